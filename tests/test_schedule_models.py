"""Scheduler models without processes: fits, routes, cases, optimiser, plan, simulation."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from fsmoe.comm.layout import DispatchLayout, assemble_rows, range_index, to_expert_major
from fsmoe.schedule.model.baselines import POLICY_NAMES
from fsmoe.schedule.model.engine import SimEngine
from fsmoe.schedule.model.optimizer import choose_r, partition_gradients, pow2_candidates, slsqp_r
from fsmoe.schedule.model.perf_model import (balanced_counts, case_objectives, chunk_bounds, chunk_counts, chunk_times,
                                             layer_work, predicates, route_work)
from fsmoe.schedule.model.plan import explain, plan, plan_all
from fsmoe.schedule.model.profile import LinearFit, Profile, base_key, fit_linear, profile_from_points, qualified, refit
from fsmoe.schedule.types import GarPlan, LayerSpec, Layout, Op, Schedule

GPU_LIKE = Profile("synthetic", "ep2-esp4", {
    "a2a_inter": LinearFit(30e-6, 1 / 10e9), "a2a_intra": LinearFit(10e-6, 1 / 100e9),
    "allgather": LinearFit(10e-6, 1 / 80e9), "reducescatter": LinearFit(10e-6, 1 / 80e9),
    "allreduce": LinearFit(40e-6, 1 / 5e9), "expert_fwd": LinearFit(10e-6, 1 / 50e12),
    "expert_bwd": LinearFit(20e-6, 2 / 50e12), "dense_fwd": LinearFit(10e-6, 1 / 60e12),
    "dense_bwd": LinearFit(20e-6, 2 / 60e12)})
SPEC = LayerSpec(batch=2, seq_len=1024, d_model=2048, d_ff=8192, num_experts=8, n_heads=16, n_layers=3)
LAYOUT = Layout(dp=8, ep=2, esp=4, gpus_per_node=4)


# ---------------------------------------------------------------------------- fits


def test_fit_linear_recovers_line_and_r2():
    n = np.array([1e3, 2e3, 4e3, 8e3])
    f = fit_linear(n, 5e-5 + n * 2e-9)
    assert f.alpha == pytest.approx(5e-5) and f.beta == pytest.approx(2e-9) and f.r2 == pytest.approx(1.0)
    g = fit_linear([1, 2, 3], [3.0, 2.0, 1.5])  # a falling line is noise: flat at the mean
    assert g.alpha == pytest.approx(6.5 / 3) and g.beta == 0
    h = fit_linear([10, 20], [0.5, 2.0])  # intercept would be -1: refitted through the origin
    assert h.alpha == 0 and h.beta > 0


def test_refit_uses_medians_and_keeps_unseen_keys(tmp_path):
    prof = profile_from_points("hw", "lay", {"allgather": [[1e3, 1e-3], [2e3, 2e-3]], "allreduce": [[1, 1], [2, 2]]})
    samples = [("allgather", 1e3, 2e-3)] * 5 + [("allgather", 1e3, 1.0)] + [("allgather", 2e3, 4e-3)] * 5
    new = refit(prof, samples)
    assert new.t("allgather", 1e3) == pytest.approx(2e-3, rel=1e-6)  # the 1.0 s outlier is ignored
    assert new.fits["allreduce"] == prof.fits["allreduce"]
    assert new.meta["refits"] == 1
    path = new.save(tmp_path / "p.json")
    assert Profile.load(path) == new
    assert "allgather" in new.summary()


def _synthetic_samples(a: float, b: float, seed: int = 0) -> list[tuple[str, float, float]]:
    """Training-like samples of ``t = a + b n``: a constant-size op (300 runs of one size, the
    dispatch AlltoAll) and a varying-size one (one run per size, the combine), 5% noise and 15%
    of runs preempted (x 10), as on an oversubscribed CPU."""
    rng = np.random.default_rng(seed)
    sizes = [5e5] * 300 + list(rng.uniform(3e5, 7e5, 300))
    out = []
    for n in sizes:
        t = (a + b * n) * rng.normal(1.0, 0.05)
        out.append(("a2a_inter", n, t * (10.0 if rng.random() < 0.15 else 1.0)))
    return out


def test_refit_recovers_line_from_noisy_training_samples():
    a, b = 2e-4, 1e-9
    prof = Profile("hw", "lay", {"a2a_inter": LinearFit(5e-4, 0.4e-9)})  # offline fit off in both
    samples = _synthetic_samples(a, b)
    new = refit(prof, samples)
    f = new.fits["a2a_inter"]
    assert f.alpha == pytest.approx(a, rel=0.3) and f.beta == pytest.approx(b, rel=0.2)
    err = lambda fit: float(np.median([abs(fit(n) - t) / t for _, n, t in samples]))
    assert err(f) < err(prof.fits["a2a_inter"])
    for n in (3e5, 5e5, 7e5):
        assert f(n) == pytest.approx(a + b * n, rel=0.05)


def test_refit_never_worse_on_its_samples_and_no_falling_line():
    prof = Profile("hw", "lay", {"allgather": LinearFit(1e-4, 1e-9)})
    samples = [("allgather", n, 1e-4 + 1e-9 * n) for n in (1e5, 2e5, 3e5, 4e5)] * 3
    kept = refit(prof, samples).fits["allgather"]  # already exact: an equal fit
    assert kept.alpha == pytest.approx(1e-4) and kept.beta == pytest.approx(1e-9)
    falling = [("allgather", n, 1e-3 - 1e-9 * n) for n in (1e5, 2e5, 3e5, 4e5)] * 3
    assert refit(prof, falling).fits["allgather"].beta > 0


def test_refit_with_holdout_never_predicts_the_held_out_steps_worse():
    """Early steps ran slow (warm-up); a fit to them would mislead the rest of the run. Scored on
    the held-out later steps, the offline fit is kept."""
    prof = Profile("hw", "lay", {"allgather": LinearFit(1e-4, 1e-9)})
    sizes = (1e5, 2e5, 3e5, 4e5)
    early = [("allgather", n, 3 * (1e-4 + 1e-9 * n)) for n in sizes] * 2
    later = [("allgather", n, 1e-4 + 1e-9 * n) for n in sizes] * 2
    assert refit(prof, early).t("allgather", 2e5) == pytest.approx(3 * prof.t("allgather", 2e5))
    guarded = refit(prof, early, holdout=later)
    assert guarded.fits["allgather"] == prof.fits["allgather"]
    # where the later steps agree with the early ones, the refit is taken
    assert refit(prof, early, holdout=early).t("allgather", 2e5) == pytest.approx(3 * prof.t("allgather", 2e5))


def test_shape_qualified_fits_fall_back_to_base_and_are_learned_online():
    prof = Profile("hw", "lay", {"expert_fwd": LinearFit(1e-4, 1e-10), "dense_fwd": LinearFit(0.0, 1e-10)})
    q = qualified("expert_fwd", "E2m64f128g2B4")
    assert q == "expert_fwd@E2m64f128g2B4" and base_key(q) == "expert_fwd" and qualified("x", "") == "x"
    assert prof.has(q) and prof.t(q, 1e6) == prof.t("expert_fwd", 1e6)  # no own fit yet: the base one
    # this shape runs 2x slower per MAC than the base line; another shape matches it
    slow = [(q, n, 2e-4 + 2e-10 * n) for n in (1e5, 2e5, 4e5, 8e5)] * 2
    other = [("expert_fwd@E2m128f256g3B4", n, 1e-4 + 1e-10 * n) for n in (1e5, 4e5)] * 2
    dense = [("dense_fwd@b1l128m64h2B4", 5e5, 3e-4)] * 4  # one size: the base fit scaled
    new = refit(prof, slow + other + dense)
    assert new.t(q, 5e5) == pytest.approx(2e-4 + 2e-10 * 5e5, rel=1e-6)
    assert new.t("expert_fwd@E2m128f256g3B4", 5e5) == pytest.approx(1e-4 + 1e-10 * 5e5, rel=1e-6)
    assert new.t("dense_fwd@b1l128m64h2B4", 5e5) == pytest.approx(3e-4, rel=1e-6)
    assert new.t("dense_fwd@other", 5e5) == pytest.approx(new.t("dense_fwd", 5e5))
    assert "expert_fwd" in new.fits and "shape-specific" in new.summary()
    with pytest.raises(KeyError, match="'allgather'"):
        prof.t("allgather@x", 1.0)


def test_ops_carry_their_shape_in_the_fit_key():
    from fsmoe.schedule.model.program import chunk_ops
    from fsmoe.schedule.model.perf_model import ExpertDims, layer_work, route_work

    dims = ExpertDims.of(SPEC, LAYOUT)
    assert dims.tag == f"E{8 // 2}m2048f{8192 // 4}g2B4" and layer_work(SPEC, LAYOUT).expert_tag == dims.tag
    ops = chunk_ops(route_work(balanced_counts(SPEC, LAYOUT), 2, LAYOUT, 0), dims, LAYOUT, "bwd", 0)
    assert ops[0].expert.key == f"expert_bwd@{dims.tag}" and ops[0].allgather.key == "allgather"
    assert SPEC.dense_tag == "b2l1024m2048h16B4"


def test_glue_is_the_block_time_no_op_covers_and_is_learned_from_scratch():
    from fsmoe.schedule.model.simulate import glue_op, simulate_iteration
    from fsmoe.schedule.model.timeline import with_glue
    from fsmoe.schedule.types import OpRecord

    spec = LayerSpec(batch=1, seq_len=128, d_model=64, d_ff=128, num_experts=4, n_heads=2, n_layers=2)
    block = OpRecord(glue_op(spec, "fwd", 0, "block"), "host", 0, 0.0, 10.0)
    recs = [block,
            OpRecord(Op("dense", "fwd", 0, 0, "dense_fwd", 1.0), "compute", 0, 0.0, 2.0),
            OpRecord(Op("a2a_dispatch", "fwd", 0, 0, "a2a_inter", 1.0), "inter", 0, 3.0, 5.0),
            OpRecord(Op("expert", "fwd", 0, 0, "expert_fwd", 1.0), "compute", 0, 4.0, 6.0),  # overlaps the A2A
            OpRecord(Op("allreduce", "bwd", 0, 0, "allreduce", 1.0), "inter", 0, 6.0, 9.0),  # not host work
            OpRecord(Op("expert", "fwd", 0, 0, "expert_fwd", 1.0), "compute", 1, 0.0, 10.0)]  # another rank
    out = with_glue(recs)
    glue = [r for r in out if r.op.kind == "glue"]
    assert len(glue) == 1 and glue[0].dur == pytest.approx(10.0 - 2.0 - 3.0) and glue[0].op.key == block.op.key
    assert not any(r.op.kind == "block" for r in out) and len(out) == len(recs)
    # no glue fit before a refit: the simulator gives it 0; one size and no prior: a line through the origin
    prof = Profile("hw", "lay", {"dense_fwd": LinearFit(0.0, 1e-9)})
    learned = refit(prof, [(block.op.key, spec.tokens, 5e-3)] * 4 + [("counts", 128.0, 2e-4)] * 4)
    assert learned.t(block.op.key, spec.tokens) == pytest.approx(5e-3) and learned.t("counts", 128) == pytest.approx(2e-4)
    sim = lambda p: simulate_iteration(spec, Layout(dp=4, ep=2, esp=2, gpus_per_node=2), p, 1, 1, True, GarPlan("end"))
    before, after = sim(GPU_LIKE), sim(refit(GPU_LIKE, [(block.op.key, spec.tokens, 5e-3)] * 4))
    assert after.iter_s == pytest.approx(before.iter_s + 2 * 5e-3, rel=1e-6)  # forward glue of 2 blocks
    assert any(r.op.kind == "glue" for r in after.records) and any(r.op.kind == "counts" for r in after.records)


@pytest.mark.parametrize("content, field", [
    ("not json {", "profile"), ("[1, 2]", "profile"), ('{"layout": "x", "fits": {}}', "hardware"),
    ('{"hardware": "h", "layout": "x", "fits": {"allgather": {"alpha": -1, "beta": 1e-9}}}', "fits.allgather.alpha"),
    ('{"hardware": "h", "layout": "x", "fits": {"allgather": {"alpha": 0}}}', "fits.allgather.beta"),
    ('{"hardware": "h", "layout": "x", "fits": {}, "overlap": 3}', "overlap")])
def test_bad_profile_files_name_the_field(tmp_path, content, field):
    from fsmoe.config import ConfigError

    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        Profile.load(path)
    with pytest.raises(ConfigError, match="no such file"):
        Profile.load(tmp_path / "missing.json")


def test_plan_names_the_fits_a_layout_needs_and_warns_on_another_layout():
    from fsmoe.config import ConfigError

    no_ag = Profile("hw", LAYOUT.name, {k: v for k, v in GPU_LIKE.fits.items() if k != "allgather"})
    with pytest.raises(ConfigError, match=r"allgather.*fsmoe profile --nproc N --ep 2 --esp 4"):
        plan(SPEC, LAYOUT, no_ag)
    plan(SPEC, Layout(dp=2, ep=2, esp=1, gpus_per_node=1), no_ag)  # no ESP: no AllGather needed
    assert Profile("hw", LAYOUT.name, GPU_LIKE.fits).layout_note(LAYOUT) is None
    assert "ep2-esp4-nodes2x4" in Profile("hw", "ep4-esp1", GPU_LIKE.fits).layout_note(LAYOUT)


def test_profile_refit_cli_from_records_and_bad_records(tmp_path, capsys):
    from fsmoe.cli import main
    from fsmoe.schedule.types import OpRecord

    prof = tmp_path / "p.json"
    Profile("hw", "lay", {"allgather": LinearFit(1e-4, 1e-9)}).save(prof)
    recs = [OpRecord(Op("allgather", "fwd", 0, 0, "allgather", n), "intra", 0, 0.0, 2e-4 + 2e-9 * n)
            for n in (1e5, 2e5, 4e5, 8e5)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in recs))
    out = tmp_path / "q.json"
    assert main(["profile", "--refit", str(tmp_path / "r.jsonl"), "--profile", str(prof), "--out", str(out)]) == 0
    assert Profile.load(out).t("allgather", 4e5) == pytest.approx(2e-4 + 2e-9 * 4e5, rel=1e-6)
    (tmp_path / "bad.jsonl").write_text(json.dumps(recs[0].to_dict()) + "\n{not json\n")
    assert main(["profile", "--refit", str(tmp_path / "bad.jsonl"), "--profile", str(prof)]) == 2
    assert "line 2" in capsys.readouterr().err
    assert main(["profile", "--refit", str(tmp_path / "r.jsonl")]) == 2  # no --profile
    assert Profile.load(prof).fits["allgather"] == LinearFit(1e-4, 1e-9)  # nothing saved over it


def test_profile_missing_key_names_it():
    with pytest.raises(KeyError, match="a2a_inter"):
        Profile("hw", "lay", {}).t("a2a_inter", 10)


# ---------------------------------------------------------------------------- chunks and routes


def test_chunk_bounds_nest_for_powers_of_two():
    counts = np.array([[0, 1, 7, 13], [5, 8, 2, 31]])
    for r in (1, 2, 4):
        fine, coarse = chunk_bounds(counts, 2 * r), chunk_bounds(counts, r)
        assert np.array_equal(fine[::2], coarse)
    assert np.array_equal(chunk_counts(counts, 3).sum(0), counts)


def test_range_index():
    assert range_index(((5, 7), (0, 0), (10, 13)), "cpu").tolist() == [5, 6, 10, 11, 12]


@pytest.mark.parametrize("ep,esp,r", [(2, 2, 1), (2, 2, 3), (4, 1, 4), (1, 2, 2), (2, 2, 8)])
def test_chunks_move_every_row_to_its_expert(ep, esp, r):
    """Emulate the collectives in one process with row ids as data: the expert side of every
    rank must see exactly the rows of its experts, addressed in the whole layer by full_ranges,
    and the chunks' rows must come back to their places."""
    import torch

    rng = np.random.default_rng(ep * 10 + esp + r)
    layout, E = Layout(dp=ep * esp, ep=ep, esp=esp), 2 * ep
    S, El = layout.world, 2
    C = rng.integers(0, 9, size=(S, E))
    C_PSE = C.reshape(ep, esp, E).tolist()
    rows = {s: [(s, e, j) for e in range(E) for j in range(C[s, e])] for s in range(S)}  # x_ND of rank s
    chunks = {s: DispatchLayout.from_counts(C_PSE, *divmod(s, esp)).chunks(r) for s in range(S)}
    for w in range(S):
        p, q = divmod(w, esp)
        full = []  # the whole layer's expert-major order: (local expert, ESP source, EP source, row)
        for e in range(p * El, (p + 1) * El):
            for qq in range(esp):
                for pp in range(ep):
                    full += [(pp * esp + qq, e, j) for j in range(C[pp * esp + qq, e])]
        seen = []
        for i in range(r):
            recv = []  # dispatch: EP AlltoAll inside each ESP column, then the ESP AllGather
            for qq in range(esp):
                for pp in range(ep):
                    ch = chunks[pp * esp + qq][i]
                    sent = [rows[pp * esp + qq][k] for a, b in ch.src_ranges for k in range(a, b)]
                    off = sum(ch.send_splits_P[:p])
                    recv += sent[off:off + ch.send_splits_P[p]]
            ch = chunks[w][i]
            assert list(ch.gather_sizes_S) == [sum(chunks[pp * esp + qq][i].send_splits_P[p] for pp in range(ep))
                                               for qq in range(esp)]
            ids = torch.arange(len(recv)).unsqueeze(1)
            canon = [recv[k] for k in to_expert_major(ids, ch)[:, 0].tolist()]
            assert [full[k] for k in range_index(ch.full_ranges, "cpu").tolist()] == canon
            assert list(ch.tokens_per_local_expert_El) == [sum(t[1] == e for t in canon)
                                                           for e in range(p * El, (p + 1) * El)]
            seen += range_index(ch.full_ranges, "cpu").tolist()
        assert sorted(seen) == list(range(len(full)))
        works = route_work(C, r, layout, w)
        assert [wk.expert_rows for wk in works] == [sum(c.tokens_per_local_expert_El) for c in chunks[w]]
        # combine: each chunk's rows, in send order, land back on their x_ND rows
        x = torch.arange(len(rows[w]) + 3, dtype=torch.float32).unsqueeze(1)  # 3 dropped rows at the end
        back = assemble_rows(chunks[w], [c.take_rows(x) for c in chunks[w]], x.shape[0])
        assert torch.equal(back[:len(rows[w])], x[:len(rows[w])]) and not back[len(rows[w]):].any()


