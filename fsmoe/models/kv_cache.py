"""KV cache for generation, and how the new tokens of one forward attend.

Shape legend: B batch, S cache slots (prompt + generated tokens), L new tokens of this forward,
G key/value heads, K head dim, C MLA key/value latent (kv_lora_rank), R MLA rotary dims.

A batch of prompts of different lengths is left-padded to one length, so every row writes its
t-th new token into the same slot; row b's first ``pad_B[b]`` slots are padding. Slot s of row b
holds RoPE position ``s - pad_B[b]`` and may be attended by a query at slot t when
``pad_B[b] <= s <= t``. A padding query attends to itself only, so its (discarded) row stays finite.

``start`` (the slot of a forward's first new token) is a Python int, or a 0-dim int64 tensor on
the model's device: then every shape and address is the same whatever the slot (the new slots are
written with ``index_copy_``, attention reads every slot of the cache and the mask hides those not
written yet), so a decode step can be captured once in a CUDA graph and replayed
(fsmoe.infer.decode_graph).

What one layer caches per slot:

    attention='mha'  k (after qk-norm and RoPE) and v: [B, S, G, K] each
    attention='mla'  the compressed latent after kv_norm [B, S, C] and the rotated shared key
                     [B, S, R]: C + R numbers per token instead of H * (N + R + V), the
                     compressed cache of DeepSeek-V2/V3; keys and values are re-expanded from it
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

Start = int | Tensor  # slot of a forward's first new token: an int, or a 0-dim device tensor (static shapes)


@dataclass
class LayerCache:
    """One layer's cache buffers, filled slot by slot (mutable: :meth:`write` fills them in place)."""

    first: Tensor  # mha: k_BSGK; mla: latent c_BSC
    second: Tensor  # mha: v_BSGK; mla: k_rope_BSR

    def write(self, start: Start, first_new: Tensor, second_new: Tensor) -> tuple[Tensor, Tensor]:
        """Store L new slots at ``[start, start + L)``; returns both buffers up to ``start + L``
        (an int ``start``) or whole (a tensor ``start``: static shapes, the mask hides the rest)."""
        if isinstance(start, Tensor):
            slots_L = torch.arange(first_new.shape[1], device=start.device) + start
            self.first.index_copy_(1, slots_L, first_new.to(self.first.dtype))  # as slice assignment casts
            self.second.index_copy_(1, slots_L, second_new.to(self.second.dtype))
            return self.first, self.second
        end = start + first_new.shape[1]
        self.first[:, start:end] = first_new
        self.second[:, start:end] = second_new
        return self.first[:, :end], self.second[:, :end]


@dataclass(frozen=True)
class Attend:
    """How the L new tokens of one forward attend (None in training: plain causal attention)."""

    start: Start  # slot of the first new token
    mask_B1LS: Tensor  # bool [B, 1, L, S]: True where a query may attend a slot (S = start + L for an int start)
    cache: LayerCache | None  # this layer's cache; None = attend only to the tokens of this forward


def attend_mask(pad_B: Tensor, start: Start, L: int, slots: int | None = None) -> Tensor:
    """bool [B, 1, L, S]: query slot t = start + i attends slot s iff pad_B[b] <= s <= t, and always
    itself (a padding query would otherwise attend nothing). S = start + L for an int ``start``,
    else ``slots`` (the whole cache)."""
    s_S = torch.arange(start + L if isinstance(start, int) else slots, device=pad_B.device)
    t_L1 = (torch.arange(L, device=pad_B.device) + start)[:, None]
    ok_BLS = (s_S[None, None] >= pad_B[:, None, None]) & (s_S[None, None] <= t_L1[None])
    return (ok_BLS | (s_S[None, None] == t_L1[None])).unsqueeze(1)


def positions(pad_B: Tensor, start: Start, L: int) -> Tensor:
    """RoPE positions [B, L] of slots ``start .. start + L - 1`` (0 on padding slots)."""
    pos_BL = (torch.arange(L, device=pad_B.device) + start)[None] - pad_B[:, None]
    return pos_BL.clamp(min=0)


class KVCache:
    """The cache of every layer of a decoder for ``batch`` rows of up to ``slots`` tokens."""

    def __init__(self, layers: list[LayerCache]):
        self.layers = layers

    @staticmethod
    def for_model(model, batch: int, slots: int, dtype: torch.dtype | None = None) -> "KVCache":
        """Empty buffers sized from ``model.cfg`` (a :class:`fsmoe.models.MoEDecoder`)."""
        cfg = model.cfg
        dtype = dtype or next(model.parameters()).dtype
        device = next(model.parameters()).device

        def buf(*shape: int) -> Tensor:
            return torch.zeros(batch, slots, *shape, dtype=dtype, device=device)

        if cfg.attention == "mla":
            layers = [LayerCache(buf(cfg.kv_lora_rank), buf(cfg.qk_rope_head_dim)) for _ in range(cfg.n_layers)]
        else:
            layers = [LayerCache(buf(cfg.kv_heads, cfg.head_size), buf(cfg.kv_heads, cfg.head_size))
                      for _ in range(cfg.n_layers)]
        return KVCache(layers)

    @property
    def slots(self) -> int:
        return self.layers[0].first.shape[1] if self.layers else 0

    def bytes_per_token(self) -> int:
        """Cache bytes one token takes over all layers (what the compressed MLA cache saves)."""
        return sum((c.first[0, 0].numel() + c.second[0, 0].numel()) * c.first.element_size() for c in self.layers)
