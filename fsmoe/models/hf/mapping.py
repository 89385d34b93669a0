"""The mapping between Hugging Face tensor names and fsmoe's, as data: one table of :class:`Rule` per
family (fsmoe/models/hf/<family>.py), expanded here over layers and experts.

Shape legend: E routed experts, D model dim, F expert hidden dim, H heads, N/R per-head no-position
and rotary dims, C latent dims, Q query latent dims.

A rule says which fsmoe tensor is made of which HF tensor(s) and how:

    copy     the same tensor
    experts  E per-expert HF matrices, each [F, D] (gate, up) or [D, F] (down), stacked and
             transposed into fsmoe's grouped layout [E, D, F] / [E, F, D]
    rope_q   DeepSeek query projection [H*(N+R), *]: within each head the R rotary rows go from
             HF's interleaved pairs (0,1),(2,3).. to fsmoe's half split (0..R/2 paired with R/2..R)
    rope_kv  DeepSeek kv_a projection [C+R, D]: the same for its last R rows

Every transform has an exact inverse (a permutation or a transpose), so HF -> fsmoe -> HF gives
the same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

from fsmoe.config import ModelConfig

KINDS = ("copy", "experts", "rope_q", "rope_kv")


@dataclass(frozen=True)
class Rule:
    """One fsmoe tensor and its HF source. ``{i}`` is the layer, ``{e}`` the expert.

    scope: ``global`` (no layer), ``layer`` (every layer), ``moe`` / ``dense`` (layers whose FFN is
    MoE / dense, see ``ModelConfig.is_moe_layer``). ``when``: the rule applies only if it holds.
    """

    ours: str
    hf: str
    kind: str = "copy"
    scope: str = "layer"
    when: Callable[[ModelConfig], bool] | None = None


@dataclass(frozen=True)
class Layout:
    """What the transforms need to know about the checkpoint besides the tensors."""

    cfg: ModelConfig
    rope_interleaved: bool = False  # DeepSeek checkpoints: rotary dims in interleaved pairs


@dataclass(frozen=True)
class Entry:
    """One expanded rule: the fsmoe tensor ``ours`` is made of the HF tensors ``hf`` (one, or E)."""

    ours: str
    hf: tuple[str, ...]
    kind: str


def expand(table: list[Rule], cfg: ModelConfig) -> list[Entry]:
    """Every (fsmoe tensor, HF tensors) pair of a model, in fsmoe's state-dict order of layers."""
    out: list[Entry] = []
    for rule in (r for r in table if r.scope == "global" and (r.when is None or r.when(cfg))):
        out.append(Entry(rule.ours, (rule.hf,), rule.kind))
    for i in range(cfg.n_layers):
        moe = cfg.is_moe_layer(i)
        for rule in table:
            if rule.scope == "global" or (rule.when is not None and not rule.when(cfg)):
                continue
            if (rule.scope == "moe" and not moe) or (rule.scope == "dense" and moe):
                continue
            experts = range(cfg.moe.num_experts) if rule.kind == "experts" else [None]
            out.append(Entry(rule.ours.format(i=i), tuple(rule.hf.format(i=i, e=e) for e in experts), rule.kind))
    return out


def _rope_perm(R: int) -> Tensor:
    """fsmoe row r of an R-dim rotary block takes HF row perm[r]: evens first, then odds."""
    return torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2)])


def _row_perm(kind: str, rows: int, layout: Layout) -> Tensor | None:
    """The row permutation of a ``rope_q``/``rope_kv`` tensor with ``rows`` rows (None: identity)."""
    cfg = layout.cfg
    if not layout.rope_interleaved:
        return None
    R, perm = cfg.qk_rope_head_dim, torch.arange(rows)
    if kind == "rope_kv":
        perm[rows - R:] = rows - R + _rope_perm(R)
        return perm
    per_head = cfg.qk_nope_head_dim + R
    for h in range(rows // per_head):
        start = h * per_head + cfg.qk_nope_head_dim
        perm[start:start + R] = start + _rope_perm(R)
    return perm


def to_ours(entry: Entry, sources: Iterable[Tensor], layout: Layout) -> Tensor:
    """The fsmoe tensor of ``entry`` from its HF tensors (in ``entry.hf`` order). ``sources`` may be
    a generator: experts are copied into the stack one by one, so only one is held besides it."""
    if entry.kind == "experts":
        out_EXY = None
        for k, w in enumerate(sources):
            if out_EXY is None:
                out_EXY = w.new_empty((len(entry.hf), w.shape[1], w.shape[0]))
            out_EXY[k] = w.t()
        return out_EXY
    (t,) = sources
    perm = _row_perm(entry.kind, t.shape[0], layout) if entry.kind in ("rope_q", "rope_kv") else None
    return t if perm is None else t[perm].contiguous()


def to_hf(entry: Entry, ours: Tensor, layout: Layout) -> list[Tensor]:
    """The HF tensors of ``entry`` (in ``entry.hf`` order) from the fsmoe tensor: ``to_ours``'s inverse."""
    if entry.kind == "experts":
        return [w.t().contiguous() for w in ours]
    perm = _row_perm(entry.kind, ours.shape[0], layout) if entry.kind in ("rope_q", "rope_kv") else None
    return [ours if perm is None else ours[torch.argsort(perm)].contiguous()]


def hf_shape(entry: Entry, ours_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape each HF tensor of ``entry`` must have, given the fsmoe tensor's shape."""
    if entry.kind == "experts":
        return (ours_shape[2], ours_shape[1])
    return tuple(ours_shape)
