"""What a fabric costs: used ports counted per component, times a price (TopoOpt's and mFabric's
method: only the ports the cluster uses are paid for).

Default prices (USD) are the ones the mFabric/MixNet authors publish with their cost calculator
("Default values are from the paper": https://github.com/mixnet-project/mixnet-project.github.io,
``src/components/CostTable.vue``): per transceiver, NIC, electrical switch port at each line rate,
an optical circuit switch port ($520) and a patch-panel port ($100) at any rate, and fiber at
$0.3 per metre, counted here at 500 m per link as their calculator does. Pass your own ``Prices``
for your quotes.

Counts (N = NIC ports on the fabric, o = oversubscription at the leaf):

* electrical fat-tree: N NICs; leaf ports N down + N / o up, and N / o ports per tier above
  (two tiers up to ``radix**2 / 2`` NIC ports, else three); one fibre and two transceivers per
  link (N host links + N / o per tier above). Rail-optimised fabrics use the same parts.
* mFabric: an electrical fat-tree on the servers' EPS NICs, and per OCS NIC: the NIC, one
  transceiver, one fibre and one OCS port (the circuit switch is optical end to end).
* static optical (TopoOpt-like): the same, with a patch-panel port instead of an OCS port.
"""
from __future__ import annotations

from dataclasses import dataclass

from fsmoe.config import ConfigError

FIBER_M = 500.0


@dataclass(frozen=True)
class Prices:
    transceiver: float
    nic: float
    switch_port: float
    ocs_port: float = 520.0
    patch_port: float = 100.0
    fiber_per_m: float = 0.3

    @staticmethod
    def at(gbps: float) -> "Prices":
        table = {100: (99, 659, 187), 200: (239, 1079, 374), 400: (659, 1499, 1090), 800: (1399, 2248, 1400)}
        if int(gbps) not in table:
            raise ConfigError("--nic-gbps", gbps, f"has no default prices; allowed: {sorted(table)}")
        return Prices(*map(float, table[int(gbps)]))


@dataclass(frozen=True)
class Bill:
    """Component counts and the total."""

    nics: float
    transceivers: float
    switch_ports: float
    ocs_ports: float
    patch_ports: float
    fibers: float
    usd: float

    def per_gpu(self, gpus: int) -> float:
        return self.usd / gpus

    def __add__(self, other: "Bill") -> "Bill":
        return Bill(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))


def _bill(p: Prices, nics=0.0, xcvr=0.0, ports=0.0, ocs=0.0, patch=0.0, fibers=0.0) -> Bill:
    usd = (nics * p.nic + xcvr * p.transceiver + ports * p.switch_port + ocs * p.ocs_port + patch * p.patch_port
           + fibers * FIBER_M * p.fiber_per_m)
    return Bill(nics, xcvr, ports, ocs, patch, fibers, usd)


def fat_tree_bill(nic_ports: int, prices: Prices, oversub: float = 1.0, radix: int = 64) -> Bill:
    """An electrical fat-tree (leaf-spine, or three tiers when two cannot reach) for ``nic_ports``."""
    if oversub < 1 or radix < 2:
        raise ConfigError("--oversub", oversub, "must be >= 1 (with a switch radix >= 2)")
    n = float(nic_ports)
    tiers = 2 if n <= radix * radix / 2 else 3
    up = n / oversub
    links = n + (tiers - 1) * up
    return _bill(prices, nics=n, xcvr=2 * links, ports=n + 2 * (tiers - 1) * up, fibers=links)


def optical_bill(ocs_nic_ports: int, eps_nic_ports: int, prices: Prices, static: bool = False,
                 radix: int = 64) -> Bill:
    """mFabric (OCS ports) or a static optical topology (patch-panel ports) beside an electrical
    fat-tree for the EPS NICs."""
    eps = fat_tree_bill(eps_nic_ports, prices, 1.0, radix)
    n = float(ocs_nic_ports)
    opt = _bill(prices, nics=n, xcvr=n, ocs=0 if static else n, patch=n if static else 0, fibers=n)
    return eps + opt


def fabric_bill(fabric, prices: Prices, radix: int = 64) -> Bill:
    """The bill of a ``LeafSpine`` (one NIC per GPU, its oversubscription) or a ``RegionalOCS``
    (its OCS and EPS NICs per server; patch panels when static)."""
    from fsmoe.sim.optical import RegionalOCS

    if isinstance(fabric, RegionalOCS):
        return optical_bill(fabric.servers * fabric.ocs_ports, fabric.servers * fabric.eps_ports, prices,
                            fabric.static, radix)
    return fat_tree_bill(fabric.gpus, prices, fabric.oversub, radix)
