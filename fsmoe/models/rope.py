"""Rotary position embedding (RoPE), half-split convention.

Shape legend: B batch, L sequence length, H heads, R rotated dims (even), P = R/2 rotation pairs.

Dimension i of the first half is paired with dimension i + R/2 (the convention of the Hugging Face
Llama/Mixtral/Qwen3 checkpoints; DeepSeek's reference code pairs neighbours instead, which is the
same rotation on permuted weights, so a checkpoint converter permutes ``wq``/``wkv_a`` rows).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fsmoe.config import RopeScalingConfig

RopeTables = tuple[Tensor, Tensor]  # (cos_LP, sin_LP), float32


def yarn_mscale(factor: float, m: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 m ln(factor) + 1 (1 when not stretched)."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def inv_frequencies(rot_dim: int, theta: float, scaling: RopeScalingConfig | None) -> tuple[Tensor, float]:
    """(inverse frequency of each pair [P] float64, factor on cos/sin). Plain RoPE: theta^(-2i/R), 1.
    YaRN: each pair's frequency blended between theta^(-2i/R) / factor (pairs that turn fewer than
    ``beta_slow`` times over the original context) and theta^(-2i/R) (more than ``beta_fast``)."""
    inv_P = theta ** (-torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    if scaling is None or scaling.kind == "none":
        return inv_P, 1.0
    s = scaling

    def dim_of(rotations: float) -> float:  # the dim whose pair turns `rotations` times over the context
        return rot_dim * math.log(s.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot_dim - 1)
    ramp_P = ((torch.arange(rot_dim // 2, dtype=torch.float64) - low) / ((high - low) or 0.001)).clamp(0, 1)
    keep_P = 1 - ramp_P  # 1: original frequency (fast pairs), 0: interpolated (slow pairs)
    inv_P = inv_P / s.factor * (1 - keep_P) + inv_P * keep_P
    attention = (yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
                 if s.mscale and s.mscale_all_dim else yarn_mscale(s.factor))
    return inv_P, attention


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables ``[max_seq_len, P]`` as non-persistent buffers (they are derived
    from the config, so checkpoints need not carry them)."""

    def __init__(self, rot_dim: int, max_seq_len: int, theta: float, scaling: RopeScalingConfig | None = None):
        super().__init__()
        self.rot_dim, self.max_seq_len, self.theta, self.scaling = rot_dim, max_seq_len, theta, scaling
        self.register_buffer("cos_LP", torch.empty(max_seq_len, rot_dim // 2), persistent=False)
        self.register_buffer("sin_LP", torch.empty(max_seq_len, rot_dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)compute the tables, e.g. after ``to_empty`` moved a meta-built model to a device."""
        if self.cos_LP.is_meta:
            return
        dev = self.cos_LP.device
        inv_freq_P, magnitude = inv_frequencies(self.rot_dim, self.theta, self.scaling)
        angle_LP = torch.arange(self.max_seq_len, device=dev, dtype=torch.float64)[:, None] * inv_freq_P.to(dev)
        self.cos_LP.copy_(angle_LP.cos() * magnitude)
        self.sin_LP.copy_(angle_LP.sin() * magnitude)

    def forward(self, seq_len: int) -> RopeTables:
        """Returns (cos_LP, sin_LP) for positions 0..seq_len-1, float32."""
        return self.cos_LP[:seq_len].float(), self.sin_LP[:seq_len].float()

    def at(self, pos_BL: Tensor) -> RopeTables:
        """(cos_BLP, sin_BLP) for each row's own positions ``pos_BL`` [B, L] (generation), float32.
        The positions must be < max_seq_len: the decoder checks the slots on the host before, so
        this needs no device-to-host read (a decode step stays capturable in a CUDA graph)."""
        return self.cos_LP[pos_BL].float(), self.sin_LP[pos_BL].float()


def apply_rope(x_BLHR: Tensor, cos_LP: Tensor, sin_LP: Tensor) -> Tensor:
    """Rotate each pair (x[i], x[i + R/2]) by angle pos * theta^(-2i/R). Computed in float32
    (bf16 angles lose the low-frequency pairs), returned in x's dtype. The tables are [L, P]
    (every row at positions 0..L-1) or [B, L, P] (each row its own positions)."""
    x1, x2 = x_BLHR.float().chunk(2, dim=-1)
    cos, sin = cos_LP.unsqueeze(-2), sin_LP.unsqueeze(-2)  # [(B,) L, 1, P]: broadcast over H
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x_BLHR.dtype)
