"""Sharded optimizer state (``parallel.shard = "optimizer"``, ZeRO stage 1; stage 2 with fsmoe.parallel.zero_grads).

Without it every rank keeps AdamW's two fp32 moments for every parameter it holds: 8 bytes per
element beside the 4-byte weight and 4-byte gradient. With it, the ranks that hold the same
shard of a parameter after gradient sync (its *replica group*: ``dp`` for the dense part,
router and shared experts; ``edp`` for routed experts) split that parameter's optimizer state
between them, and each updates only its slice:

    1. the gradient is summed and clipped as without sharding; in training each rank receives
       only its slice of the sum (a reduce-scatter, fsmoe.parallel.zero_grads: ZeRO stage 2);
    2. AdamW updates this rank's slice of the weights with its slice of the gradient and moments;
    3. one all_gather per replica group and bucket writes every rank's updated slices back
       into the full parameters, so forward and backward see the same weights as before. In
       training the gathers run behind the next forward, one block ahead of it; each block
       waits for its own buckets as it starts (``overlap_with``).

Per element: 4 B weight + 4 B gradient (4 B / n once reduce-scattered) + 8 B / n of moments,
against 16 B. A slice along the
first dimension is a contiguous piece of the parameter and its gradient, and AdamW updates it
in place; a slice along another dimension (the first is taken: experts split by EP, q/k/v and
w1/w3 by TP) is strided, so its weights are kept in a buffer of their own (+4 B / n) and its
gradient copied there for the step.

The slice of a parameter: along its first dimension not already split (by TP, EP or ESP) that
gives every rank a non-empty piece, in ``torch.chunk``'s sizes, which is what a DTensor
``Shard(dim)`` holds; so the
checkpoint writes each slice as a piece of the global tensor (fsmoe.parallel.checkpoint), and a
checkpoint loads under any other layout and any setting of ``parallel.shard``. A parameter
with no dimension that splits into n non-empty pieces (a TP-split bias) keeps its whole state on
every rank, as without sharding.

With ``parallel.shard = "full"`` (ZeRO stage 3, fsmoe.parallel.zero3) every slice lives in its
bucket's buffer (none in place), buckets are cut at block boundaries, and the blocks' full
weights are released between uses; ``overlap_with`` then also installs those hooks.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fsmoe.parallel.groups import ParallelGroups
from fsmoe.parallel.sharding import get_sharding
from fsmoe.parallel.zero3 import can_release, free_between_uses, restore

BUCKET_ELEMENTS = 1 << 25  # elements a bucket's all_gather writes (128 MB of fp32): its temporary buffer
GATHER_AHEAD = 1  # blocks whose weights' all_gather starts before the forward reaches them
# all_gather_into_tensor's newer name (the old one warns on torch 2.13; 2.11 has only the old one)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class ZeroSlice:
    """This rank's slice of one parameter's optimizer state: ``length`` entries from ``offset``
    along ``dim`` of the (local) parameter, out of ``n`` pieces of ``chunk`` (the last may be shorter)."""

    kind: str  # "dp" | "edp": the replica group the state is split over
    dim: int
    n: int
    index: int  # this rank's index in the group
    size: int  # the parameter's size along dim

    @property
    def chunk(self) -> int:
        return -(-self.size // self.n)

    @property
    def offset(self) -> int:
        return min(self.index * self.chunk, self.size)

    @property
    def length(self) -> int:
        return max(0, min(self.chunk, self.size - self.offset))


def replica_kind(p: nn.Parameter) -> str:
    """The group whose ranks hold this parameter's same shard once gradients are synced."""
    return "edp" if get_sharding(p).reduce == "edp" else "dp"


