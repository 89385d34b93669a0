"""What a training step costs beyond its MoE layers' scheduled ops, measured on one rank's share
of a run (``fsmoe profile --config``), so that a step can be predicted whole (``fsmoe.sim.step``).

Keys added to the profile (every rank measures at once, a barrier before each repeat, so the
times include what the ranks of one host take from each other, as they do in training):

    head_fwd / head_bwd   output projection + cross-entropy, n = tokens * d_model * vocab (MACs)
    optimizer             the trainer's optimizer phase (gradient norm, clipping, the guarded AdamW
                          step), n = parameters on the rank
    step_jitter           per step, n = 1: the standard deviation of the rank's forward + backward
                          over the timed runs (ranks wait for the slowest at their collectives)
    loop                  per step, n = 1: what a one-process ``fsmoe train`` step (fsmoe.train.Trainer
                          on the rank's sequences) takes beyond its device phases (forward with the
                          loss, backward, gradient sync, optimizer; each step against its own
                          phases): the next batch, the LR schedule, the routers' hooks, Python
    glue_fwd@<tag> / glue_bwd@<tag>
                          per MoE block, n = tokens: the one-process model's forward (backward),
                          as the trainer's steps run it (between optimizer steps), less its head,
                          its attention (the profile's fit at the run's shape), its
                          expert GEMMs (timed in place by fsmoe.op_clock) and its dense blocks'
                          MLPs, spread over the MoE blocks: router, permutation, norms, residuals,
                          embedding; plus, under EP / ESP, what the run's dispatcher takes beyond
                          its collectives' fits (``dispatcher_extra``: the counts' exchange, host
                          reads of the split sizes, uneven splits). This is the host work the
                          scheduler's iteration calls glue (``simulate.glue_op``); the planner
                          picks it up by its tag.

The one-process model holds the rank's sequences (global batch / dp) and every expert, so its
routing and permutation handle the tokens one rank routes under any expert layout.
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from fsmoe.config import RunConfig
from fsmoe.schedule.model.profile import Profile, qualified
from fsmoe.schedule.types import LayerSpec


def run_spec(cfg: RunConfig, dp: int, mp: int = 1) -> LayerSpec:
    """The MoE block one rank runs: its share (global batch / (dp * mp)) of the sequences."""
    return LayerSpec.from_run_config(cfg, batch=max(1, cfg.train.batch_size // (dp * mp)))


def dense_mlp_macs(cfg: RunConfig, tokens: int) -> int:
    """Multiply-adds of one dense block's MLP forward (2 GEMMs, 3 for gated activations)."""
    m = cfg.model
    gemms = 2 if m.arch == "gpt" else 3  # GPT-2's GeLU MLP, the llama family's SwiGLU (build_dense_ffn)
    return tokens * m.d_model * m.d_ff * gemms


