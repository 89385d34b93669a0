"""``plan``: the pure function from (layer, layout, profile) to a Schedule, and ``explain``.

    schedule = plan(spec, parallel, profile)              # FSMoE's schedule
    schedule = plan(spec, parallel, profile, "default")   # or any baseline (baselines.py)
    print(explain(spec, parallel, profile))               # case, r, partitions, timelines

``parallel`` is a ``fsmoe.config.ParallelConfig`` or a ``Layout``; ``spec`` a ``LayerSpec``
(``LayerSpec.from_run_config`` builds one from a run config).
"""
from __future__ import annotations

from fsmoe.schedule.model.baselines import POLICIES, POLICY_NAMES
from fsmoe.schedule.model.perf_model import case_objectives, chunk_times, layer_work, predicates
from fsmoe.schedule.model.profile import Profile
from fsmoe.schedule.model.simulate import simulate_iteration
from fsmoe.schedule.model.timeline import ascii_gantt
from fsmoe.schedule.types import LayerSpec, Layout, Schedule


def _layout(parallel) -> Layout:
    if isinstance(parallel, Layout):
        return parallel
    return Layout.from_config(parallel, parallel.world, parallel.gpus_per_node)


def plan(spec: LayerSpec, parallel, profile: Profile, policy: str = "fsmoe") -> Schedule:
    if policy not in POLICIES:
        from fsmoe.config import ConfigError  # a ValueError: callers catching that still do

        raise ConfigError("policy", policy, f"allowed: {list(POLICY_NAMES)}")
    layout = _layout(parallel)
    profile.require(layout)
    return POLICIES[policy](spec, layout, profile)


def plan_all(spec: LayerSpec, parallel, profile: Profile) -> dict[str, Schedule]:
    return {name: plan(spec, parallel, profile, name) for name in POLICY_NAMES}


def _ms(s: float) -> str:
    return f"{s * 1e3:8.3f}"


COMM_KEYS = ("a2a_inter", "a2a_intra", "allgather", "reducescatter", "allreduce")


def links(profile: Profile) -> str:
    """The measured links: per collective, bandwidth 1/beta (GB/s), latency alpha (us) and the
    fit's R^2; e.g. two GPUs of one host run as two nodes show the inter-node AlltoAll's rate."""
    parts = []
    for key in COMM_KEYS:
        if profile.has(key):
            f = profile.fit_for(key)
            rate = f"{1e-9 / f.beta:.1f} GB/s" if f.beta > 0 else "no slope"
            parts.append(f"{key} {rate}, {f.alpha * 1e6:.0f} us (R^2 {f.r2:.2f})")
    return "links: " + ("; ".join(parts) if parts else "none measured (one rank)")


def explain(spec: LayerSpec, parallel, profile: Profile, schedules: dict[str, Schedule] | None = None) -> str:
    layout = _layout(parallel)
    schedules = schedules or plan_all(spec, layout, profile)
    fs = schedules["fsmoe"]
    work = layer_work(spec, layout)
    out = [f"layer  B={spec.batch} L={spec.seq_len} M={spec.d_model} H={spec.d_ff} E={spec.num_experts} "
           f"k={spec.top_k} f={spec.capacity_factor or 'dropless'} ffn={spec.activation} x{spec.n_layers} blocks",
           f"layout {layout.name} (EP A2A {'inter' if layout.ep_inter else 'intra'}-node, DP={layout.dp})",
           f"profile {profile.hardware} / {profile.layout}; comm/compute overlap efficiency "
           f"{profile.overlap:.2f}{'' if profile.overlap >= 1 else ' (models blend overlapped and serial time)'}"
           + ("; per AlltoAll size " + ", ".join(f"{n / 2**20:.3g} MiB {e:.2f}" for n, e in profile.overlap_points)
              if profile.overlap_points else ""),
           links(profile), ""]
    for phase, r, rc, case in (("forward", fs.r_fwd, fs.r_fwd_cont, fs.case_fwd),
                               ("backward", fs.r_bwd, fs.r_bwd_cont, fs.case_bwd)):
        ct = chunk_times(work, profile, layout, float(r), backward=phase == "backward")
        objs = case_objectives(ct)
        preds = predicates(ct)
        out.append(f"{phase}: SLSQP r={rc:.2f} (case {case}) -> r={r}; per chunk (ms) a2a={ct.a2a * 1e3:.3f} "
                   f"ag={ct.ag * 1e3:.3f} rs={ct.rs * 1e3:.3f} exp={ct.exp * 1e3:.3f}")
        out.append("  cases at r: " + "  ".join(f"{c}:{v * 1e3:.3f}ms" for c, v in objs.items())
                   + "   predicates: " + " ".join(f"{k}={'T' if v else 'F'}" for k, v in preds.items() if k != "Q7"))
    fwd_c = fs.meta.get("fwd_candidates", [])
    if fwd_c:
        out.append("  forward neighbours (simulated layer ms): "
                   + ", ".join(f"r={r}: {t * 1e3:.3f}" for r, t in fwd_c))
    if fs.candidates:
        out.append("  candidates r_fwd/r_bwd (simulated iteration ms): "
                   + ", ".join(f"{n}: {t * 1e3:.3f}" for n, t in fs.candidates))
    if fs.gar.mode == "windows":
        G = spec.gar_bytes
        out.append(f"gradient partitions (bytes per MoE layer window; one block = {G}): "
                   f"{list(fs.gar.window_bytes)}; greedy alone {fs.meta.get('greedy_bytes')}; "
                   f"after backward {fs.meta.get('tail_bytes')}")
    else:
        out.append(f"gradient AllReduce: {fs.gar.mode}")
    out += ["", f"  {'schedule':<16}{'r_fwd':>6}{'r_bwd':>6}{'IIO':>5}  {'AllReduce':<9}"
                f"{'fwd ms':>9}{'iter ms':>9}{'vs default':>11}"]
    base = schedules["default"].predicted_iter_s
    for name, s in schedules.items():
        out.append(f"  {name:<16}{s.r_fwd:>6}{s.r_bwd:>6}{'yes' if s.iio else 'no':>5}  {s.gar.mode:<9}"
                   f"{_ms(s.predicted_fwd_s):>9}{_ms(s.predicted_iter_s):>9}{base / s.predicted_iter_s:>10.2f}x")
    for name in ("fsmoe", "default"):
        s = schedules[name]
        sim = simulate_iteration(spec, layout, profile, s.r_fwd, s.r_bwd, s.iio, s.gar)
        out += ["", f"predicted timeline, {name} (rank 0; D/C dispatch/combine A2A, G/S AllGather/ReduceScatter, "
                    f"X expert, d dense, R AllReduce):", ascii_gantt(sim.records)]
    return "\n".join(out)
