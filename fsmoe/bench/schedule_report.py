"""The report of ``fsmoe bench schedule``: per-op error summaries, the schedule comparison,
its markdown table, and merging the parts of a grid measured in separate runs (``--merge``)."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from fsmoe.schedule.model.baselines import POLICY_NAMES
from fsmoe.schedule.model.profile import base_key
from fsmoe.schedule.model.timeline import NOT_SCHEDULED
from fsmoe.schedule.types import LayerSpec


def spec_dict(s: LayerSpec) -> dict:
    return {"B": s.batch, "heads": s.n_heads, "L": s.seq_len, "M": s.d_model, "H": s.d_ff, "E": s.num_experts,
            "f": s.capacity_factor, "ffn": s.activation}


def spec_str(s: LayerSpec) -> str:
    return (f"B{s.batch} h{s.n_heads} L{s.seq_len} M{s.d_model} H{s.d_ff} f{s.capacity_factor or 'nd'} "
            f"{s.activation}")


def summarize_errors(errors: list[tuple]) -> dict:
    """Median relative error per fit key (shape-qualified keys pooled under their base key), for
    each profile; ``median`` compares the prediction with the op's median over the timed
    iterations, ``instance`` with every single run."""
    spread = [abs(t - med) / t for key, n, med, runs, pred in errors if len(runs) > 1 for t in runs]
    out = {"noise_floor": statistics.median(spread) if spread else math.nan}  # the op's own median as the prediction
    for prof in ("offline", "refitted"):
        by_key: dict[str, list[float]] = {}
        inst: dict[str, list[float]] = {}
        for key, n, med, runs, pred in errors:
            by_key.setdefault(base_key(key), []).append(abs(pred[prof] - med) / med)
            inst.setdefault(base_key(key), []).extend(abs(pred[prof] - t) / t for t in runs)
        out[prof] = {k: {"ops": len(v), "median": statistics.median(v), "instance": statistics.median(inst[k])}
                     for k, v in sorted(by_key.items())}
        allv, alli = [x for v in by_key.values() for x in v], [x for v in inst.values() for x in v]
        out[prof]["all"] = {"ops": len(allv), "median": statistics.median(allv) if allv else math.nan,
                            "instance": statistics.median(alli) if alli else math.nan}
    return out


def summarize(rows: list[dict]) -> dict:
    gm = lambda xs: math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan
    cob = [r["chosen_over_best"] for r in rows]
    sp_def = [r["seconds"]["default"] / r["seconds"]["fsmoe"] for r in rows]
    sp_tut = [r["seconds"]["tutel_improved"] / r["seconds"]["fsmoe"] for r in rows]
    sp = {k: gm([r["seconds"]["default"] / r["seconds"][k] for r in rows]) for k in POLICY_NAMES}
    ratio = {k: statistics.median(r["predicted"][k] / r["seconds"][k] for r in rows) for k in POLICY_NAMES} \
        if rows else {}
    return {"configs": len(rows), "chosen_within_5pct": sum(c <= 1.05 for c in cob),
            "iteration_predicted_over_measured_median": ratio,
            "chosen_is_sweep_best": sum(r["same_as_best"] for r in rows),
            "sweep_pass_ratio_median": statistics.median(r["chosen_over_best_sweep_pass"] for r in rows),
            "chosen_over_best_median": statistics.median(cob) if cob else math.nan,
            "chosen_over_best_max": max(cob) if cob else math.nan,
            "speedup_fsmoe_over_default_geomean": gm(sp_def),
            "speedup_fsmoe_over_tutel_geomean": gm(sp_tut),
            "speedup_over_default_geomean": sp,
            "fsmoe_faster_than_default": sum(s > 1 for s in sp_def),
            "fsmoe_faster_than_tutel": sum(s > 1 for s in sp_tut)}


def report_markdown(res: dict, command: str) -> str:
    s, e = res["summary"], res["op_errors"]
    lines = [f"Command: `{command}`", "",
             f"Layout {res['layout']} ({res['world']} processes, {res['device']}), {s['configs']} configs, "
             f"wall {res['seconds']:.0f} s.", "",
             "| metric | value |", "|---|---|",
             f"| per-op prediction error, median over ops (offline profile) | "
             f"{e['offline']['all']['median'] * 100:.1f}% ({e['offline']['all']['ops']} ops) |",
             f"| per-op prediction error, median over ops (refitted online) | "
             f"{e['refitted']['all']['median'] * 100:.1f}% |",
             f"| same, every single run (offline / refitted) | {e['offline']['all']['instance'] * 100:.1f}% / "
             f"{e['refitted']['all']['instance'] * 100:.1f}% |",
             f"| noise floor: single runs vs their own op's median | {e['noise_floor'] * 100:.1f}% |",
             f"| chosen within 5% of sweep best (head-to-head re-measure) | {s['chosen_within_5pct']}/{s['configs']} "
             f"(median ratio {s['chosen_over_best_median']:.3f}, max {s['chosen_over_best_max']:.3f}) |",
             f"| chosen is the sweep's best point | {s['chosen_is_sweep_best']}/{s['configs']} "
             f"(sweep-pass ratio median {s['sweep_pass_ratio_median']:.3f}) |",
             "| iteration time, predicted / measured (median over configs; default, fsmoe) | " + (
                 " / ".join(f"{s['iteration_predicted_over_measured_median'][k]:.2f}" for k in ("default", "fsmoe"))
                 if "iteration_predicted_over_measured_median" in s else "n/a") + " |",
             f"| FSMoE speedup over Default (geomean) | {s['speedup_fsmoe_over_default_geomean']:.3f}x "
             f"(faster on {s['fsmoe_faster_than_default']}/{s['configs']}) |",
             f"| FSMoE speedup over Tutel-Improved (geomean) | {s['speedup_fsmoe_over_tutel_geomean']:.3f}x "
             f"(faster on {s['fsmoe_faster_than_tutel']}/{s['configs']}) |", "",
             "Per-op median relative error by fit (op = one op of one rank, its median over the timed "
             "iterations; single runs in brackets):", "",
             "| op | ops | offline | refitted |", "|---|---|---|---|"]
    for k in e["offline"]:
        if k not in ("all", "noise_floor"):
            o, r = e["offline"][k], e["refitted"][k]
            lines.append(f"| {k} | {o['ops']} | {o['median'] * 100:.1f}% ({o['instance'] * 100:.0f}%) | "
                         f"{r['median'] * 100:.1f}% ({r['instance'] * 100:.0f}%) |")
    lines += ["", "Speedup over Default (geomean): " + ", ".join(
        f"{k} {v:.3f}x" for k, v in s["speedup_over_default_geomean"].items()), "",
        "| config | default ms | tutel ms | lina ms | no-IIO ms | fsmoe ms | r fwd/bwd | best sweep | chosen/best |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        c, t = r["config"], r["seconds"]
        lines.append(f"| B{c['B']} h{c['heads']} L{c['L']} M{c['M']} H{c['H']} f{c['f'] or 'nd'} {c['ffn']} | "
                     f"{t['default'] * 1e3:.1f} | {t['tutel_improved'] * 1e3:.1f} | {t['pipemoe_lina'] * 1e3:.1f} | "
                     f"{t['fsmoe_no_iio'] * 1e3:.1f} | {t['fsmoe'] * 1e3:.1f} | {r['chosen']['r_fwd']}/"
                     f"{r['chosen']['r_bwd']} | {r['best_sweep']['name'][6:]} {r['best_sweep']['seconds'] * 1e3:.1f} | "
                     f"{r['chosen_over_best']:.3f} |")
    return "\n".join(lines)


def merge_runs(dirs: list[Path]) -> dict:
    """One result from several runs' ``results.json`` + ``ops.jsonl`` (e.g. halves of a grid
    measured in separate calls): rows concatenated, summaries and per-op errors recomputed."""
    parts, errors = [], []
    for d in dirs:
        for name in ("results.json", "ops.jsonl"):
            if not (d / name).is_file():
                raise SystemExit(f"--merge: {d / name} is missing (a run dir of `fsmoe bench schedule`)")
        parts.append(json.loads((d / "results.json").read_text()))
        for line in (d / "ops.jsonl").read_text().splitlines():
            o = json.loads(line)
            if o["kind"] in NOT_SCHEDULED:
                continue
            errors.append((o["key"], o["n"], statistics.median(o["runs"]), o["runs"],
                           {"offline": o["offline"], "refitted": o["refitted"]}))
    layouts = {p["layout"] for p in parts}
    if len(layouts) > 1:
        raise SystemExit(f"--merge: runs of different layouts {sorted(layouts)} cannot be merged")
    rows = [r for p in parts for r in p["rows"]]
    return {"layout": parts[0]["layout"], "world": parts[0]["world"], "device": parts[0]["device"],
            "profile": parts[0]["profile"], "refitted": parts[-1]["refitted"], "rows": rows,
            "op_errors": summarize_errors(errors), "summary": summarize(rows),
            "seconds": sum(p["seconds"] for p in parts), "merged_from": [str(d) for d in dirs]}
