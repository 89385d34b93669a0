"""Causal self-attention with grouped-query heads (GPT-2, Mixtral, Qwen3).

Shape legend: B batch, L sequence length, D model dim, H query heads, G key/value heads
(H % G == 0; G == H is plain multi-head attention), K head dim, P rotary pairs.

q/k/v/o are separate ``nn.Linear`` modules so tensor parallelism can shard them by module
replacement (q/k/v column-wise by head, o row-wise). ``forward`` therefore reads the number of
heads from the projection's output size, never from the config: a shard simply has fewer heads.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fsmoe.models.norms import RMSNorm
from fsmoe.models.rope import RopeTables, apply_rope


class Attention(nn.Module):
    """Multi-head / grouped-query attention.

    ``qk_norm`` (Qwen3) applies an RMSNorm over the head dim to q and k before RoPE, which keeps
    the attention logits bounded as training goes on.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, bias: bool,
                 qk_norm: bool, norm_eps: float, dropout: float):
        super().__init__()
        self.head_dim, self.dropout = head_dim, dropout
        self.wq = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.wk = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.wv = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.wo = nn.Linear(n_heads * head_dim, d_model, bias=bias)
        self.q_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None

    def forward(self, x_BLD: Tensor, rope: RopeTables | None) -> Tensor:
        """x_BLD: [B, L, D]; rope: (cos_LP, sin_LP) or None. Returns [B, L, D]."""
        B, L, _ = x_BLD.shape
        q_BLHK = self.wq(x_BLD).view(B, L, -1, self.head_dim)
        k_BLGK = self.wk(x_BLD).view(B, L, -1, self.head_dim)
        v_BLGK = self.wv(x_BLD).view(B, L, -1, self.head_dim)
        if self.q_norm is not None:
            q_BLHK, k_BLGK = self.q_norm(q_BLHK), self.k_norm(k_BLGK)
        if rope is not None:
            q_BLHK, k_BLGK = apply_rope(q_BLHK, *rope), apply_rope(k_BLGK, *rope)
        o_BHLK = F.scaled_dot_product_attention(
            q_BLHK.transpose(1, 2), k_BLGK.transpose(1, 2), v_BLGK.transpose(1, 2), is_causal=True,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=q_BLHK.shape[2] != k_BLGK.shape[2])
        return self.wo(o_BHLK.transpose(1, 2).reshape(B, L, -1))