# ---------------------------------------------------------------------------- cases and optimiser


def test_predicates_are_case_dominance():
    work = layer_work(SPEC, LAYOUT)
    for r in (1.0, 2.0, 3.5, 8.0):
        ct = chunk_times(work, GPU_LIKE, LAYOUT, r)
        obj, q = case_objectives(ct), predicates(ct)
        assert q["Q2"] == (obj[2] > obj[3])
        assert q["Q3"] == (obj[2] > obj[4])


def test_slsqp_matches_brute_force():
    work = layer_work(SPEC, LAYOUT)
    for backward in (False, True):
        r, case, val = slsqp_r(work, GPU_LIKE, LAYOUT, backward=backward)
        grid = np.linspace(1, 8, 2801)
        brute = min(max(case_objectives(chunk_times(work, GPU_LIKE, LAYOUT, g, backward)).values()) for g in grid)
        assert val == pytest.approx(brute, rel=1e-3)
        assert 1 <= r <= 8 and case in (1, 2, 3, 4)


def test_choose_r_snaps_to_powers_of_two_and_checks_neighbours():
    work = layer_work(SPEC, LAYOUT)
    ch = choose_r(work, GPU_LIKE, LAYOUT)
    assert ch.r in (1, 2, 4, 8) and ch.r in [c for c, _ in ch.candidates]
    assert ch.candidates and min(ch.candidates, key=lambda c: c[1])[0] == ch.r
    assert pow2_candidates(3.2) == [1, 2, 4] and pow2_candidates(8.0) == [4, 8] and pow2_candidates(1.0) == [1, 2]


