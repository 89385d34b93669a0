"""Multi-head latent attention (MLA, DeepSeek-V2/V3).

Shape legend: B batch, L sequence length, D model dim, H heads, Q query latent (q_lora_rank),
C key/value latent (kv_lora_rank), N per-head "nope" dims (no position), R per-head rotary dims,
P = R/2 rotary pairs, V per-head value dims, X = N+R query/key dims, Y = N+V.

Keys and values are compressed into one latent ``c_BLC`` per token (C << H*(N+V), which is what
an inference KV cache would store) plus one rotary key ``k_rope_BLR`` shared by all heads; the
up-projection ``wkv_b`` expands the latent into per-head no-position keys and values. Queries
are compressed the same way when ``q_lora_rank > 0``. The score of head h is

    q_nope_h . k_nope_h + rope(q_rope_h) . rope(k_rope),   scaled by 1/sqrt(N + R).

This is the training form (latents expanded before attention). The "absorbed" inference form
folds ``wkv_b`` into the query and output projections instead; it computes the same numbers.
In generation the KV cache holds only ``kv_norm(c)`` and the rotated ``k_rope`` of every slot
(fsmoe.models.kv_cache), and keys and values are re-expanded from them at each step.
``latent_norm_eps`` is the eps of ``q_norm``/``kv_norm`` (Hugging Face's DeepSeek-V3 fixes it at
1e-6 whatever its ``rms_norm_eps``); ``scale`` overrides the softmax scale (YaRN's mscale).

The up-projections (``wq_b``/``wq``, ``wkv_b``) are column-parallel by head and ``wo`` is
row-parallel under tensor parallelism; ``forward`` reads the head count from their output size.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fsmoe.models.attention import attention
from fsmoe.models.kv_cache import Attend
from fsmoe.models.norms import RMSNorm
from fsmoe.models.rope import RopeTables, apply_rope


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, *, q_lora_rank: int, kv_lora_rank: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, norm_eps: float, dropout: float,
                 scale: float | None = None):
        super().__init__()
        self.nope_dim, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.q_lora_rank, self.kv_lora_rank, self.dropout = q_lora_rank, kv_lora_rank, dropout
        qk_dim = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank > 0:
            self.wq_a = nn.Linear(d_model, q_lora_rank, bias=False)
            self.q_norm = RMSNorm(q_lora_rank, eps=norm_eps)
            self.wq_b = nn.Linear(q_lora_rank, n_heads * qk_dim, bias=False)
        else:  # DeepSeek-V2-Lite style: no query compression
            self.wq = nn.Linear(d_model, n_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(d_model, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(kv_lora_rank, eps=norm_eps)
        self.wkv_b = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.wo = nn.Linear(n_heads * v_head_dim, d_model, bias=False)
        self.scale = qk_dim ** -0.5 if scale is None else scale

    def _query(self, x_BLD: Tensor) -> Tensor:
        """[B, L, D] -> [B, L, H*(N+R)], through the query latent when there is one."""
        if self.q_lora_rank > 0:
            return self.wq_b(self.q_norm(self.wq_a(x_BLD)))
        return self.wq(x_BLD)

    def forward(self, x_BLD: Tensor, rope: RopeTables, attend: Attend | None = None) -> Tensor:
        """x_BLD: [B, L, D]; rope: (cos, sin) [L, P] or [B, L, P] over the R rotary dims; attend:
        generation's mask and compressed KV cache, None in training. Returns [B, L, D]."""
        B, L, _ = x_BLD.shape
        N, R, V = self.nope_dim, self.rope_dim, self.v_dim
        q_BLHX = self._query(x_BLD).view(B, L, -1, N + R)
        H = q_BLHX.shape[2]
        q_nope_BLHN, q_rope_BLHR = q_BLHX.split([N, R], dim=-1)
        # One latent and one rotary key per token, shared by every head.
        c_BLC, k_rope_BLR = self.wkv_a(x_BLD).split([self.kv_lora_rank, R], dim=-1)
        c_BLC = self.kv_norm(c_BLC)
        k_rope_BLR = apply_rope(k_rope_BLR.unsqueeze(2), *rope).squeeze(2)
        if attend is not None and attend.cache is not None:  # every slot so far: [B, S, C], [B, S, R]
            c_BLC, k_rope_BLR = attend.cache.write(attend.start, c_BLC, k_rope_BLR)
        S = c_BLC.shape[1]
        kv_BSHY = self.wkv_b(c_BLC).view(B, S, H, N + V)
        k_nope_BSHN, v_BSHV = kv_BSHY.split([N, V], dim=-1)
        q_BLHX = torch.cat((q_nope_BLHN, apply_rope(q_rope_BLHR, *rope)), dim=-1)
        k_BSHX = torch.cat((k_nope_BSHN, k_rope_BLR.unsqueeze(2).expand(B, S, H, R)), dim=-1)
        o_BHLV = attention(q_BLHX.transpose(1, 2), k_BSHX.transpose(1, 2), v_BSHV.transpose(1, 2), attend,
                           dropout=self.dropout if self.training else 0.0, scale=self.scale)
        return self.wo(o_BHLV.transpose(1, 2).reshape(B, L, -1))
