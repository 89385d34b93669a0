"""Memory per GPU: what a training step holds, estimated before launch and counted in a run.

:func:`saved_tensor_census` counts what autograd keeps for backward, block by block, in a real
forward (saved-tensor hooks; parameters and repeated storages counted once). The memory plan
(``fsmoe plan --memory``, :func:`plan_memory` below) is checked against it and against the peaks
that ``fsmoe train`` measures.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


def _is_weight_copy(t: Tensor) -> bool:
    """A cast of a parameter (autocast's bf16 copy of a weight, the experts' ``cast_weights``),
    possibly transposed or viewed: a chain of one-input ops, one of them a copy, from the
    parameter's gradient accumulator."""
    fn, cast = t.grad_fn, False
    for _ in range(6):
        if fn is None or len(fn.next_functions) != 1:
            return False
        cast = cast or "Copy" in fn.name() or "Cast" in fn.name()
        fn = fn.next_functions[0][0]
        if fn is not None and "AccumulateGrad" in fn.name():
            return cast
    return False


def saved_tensor_census(model: nn.Module, loss_fn: Callable[[], Tensor]) -> dict[str, list[dict]]:
    """Run ``loss_fn()`` (a forward of ``model`` and its loss) and list, per part of the model,
    the tensors autograd saved for backward: ``{"embed" | "block<i>:<moe|dense>" | "head":
    [{"shape", "dtype", "bytes", "weight_copy"}]}`` (``weight_copy``: a bf16 copy of a parameter).
    Parameters are left out; a storage saved twice (views, two ops saving one tensor) is counted
    once, under the part that saved it first. The graph is freed before returning."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    parts: dict[str, list[dict]] = {"embed": []}
    where = ["embed"]

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in params and key not in seen and st.nbytes():
            seen.add(key)
            parts[where[0]].append({"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                                    "bytes": st.nbytes(), "weight_copy": _is_weight_copy(t)})
        return t

    def enter(label: str):
        def hook(module, args):
            where[0] = label
            parts.setdefault(label, [])
        return hook

    handles = []
    for i, block in enumerate(model.layers):
        handles.append(block.register_forward_pre_hook(enter(f"block{i}:{'moe' if block.is_moe else 'dense'}")))
    handles.append(model.layers[-1].register_forward_hook(lambda *a: enter("head")(None, None)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn()
    finally:
        for h in handles:
            h.remove()
    del loss
    return parts


# ---------------------------------------------------------------- the plan

GiB = 2 ** 30
ACT = 2  # bytes of an activation under bf16 training (fp32 runs: 4)


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of the global model by where they live (a layout divides them differently)."""

    split_by_mp: int  # attention and dense MLP matrices: split by tensor parallelism
    replicated: int  # embeddings, head, norms, router, shared experts, biases of row-parallel ops
    experts: int  # routed experts: split over ep x esp
    column_parallel: int = 0  # of split_by_mp, those split along their first dim (q/k/v, w1/w3)
    summed_over_world: int = 0  # of replicated, the router and shared experts (gradients summed over the world)
    outside_blocks: int = 0  # of replicated, what is not in a block: embeddings, final norm, head

    @staticmethod
    def of(model_cfg) -> "ParamCounts":
        """Counted on a model built on the meta device (no memory, exact shapes)."""
        from fsmoe.models import build_model

        with torch.device("meta"):
            model = build_model(model_cfg, seed=0)
        split = repl = experts = column = world = outside = 0
        for name, p in model.named_parameters():
            n = p.numel()
            if not name.startswith("layers."):
                outside += n
            if ".router" in name or ".shared" in name:
                world += n
            if ".experts." in name and ".shared" not in name:
                experts += n
            elif p.ndim == 2 and (("attn." in name and model_cfg.attention != "mla")
                                  or (".ffn." in name and ".router" not in name and ".shared" not in name)):
                split += n
                if any(name.endswith(f".{w}.weight") for w in ("wq", "wk", "wv", "w1", "w3")):
                    column += n
            else:
                repl += n
        return ParamCounts(split, repl, experts, column, world, outside)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU of one training step at its two high points (``forward``: the end of the
    forward pass, every activation saved; ``step``: the end of backward and the optimizer step,
    every gradient held), and the larger of the two (``total``, with its parts ``parts``)."""

    forward: dict[str, float]
    step: dict[str, float]
    tokens_per_gpu: int
    params_per_gpu: float

    @property
    def peak_phase(self) -> str:
        return "forward" if sum(self.forward.values()) >= sum(self.step.values()) else "step"

    @property
    def parts(self) -> dict[str, float]:
        return self.forward if self.peak_phase == "forward" else self.step

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def _norm_bytes(m) -> int:
    """Per token, what a block's norm saves: its fp32 input copy and statistics (LayerNorm: mean
    and rstd, RMSNorm: rstd)."""
    return 4 * m.d_model + 4 * (2 if m.arch == "gpt" else 1)


def _attention_bytes(m, tokens: int, mp: int, act: int) -> float:
    """What one attention sub-block (its norm included) saves for backward, for ``tokens`` tokens."""
    norm = _norm_bytes(m)
    if m.attention == "mla":  # replicated under tensor parallelism (every head on every rank)
        d, H = m.d_model, m.n_heads
        qk, v = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
        q_lat = (4 + act) * m.q_lora_rank + 4 if m.q_lora_rank else 0  # the latent, normed (fp32 + bf16)
        kv_lat = (4 + act) * m.kv_lora_rank + 4
        # q, k, the kv projection (k's nope part and v, one storage), output; logsumexp
        sdpa = act * H * (2 * qk + m.qk_nope_head_dim + 2 * v) + 4 * H
        return tokens * (norm + act * d + q_lat + kv_lat + sdpa)
    d, H, G, K = m.d_model, m.n_heads // mp, max(1, m.kv_heads // mp), m.head_size
    qk_norm = 4 * (H + G) * (K + 1) if m.qk_norm else 0  # q, k in fp32 and their statistics
    sdpa = act * (2 * H * K + 2 * G * K) + 4 * H  # q, k, v, output; logsumexp
    # LayerNorm's output is fp32, so each of q/k/v casts it to bf16 on its own; RMSNorm's is bf16
    inputs = (3 if m.arch == "gpt" and act < 4 else 1) * act * d
    return tokens * (norm + inputs + qk_norm + sdpa)


def _ffn_bytes(m, tokens: int, d_ff: int, act: int) -> float:
    """A dense MLP (its norm included): input, hidden tensors (GeLU: 2, SwiGLU: 4)."""
    hidden = 2 if m.arch == "gpt" else 4
    return tokens * (_norm_bytes(m) + act * m.d_model + hidden * act * d_ff)


def _moe_bytes(m, tokens: int, par, act: int, imbalance: float, recompute: str) -> float:
    """An MoE sub-block: its norm over every token; the MoE layer itself takes 1/mp of them
    (router and order state per token; per routed row (``tokens x k`` rows, ``imbalance`` times
    that on the busiest rank, gathered over esp) the permuted input, the hidden tensors (GeLU: 2,
    SwiGLU: 3; none when the experts are recomputed) and the output)."""
    moe = m.moe
    k, E, d = moe.router.top_k, moe.num_experts, m.d_model
    norm = tokens * _norm_bytes(m)
    tokens = tokens / par.mp
    router = 4 * E + 46 * k + (12 + 8 * k if moe.router.name == "deepseek" else 0)
    rows = tokens * k * imbalance
    f = moe.experts.d_ff // par.esp
    hidden = 0 if recompute == "moe" else (2 if moe.experts.activation == "gelu" else 3) * act * f
    per_row = act * d * par.esp + hidden + act * d
    shared = 0.0
    if moe.experts.num_shared:
        fs = moe.experts.num_shared * (moe.experts.shared_d_ff or moe.experts.d_ff)
        shared = tokens * (4 if moe.experts.activation == "swiglu" else 2) * act * fs
    return norm + tokens * (act * d + router) + rows * per_row + shared


def plan_memory(cfg, *, batch_per_gpu: int | None = None, imbalance: float = 1.0,
                counts: ParamCounts | None = None) -> MemoryPlan:
    """Peak memory per GPU of ``fsmoe train`` on ``cfg`` (its model, ``parallel.*`` layout and
    ``shard``, ``train.batch_size`` / ``seq_len`` / ``dtype`` / ``activation_checkpointing``).

    Gradients are released right after each optimizer step, so the turn from forward to backward
    holds weights, optimizer state, every saved activation (with autocast's bf16 weight copies)
    and, as the loss's backward begins, the logits four times over (as returned, log_softmax's
    saved output in fp32, two fp32 gradients of the same size); the end of
    backward holds weights, gradients and optimizer state (the data-parallel AllReduce's buckets
    are views of the gradients, fsmoe.parallel.grad_buckets).
    ``batch_per_gpu``: sequences per data-parallel rank (default: the config's batch / dp).
    ``imbalance``: rows of the busiest expert rank over the mean (1: balanced routing)."""
    m, par, t = cfg.model, cfg.parallel, cfg.train
    counts = counts or ParamCounts.of(m)
    act = ACT if t.dtype == "bfloat16" else 4
    per_gpu_batch = batch_per_gpu if batch_per_gpu is not None else max(1, t.batch_size // par.dp)
    tokens = per_gpu_batch * t.seq_len
    dense = counts.split_by_mp / par.mp + counts.replicated
    experts = counts.experts / (par.ep * par.esp)
    params = dense + experts
    states = {"weights": 4 * params, "optimizer": _optimizer_bytes(counts, par, dense, experts)}
    if par.shard == "full":  # the blocks' weights as slices, whole only while a block runs
        states["weights"], states["gathered blocks"] = _sharded_weight_bytes(counts, m, par, dense, experts)
    forward = dict(states)
    forward["activations"] = _activation_bytes(m, par, t, tokens, act, imbalance)
    # autocast's bf16 copy of every matrix a matmul uses is saved with the activations (the
    # embeddings are looked up, not cast); full checkpointing makes them again in backward
    copies = t.dtype == "bfloat16" and t.activation_checkpointing != "full"
    forward["bf16 weight copies"] = act * (params - _embeddings(m)) if copies else 0.0
    head_in = tokens * (4 * m.d_model + 8 + act * m.d_model)
    # the loss's backward begins: the logits as returned, log_softmax's saved output, and two
    # [tokens, vocab] fp32 gradients (of the loss's output, then of its input)
    forward["logits"] = head_in + tokens * m.vocab_size * (act + 12)
    step = dict(states)
    step["gradients"] = 4 * params
    if par.shard in ("optimizer", "full"):  # reduce-scattered into slices (fsmoe.parallel.zero_grads)
        step["gradients"], step["communication buffers"] = _sliced_gradient_bytes(counts, par, dense, experts)
    elif par.world // (par.ep * par.esp) > 1:  # the experts' AllReduce copies a chunk of them (sync_grads)
        from fsmoe.parallel.grads import FLAT_ELEMENTS

        step["communication buffers"] = 4 * min(FLAT_ELEMENTS, experts)
    return MemoryPlan(forward, step, tokens, params)


def _sliced_gradient_bytes(counts: ParamCounts, par, dense: float, experts: float) -> tuple[float, float]:
    """fp32 gradients a rank holds after the reduce-scatter (dense over dp, experts over edp; the
    router and shared experts stay whole where tensor parallelism makes their group the world),
    and the reduce-scatters' inputs in flight (``IN_FLIGHT`` buckets of ``BUCKET_ELEMENTS``)."""
    from fsmoe.parallel.zero import BUCKET_ELEMENTS
    from fsmoe.parallel.zero_grads import IN_FLIGHT

    edp = par.world // (par.ep * par.esp)
    whole = counts.summed_over_world if par.mp > 1 else 0
    sliced = (dense - whole) / par.dp + experts / edp
    largest = max(dense - whole if par.dp > 1 else 0.0, experts if edp > 1 else 0.0)
    return 4 * (sliced + whole), 4 * min(IN_FLIGHT * BUCKET_ELEMENTS, largest)


def _sharded_weight_bytes(counts: ParamCounts, m, par, dense: float, experts: float) -> tuple[float, float]:
    """``shard = "full"`` (fsmoe.parallel.zero3): the fp32 weights a rank holds between uses (the
    embeddings, final norm and head whole, beside their slices; every block's slices: dense over
    dp, experts over edp), and the whole weights of the blocks in flight (the one running and the
    ``GATHER_AHEAD`` gathered ahead of it, the largest blocks)."""
    from fsmoe.parallel.zero import GATHER_AHEAD

    edp = par.world // (par.ep * par.esp)
    outside = counts.outside_blocks
    held = outside + dense / par.dp + experts / edp  # the parts outside blocks: whole and a slice
    moe_layers = sum(m.is_moe_layer(i) for i in range(m.n_layers))
    block = (dense - outside) / m.n_layers + (experts / moe_layers if moe_layers else 0.0)
    return 4 * held, 4 * (1 + GATHER_AHEAD) * block


def _optimizer_bytes(counts: ParamCounts, par, dense: float, experts: float) -> float:
    """AdamW's two fp32 moments per parameter held; ``shard = "optimizer"`` splits them over dp
    (edp for the experts) and keeps the weights of the slices that do not lie along the first
    dimension (experts split by ep, q/k/v and w1/w3 by mp) in a buffer of their own
    (fsmoe.parallel.zero)."""
    if par.shard == "none":
        return 8 * (dense + experts)
    edp = par.world // (par.ep * par.esp)
    if par.shard == "full":  # every slice has its own buffer, counted as the weights
        return 8 * dense / par.dp + 8 * experts / edp
    copied_experts = experts if par.ep > 1 and edp > 1 else 0.0  # edp 1: nothing to split, no copy
    copied_dense = counts.column_parallel / par.mp if par.mp > 1 and par.dp > 1 else 0.0
    return (8 * dense + 4 * copied_dense) / par.dp + (8 * experts + 4 * copied_experts) / edp


def _activation_bytes(m, par, t, tokens: int, act: int, imbalance: float) -> float:
    """What every block saves for backward, and the rotary tables (saved once) unless each block
    is recomputed."""
    mode = t.activation_checkpointing
    saved = sum(block_bytes(m, i, tokens, par, act, imbalance, mode) for i in range(m.n_layers))
    return saved + (0.0 if mode == "full" else rope_table_bytes(m))


def block_bytes(m, i: int, tokens: int, par, act: int, imbalance: float, mode: str) -> float:
    """What block ``i`` saves for backward under activation checkpointing ``mode``."""
    if mode == "full":  # the block's input; the rest is recomputed
        return tokens * act * m.d_model
    ffn = (_moe_bytes(m, tokens, par, act, imbalance, mode) if m.is_moe_layer(i)
           else _ffn_bytes(m, tokens, m.d_ff // par.mp, act))
    return _attention_bytes(m, tokens, par.mp, act) + ffn


def rope_table_bytes(m) -> int:
    """The rotary tables (cos, sin, fp32, for max_seq_len), saved once by the first block."""
    rope = m.qk_rope_head_dim if m.attention == "mla" else m.head_size if m.arch == "llama" else 0
    return 2 * 4 * m.max_seq_len * (rope // 2)


def _embeddings(m) -> int:
    """Parameters of the token (and position) embeddings: looked up, never cast to bf16."""
    return m.vocab_size * m.d_model + (m.max_seq_len * m.d_model if m.arch == "gpt" else 0)


def largest_batch(cfg, budget_bytes: float, *, imbalance: float = 1.0, counts: ParamCounts | None = None,
                  limit: int = 1 << 16) -> int:
    """The most sequences per data-parallel rank whose planned peak stays within ``budget_bytes``
    (0: none); a multiple of mp (the MoE layers split a rank's sequences over the MP group)."""
    counts = counts or ParamCounts.of(cfg.model)
    mp = cfg.parallel.mp

    def fits(j: int) -> bool:
        return plan_memory(cfg, batch_per_gpu=j * mp, imbalance=imbalance, counts=counts).total <= budget_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * mp
