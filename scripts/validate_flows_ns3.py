"""The flow-level simulator (fsmoe.sim.flows) against ns-3, a packet-level simulator, on small
topologies: TCP flows through one switch, each host on its own full-duplex link.

Needs the ``ns3`` wheel (ns-3.44's Python bindings through cppyy) and numpy/scipy in the same
interpreter; not part of the test suite (ns-3's first import compiles for about 20 s):

    python3 -m venv /tmp/ns3v && /tmp/ns3v/bin/pip install ns3 numpy scipy
    PYTHONPATH=. /tmp/ns3v/bin/python scripts/validate_flows_ns3.py --json ns3_validation.json

Each case: hosts with link rates (Gb/s, both directions), flows (source, destination, MB). ns-3
runs TCP bulk transfers (1448-byte segments, queues deep enough not to drop, 10 us links);
the flow simulator runs the same flows on the same links (host up and down at the link rate).
Compared: each flow's completion time. TCP carries its headers (54 of 1502 bytes on the wire, 3.6%)
and starts slowly; the flow model has neither, so ns-3 is expected a few percent slower.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from fsmoe.sim.flows import incidence, simulate

CASES = {
    # two flows into one receiver: each gets half of its link
    "single bottleneck": ([1, 1, 1], [(0, 2, 10), (1, 2, 10)]),
    # max-min: host 0's slow link limits A; B and C share host 1's link; A takes the rest later
    "max-min, three flows": ([0.25, 1, 1, 1], [(0, 2, 10), (1, 2, 10), (1, 3, 10)]),
    # incast: four senders into one receiver
    "incast 4 -> 1": ([1, 1, 1, 1, 1], [(i, 4, 5) for i in range(4)]),
    # a finished flow frees its share: a short and a long flow on one link
    "short and long flow": ([1, 1, 1], [(0, 2, 2), (1, 2, 10)]),
    # two switches of four hosts joined by one 1 Gb/s link (4:1 oversubscribed): an AlltoAll of 8
    "AlltoAll over an oversubscribed link": ([1] * 8, [(s, d, 1) for s in range(8) for d in range(8) if s != d],
                                             (4, 1.0)),
}


def flow_model(rates_gbps, flows, split=None) -> list[float]:
    """Completion seconds of each flow: host h's uplink is link h, its downlink link H + h; with
    ``split = (k, gbps)`` hosts below k hang off a first switch, the others off a second, joined by
    links 2H (first -> second) and 2H + 1 (back) of ``gbps``."""
    H = len(rates_gbps)
    cap = list(rates_gbps) * 2
    routes = []
    for s, d, _ in flows:
        r = [s, H + d]
        if split is not None and (s < split[0]) != (d < split[0]):
            r.append(2 * H if s < split[0] else 2 * H + 1)
        routes.append(np.array(r))
    if split is not None:
        cap += [split[1], split[1]]
    res = simulate(incidence(routes, len(cap)), np.array(cap) * 1e9 / 8, np.array([mb * 1e6 for _, _, mb in flows]))
    return res.finish_s.tolist()


def _link(ns, a, b, gbps):
    p2p = ns.PointToPointHelper()
    p2p.SetDeviceAttribute("DataRate", ns.StringValue(f"{gbps * 1000:g}Mbps"))
    p2p.SetChannelAttribute("Delay", ns.StringValue("10us"))
    p2p.SetQueue("ns3::DropTailQueue", "MaxSize", ns.StringValue("100000p"))
    pair = ns.NodeContainer()
    pair.Add(a)
    pair.Add(b)
    return p2p.Install(pair)


def packet_model(rates_gbps, flows, split=None) -> list[float]:
    """Completion seconds of each flow in ns-3 (the last byte received)."""
    from ns import ns

    ns.Ipv4AddressGenerator.Reset()
    ns.Config.SetDefault("ns3::TcpSocket::SegmentSize", ns.UintegerValue(1448))
    ns.Config.SetDefault("ns3::TcpSocket::SndBufSize", ns.UintegerValue(1 << 22))
    ns.Config.SetDefault("ns3::TcpSocket::RcvBufSize", ns.UintegerValue(1 << 22))
    H = len(rates_gbps)
    hosts, switch = ns.NodeContainer(), ns.NodeContainer()
    hosts.Create(H)
    switch.Create(2 if split else 1)
    stack = ns.InternetStackHelper()
    stack.Install(hosts)
    stack.Install(switch)
    addr = ns.Ipv4AddressHelper()
    ips = []
    for h, rate in enumerate(rates_gbps):
        sw = switch.Get(1 if split and h >= split[0] else 0)
        devs = _link(ns, hosts.Get(h), sw, rate)
        addr.SetBase(ns.Ipv4Address(f"10.0.{h}.0"), ns.Ipv4Mask("255.255.255.0"))
        ips.append(addr.Assign(devs).GetAddress(0))
    if split:
        addr.SetBase(ns.Ipv4Address("10.1.0.0"), ns.Ipv4Mask("255.255.255.0"))
        addr.Assign(_link(ns, switch.Get(0), switch.Get(1), split[1]))
    ns.Ipv4GlobalRoutingHelper.PopulateRoutingTables()
    port0 = 5000
    for i, (s, d, mb) in enumerate(flows):
        port = port0 + i
        sink = ns.PacketSinkHelper("ns3::TcpSocketFactory",
                                   ns.InetSocketAddress(ns.Ipv4Address.GetAny(), port).ConvertTo())
        sink.Install(hosts.Get(d)).Start(ns.Seconds(0.0))
        src = ns.BulkSendHelper("ns3::TcpSocketFactory", ns.InetSocketAddress(ips[d], port).ConvertTo())
        src.SetAttribute("MaxBytes", ns.UintegerValue(int(mb * 1e6)))
        src.Install(hosts.Get(s)).Start(ns.Seconds(0.0))
    fm_helper = ns.FlowMonitorHelper()
    monitor = fm_helper.InstallAll()
    ns.Simulator.Stop(ns.Seconds(30.0))
    ns.Simulator.Run()
    monitor.CheckForLostPackets()
    classifier = fm_helper.GetClassifier()
    stats = monitor.GetFlowStats()
    done = {}
    for fid, st in stats:
        t = classifier.FindFlow(fid)
        if t.destinationPort >= port0 and st.rxBytes > 0:
            done[t.destinationPort - port0] = st.timeLastRxPacket.GetSeconds()
    ns.Simulator.Destroy()
    return [done.get(i, float("nan")) for i in range(len(flows))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = {}
    for name, (rates, flows, *split) in CASES.items():
        split = split[0] if split else None
        fm, pk = flow_model(rates, flows, split), packet_model(rates, flows, split)
        out[name] = {"flows": flows, "rates_gbps": rates, "flow_model_s": fm, "ns3_s": pk,
                     "ns3_over_flow_model": [p / f for p, f in zip(pk, fm)]}
        print(f"{name}:")
        for (s, d, mb), f, p in list(zip(flows, fm, pk))[:6]:
            print(f"  {s} -> {d} {mb:g} MB: flow model {f * 1e3:8.3f} ms, ns-3 {p * 1e3:8.3f} ms ({p / f:.3f}x)")
        r = np.array(out[name]["ns3_over_flow_model"])
        print(f"  all {len(r)} flows: ns-3 / flow model {r.min():.3f} .. {r.max():.3f} (median {np.median(r):.3f}); "
              f"last flow {max(pk) * 1e3:.3f} vs {max(fm) * 1e3:.3f} ms ({max(pk) / max(fm):.3f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
