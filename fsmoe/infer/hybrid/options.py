"""The device path's command-line switches, as ``fsmoe infer`` and ``fsmoe bench infer`` take them
(resolved by :func:`fsmoe.infer.hybrid.zero_copy.resolve` and :func:`fsmoe.infer.hybrid.mailbox.resolve`)."""
from __future__ import annotations

import argparse


def add_device_path_options(p: argparse.ArgumentParser) -> None:
    """``--zero-copy`` and ``--cpu-on-device``, as ``fsmoe infer`` and ``fsmoe bench infer`` take them."""
    p.add_argument("--zero-copy", choices=["on", "off"], default=None,
                   help="a small forward's streamed experts read in place by the GPU from pinned host memory, "
                        "and with the stream policy (scheinfer once streaming wins its race) decode steps on the "
                        "device alone (default: on where CUDA and Triton are; FSMOE_ZERO_COPY=0 turns it off)")
    p.add_argument("--cpu-on-device", choices=["on", "off"], default="off",
                   help="with scheinfer, small forwards on the device path also compute a share of the "
                        "non-resident experts on the CPU, handed over through pinned memory without a host "
                        "round trip (the share measured at placement). Needs the in-place kernels and bf16; "
                        "off by default until measured on a GPU")
