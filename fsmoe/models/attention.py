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

from fsmoe.models.kv_cache import Attend
from fsmoe.models.norms import RMSNorm
from fsmoe.models.rope import RopeTables, apply_rope


def attention(q_BHLX: Tensor, k_BGSX: Tensor, v_BGSV: Tensor, attend: Attend | None, *, dropout: float,
              scale: float | None = None) -> Tensor:
    """Scaled dot-product attention of L queries over S keys ([B, heads, len, dim] each; G key
    heads may be fewer than H query heads). ``attend`` None: causal, S == L (training); else its
    mask. Returns [B, H, L, V]."""
    mask = None if attend is None else attend.mask_B1LS
    return F.scaled_dot_product_attention(q_BHLX, k_BGSX, v_BGSV, attn_mask=mask, is_causal=attend is None,
                                          dropout_p=dropout, scale=scale,
                                          enable_gqa=q_BHLX.shape[1] != k_BGSX.shape[1])


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

    def forward(self, x_BLD: Tensor, rope: RopeTables | None, attend: Attend | None = None) -> Tensor:
        """x_BLD: [B, L, D]; rope: (cos, sin) [L, P] or [B, L, P], or None; attend: generation's
        mask and KV cache (fsmoe.models.kv_cache), None in training. Returns [B, L, D]."""
        B, L, _ = x_BLD.shape
        q_BLHK = self.wq(x_BLD).view(B, L, -1, self.head_dim)
        k_BLGK = self.wk(x_BLD).view(B, L, -1, self.head_dim)
        v_BLGK = self.wv(x_BLD).view(B, L, -1, self.head_dim)
        if self.q_norm is not None:
            q_BLHK, k_BLGK = self.q_norm(q_BLHK), self.k_norm(k_BLGK)
        if rope is not None:
            q_BLHK, k_BLGK = apply_rope(q_BLHK, *rope), apply_rope(k_BLGK, *rope)
        if attend is not None and attend.cache is not None:  # keys/values of every slot so far: [B, S, G, K]
            k_BLGK, v_BLGK = attend.cache.write(attend.start, k_BLGK, v_BLGK)
        o_BHLK = attention(q_BLHK.transpose(1, 2), k_BLGK.transpose(1, 2), v_BLGK.transpose(1, 2), attend,
                           dropout=self.dropout if self.training else 0.0)
        return self.wo(o_BHLK.transpose(1, 2).reshape(B, L, -1))