def test_partitions_greedy_then_de_respect_readiness():
    ar = LinearFit(1e-4, 1e-9)
    layer = lambda k, t: max(5e-3, 2e-3 + t)  # 3 ms of slack per layer window
    part = partition_gradients([3e-3, 3e-3, 3e-3], [0, 4e6, 8e6], 12e6, ar, layer)
    assert part.greedy_bytes[0] == 0  # nothing is ready before the first window
    prefix = np.cumsum(part.window_bytes)
    assert np.all(prefix <= np.array([0, 4e6, 8e6]) + 1)
    greedy_cost = sum(layer(k, ar(b) if b else 0) for k, b in enumerate(part.greedy_bytes)) + ar(
        12e6 - sum(part.greedy_bytes))
    assert part.objective <= greedy_cost + 1e-12
    assert part.tail_bytes == pytest.approx(12e6 - sum(part.window_bytes), abs=2)


# ---------------------------------------------------------------------------- plan


def test_plan_is_pure_and_covers_the_policies():
    a, b = plan(SPEC, LAYOUT, GPU_LIKE), plan(SPEC, LAYOUT, GPU_LIKE)
    assert a == b
    assert a.r_fwd in (1, 2, 4, 8) and a.r_bwd in (1, 2, 4, 8) and a.iio and a.gar.mode == "windows"
    assert len(a.gar.window_bytes) == SPEC.n_layers and a.gar.window_bytes[-1] == 0  # nothing ready yet
    allp = plan_all(SPEC, LAYOUT, GPU_LIKE)
    assert list(allp) == list(POLICY_NAMES)
    assert allp["default"].r_fwd == allp["default"].r_bwd == 1 and not allp["default"].iio
    assert allp["fsmoe"].predicted_iter_s <= allp["default"].predicted_iter_s
    assert Schedule.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    with pytest.raises(ValueError, match="policy"):
        plan(SPEC, LAYOUT, GPU_LIKE, "nope")