def measure_model_parts(cfg: RunConfig, spec: LayerSpec, profile: Profile, device: torch.device,
                        dtype: torch.dtype, reps: int, warmup: int, group: ProcessGroup | None = None,
                        extra: tuple[float, float] = (0.0, 0.0)) -> dict[str, list[list[float]]]:
    """Points ``{key: [[n, seconds]]}`` of the keys in the module docstring; ``spec`` is the
    rank's MoE block (``run_spec``), ``profile`` the fits measured so far (attention, experts);
    ``extra``: host work per MoE layer (forward, backward) the one-process model cannot show
    (``dispatcher_extra``), added to the glue."""
    import tempfile

    tokens = spec.batch * spec.seq_len
    idx = torch.randint(0, cfg.model.vocab_size, (spec.batch, spec.seq_len), device=device)
    with tempfile.TemporaryDirectory(prefix="fsmoe-parts-") as scratch:
        trainer = _scratch_trainer(cfg, spec, device, Path(scratch))
        model = trainer.model  # one model for every timing below (a second would double the memory)
        fwd_s, bwd_s, experts_s, jitter = _model_times(model, idx, device, dtype, reps, warmup, group)
        optimizer = _optimizer_points(model, device, reps, warmup, group)
        loop, in_steps = _loop_time(trainer, device, reps, warmup, group)
        # the model's forward and backward as the trainer's steps run them: between optimizer steps
        # (which stream every parameter and its moments through the caches), not back to back
        fwd_s, bwd_s = in_steps.get("forward", fwd_s), in_steps.get("backward", bwd_s)
    head_fwd, head_bwd = _head_times(cfg, tokens, device, dtype, reps, warmup, group)
    n_moe = len(model.moe_layers())
    n_dense = cfg.model.n_layers - n_moe
    mlp = dense_mlp_macs(cfg, tokens)
    priced_fwd = (cfg.model.n_layers * profile.t(qualified("dense_fwd", spec.dense_tag), spec.dense_macs)
                  + n_dense * profile.t("expert_fwd", mlp))
    priced_bwd = (cfg.model.n_layers * profile.t(qualified("dense_bwd", spec.dense_tag), spec.dense_macs)
                  + n_dense * profile.t("expert_bwd", mlp))
    head_n = tokens * cfg.model.d_model * cfg.model.vocab_size
    glue = lambda total, head, priced, experts: max(0.0, total - head - priced - experts) / max(1, n_moe)
    pts = {"head_fwd": [[head_n, head_fwd]], "head_bwd": [[head_n, head_bwd]], "optimizer": optimizer,
           "loop": [[1.0, max(0.0, loop)]], "step_jitter": [[1.0, jitter]]}
    for phase, total, head, priced, experts, more in (("fwd", fwd_s, head_fwd, priced_fwd, experts_s[0], extra[0]),
                                                      ("bwd", bwd_s, head_bwd, priced_bwd, experts_s[1], extra[1])):
        point = [[tokens, glue(total, head, priced, experts) + more]]
        pts[f"glue_{phase}"] = point  # the base key too: other shapes scale it per token
        pts[qualified(f"glue_{phase}", spec.glue_tag)] = point
    return pts


def dispatcher_extra(cfg: RunConfig, spec: LayerSpec, groups, profile: Profile, device: torch.device,
                     dtype: torch.dtype, reps: int, warmup: int) -> tuple[float, float]:
    """Seconds per MoE layer (forward, backward) the run's own dispatcher takes beyond what the
    profile's collective fits price for its dispatch and combine (``op_check.predicted_ops``):
    the counts' exchange, the split sizes read on the host, uneven splits, the regrouping, and
    the waits for peers that a layer's collectives meet between its computations. Timed in
    context: the run's first MoE block (attention, norms, the MoE layer on these groups), forward
    and backward on the rank's tokens, the layer's dispatch and combine spans read by
    fsmoe.op_clock (medians, every rank starting together); (0, 0) without EP / ESP."""
    from fsmoe.op_clock import OPS, OpClock
    from fsmoe.schedule.model.perf_model import layer_op_seconds

    layout = groups.layout
    if layout.moe == 1:
        return 0.0, 0.0
    block = _moe_block(cfg, groups).to(device)
    layer = block.ffn
    rope = _rope_tables(cfg, spec.seq_len, device)
    x = torch.randn(spec.batch, spec.seq_len, spec.d_model, device=device, requires_grad=True)
    clock, now = OpClock([layer], device), _timed(device, groups.world_group)
    spans = [OPS.index("dispatch"), OPS.index("combine")]
    fwd, bwd = [], []
    try:
        for k in range(warmup + reps):
            now(start=True)
            with _autocast(device, dtype):
                y, stats = block(x, rope)
            (y.float().square().mean() + stats.aux_loss).backward()
            now()
            ops = clock.collect()
            if k >= warmup:
                fwd.append(sum(ops["forward"][0][j] for j in spans))
                bwd.append(sum(ops["backward"][0][j] for j in spans))
    finally:
        clock.close()
    lines = layer_op_seconds(spec, layout, profile)
    priced = [lines[phase]["dispatch"] + lines[phase]["combine"] for phase in ("forward", "backward")]
    return max(0.0, _median(fwd) - priced[0]), max(0.0, _median(bwd) - priced[1])


