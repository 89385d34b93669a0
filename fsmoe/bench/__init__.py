"""``fsmoe bench``: speed measurements on one device.

``fsmoe bench layer``  forward+backward of one MoE layer vs the dense ceiling and peers (layer.py)
``fsmoe bench train``  tokens/s and MFU of full training steps of a GPT-MoE model (train.py)

Both print a table and, with ``--json PATH``, write what scripts/perf_page.py turns into
docs/performance.md.
"""
from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from fsmoe.bench import layer, train

    p = subparsers.add_parser("bench", help="measure layer and training-step speed on this device")
    sub = p.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    pl = sub.add_parser("layer", help="fwd+bwd of one MoE layer vs dense ceiling, HF loop, grouped_mm, torchtitan")
    layer.add_arguments(pl)
    pl.set_defaults(func=layer.run)
    pt = sub.add_parser("train", help="tokens/s and MFU of a GPT-MoE training step (vs torchtitan)")
    train.add_arguments(pt)
    pt.set_defaults(func=train.run)
    from fsmoe.bench import schedule as schedule_bench

    ps = sub.add_parser("schedule", help="FSMoE layer grid under the five schedules (multi-process)")
    schedule_bench.add_arguments(ps)
    ps.set_defaults(func=schedule_bench.run)