def test_fsmoe_plan_never_predicts_slower_than_not_pipelining():
    # r = 1/1 is always simulated over the whole iteration, whatever the forward's own optimum
    # (whose power-of-two neighbours need not include 1), and the plan is the fastest candidate;
    # a large per-chunk cost (an expert GEMM's alpha) keeps it at 1/1
    heavy = dataclasses.replace(GPU_LIKE, fits={**GPU_LIKE.fits, "expert_fwd": LinearFit(2e-2, 1 / 50e12),
                                                "expert_bwd": LinearFit(4e-2, 2 / 50e12)})
    for prof in (GPU_LIKE, heavy):
        s = plan(SPEC, LAYOUT, prof)
        names = dict(s.candidates)
        assert "r=1/1" in names and s.predicted_iter_s == pytest.approx(min(names.values()))
        assert s.predicted_iter_s <= names["r=1/1"]
    assert (plan(SPEC, LAYOUT, heavy).r_fwd, plan(SPEC, LAYOUT, heavy).r_bwd) == (1, 1)


def test_explain_names_case_r_partitions_and_baselines():
    text = explain(SPEC, LAYOUT, GPU_LIKE)
    for needle in ("case", "SLSQP", "gradient partitions", "predicted timeline", *POLICY_NAMES):
        assert needle in text
    # the measured links, e.g. the inter-node AlltoAll of two GPUs run as two nodes: 1/beta, alpha
    assert "a2a_inter 10.0 GB/s, 30 us" in text and "allreduce 5.0 GB/s, 40 us" in text


