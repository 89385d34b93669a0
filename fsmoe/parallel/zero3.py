"""Sharded weights (``parallel.shard = "full"``, ZeRO stage 3): a block's sliced weights exist in
full only while the block runs.

On top of stage 1/2 (fsmoe.parallel.zero, zero_grads), each rank keeps only its slices of the
weights of every block (in the buckets' own buffers, which AdamW updates); the full weights are
all_gathered when needed and their storage released after:

* forward: a block's gathers start ``ahead`` blocks early and are waited for as the block begins
  (as with stage 1); when its forward ends its weights are freed, and a hook is put on its output;
* backward: that hook runs when the gradient of the block's output is complete, i.e. just before
  the block's backward. It frees the weights of the block after it (whose backward has
  produced everything that needed them: the gradient of this output is its last act), then
  gathers this block's weights again, starting those of the ``ahead`` blocks before it;
* recomputation (``train.activation_checkpointing = "full"``) runs inside that window, so a
  recomputed forward neither gathers nor frees.

The storage of a freed weight is resized to zero and refilled in place (``untyped_storage``), so
every tensor autograd saved in the forward sees the gathered values again in backward; they are
written through ``.data``, which autograd does not count as an in-place change. The embeddings,
final norm and head stay gathered (one copy; a tied head would need them twice per step anyway).

Per element of a block's weights a rank then holds ``4 B / n`` of weights instead of 4 B, beside
the stage-2 gradient and moment slices, plus the full weights of the blocks in flight.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from fsmoe.recompute import recomputing

if TYPE_CHECKING:
    from fsmoe.parallel.zero import ZeroAdamW


def release(p: nn.Parameter) -> None:
    """Give back ``p``'s storage (its shape, dtype and autograd identity stay)."""
    p.data.untyped_storage().resize_(0)


def restore(p: nn.Parameter) -> None:
    """Give ``p`` storage for its values again (uninitialised until written)."""
    st = p.data.untyped_storage()
    need = p.numel() * p.element_size()
    if st.nbytes() < need:
        st.resize_(need)


def can_release(p: nn.Parameter) -> bool:
    """Whether ``p`` owns exactly its storage (a view of another tensor cannot be freed alone)."""
    return p.is_contiguous() and p.storage_offset() == 0 and \
        p.untyped_storage().nbytes() == p.numel() * p.element_size()


def free_between_uses(opt: "ZeroAdamW", parts: list[tuple[list[int], nn.Module, str]]) -> list:
    """Install the hooks (module docstring) for the blocks among ``parts`` (as
    ``ZeroAdamW.overlap_with`` builds them: bucket indices, module, when). Returns the handles."""
    blocks = [(w, m) for w, m, when in parts[1:] if when == "pre"]
    handles = []
    for k, (mine, module) in enumerate(blocks):
        if not mine:
            continue
        before = tuple(i for w, _ in blocks[max(0, k - opt._ahead):k][::-1] for i in w)
        after = tuple(blocks[k + 1][0]) if k + 1 < len(blocks) else ()

        def forward_done(m, args, out, mine=tuple(mine), before=before, after=after):
            if recomputing():
                return
            _free(opt, mine)
            y = out[0] if isinstance(out, tuple) else out
            if isinstance(y, Tensor) and y.requires_grad:
                y.register_hook(lambda g: _backward_reaches(opt, mine, before, after))

        handles.append(module.register_forward_hook(forward_done))
    return handles


def _backward_reaches(opt: "ZeroAdamW", mine: tuple[int, ...], before: tuple[int, ...],
                      after: tuple[int, ...]) -> None:
    _free(opt, after)
    opt._reach(mine, before)


@torch.no_grad()
def _free(opt: "ZeroAdamW", which: tuple[int, ...]) -> None:
    """Release the full weights of buckets ``which`` (a gather in flight for one is kept: it is
    about to be used); the next use gathers them again."""
    for i in which:
        if i in opt._pending or i in opt._freed:
            continue
        for e in opt.buckets[i].entries:
            release(e.param)
        opt._freed.add(i)
        opt._unstarted.add(i)