def slice_for(p: nn.Parameter, groups: ParallelGroups) -> ZeroSlice | None:
    """Where this rank's share of ``p``'s optimizer state lies; None: the whole state (no group
    to split over, or no free dimension that gives every rank a non-empty piece)."""
    kind = replica_kind(p)
    n = groups.size(kind)
    if n == 1:
        return None
    taken = {dim for dim, k in get_sharding(p).dims if groups.size(k) > 1}  # a group of 1 splits nothing
    # dim 0 may split unevenly (its pieces stay contiguous); a later dim only evenly, so that a
    # piece kept in a buffer of its own is a whole block in the parameter's layout
    free = [d for d in range(p.ndim) if d not in taken
            and (p.shape[d] % n == 0 if d else -(-p.shape[d] // n) * (n - 1) < p.shape[d])]
    if not free:
        return None
    return ZeroSlice(kind, free[0], n, getattr(groups.coords, kind), p.shape[free[0]])


@dataclass
class _Entry:
    """One sliced parameter inside a bucket: its segment ``[start, start + seg)`` of every rank's
    flat buffer holds that rank's slice in the parameter's layout (``chunk`` along ``dim``)."""

    param: nn.Parameter
    zs: ZeroSlice
    start: int
    piece: tuple[int, ...]  # the parameter's shape with ``chunk`` along dim
    own: bool = False  # the slice lives in the bucket's buffer even along dim 0 (the weights are freed)

    @property
    def seg(self) -> int:
        return math.prod(self.piece)

    @property
    def in_place(self) -> bool:
        """A slice along dim 0: a contiguous piece of the parameter, updated where it lies."""
        return self.zs.dim == 0 and not self.own

    def view(self, flat: Tensor) -> Tensor:
        """This rank's slice inside ``flat`` (contiguous: dim 0, or a later dim split evenly)."""
        return flat[self.start:self.start + self.seg].view(self.piece).narrow(self.zs.dim, 0, self.zs.length)

    def of(self, t: Tensor) -> Tensor:
        """This rank's slice of ``t`` (the parameter or its gradient)."""
        return t.narrow(self.zs.dim, self.zs.offset, self.zs.length)


@dataclass
class _Bucket:
    kind: str
    entries: list[_Entry]
    total: int  # elements of this rank's part of the gather: every entry's segment, padded
    weights: Tensor | None  # [total]: the weight slices of the strided entries (AdamW updates them)
    grads: Tensor | None  # same layout: their gradient slices, during the step
    reduced: bool = False  # the gradients' reduce group is the replica group: they can be reduce-scattered
    grad_slices: Tensor | None = None  # [total]: this rank's reduced gradient slices (fsmoe.parallel.zero_grads)


@torch.no_grad()
def _copy_weight_slices(b: _Bucket) -> None:
    """A strided bucket's own weight slices := the parameters' values (nothing for one in place)."""
    if b.weights is not None:
        for e in b.entries:
            e.view(b.weights).copy_(e.of(e.param))


def model_parts(model: nn.Module) -> list[tuple[set[int], nn.Module, str]]:
    """The parts a forward reaches in order, as (ids of their parameters, module whose hook marks
    the moment, "pre" | "post"): what comes before ``model.layers`` (the embeddings; as the
    model's forward starts), each block (as its forward starts), what comes after (final norm and
    head; as the last block's forward ends: the head's weight may be read without calling its
    module; a weight tied to an earlier part counts there)."""
    def ids(modules) -> set[int]:
        return {id(p) for m in modules for p in m.parameters()}

    children = dict(model.named_children())
    names = list(children)
    blocks = list(children.pop("layers", []))
    split = names.index("layers") if blocks else len(names)
    before = ids(children[n] for n in names[:split])
    parts = [(before, model, "pre")] + [(ids([blk]), blk, "pre") for blk in blocks]
    if blocks:
        parts.append((ids(children[n] for n in names[split + 1:]) - before, blocks[-1], "post"))
    return parts


class ZeroAdamW(torch.optim.AdamW):
    """AdamW over this rank's slices of the model's parameters (see the module docstring).

    ``param_groups`` are given as for ``torch.optim.AdamW`` (lists of model parameters with
    their hyperparameters); the optimizer's own ``param_groups`` then hold the slices (or the
    parameter itself where its state is not split). Call :meth:`prepare_step` after gradient
    sync to copy the gradient slices (``step`` does it if nobody did), then ``step``.
    ``zero_grad`` clears the model's gradients too.
    """

    def __init__(self, param_groups: list[dict[str, Any]], groups: ParallelGroups, *,
                 bucket_elements: int = BUCKET_ELEMENTS, weights_of: nn.Module | None = None, **defaults: Any):
        self.groups = groups
        self.model_params = [p for g in param_groups for p in g["params"]]
        # ``weights_of`` (parallel.shard = "full"): the model whose blocks' sliced weights are freed
        # between uses (fsmoe.parallel.zero3); buckets then never span two of its parts
        self.full = weights_of is not None
        self._part_of = ({i: k for k, (ids, _, _) in enumerate(model_parts(weights_of)) for i in ids}
                         if self.full else {})
        # under "full" a weight that shares its storage cannot be freed alone: its whole state stays
        slices = {id(p): slice_for(p, groups) if not self.full or can_release(p) else None
                  for p in self.model_params}
        self.buckets = self._buckets(slices, bucket_elements)
        # model parameter id -> its entry (sliced parameters only)
        self.entries: dict[int, _Entry] = {id(e.param): e for b in self.buckets for e in b.entries}
        self.slices_of: dict[int, nn.Parameter] = {}  # model parameter id -> what the optimizer updates
        for b in self.buckets:
            for e in b.entries:
                piece = e.of(e.param.data) if e.in_place else e.view(b.weights)
                self.slices_of[id(e.param)] = nn.Parameter(piece)
        shards = [dict(g, params=[self.slices_of.get(id(p), p) for p in g["params"]]) for g in param_groups]
        super().__init__(shards, **defaults)
        self._prepared = False
        self._pending: dict[int, tuple] = {}  # bucket index -> (all_gather work, its output, its input)
        self._hooks: list = []
        self._unstarted: set[int] = set()  # buckets whose all_gather the next forward starts
        self._gather_order: list[list[int]] = []  # the buckets of each block, in forward order
        self._ahead = GATHER_AHEAD
        self._freed: set[int] = set()  # buckets whose parameters' storage is released (shard = "full")
        self._init_state()

    def overlap_with(self, model: nn.Module, ahead: int = GATHER_AHEAD) -> None:
        """Let the next forward, not the step, wait for the updated weights. The forward reaches the
        model's parts in order: what comes before ``model.layers`` (embeddings; waited for as the
        model's forward starts), each block (as its forward starts), what comes after (final
        norm, head; as the last block's forward ends: the head's weight may be read without
        calling its module). After ``step`` only the first parts' all_gathers start; each part,
        when reached, starts those of the ``ahead`` parts after it and waits for its own. So a
        gather overlaps the compute before its part, and the link is not flooded at the start of
        the forward (where the first MoE layer's AlltoAll needs it). Anything else that reads the
        weights calls :meth:`finish_gathers` first (checkpoints do)."""
        bucket_of = {id(e.param): i for i, b in enumerate(self.buckets) for e in b.entries}
        parts = [(sorted({bucket_of[i] for i in ids if i in bucket_of}), module, when)
                 for ids, module, when in model_parts(model)]
        if parts[-1][2] == "post":  # a bucket shared with the embeddings is waited for there
            parts[-1] = ([i for i in parts[-1][0] if i not in parts[0][0]], *parts[-1][1:])
        wanted = [w for w, _, _ in parts]
        self._gather_order, self._ahead = [w for w in wanted if w], ahead
        for k, (w, module, when) in enumerate(parts):
            if not w:
                continue
            soon = tuple(i for later in [x for x in wanted[k + 1:] if x][:ahead] for i in later)
            reach = (lambda m, a, w=tuple(w), soon=soon: self._reach(w, soon)) if when == "pre" else \
                (lambda m, a, out, w=tuple(w), soon=soon: self._reach(w, soon))
            self._hooks.append(module.register_forward_pre_hook(reach) if when == "pre"
                               else module.register_forward_hook(reach))
        if self.full:
            self._hooks += free_between_uses(self, parts)

    def _reach(self, mine: tuple[int, ...], soon: tuple[int, ...]) -> None:
        """A block's forward begins: start its gathers and those of the next blocks, wait for its own."""
        self._start(mine + soon)
        self._finish(mine)

    def _buckets(self, slices: dict[int, ZeroSlice | None], bucket_elements: int) -> list[_Bucket]:
        """Sliced parameters in model order, per replica group and per kind of slice (in place or
        in a buffer of its own), cut into buckets whose gathered size (n x segment total) stays
        under ``bucket_elements``."""
        out: list[_Bucket] = []
        for kind, in_place, reduced in itertools.product(("dp", "edp"), (True, False), (True, False)):
            todo = [p for p in self.model_params if slices[id(p)] is not None and slices[id(p)].kind == kind
                    and (slices[id(p)].dim == 0 and not self.full) == in_place
                    and self._summed_over(p, kind) == reduced]
            entries: list[_Entry] = []
            used = 0
            for p in todo:
                zs = slices[id(p)]
                piece = tuple(zs.chunk if d == zs.dim else s for d, s in enumerate(p.shape))
                e = _Entry(p, zs, used, piece, own=self.full)
                part = self._part_of.get(id(p))
                if entries and ((used + e.seg) * zs.n > bucket_elements
                                or part != self._part_of.get(id(entries[-1].param))):
                    out.append(self._new_bucket(kind, entries, used, reduced))
                    entries, used, e.start = [], 0, 0
                entries.append(e)
                used += e.seg
            if entries:
                out.append(self._new_bucket(kind, entries, used, reduced))
        return out

    def _summed_over(self, p: nn.Parameter, kind: str) -> bool:
        """Whether ``p``'s gradient is summed over exactly its replica group (so a reduce-scatter
        over that group gives each rank its slice): dp and edp parameters; the router and shared
        experts (summed over the world) where the world is the dp group (no tensor parallelism)."""
        reduce = get_sharding(p).reduce
        return reduce == kind or (reduce == "world" and kind == "dp" and self.groups.mp == 1)

    @staticmethod
    def _new_bucket(kind: str, entries: list[_Entry], total: int, reduced: bool) -> _Bucket:
        """A bucket of strided entries keeps their weight slices, starting as the parameters' values."""
        p0 = entries[0].param
        weights = None if entries[0].in_place else torch.zeros(total, dtype=p0.dtype, device=p0.device)
        b = _Bucket(kind, entries, total, weights, None, reduced)
        _copy_weight_slices(b)
        return b

    def _init_state(self) -> None:
        """AdamW's state, created now (zero moments, step 0) rather than at the first step, so a
        checkpoint can be loaded into it before any step; the first step is the same either way."""
        on_device = self.defaults.get("fused") or self.defaults.get("capturable")
        for g in self.param_groups:
            for p in g["params"]:
                self.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}

    # ------------------------------------------------------------ the step

    @torch.no_grad()
    def prepare_step(self) -> None:
        """Point every slice's ``.grad`` at this rank's slice of the (synced, full) gradient: a
        view where the slice lies in place, a copy in the bucket's buffer where it is strided;
        parameters whose state is whole keep their own. A bucket whose gradients were
        reduce-scattered (``grad_slices``) already holds this rank's slices: views of them."""
        if self.full:  # freed weights stay freed: their slices are what the step updates
            self._finish(tuple(self._pending))
        else:
            self.finish_gathers()  # a weight no forward used since the last step
        for b in self.buckets:
            if b.grad_slices is not None:
                for e in b.entries:
                    self.slices_of[id(e.param)].grad = e.view(b.grad_slices)
                continue
            if b.weights is not None and b.grads is None:
                b.grads = torch.empty_like(b.weights)
            for e in b.entries:
                shard = self.slices_of[id(e.param)]
                if e.param.grad is None:
                    shard.grad = None
                elif e.in_place:
                    shard.grad = e.of(e.param.grad)
                else:
                    shard.grad = e.view(b.grads).copy_(e.of(e.param.grad))
        self._prepared = True

    @torch.no_grad()
    def step(self, closure=None):
        if not self._prepared:
            self.prepare_step()
        loss = super().step(closure)
        self._prepared = False
        for b in self.buckets:
            b.grads = b.grad_slices = None  # the gradient slices live only for the step
        self._unstarted = set(range(len(self.buckets)))
        if not self._hooks:
            self.finish_gathers()
            return loss
        first = [i for w in self._gather_order[:1 + self._ahead] for i in w]
        self._start(tuple(first) + tuple(sorted(self._unstarted - {i for w in self._gather_order for i in w})))
        return loss

    def _launch(self, i: int) -> None:
        """Start the all_gather of bucket ``i``: every rank's updated slices, side by side."""
        b = self.buckets[i]
        mine = b.weights  # a strided bucket's slices already lie in the gather's layout
        if mine is None:
            mine = torch.empty(b.total, dtype=b.entries[0].param.dtype, device=b.entries[0].param.device)
            for e in b.entries:
                e.view(mine).copy_(e.of(e.param))
        everyone = torch.empty(b.entries[0].zs.n * b.total, dtype=mine.dtype, device=mine.device)
        work = _all_gather(everyone, mine, group=self.groups.group(b.kind), async_op=True)
        self._pending[i] = (work, everyone, mine)  # mine: alive until the gather has read it

    def _start(self, which: tuple[int, ...]) -> None:
        for i in which:
            if i in self._unstarted:
                self._unstarted.discard(i)
                self._launch(i)

    def finish_gathers(self) -> None:
        """Start the all_gathers not started yet, wait for every one and write the weights (a
        no-op when none is left)."""
        self._start(tuple(sorted(self._unstarted)))
        self._finish(tuple(self._pending))

    @torch.no_grad()
    def _finish(self, which: tuple[int, ...]) -> None:
        for i in which:
            if i in self._pending:
                work, everyone, _ = self._pending.pop(i)
                work.wait()
                self._unpack(i, everyone)

    def _unpack(self, i: int, everyone: Tensor) -> None:
        """The gathered slices of bucket ``i`` into the full parameters (their storage restored
        first where it was freed; written through ``.data``, so tensors autograd saved in the
        forward are not counted as modified when backward gathers them again)."""
        b = self.buckets[i]
        if self.full:
            self._freed.discard(i)
            for e in b.entries:
                restore(e.param)
        n = b.entries[0].zs.n
        rows = everyone.view(n, b.total)
        for e in b.entries:
            z = e.zs.dim  # [n, .., chunk, ..] -> [.., n, chunk, ..] -> [.., n * chunk, ..]
            pieces = rows[:, e.start:e.start + e.seg].view(n, *e.piece).movedim(0, z)
            whole = pieces.reshape(*e.piece[:z], n * e.zs.chunk, *e.piece[z + 1:]).narrow(z, 0, e.zs.size)
            e.param.data.copy_(whole)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for b in self.buckets:
            b.grads = b.grad_slices = None
        for p in self.model_params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    # ------------------------------------------------------------ checkpoints

    def zero_slices(self, names: dict[int, str]) -> dict[str, ZeroSlice]:
        """Parameter name -> its slice, for the checkpoint's global tensors (``names``: id -> name)."""
        return {names[pid]: e.zs for pid, e in self.entries.items()}

    def fqn_state_dict(self, names: dict[int, str]) -> dict[str, Any]:
        """The state as ``torch.distributed.checkpoint.state_dict.get_state_dict`` gives an
        unsharded AdamW's (keyed by parameter name), sliced moments as this rank's slices (in
        the parameter's layout, contiguous)."""
        self.finish_gathers()
        state, groups = {}, []
        for g, mine in zip(self.param_groups, self._model_groups()):
            for shard, p in zip(g["params"], mine):
                state[names[id(p)]] = dict(self.state[shard])
            groups.append({k: v for k, v in g.items() if k != "params"} | {"params": [names[id(p)] for p in mine]})
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_fqn_state_dict(self, osd: dict[str, Any], names: dict[int, str]) -> None:
        """Inverse of :meth:`fqn_state_dict` (values already resharded to this rank's slices)."""
        self.finish_gathers()  # none may land on the loaded weights
        for g, mine, saved in zip(self.param_groups, self._model_groups(), osd["param_groups"]):
            g.update({k: v for k, v in saved.items() if k != "params"})
            for shard, p in zip(g["params"], mine):
                for k, v in osd["state"][names[id(p)]].items():
                    self.state[shard][k].copy_(v)
        for b in self.buckets:  # the strided entries' weight slices follow the loaded weights
            _copy_weight_slices(b)

    def _model_groups(self) -> list[list[nn.Parameter]]:
        """The model parameters of each param group, in the optimizer's order."""
        out, it = [], iter(self.model_params)
        for g in self.param_groups:
            out.append([next(it) for _ in g["params"]])
        return out

    def state_bytes(self) -> tuple[int, int]:
        """(bytes of optimizer state on this rank incl. the strided slices' weights, bytes of the
        moments unsharded)."""
        held = sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values() if t.ndim)
        held += sum(b.weights.numel() * b.weights.element_size() for b in self.buckets if b.weights is not None)
        full = sum(2 * p.numel() * p.element_size() for p in self.model_params)
        return held, full