def test_balanced_counts_and_layout_keys():
    C = balanced_counts(SPEC, LAYOUT)
    assert C.shape == (8, 8) and C.sum(1).tolist() == [SPEC.routed_rows] * 8
    assert LAYOUT.ep_inter and LAYOUT.a2a_key == "a2a_inter"
    assert not Layout(dp=2, ep=2, esp=1).ep_inter
    assert LAYOUT.peers("allgather", 5) == (4, 5, 6, 7) and LAYOUT.peers("a2a_combine", 5) == (1, 5)


def test_layout_of_a_run_with_expert_data_parallelism_and_of_older_records():
    """The cost model reads the first moe group; dp is the dense AllReduce's degree. Records files
    written before the layout had dp and mp (keys ep, esp, gpus_per_node, dp_size) still load."""
    import dataclasses

    from fsmoe.config import ParallelConfig

    lay = Layout.from_config(ParallelConfig(mp=2, ep=2, esp=2), 8, gpus_per_node=4)  # dp 4, edp 2
    assert (lay.world, lay.moe, lay.edp, lay.dp, lay.name) == (8, 4, 2, 4, "ep2-esp2-nodes1x4")
    assert lay.peers("counts", 3) == (0, 1, 2, 3) and balanced_counts(SPEC, lay).shape == (4, 8)
    assert Layout.from_dict({"ep": 2, "esp": 4, "gpus_per_node": 4, "dp_size": None}) == LAYOUT
    old = Layout.from_dict({"ep": 2, "esp": 2, "gpus_per_node": None, "dp_size": 2})
    assert (old.dp, old.moe) == (2, 4) and Layout.from_dict(dataclasses.asdict(lay)) == lay