def _moe_block(cfg: RunConfig, groups):
    """The run's first MoE block (attention, norms, its MoE layer on ``groups``): the compute a
    layer's collectives interleave with in training."""
    from fsmoe.models.block import build_block
    from fsmoe.parallel.moe import moe_layer_factory

    m = cfg.model
    first = next(i for i in range(m.n_layers) if m.is_moe_layer(i))
    return build_block(m, first, moe_layer_factory(groups))


def _rope_tables(cfg: RunConfig, seq_len: int, device: torch.device):
    """The rotary tables a block of ``cfg`` is called with (None for learned positions), as
    fsmoe.models.decoder builds them."""
    from fsmoe.models.rope import RotaryEmbedding

    m = cfg.model
    if m.arch != "llama":
        return None
    rot_dim = m.qk_rope_head_dim if m.attention == "mla" else m.head_size
    return RotaryEmbedding(rot_dim, m.max_seq_len, m.rope_theta, m.rope_scaling).to(device)(seq_len)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _timed(device: torch.device, group: ProcessGroup | None):
    """A clock that waits for the device (and, with ``group``, starts every rank together)."""
    import time

    import torch.distributed as dist

    def now(start: bool = False) -> float:
        if start and group is not None:
            dist.barrier(group=group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    return now


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _model_times(model, idx, device, dtype, reps, warmup, group
                 ) -> tuple[float, float, tuple[float, float], float]:
    """Median forward (with loss) and backward seconds of the whole model, of its MoE layers'
    expert spans summed (forward, backward), and the standard deviation of forward + backward
    over the runs (0 with fewer than two)."""
    from fsmoe.op_clock import OpClock, OPS

    clock, now = OpClock(model.moe_layers(), device), _timed(device, group)
    col = OPS.index("experts")
    fwd, bwd, ex_f, ex_b = [], [], [], []
    try:
        for k in range(warmup + reps):
            t0 = now(start=True)
            with _autocast(device, dtype):
                out = model(idx)
                loss = F.cross_entropy(out.logits.flatten(0, 1).float(), idx.flatten()) + out.aux_loss
            t1 = now()
            loss.backward()
            t2 = now()
            ops = clock.collect()
            model.zero_grad(set_to_none=True)
            if k >= warmup:
                fwd.append(t1 - t0)
                bwd.append(t2 - t1)
                ex_f.append(sum(row[col] for row in ops["forward"]))
                ex_b.append(sum(row[col] for row in ops["backward"]))
    finally:
        clock.close()
    both = [f + b for f, b in zip(fwd, bwd)]
    jitter = statistics.stdev(both) if len(both) > 1 else 0.0
    return _median(fwd), _median(bwd), (_median(ex_f), _median(ex_b)), jitter


def _loop_time(trainer, device, reps: int, warmup: int, group) -> tuple[float, dict[str, float]]:
    """Median seconds a trainer step takes beyond its device phases (fsmoe.op_clock.StepClock:
    forward, backward, gradient sync, optimizer), each step against its own phases (as the
    difference of separately timed medians it swung between 0 and 8 ms on a shared host), and
    the median of each phase ({} where the clock marked none)."""
    from fsmoe.op_clock import StepClock

    trainer.step_clock = StepClock(device)
    now = _timed(device, group)
    rest, phase_s = [], {}
    for k in range(warmup + reps):
        t0 = now(start=True)
        trainer.train_step().read()
        total = now() - t0
        phases = trainer.step_clock.collect()
        if k >= warmup and phases is not None:
            rest.append(max(0.0, total - sum(phases.values())))
            for name, seconds in phases.items():
                phase_s.setdefault(name, []).append(seconds)
    trainer.step_clock = None
    return (_median(rest) if rest else 0.0), {name: _median(xs) for name, xs in phase_s.items()}


def _scratch_trainer(cfg: RunConfig, spec: LayerSpec, device: torch.device, scratch: Path):
    """A one-process ``fsmoe train`` of ``cfg`` on the rank's sequences, in a scratch run directory
    (nothing logged): its steps are the loop the ``loop`` key measures, its model the one timed."""
    from rich.console import Console

    from fsmoe.config import ParallelConfig
    from fsmoe.train import Trainer

    # eager steps: the loop is timed against each step's phases, which a replayed graph does not mark
    train = dataclasses.replace(cfg.train, batch_size=spec.batch, steps=10 ** 6, trace=False, timeline_steps=0,
                                cuda_graph=False,
                                torch_profile_steps=0, device=device.type,
                                data_limit_mb=min(cfg.train.data_limit_mb, 1.0))  # sampling does not need more
    return Trainer(dataclasses.replace(cfg, train=train, parallel=ParallelConfig()), scratch / "run",
                   console=Console(quiet=True))


def _head_times(cfg: RunConfig, tokens: int, device, dtype, reps, warmup, group) -> tuple[float, float]:
    """Median forward and backward seconds of the output projection and the loss."""
    D, V = cfg.model.d_model, cfg.model.vocab_size
    w = torch.randn(V, D, device=device, requires_grad=True)
    h = torch.randn(tokens, D, device=device, requires_grad=True)
    target = torch.randint(0, V, (tokens,), device=device)
    now = _timed(device, group)
    fwd, bwd = [], []
    for k in range(warmup + reps):
        t0 = now(start=True)
        with _autocast(device, dtype):
            loss = F.cross_entropy(F.linear(h, w).float(), target)
        t1 = now()
        loss.backward()
        t2 = now()
        if k >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return _median(fwd), _median(bwd)


def _optimizer_points(model, device, reps, warmup, group) -> list[list[float]]:
    """Seconds of the trainer's optimizer phase (``Trainer.device_step`` after the gradients'
    sync: the gradient norm, the clipping coefficient, the finite check, and the guarded AdamW of
    ``fsmoe.guard``, with the trainer's parameter groups and AdamW kind) over the model's
    parameters and over those outside its experts: two sizes, so the line covers any expert
    sharding in between. (Timing a different AdamW, e.g. foreach on the CPU where training runs
    torch's default, was 4 ms short of every traced step on this repository's CPU host.)"""
    from fsmoe.guard import NonFiniteGuard
    from fsmoe.train import clip_coefficient

    experts = {id(p) for layer in model.moe_layers() for p in layer.experts.parameters()}
    everything = [p for p in model.parameters() if p.requires_grad]
    decayed = {id(p) for p in everything if p.dim() >= 2}
    out = []
    for params in (everything, [p for p in everything if id(p) not in experts]):
        for p in params:
            p.grad = torch.randn_like(p)
        groups = [{"params": [p for p in params if id(p) in decayed], "weight_decay": 0.1},
                  {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-4, fused=device.type == "cuda")
        guard = NonFiniteGuard("skip", device)

        def step(params=params, opt=opt, guard=guard):
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            guard.apply(opt, torch.isfinite(norm), 1, grad_coef=clip_coefficient(norm, 1.0))
        out.append([float(sum(p.numel() for p in params)), _cold_median_time(step, device, reps, warmup, group)])
    for p in everything:
        p.grad = None
    return out


FLUSH_BYTES = 256 * 2**20  # more than a server CPU's last-level cache, and than a GPU's L2


def _cold_median_time(fn, device, reps: int, warmup: int, group) -> float:
    """Median seconds of ``fn()`` with the caches flushed before each run (a buffer of
    ``FLUSH_BYTES`` written): in training the optimizer runs after forward and backward have
    filled the caches with activations, so its weights, gradients and moments come from memory.
    Timed warm, the optimizer of this repository's CPU host's ``tiny`` took 5.6 ms against 9.2 ms
    in its traced steps."""
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.float32, device=device)
    now = _timed(device, group)
    times = []
    for k in range(warmup + reps):
        flush.fill_(k)
        t0 = now(start=True)
        fn()
        if k >= warmup:
            times.append(now() - t0)
    del flush
    return _median(times)


def with_model_parts(profile: Profile, points: dict[str, list[list[float]]]) -> Profile:
    """``profile`` with ``points`` added (their keys replaced) and refitted."""
    from fsmoe.schedule.model.profile import profile_from_points

    merged = dict(profile.points, **points)
    out = profile_from_points(profile.hardware, profile.layout, merged, profile.meta, profile.overlap,
                              profile.overlap_points)
    kept = {k: f for k, f in profile.fits.items() if k not in out.fits}  # fits without points (hier overhead)
    return dataclasses.replace(out, fits={**kept, **out.fits})
