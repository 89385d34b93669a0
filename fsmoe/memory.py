"""Memory per GPU: what a training step holds, estimated before launch and counted in a run.

:func:`saved_tensor_census` counts what autograd keeps for backward, block by block, in a real
forward (saved-tensor hooks; parameters and repeated storages counted once). The memory plan
(``fsmoe plan --memory``, :mod:`fsmoe.memory_plan`) is checked against it and against the peaks
that ``fsmoe train`` measures.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


def saved_tensor_census(model: nn.Module, loss_fn: Callable[[], Tensor]) -> dict[str, list[dict]]:
    """Run ``loss_fn()`` (a forward of ``model`` and its loss) and list, per part of the model,
    the tensors autograd saved for backward: ``{"embed" | "block<i>:<moe|dense>" | "head":
    [{"shape", "dtype", "bytes"}]}``. Parameters are left out; a storage saved twice (views,
    two ops saving one tensor) is counted once, under the part that saved it first. The graph
    is freed before returning."""
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
                                    "bytes": st.nbytes()})
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

    @staticmethod
    def of(model_cfg) -> "ParamCounts":
        """Counted on a model built on the meta device (no memory, exact shapes)."""
        from fsmoe.models import build_model

        with torch.device("meta"):
            model = build_model(model_cfg, seed=0)
        split = repl = experts = column = 0
        for name, p in model.named_parameters():
            n = p.numel()
            if ".experts." in name and ".shared" not in name:
                experts += n
            elif ("attn." in name or (".ffn." in name and ".router" not in name and ".shared" not in name)) \
                    and p.ndim == 2:
                split += n
                if any(name.endswith(f".{w}.weight") for w in ("wq", "wk", "wv", "w1", "w3")):
                    column += n
            else:
                repl += n
        return ParamCounts(split, repl, experts, column)


@dataclass(frozen=True)
class MemoryPlan:
    """Peak bytes per GPU of one training step, by part (``parts``) and in all (``total``)."""

    parts: dict[str, float]
    tokens_per_gpu: int
    params_per_gpu: float

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def _attention_bytes(m, tokens: int, mp: int, act: int) -> float:
    """What one attention sub-block (its norm included) saves for backward, for ``tokens`` tokens."""
    d, H, G, K = m.d_model, m.n_heads // mp, max(1, m.kv_heads // mp), m.head_size
    norm = 4 * d + 4 * (2 if m.arch == "gpt" else 1)  # fp32 input copy + its statistics
    if m.attention == "mla":
        qk, v = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
        q_lat = (4 + act) * m.q_lora_rank + 4 if m.q_lora_rank else 0  # the latent, normed (fp32 + bf16)
        kv_lat = (4 + act) * m.kv_lora_rank + 4
        # q, k, the kv projection (k's nope part and v, one storage), output; logsumexp
        sdpa = act * H * (2 * qk + m.qk_nope_head_dim + 2 * v) + 4 * H
        return tokens * (norm + act * d + q_lat + kv_lat + sdpa)
    qk_norm = 4 * (H + G) * (K + 1) if m.qk_norm else 0  # q, k in fp32 and their statistics
    sdpa = act * (2 * H * K + 2 * G * K) + 4 * H  # q, k, v, output; logsumexp
    # LayerNorm's output is fp32, so each of q/k/v casts it to bf16 on its own; RMSNorm's is bf16
    inputs = (3 if m.arch == "gpt" and act < 4 else 1) * act * d
    return tokens * (norm + inputs + qk_norm + sdpa)


def _ffn_bytes(m, tokens: int, d_ff: int, act: int) -> float:
    """A dense MLP (its norm included): input, hidden tensors (GeLU: 2, SwiGLU: 4)."""
    norm = 4 * m.d_model + 4 * (2 if m.arch == "gpt" else 1)
    hidden = 2 if m.arch == "gpt" else 4
    return tokens * (norm + act * m.d_model + hidden * act * d_ff)


def _moe_bytes(m, tokens: int, par, act: int, imbalance: float, recompute: str) -> float:
    """An MoE sub-block: norm, router and order state per token; per routed row (``tokens x k``
    rows, ``imbalance`` times that on the busiest rank, gathered over esp) the permuted input,
    the hidden tensors (GeLU: 2, SwiGLU: 3; none when the experts are recomputed) and the output."""
    moe = m.moe
    k, E, d = moe.router.top_k, moe.num_experts, m.d_model
    norm = 4 * d + 4 * (2 if m.arch == "gpt" else 1)
    router = 4 * E + 46 * k + (12 + 8 * k if moe.router.name == "deepseek" else 0)
    rows = tokens * k * imbalance
    f = moe.experts.d_ff // par.esp
    hidden = 0 if recompute == "moe" else (2 if moe.experts.activation == "gelu" else 3) * act * f
    per_row = act * d * par.esp + hidden + act * d
    shared = 0.0
    if moe.experts.num_shared:
        fs = moe.experts.num_shared * (moe.experts.shared_d_ff or moe.experts.d_ff)
        shared = tokens * (4 if moe.experts.activation == "swiglu" else 2) * act * fs
    return tokens * (norm + act * d + router) + rows * per_row + shared


def plan_memory(cfg, *, batch_per_gpu: int | None = None, imbalance: float = 1.0,
                counts: ParamCounts | None = None) -> MemoryPlan:
    """Peak memory per GPU of ``fsmoe train`` on ``cfg`` (its model, ``parallel.*`` layout and
    ``shard``, ``train.batch_size`` / ``seq_len`` / ``dtype`` / ``activation_checkpointing``).

    The peak is at the end of a forward pass after the first step: the previous step's
    gradients are still held (they are released when backward starts), beside the weights, the
    optimizer state, every saved activation, and the logits (bf16, and the fp32 copy the loss
    keeps). ``batch_per_gpu``: sequences per data-parallel rank (default: the config's batch / dp).
    ``imbalance``: rows of the busiest expert rank over the mean (1: balanced routing)."""
    m, par, t = cfg.model, cfg.parallel, cfg.train
    counts = counts or ParamCounts.of(m)
    act = ACT if t.dtype == "bfloat16" else 4
    per_gpu_batch = batch_per_gpu if batch_per_gpu is not None else max(1, t.batch_size // par.dp)
    tokens = per_gpu_batch * t.seq_len
    edp = par.world // (par.ep * par.esp)
    dense = counts.split_by_mp / par.mp + counts.replicated
    experts = counts.experts / (par.ep * par.esp)
    params = dense + experts
    parts = {"weights": 4 * params, "gradients": 4 * params}
    if par.shard == "optimizer":
        # moments split over dp (edp for experts); where the split runs along a dimension other
        # than the first (experts split by ep, q/k/v and w1/w3 by mp) the slice of the weights is
        # kept in a buffer of its own too (fsmoe.parallel.zero)
        copied_experts = experts if par.ep > 1 else 0.0
        copied_dense = counts.column_parallel / par.mp if par.mp > 1 else 0.0
        parts["optimizer"] = (8 * dense + 4 * copied_dense) / par.dp + (8 * experts + 4 * copied_experts) / edp
    else:
        parts["optimizer"] = 8 * params
    mode = t.activation_checkpointing
    layers = [m.is_moe_layer(i) for i in range(m.n_layers)]
    if mode == "full":  # each block keeps its input; the bf16 weight copies are made again in backward
        saved = m.n_layers * tokens * act * m.d_model
        weight_copies = 0.0
    else:
        saved = sum(_attention_bytes(m, tokens, par.mp, act) for _ in layers)
        saved += sum(_moe_bytes(m, tokens, par, act, imbalance, mode) if moe else _ffn_bytes(m, tokens, m.d_ff // par.mp, act)
                     for moe in layers)
        if m.attention != "mla" and m.arch == "llama":  # rope tables (cos, sin) for max_seq_len, once
            saved += 2 * 4 * m.max_seq_len * m.head_size // 2
        # autocast's bf16 copy of each matrix a matmul uses stays saved until backward (all but
        # the embeddings, which are looked up)
        weight_copies = act * (params - _embeddings(m)) if t.dtype == "bfloat16" else 0.0
    parts["activations"] = saved
    parts["bf16 weight copies"] = weight_copies
    head_in = tokens * (4 * m.d_model + 8 + act * m.d_model)
    # while the loss runs: the logits as returned (bf16), their fp32 copy and log_softmax's output
    parts["logits"] = head_in + tokens * m.vocab_size * (act + 4 + (4 if act < 4 else 0))
    return MemoryPlan(parts, tokens, params)


def _embeddings(m) -> int:
    """Parameters of the token (and position) embeddings: looked up, never cast to bf16."""
    return m.vocab_size * m.d_model + (m.max_seq_len * m.d_model if m.arch == "gpt" else 0)
