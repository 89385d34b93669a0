"""Which routed experts live on the GPU (class GG), given how many fit and how hot each one is.

``hot_LE`` [L, E] are routing frequencies (tokens each expert received per MoE layer, recorded in
an earlier run or in a calibration pass); ``slots`` is how many experts the GPU memory budget
holds after attention, KV cache and buffers (:mod:`.memory`). Granularities:

* ``expert``: the ``slots`` hottest (layer, expert) pairs of the whole model (each layer sees the
  same tokens, so raw counts compare across layers);
* ``layer``: whole layers, the last ones first, as llama.cpp's ``--n-cpu-moe N`` keeps the first
  N layers' experts on the CPU;
* ``none`` / ``all``: nothing or everything.
"""
from __future__ import annotations

import numpy as np

GRANULARITIES = ("expert", "layer", "none", "all")


def resident_experts(hot_LE, slots: int, by: str = "expert") -> np.ndarray:
    """bool [L, E]: True where the expert is kept on the GPU."""
    hot_LE = np.asarray(hot_LE, dtype=np.float64)
    L, E = hot_LE.shape
    out = np.zeros((L, E), dtype=bool)
    slots = max(0, min(int(slots), L * E))
    if by == "all":
        out[:] = True
    elif by == "layer":
        n = slots // E
        if n:
            out[L - n:] = True
    elif by == "expert":
        # Hottest first; ties go to the earlier (layer, expert) so the choice is deterministic.
        order = np.lexsort((np.arange(L * E), -hot_LE.reshape(-1)))
        out.reshape(-1)[order[:slots]] = True
    elif by != "none":
        raise ValueError(f"residency granularity {by!r}; allowed: {list(GRANULARITIES)}")
    return out
