"""A whole training step of ``fsmoe train`` predicted from a ``Profile``: what ``fsmoe simulate
step`` prints beside a run's measured step time, and what the cluster simulator adds to the
scheduler's MoE blocks.

    parts = predict_step(cfg, layout, profile)         # StepParts, seconds per part
    parts.total_s

The parts, one rank's view, in the order a step runs them:

    moe_blocks   the scheduler's simulated iteration (``plan(...).predicted_iter_s``) of the MoE
                 blocks: attention, router and host glue, dispatch / experts / combine under the
                 chosen schedule, and the AllReduce of those blocks' dense gradients
    dense_blocks blocks with a dense MLP: attention + MLP forward and backward (the profile's
                 attention and GEMM fits)
    head         output projection and loss, forward and backward (``head_fwd`` / ``head_bwd``)
    tensor_par   with mp > 1: each block's tensor-parallel collectives, forward and backward (an
                 AllReduce after attention and after a dense MLP, the MoE output's AllGather)
    gradients    the AllReduce of every other gradient: embeddings, head, norms, dense blocks over
                 dp, and the experts over their edp replicas (``grad_sync``, else ``allreduce``)
    optimizer    the gradient norm, clipping and the guarded AdamW step over the rank's parameters (and,
                 with more than one process, the norm's and the finite flag's reductions over the world)
    loop         the training loop's own host work per step (next batch, loss, guards, the LR
                 schedule, Python between the ops): ``loop``, measured on one process
    waiting      with more than one process: the slowest rank's lead, which every rank waits for
                 at the step's collectives (``step_jitter`` x the expected maximum of the ranks)

A part the profile cannot price (an older profile without ``head`` or ``optimizer`` fits) is 0
and named in ``missing``: ``fsmoe profile --config`` measures them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from fsmoe.config import RunConfig
from fsmoe.parallel.layout import Layout
from fsmoe.schedule.model.profile import Profile, qualified
from fsmoe.schedule.run.model_parts import dense_mlp_macs, run_spec

PARTS = ("moe_blocks", "dense_blocks", "head", "tensor_par", "gradients", "optimizer", "loop", "waiting")


@dataclass(frozen=True)
class ParamSplit:
    """Parameters of the one-process model by how they are sharded, and which of them lie outside
    the MoE blocks (their gradients are not the MoE blocks' schedule's to reduce)."""

    experts: int  # routed experts of every MoE layer (sharded over ep * esp)
    tensor_par: int  # attention and dense-MLP weights (sharded over mp)
    other: int  # embeddings, head, norms, routers, shared experts (whole on every rank)
    head: int = 0  # of ``other``: the output projection (0 when tied to the embedding)
    embedding: int = 0  # of ``other``: token (and position) embeddings
    outside_tp: int = 0  # of ``tensor_par``: the dense blocks' (outside every MoE block)
    outside_other: int = 0  # of ``other``: outside every MoE block (embeddings, head, norms of dense blocks)

    @staticmethod
    def of(cfg: RunConfig) -> "ParamSplit":
        from fsmoe.models.decoder import build_model

        with torch.device("meta"):
            model = build_model(cfg.model, seed=0)
        ids = lambda modules: {id(p) for mod in modules for p in mod.parameters()}
        experts = ids(layer.experts for layer in model.moe_layers())
        tp = ids(block.attn for block in model.layers) | ids(block.ffn for block in model.layers if not block.is_moe)
        in_moe = ids(block for block in model.layers if block.is_moe)
        emb = {id(model.tok_emb.weight)} | ({id(model.pos_emb.weight)} if model.pos_emb is not None else set())
        head = {id(model.lm_head.weight)} - emb
        count = lambda keep: sum(p.numel() for p in model.parameters() if keep(id(p)))
        n_tp, n_exp = count(lambda i: i in tp), count(lambda i: i in experts)
        return ParamSplit(n_exp, n_tp, count(lambda i: True) - n_exp - n_tp, count(lambda i: i in head),
                          count(lambda i: i in emb), count(lambda i: i in tp and i not in in_moe),
                          count(lambda i: i not in tp and i not in experts and i not in in_moe))

    def on_rank(self, layout: Layout) -> int:
        return self.experts // layout.moe + self.tensor_par // layout.mp + self.other

    def outside_on_rank(self, layout: Layout) -> int:
        """Parameters outside the MoE blocks on one rank: the gradients reduced over dp besides
        the MoE blocks' own (which the blocks' schedule reduces)."""
        return self.outside_tp // layout.mp + self.outside_other


@dataclass(frozen=True)
class StepParts:
    """Seconds of each part of one training step (``PARTS``), the schedule the MoE blocks ran
    under, and the parts the profile had no fit for."""

    moe_blocks: float
    dense_blocks: float
    head: float
    tensor_par: float
    gradients: float
    optimizer: float
    loop: float = 0.0
    policy: str = "default"
    missing: tuple[str, ...] = ()
    waiting: float = 0.0

    @property
    def total_s(self) -> float:
        return sum(getattr(self, p) for p in PARTS)

    def as_dict(self) -> dict:
        return {**{p: getattr(self, p) for p in PARTS}, "total": self.total_s, "policy": self.policy,
                "missing": list(self.missing)}


def predict_step(cfg: RunConfig, layout: Layout, profile: Profile, policy: str = "default",
                 tp_fits: Profile | None = None, routing_NMSE: np.ndarray | None = None,
                 overlap_grads: bool = False) -> StepParts:
    """One training step of ``cfg`` on ``layout`` priced with ``profile`` (see the module
    docstring). ``tp_fits``: where the tensor-parallel collectives' fits come from (the cluster
    simulator's fabric), else ``profile``'s ``tp_allreduce`` / ``tp_allgather``, else its
    data-parallel ``allreduce`` / ESP ``allgather``. ``routing_NMSE``: the tokens each rank of
    the moe group sent to each expert, per step and MoE layer (a routing trace's); the MoE blocks
    are then priced with that routing (``moe_blocks_routed``) instead of balanced experts.
    ``overlap_grads``: the data-parallel gradients are reduced in buckets while backward runs, as
    ``fsmoe train`` does on NCCL under every schedule (``fsmoe.parallel.grad_buckets``; on gloo a
    pipelined schedule's GradSync reduces them instead); only what outlasts the backward is counted
    (``overlapped_gradients_s``)."""
    from fsmoe.schedule.model.plan import plan

    spec = run_spec(cfg, layout.dp, layout.mp)
    m = cfg.model
    n_moe = sum(m.is_moe_layer(i) for i in range(m.n_layers))
    n_dense = m.n_layers - n_moe
    missing = []
    t = lambda key, n: _priced(profile, (key,), n, missing)

    schedule = plan(spec, layout, profile, policy)
    moe = schedule.predicted_iter_s if n_moe else 0.0
    if n_moe and routing_NMSE is not None:
        moe = moe_blocks_routed(spec, layout, profile, schedule, routing_NMSE)
    attn = lambda ph: t(qualified(f"dense_{ph}", spec.dense_tag), spec.dense_macs)
    mlp = dense_mlp_macs(cfg, spec.tokens)
    dense = n_dense * sum(attn(ph) + t(f"expert_{ph}", mlp) for ph in ("fwd", "bwd"))
    shard_tokens = spec.tokens * layout.mp  # the head runs on the dp shard's tokens on every mp rank
    head_n = shard_tokens * m.d_model * m.vocab_size
    head_bwd = t("head_bwd", head_n)
    head = t("head_fwd", head_n) + head_bwd
    tp = _tensor_parallel_s(cfg, layout, spec, n_moe, n_dense, tp_fits or profile, missing)
    params = ParamSplit.of(cfg)
    backward = None
    if overlap_grads:
        order = [m.is_moe_layer(i) for i in reversed(range(m.n_layers))]  # backward's block order
        moe_bwd = (schedule.predicted_iter_s - schedule.predicted_fwd_s) / max(n_moe, 1)
        dense_bwd = attn("bwd") + t("expert_bwd", mlp)
        backward = (head_bwd, [moe_bwd if moe_i else dense_bwd for moe_i in order], order)
    grads = _other_gradients_s(params, layout, spec, profile, missing, backward)
    opt = t("optimizer", params.on_rank(layout))
    loop = t("loop", 1.0)  # the profile's loop is a one-process trainer's
    if layout.world > 1 and profile.has("allreduce"):
        opt += SCALAR_COLLECTIVES * profile.t("allreduce", 4.0)  # the norm's and the finite flag's
        # the distributed trainer's metrics after every step: loss, aux loss, drops, routing counts
        loop += profile.t("allreduce", 8.0 * (3 + n_moe * m.moe.num_experts))
    return StepParts(moe, dense, head, tp, grads, opt, loop, policy, tuple(dict.fromkeys(missing)),
                     waiting_s(profile, layout.world))


def waiting_s(profile: Profile, ranks: int) -> float:
    """Seconds a step waits for its slowest rank: the ranks' forward + backward vary step to step
    (``step_jitter``, a standard deviation), and the step's collectives make each wait for the
    slowest, ``sigma`` times the expected maximum of ``ranks`` standard normals (0.56 for 2, 1.03
    for 4, 1.42 for 8). 0 for one process or a profile without the fit."""
    if ranks < 2 or not profile.has("step_jitter"):
        return 0.0
    return profile.t("step_jitter", 1.0) * expected_max_normal(ranks)


def expected_max_normal(n: int) -> float:
    """E[max of n independent standard normals], by quadrature of n x phi(x) Phi(x)^(n-1)."""
    from scipy.stats import norm

    x = np.linspace(-8.0, 8.0, 4001)
    return float(np.trapezoid(x * n * norm.pdf(x) * norm.cdf(x) ** (n - 1), x))


@dataclass(frozen=True)
class PipelinedStep:
    """A step under pipeline parallelism (1F1B, ``stages`` x ``microbatches``), seconds: one
    microbatch's forward + backward on a stage (``micro``'s compute parts; the head counted on
    every stage, as the last one has it), the send of its activations and gradients to the next
    stage, and once per step the gradients' reduction and the optimizer of a stage's share."""

    stages: int
    microbatches: int
    micro: StepParts
    p2p_s: float  # one microbatch's activations to the next stage (their gradients take as long back)
    once_s: float  # the gradients' reductions + the optimizer, once per step

    @property
    def micro_s(self) -> float:
        m = self.micro
        return m.moe_blocks + m.dense_blocks + m.head + m.tensor_par + 2 * self.p2p_s

    @property
    def total_s(self) -> float:
        return (self.microbatches + self.stages - 1) * self.micro_s + self.once_s

    @property
    def bubble(self) -> float:
        """Fraction of the step a stage idles in the pipeline's fill and drain."""
        return (self.stages - 1) * self.micro_s / self.total_s


def stage_config(cfg: RunConfig, stages: int, microbatches: int = 1) -> RunConfig:
    """The model one pipeline stage holds (ceil(layers / stages) layers, the same MoE pattern,
    so the first stage keeps any leading dense layers) on one microbatch of the global batch."""
    m, t = cfg.model, cfg.train
    layers = -(-m.n_layers // stages)
    if t.batch_size % microbatches:
        raise ValueError(f"train.batch_size={t.batch_size} is not divisible into {microbatches} microbatches")
    return dataclasses.replace(cfg, model=dataclasses.replace(m, n_layers=layers),
                               train=dataclasses.replace(t, batch_size=t.batch_size // microbatches))


def predict_pipelined(cfg: RunConfig, layout: Layout, profile: Profile, policy: str, stages: int,
                      microbatches: int, p2p_s: float, overlap_grads: bool = False) -> PipelinedStep:
    """``layout`` is one stage's ranks; ``p2p_s`` prices one microbatch's boundary send (the
    cluster simulator's fabric, ``cluster.p2p_seconds``). ``overlap_grads``: the data-parallel
    gradients outside the MoE blocks go in buckets during the last microbatch's backward, when
    they become final (``overlapped_gradients_s`` over that backward). The first stage ends the
    step (its last backward comes last in 1F1B's drain), so only what outlasts its last backward
    counts; later stages finish theirs earlier and hide more."""
    micro_cfg = stage_config(cfg, stages, microbatches)
    micro = predict_step(micro_cfg, layout, _without_reduce(profile), policy)
    # a microbatch reduces nothing (the gradients go once per step, below): not a missing fit
    micro = dataclasses.replace(micro, missing=tuple(k for k in micro.missing if k != "allreduce"))
    whole = stage_config(cfg, stages)
    spec = run_spec(whole, layout.dp, layout.mp)
    full = predict_step(whole, layout, profile, policy)
    grads = predict_step(micro_cfg, layout, profile, policy, overlap_grads=True).gradients if overlap_grads \
        else full.gradients
    n_moe = sum(whole.model.is_moe_layer(i) for i in range(whole.model.n_layers))
    gar = profile.t("allreduce", n_moe * spec.gar_bytes) if layout.dp > 1 and profile.has("allreduce") else 0.0
    return PipelinedStep(stages, microbatches, micro, p2p_s, grads + gar + full.optimizer + full.loop)


def _without_reduce(profile: Profile) -> Profile:
    """``profile`` without its gradient AllReduce line: the plans priced with it reduce nothing."""
    return dataclasses.replace(profile, fits={k: f for k, f in profile.fits.items() if k != "allreduce"})


def moe_blocks_routed(spec, layout: Layout, profile: Profile, schedule, routing_NMSE: np.ndarray) -> float:
    """The MoE blocks under a recorded routing: per step and layer, the slowest rank of the moe
    group's simulated block (the collectives make every rank wait for it), summed over the layers
    and averaged over the steps; then the blocks' gradient AllReduce once, after the backward
    (the default schedule's; a pipelined schedule's partitions would hide part of it)."""
    from fsmoe.schedule.model.simulate import simulate_iteration

    N, M, S, _ = routing_NMSE.shape
    if S != layout.moe or M != spec.n_layers:
        raise ValueError(f"routing of {S} sources x {M} layers does not match the moe group of {layout.moe} "
                         f"ranks x {spec.n_layers} MoE layers")
    one, no_reduce = dataclasses.replace(spec, n_layers=1), _without_reduce(profile)
    s = schedule
    per_step = [sum(max(simulate_iteration(one, layout, no_reduce, s.r_fwd, s.r_bwd, s.iio, s.gar,
                                           counts_SE=routing_NMSE[n, m], rank=r).iter_s for r in range(S))
                    for m in range(M)) for n in range(N)]
    reduce = 0.0
    if layout.dp > 1 and profile.has("allreduce"):
        reduce = profile.t("allreduce", spec.n_layers * spec.gar_bytes)
    return float(np.mean(per_step)) + reduce


def _tensor_parallel_s(cfg: RunConfig, layout: Layout, spec, n_moe: int, n_dense: int, fits: Profile,
                       missing: list) -> float:
    """Per block, forward and backward: an AllReduce of the dp shard's activations after
    attention (and after a dense MLP), the MoE output's AllGather over mp (its backward: the
    input's AllGather)."""
    if layout.mp == 1:
        return 0.0
    nbytes = spec.tokens * layout.mp * spec.d_model * spec.dtype_bytes
    ar = _priced(fits, ("tp_allreduce", "allreduce"), nbytes, missing)
    ag = _priced(fits, ("tp_allgather", "allgather"), nbytes, missing)
    return 2 * (n_moe * (ar + ag) + n_dense * 2 * ar)


def _other_gradients_s(params: ParamSplit, layout: Layout, spec, profile: Profile, missing: list,
                       backward: tuple[float, list[float], list[bool]] | None = None) -> float:
    """The AllReduce of the gradients the MoE blocks' schedule does not reduce (grad_bytes each):
    the experts over their edp replicas after backward, and those outside the MoE blocks over dp,
    after backward too, or, given ``backward`` = (head_bwd_s, block_bwd_s, block_is_moe), in
    buckets during it (``overlapped_gradients_s``)."""
    total = _allreduce(params.experts // layout.moe * spec.grad_bytes, profile, missing) if layout.edp > 1 else 0.0
    if layout.dp == 1:
        return total
    if backward is None:
        return total + _allreduce(params.outside_on_rank(layout) * spec.grad_bytes, profile, missing)
    return total + overlapped_gradients_s(params, layout, spec, profile, *backward, missing)


# fsmoe.parallel's optimizer phase reduces two scalars over the world every step: the gradient
# norm's sum of squares and the finite flag's minimum (every rank must skip or apply alike)
SCALAR_COLLECTIVES = 2
BUCKET_BYTES = 25 * 2**20  # fsmoe.parallel.grad_buckets' default bucket


def overlapped_gradients_s(params: ParamSplit, layout: Layout, spec, profile: Profile, head_bwd_s: float,
                           block_bwd_s: list[float], block_is_moe: list[bool], missing: list) -> float:
    """Seconds the data-parallel gradients outside the MoE blocks add to a step when they are
    reduced in buckets during backward (one communication stream, first come first served).
    Backward runs the head, then the blocks last to first (``block_bwd_s``, in that order), then
    the embeddings; each part's gradients are ready when its backward ends: the head's first, the
    dense blocks' as each finishes, the embeddings' last. Only what outlasts the backward counts."""
    spread = params.outside_on_rank(layout) - params.head - params.embedding  # dense blocks, final norm
    holders = [i for i, moe in enumerate(block_is_moe) if not moe] or list(range(len(block_is_moe)))
    ready, clock = [(head_bwd_s, params.head)], head_bwd_s
    for i, dt in enumerate(block_bwd_s):
        clock += dt
        if i in holders:
            ready.append((clock, spread / len(holders)))
    ready.append((clock, params.embedding))
    finish = 0.0
    for at, n in ready:
        finish = max(finish, at) + _bucketed_allreduce(n * spec.grad_bytes, profile, missing)
    return max(0.0, finish - clock)


def _bucketed_allreduce(nbytes: float, profile: Profile, missing: list) -> float:
    """``nbytes`` reduced in ``BUCKET_BYTES`` buckets, one after the other."""
    if nbytes <= 0:
        return 0.0
    n = -(-nbytes // BUCKET_BYTES)
    return n * _allreduce(nbytes / n, profile, missing)


def _allreduce(nbytes: float, profile: Profile, missing: list) -> float:
    """``grad_sync`` (timed as training reduces its gradients: flat copies, the mean written back)
    where the profile has it, else the bare AllReduce line."""
    return _priced(profile, ("grad_sync", "allreduce"), nbytes, missing, name="allreduce")


def _priced(profile: Profile, keys: tuple[str, ...], n: float, missing: list, name: str | None = None) -> float:
    """Seconds of the first of ``keys`` the profile has a fit for at size ``n``; 0 with ``name``
    (default the first key) added to ``missing`` when it has none."""
    for key in keys:
        if profile.has(key):
            return profile.t(key, n)
    missing.append(name or keys[0])
    return 0.0


def saved_run(run_dir, field: str, value: str) -> tuple[RunConfig, Layout]:
    """The config and layout a ``fsmoe train`` run in ``run_dir`` ran with (its config.json);
    ConfigError naming ``field`` = ``value`` when there is none."""
    from pathlib import Path

    from fsmoe.config import ConfigError, config_from_dict
    from fsmoe.train import saved_config

    saved = saved_config(Path(run_dir))
    if saved is None:
        raise ConfigError(field, value, f"needs the run's config.json in {run_dir} (the directory `fsmoe train` wrote)")
    cfg = config_from_dict(saved)
    p = cfg.parallel  # saved resolved: dp * mp is the run's world
    return cfg, Layout.from_config(p, p.dp * p.mp, p.gpus_per_node)


def measured_step_s(records: list[dict], tokens_per_step: int, skip: int = 1) -> float | None:
    """Median seconds per step of a run's ``metrics.jsonl`` training records (``tokens_per_s``
    over each logged window), the first ``skip`` windows (warm-up) left out where there are more."""
    rates = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    if len(rates) > skip:
        rates = rates[skip:]
    if not rates:
        return None
    import statistics

    return tokens_per_step / statistics.median(rates)