def test_bad_specs_name_the_field():
    with pytest.raises(ValueError, match="activation"):
        LayerSpec(1, 8, 16, 32, 4, activation="relu")
    with pytest.raises(ValueError, match="n_heads"):
        LayerSpec(1, 8, 16, 32, 4, n_heads=3)
    with pytest.raises(ValueError, match="chunk_bytes"):
        GarPlan("chunks")
    with pytest.raises(ValueError, match="mode"):
        GarPlan("sometimes")


# ---------------------------------------------------------------------------- simulation


def test_sim_engine_lanes_are_fifo_and_wait_for_inputs():
    eng = SimEngine(lambda op: op.n)
    a = eng.launch("inter", Op("a2a_dispatch", n=2.0), None)
    b = eng.launch("intra", Op("allgather", n=1.0), None, a)  # waits for a: [2, 3]
    c = eng.launch("inter", Op("a2a_combine", n=1.0), None)  # behind a on its lane: [2, 3]
    x = eng.compute(Op("expert", n=4.0), None, b)  # [3, 7]
    eng.wait(c)
    assert eng.drain() == 7.0
    spans = {r.op.kind: (r.t0, r.t1) for r in eng.recorder.records}
    assert spans == {"a2a_dispatch": (0, 2), "allgather": (2, 3), "a2a_combine": (2, 3), "expert": (3, 7)}
    del x


