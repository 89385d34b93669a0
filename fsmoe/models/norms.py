"""Normalisation layers of the two families: LayerNorm (gpt) and RMSNorm (llama).

``RMSNorm`` computes in float32 whatever the input dtype: under bf16 autocast the input is bf16
while the weight stays float32, which torch's fused kernel refuses (it falls back to a slow path
and warns), and the mean of squares is better taken in float32 anyway.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fsmoe.config import ModelConfig


class RMSNorm(nn.RMSNorm):
    def forward(self, x: Tensor) -> Tensor:
        """x: [..., dim] -> same shape and dtype."""
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).to(x.dtype)


def build_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.arch == "gpt":
        return nn.LayerNorm(dim, eps=cfg.norm_eps)
    return RMSNorm(dim, eps=cfg.norm_eps)
