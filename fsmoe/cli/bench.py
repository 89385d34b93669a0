"""``fsmoe bench layer|train|schedule|dispatch|placement|infer``: the benchmarks of fsmoe.bench."""
from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from fsmoe.bench import dispatch, infer, layer, placement, schedule, train

    p = subparsers.add_parser("bench", help="measure layer, training-step and schedule speed on this device")
    sub = p.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    for name, module, text in (
            ("layer", layer, "fwd+bwd of one MoE layer vs dense ceiling, HF loop, grouped_mm, torchtitan"),
            ("train", train, "tokens/s, MFU and peak memory of fsmoe train's step (vs torchtitan's MoE)"),
            ("schedule", schedule, "FSMoE layer grid under the five schedules (multi-process)"),
            ("dispatch", dispatch, "dispatch + combine time and bytes per level: flat, 2DH, HierMoE d-level dedup"),
            ("placement", placement, "static vs FlexMoE vs EPLB-style expert placement under skewed routing "
                                     "(multi-process), or replayed on a routing trace"),
            ("infer", infer, "hybrid CPU/GPU inference under a GPU memory budget: every expert placement policy")):
        parser = sub.add_parser(name, help=text)
        module.add_arguments(parser)
        parser.set_defaults(func=module.run)
