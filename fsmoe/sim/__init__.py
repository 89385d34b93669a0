"""Simulation beyond the machines we have: flow-level fabric simulation (``flows``) over
datacenter topologies (``fabrics``), driven by collective traffic patterns (``patterns``)."""
