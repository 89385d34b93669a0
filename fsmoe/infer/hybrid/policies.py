"""Placement policies: which experts are resident (GG) and how a forward's other experts are split.

========== =================================================== =========================================
policy     resident on the GPU                                 the other experts, per layer and forward
========== =================================================== =========================================
scheinfer  the hottest experts that fit                        CC or CG chosen by the lane model, checked
                                                               against the clock (:mod:`.race`); with the
                                                               in-place kernels, a small forward size that
                                                               streaming won on the device alone
model      the hottest experts that fit                        CC or CG chosen by the lane model alone
llamacpp   whole layers, the last ones first (--n-cpu-moe)     CPU; the layer's whole expert tensor is
                                                               streamed when the batch has >= 32 tokens
fiddler    the hottest experts that fit                        CC (the activations go to the CPU)
stream     the hottest experts that fit                        CG (every one streamed; with the in-place
                                                               kernels, small forwards on the device alone)
static:Q   the hottest experts that fit                        a fixed set, the hottest share Q of them,
                                                               CG; the others CC
gpu        every expert (the upper bound, when it fits)        -
========== =================================================== =========================================
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fsmoe.config import ConfigError
from fsmoe.infer.hybrid.partition import LaneCosts, Split, best_split, forced_split

POLICY_NAMES = ("scheinfer", "model", "llamacpp", "fiddler", "stream", "static:Q", "gpu")
LLAMACPP_MIN_BATCH = 32  # llama.cpp's CUDA backend takes over a CPU-held op from this many tokens


@dataclass(frozen=True)
class Policy:
    name: str
    residency: str  # fsmoe.infer.hybrid.residency granularity
    rule: str  # adaptive | cpu | stream | threshold | static
    share: float = 0.0  # static: share of the non-resident experts streamed
    race: bool = False  # adaptive: race the model's split against all-CG and all-CC (fsmoe.infer.hybrid.race)
    # with the in-place kernels on, small forwards run on the device alone (fsmoe.infer.hybrid.in_place):
    # no token count reaches the host, so no routing frequencies are counted either (race policies:
    # the sizes whose race streaming won)
    device_only: bool = False

    def split(self, counts_E, resident_E, costs: LaneCosts, num_tokens: int, hot_E) -> Split:
        """counts_E [E] tokens per expert this forward, resident_E [E] bool, hot_E [E] recorded
        frequencies of this layer."""
        counts_E = np.asarray(counts_E)
        nonres = ~np.asarray(resident_E, dtype=bool)
        if self.rule in ("adaptive", "stream", "cpu"):
            return candidate_split({"adaptive": "model"}.get(self.rule, self.rule), counts_E, resident_E, costs)
        if self.rule == "threshold":
            big = num_tokens >= LLAMACPP_MIN_BATCH
            return forced_split(counts_E, resident_E, costs, nonres & big, stream_idle=True)
        if self.rule == "static":
            cand = np.flatnonzero(nonres)
            keep = cand[np.lexsort((cand, -np.asarray(hot_E)[cand]))][:round(self.share * len(cand))]
            cg = np.zeros_like(nonres)
            cg[keep] = True
            return forced_split(counts_E, resident_E, costs, cg)
        raise AssertionError(self.rule)


def candidate_split(name: str, counts_E, resident_E, costs: LaneCosts) -> Split:
    """``model``: the lane model's split; ``stream``: every non-resident expert CG; ``cpu``: every one CC."""
    if name == "model":
        return best_split(counts_E, resident_E, costs)
    nonres = ~np.asarray(resident_E, dtype=bool)
    return forced_split(counts_E, resident_E, costs, nonres if name == "stream" else np.zeros_like(nonres))


def parse_policy(name: str, field: str = "--policy") -> Policy:
    """A policy from its name (see the table above); a bad name is a ConfigError naming ``field`` and
    the allowed ones."""
    fixed = {"scheinfer": Policy("scheinfer", "expert", "adaptive", race=True),
             "model": Policy("model", "expert", "adaptive"),
             "llamacpp": Policy("llamacpp", "layer", "threshold"),
             "fiddler": Policy("fiddler", "expert", "cpu"),
             "stream": Policy("stream", "expert", "stream", device_only=True),
             "gpu": Policy("gpu", "all", "cpu")}
    if name in fixed:
        return fixed[name]
    if name.startswith("static:"):
        try:
            share = float(name.split(":", 1)[1])
        except ValueError:
            share = -1.0
        if 0.0 <= share <= 1.0:
            return Policy(name, "expert", "static", share)
    raise ConfigError(field, name, f"allowed: {list(POLICY_NAMES)} (Q in [0, 1], e.g. static:0.5)")