def test_spec_from_bf16_run_keeps_fp32_gradient_bytes():
    """bf16 is autocast only: activations move 2 bytes, the dense gradients 4 (fp32 params)."""
    from fsmoe.config import load_config

    spec = LayerSpec.from_run_config(load_config("tiny", ["train.dtype=bfloat16"]))
    assert (spec.dtype_bytes, spec.grad_bytes) == (2, 4)
    assert spec.gar_bytes == 4 * spec.dense_params


def test_training_op_errors_identify_ops_without_their_size():
    """Routing changes every step: an op whose size differs between iterations is still one op,
    its error compares the medians over iterations; the single-run error and noise are separate."""
    from fsmoe.schedule.types import OpRecord
    from fsmoe.schedule.run.training import noise_floor, op_errors, single_errors

    prof = Profile("hw", "lay", {"expert_fwd": LinearFit(1e-3, 1e-9)})
    its = [[OpRecord(Op("expert", "fwd", 0, 0, "expert_fwd", n), "compute", 0, 0.0, t)]
           for n, t in ((1e6, 2e-3), (2e6, 3e-3 * 1.2), (1e6, 2e-3 * 0.8))]
    errs = op_errors(its, Layout(), prof)
    assert len(errs) == 1  # one op, not one per size
    assert errs[0] == pytest.approx(abs(2e-3 - 2e-3) / 2e-3)  # medians: predicted 2 ms, measured 2 ms
    single = single_errors(its, Layout(), prof)
    assert sorted(single) == pytest.approx(sorted([0.0, 0.2 / 1.2, 0.25]))
    assert noise_floor(its, Layout(), prof) > 0


def test_piecewise_fit_where_one_line_does_not(tmp_path):
    """A collective whose protocol switches at 1 MB: latency-bound below, bandwidth-bound above.
    One line misfits both ends; two lines split at the switch fit each regime."""
    from fsmoe.schedule.model.profile import fit_piecewise

    small = [(n, 20e-6 + n / 2e9) for n in (1e4, 3e4, 1e5, 3e5, 6e5)]
    large = [(n, 400e-6 + n / 40e9) for n in (1e6, 4e6, 1.6e7, 6.4e7, 2.56e8)]
    pts = small + large
    one = fit_linear(*zip(*pts))
    pw = fit_piecewise(*zip(*pts))
    assert pw.below and pw.split == 1e6 and pw.r2 >= one.r2
    for n, t in pts:
        assert pw(n) == pytest.approx(t, rel=1e-6)
    assert abs(one(1e4) - small[0][1]) / small[0][1] > 0.5  # the one line is far off at small sizes
    assert 1 / pw.beta == pytest.approx(40e9, rel=1e-6)  # the planner's bandwidth: the large regime
    line = [(n, 1e-5 + n / 1e9) for n in (1e4, 1e5, 1e6, 1e7)]
    assert not fit_piecewise(*zip(*line)).below  # one line fits: no knot
    prof = profile_from_points("hw", "lay", {"a2a_inter": [list(p) for p in pts], "expert_fwd": [[1, 1], [2, 2]]})
    assert prof.fits["a2a_inter"].below and not prof.fits["expert_fwd"].below
    assert prof.fits["a2a_inter"].scaled(2.0)(1e4) == pytest.approx(2 * small[0][1], rel=1e-6)
    assert Profile.load(prof.save(tmp_path / "p.json")) == prof
    assert "piecewise" in prof.summary()


