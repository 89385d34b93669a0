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
    p.add_argument("--cpu-on-device", choices=["auto", "on", "off"], default="auto",
                   help="with scheinfer, small forwards on the device path hand a share of their routed "
                        "non-resident experts to the CPU through pinned memory, without a host round trip (the "
                        "share measured at placement, 0 where the CPU does not help). auto (default): wherever "
                        "the in-place kernels run in bf16 and the native CPU kernel builds")