def test_piecewise_segments_are_checked_on_load(tmp_path):
    import json

    from fsmoe.config import ConfigError

    bad = {"hardware": "hw", "layout": "lay", "fits": {"a2a_inter": {"alpha": 1e-4, "beta": 1e-10,
                                                                    "below": [[0, -1, 2]], "split": 1e6}}}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="a2a_inter.below"):
        Profile.load(path)


def test_overlap_per_message_size_feeds_the_model(tmp_path):
    """eta measured at three AlltoAll sizes: interpolated in log(bytes), clamped outside, kept
    through JSON and refits, used by the per-chunk model; PipeMoE's baseline still ignores it."""
    import dataclasses
    import json

    from fsmoe.config import ConfigError
    from fsmoe.schedule.model.perf_model import chunk_times, layer_work

    prof = Profile("hw", "lay", {"a2a_inter": LinearFit(1e-4, 1e-10), "expert_fwd": LinearFit(1e-4, 1e-12),
                                 "expert_bwd": LinearFit(1e-4, 2e-12)},
                   overlap=0.3, overlap_points=((1e6, 0.1), (4e6, 0.3), (1.6e7, 0.5)))
    assert prof.overlap_at(1e6) == pytest.approx(0.1) and prof.overlap_at(1e5) == pytest.approx(0.1)
    assert prof.overlap_at(2e6) == pytest.approx(0.2) and prof.overlap_at(1e9) == pytest.approx(0.5)
    assert Profile("hw", "lay", {}, overlap=0.7).overlap_at(1e6) == 0.7  # no per-size points
    loaded = Profile.load(prof.save(tmp_path / "p.json"))
    assert loaded == prof and "per AlltoAll size" not in prof.summary() and "MiB" in prof.summary()
    assert refit(prof, [("a2a_inter", 1e6, 2e-4)] * 4).overlap_points == prof.overlap_points
    spec = LayerSpec(batch=8, seq_len=512, d_model=1024, d_ff=4096, num_experts=8, top_k=2)
    layout = Layout(dp=2, ep=2, esp=1, gpus_per_node=1)
    work = layer_work(spec, layout)
    assert chunk_times(work, prof, layout, 1.0).overlap == pytest.approx(prof.overlap_at(work.a2a_bytes))
    assert chunk_times(work, prof, layout, 4.0).overlap == pytest.approx(prof.overlap_at(work.a2a_bytes / 4))
    bad = json.loads((tmp_path / "p.json").read_text())
    bad["overlap_points"] = [[1e6, 1.5]]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="overlap_points"):
        Profile.load(tmp_path / "bad.json")
    assert dataclasses.replace(prof, overlap=1.0, overlap_points=()).overlap_at(1e6) == 1.0


def test_first_block_attention_forward_has_its_own_fit_falling_back_to_the_shape():
    from fsmoe.schedule.model.simulate import dense_op

    first, second = dense_op(SPEC, "fwd", 0), dense_op(SPEC, "fwd", 1)
    assert first.key == second.key + "@first" and dense_op(SPEC, "bwd", 0).key == dense_op(SPEC, "bwd", 1).key
    shape = LinearFit(0.0, 1e-12)
    prof = dataclasses.replace(GPU_LIKE, fits={**GPU_LIKE.fits, second.key: shape})
    assert prof.fit_for(first.key) == shape and prof.has(first.key)  # the shape's fit until it has its own
    assert Profile("x", "y", {"dense_bwd": shape}).has(first.key) is False
    # the online refit learns the first block apart: 20% slower here, the others as the shape's fit
    n = float(SPEC.dense_macs)
    samples = [(first.key, n, 1.2 * shape(n))] * 6 + [(second.key, n, shape(n))] * 6
    fitted = refit(prof, samples)
    assert fitted.t(first.key, n) == pytest.approx(1.2 * shape(n), rel=1e-6)
    assert fitted.t(second.key, n) == pytest.approx(shape(n), rel=1e-6)
