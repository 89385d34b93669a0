#!/usr/bin/env python3
"""Regenerate docs/performance.md from the JSON that ``fsmoe bench layer|train --json`` wrote.

Usage: python3 scripts/perf_page.py benchmarks/results/layer.json benchmarks/results/train.json \
           [--notes benchmarks/results/notes.md] [-o docs/performance.md]

The tables, the device, torch/Triton versions and the exact commands all come from the JSON, so
the page always matches the run it was made from; ``--notes`` appends hand-written analysis
(profile evidence, what limits each config, next steps), kept beside the results.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

CATS = ("gemm", "fsmoe_triton", "elementwise/other", "index/scatter", "sort/scan")
LAYER_ORDER = ["dense", "loop", "grouped", "torchtitan", "fsmoe-torch", "fsmoe-cutlass", "fsmoe", "dense-graph",
               "fsmoe-cutlass-graph", "fsmoe-graph"]
LABEL = {"dense": "dense ceiling", "loop": "HF-style loop", "grouped": "plain grouped_mm recipe",
         "torchtitan": "torchtitan MoE", "fsmoe-torch": "fsmoe (kernels=torch)", "fsmoe": "**fsmoe**",
         "dense-graph": "dense ceiling, CUDA graph", "fsmoe-graph": "**fsmoe, CUDA graph**",
         "fsmoe-cutlass": "fsmoe, experts on torch's grouped_mm", "fsmoe-cutlass-graph": "fsmoe, experts on torch's grouped_mm, CUDA graph"}


def _command(d: dict) -> str:
    """The run's command, with output paths reduced to their file names (the machine's are not ours)."""
    return " ".join(w.rsplit("/", 1)[-1] if w.endswith(".json") else w for w in d["command"].split())


def _meta_line(d: dict) -> str:
    m = d["meta"]
    parts = [f"{m.get('name')}", f"torch {m.get('torch')}"]
    if m.get("cuda"):
        parts.append(f"CUDA {m['cuda']}")
    if m.get("triton"):
        parts.append(f"Triton {m['triton']}")
    if m.get("fsmoe_kernels"):
        parts.append(f"fsmoe kernels={m['fsmoe_kernels']}")
    return ", ".join(parts)


def layer_section(d: dict) -> list[str]:
    out = ["## MoE layer: forward + backward, bf16", "",
           f"Device: {_meta_line(d)}. Median of {d.get('iters')} timed steps (CUDA events) after warm-up; "
           "every variant in the same process, same weights and inputs.", "",
           "Command:", "", "```", _command(d), "```", ""]
    summary = ["| config (T, d, f, E, k) | target | grouped_mm recipe | torchtitan | fsmoe | fsmoe, CUDA graph |",
               "|---|---|---|---|---|---|"]
    for name, c in d["configs"].items():
        s, v = c["shape"], c["variants"]

        def frac(k):
            r = v.get(k, {})
            return f"{r['fraction']:.3f}" if "fraction" in r else ("error" if "error" in r else "–")

        tgt = f"≥ {c['target']:.2f}" if "target" in c else "–"
        summary.append(f"| {name} ({s['T']}, {s['D']}, {s['F']}, {s['E']}, {s['K']}) | {tgt} | {frac('grouped')} | "
                       f"{frac('torchtitan')} | **{frac('fsmoe')}** | {frac('fsmoe-graph')} |")
    out += ["Fraction of the dense ceiling (higher is better; 1.0 = as fast as one dense GEMM chain with the "
            "same FLOPs; the CUDA-graph column is against the graphed dense chain):", ""] + summary + [""]
    for name, c in d["configs"].items():
        s, v = c["shape"], c["variants"]
        out += [f"### {name}: T={s['T']} d={s['D']} f={s['F']} E={s['E']} k={s['K']}", "",
                "| variant | ms | TFLOP/s | fraction of dense | step peak memory (GiB) |", "|---|---|---|---|---|"]
        for k in LAYER_ORDER:
            if k not in v:
                continue
            r = v[k]
            if "error" in r:
                out.append(f"| {LABEL[k]} | – | – | – | not run: {r['error'][:90]} |")
                continue
            mem = "–" if r.get("peak_mem_gb") is None else f"{r['peak_mem_gb']:.2f}"
            ms = f"{r['ms']:.3f}"
            if "ms_first" in r:
                ms += f" ({r['ms_first']:.3f} / {r['ms_last']:.3f})"
            out.append(f"| {LABEL[k]} | {ms} | {r['tflops']:.1f} | {r.get('fraction', float('nan')):.3f} | {mem} |")
        if c.get("rel_err_vs_grouped"):
            errs = ", ".join(f"{k} {e:.1e}" for k, e in c["rel_err_vs_grouped"].items())
            out += ["", f"Output agreement with the grouped_mm recipe (relative error norm, bf16): {errs}."]
        prof = {k: v[k]["profile"] for k in ("dense", "fsmoe") if v.get(k, {}).get("profile")}
        if prof:
            out += ["", "GPU kernel time by category (torch.profiler, ms per step, % of kernel time):", "",
                    "| variant | kernel ms | " + " | ".join(CATS) + " |", "|---|---|---|---|---|---|---|"]
            for k, p in prof.items():
                cells = []
                for cat in CATS:
                    x = p["categories"].get(cat)
                    cells.append(f"{x['ms']:.2f} ({x['pct']:.0f}%)" if x else "–")
                out.append(f"| {k} | {p['total_ms']:.2f} | " + " | ".join(cells) + " |")
            if "fsmoe" in prof:
                out += ["", "fsmoe's largest kernels:", "", "| kernel | calls | ms | % |", "|---|---|---|---|"]
                for t in prof["fsmoe"]["top"][:8]:
                    nm = t["name"]
                    if "cutlass" in nm:
                        nm = "CUTLASS sm90 grouped GEMM (torch grouped_mm)"
                    out.append(f"| `{nm[:70]}` | {t['calls']} | {t['ms']:.3f} | {t['pct']:.1f} |")
        out.append("")
    return out


def rerun_section(first: dict, again: dict) -> list[str]:
    """Fractions of two runs side by side: their spread is the noise level of the numbers above."""
    out = ["## Repeatability", "",
           f"A second run on the same machine (`{_command(again)}`); fraction of dense in each:", "",
           "| config | variant | run 1 | run 2 |", "|---|---|---|---|"]
    for name, c in again["configs"].items():
        c1 = first["configs"].get(name, {}).get("variants", {})
        for v, r in c["variants"].items():
            if v.startswith("dense") or "fraction" not in r or "fraction" not in c1.get(v, {}):
                continue
            out.append(f"| {name} | {LABEL.get(v, v)} | {c1[v]['fraction']:.3f} | {r['fraction']:.3f} |")
    return out + [""]


def train_section(d: dict) -> list[str]:
    extra = f"; overrides {' '.join(d['overrides'])}" if d.get("overrides") else ""
    out = [f"## `fsmoe train`'s step on one GPU: {d['model']}", "",
           f"Device: {_meta_line(d)}; MFU against {d.get('peak_tflops')} TFLOP/s (dense bf16 peak by datasheet). "
           f"Preset `{d.get('preset', d['model'])}` cut to {d['layers']} layers, batch {d['batch']} × {d['seq_len']} "
           f"tokens{extra}. What is timed is `Trainer.train_step`, the step `fsmoe train` runs: fp32 master weights "
           "and fused-AdamW state, bf16 compute under autocast, clipping, the non-finite guard, batches of the "
           "stdlib corpus.", "",
           "Command:", "", "```", _command(d), "```", "",
           "| variant | ms / step | tokens/s | model TFLOP/s | MFU | peak memory (GiB) |", "|---|---|---|---|---|---|"]
    for k, r in d["variants"].items():
        if "error" in r:
            out.append(f"| {k} | – | – | – | – | not run: {r['error'][:90]} |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "–"
        out.append(f"| {'**fsmoe**' if k == 'fsmoe' else k} | {r['ms']:.1f} | {r['tokens_per_s']:,} | "
                   f"{r['model_tflops']:.1f} | {mfu} | {r.get('peak_mem_gb', '–')} |")
    if d.get("speedup_vs_torchtitan"):
        out += ["", f"fsmoe / torchtitan tokens/s: **{d['speedup_vs_torchtitan']:.3f}×** (same decoder, same "
                "optimizer; only the MoE layers differ)."]
    v = next(iter(d["variants"].values()), {})
    if "params" in v:
        out += ["", f"Parameters: {v['params'] / 1e9:.2f} B total, {v['active_params'] / 1e9:.2f} B active per token; "
                f"{v['flops_per_token'] / 1e9:.2f} GFLOP per token (6·N_active + attention)."]
    p = d["variants"].get("fsmoe", {}).get("profile")
    if p:
        out += ["", "fsmoe step, GPU kernel time by category: " + ", ".join(
            f"{c} {x['ms']:.1f} ms ({x['pct']:.0f}%)" for c, x in p["categories"].items()) + "."]
    out.append("")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", help="JSON files from fsmoe bench layer/train --json")
    ap.add_argument("--notes", nargs="+", default=[], help="Markdown files appended after the tables")
    ap.add_argument("--rerun", help="a second `fsmoe bench layer --json` of the same session (repeatability table)")
    ap.add_argument("-o", "--output", default="docs/performance.md")
    a = ap.parse_args()
    docs = [json.loads(Path(p).read_text()) for p in a.inputs]
    lines = ["# Performance", "",
             "Generated by `scripts/perf_page.py` from the JSON written by `fsmoe bench layer` and `fsmoe bench train` "
             f"({', '.join('`' + p + '`' for p in a.inputs)}). Do not edit by hand: rerun the commands below on the "
             "device and regenerate.", "",
             "How to reproduce (one GPU; the baselines run in the same process as fsmoe):", "", "```",
             "bash scripts/gpu_check.sh                      # kernel numerics on the device",
             "fsmoe bench layer --iters 30 --profile --json benchmarks/results/layer.json",
             "fsmoe bench layer --iters 20 --variants dense,grouped,fsmoe,dense-graph,fsmoe-graph "
             "--json benchmarks/results/layer_rerun.json",
             "# the training step (Trainer.train_step, what `fsmoe train` runs); the H200 runs used",
             "# scripts/device_train.sh, which also runs `fsmoe train` itself on 1 and 2 GPUs",
             "fsmoe bench train --model mixtral-2l --json benchmarks/results/train/bench_mixtral-2l.json",
             "fsmoe bench train --model mixtral-2l --set train.compile=true "
             "--json benchmarks/results/train/bench_mixtral-2l_compile.json",
             "fsmoe bench train --model qwen3-moe-4l --json benchmarks/results/train/bench_qwen3-moe-4l.json",
             "fsmoe bench train --model gpt2-xl-moe-8l --variants fsmoe "
             "--json benchmarks/results/train/bench_gpt2-xl-moe-8l.json",
             "python3 scripts/perf_page.py benchmarks/results/layer.json benchmarks/results/train/bench_*.json "
             "--rerun benchmarks/results/layer_rerun.json "
             "--notes benchmarks/results/train/notes.md benchmarks/results/notes.md", "```", ""]
    for d in docs:
        lines += layer_section(d) if d.get("kind") == "layer" else train_section(d)
    first_layer = next((d for d in docs if d.get("kind") == "layer"), None)
    if a.rerun and first_layer:
        lines += rerun_section(first_layer, json.loads(Path(a.rerun).read_text()))
    for notes in a.notes:
        if Path(notes).exists():
            lines += [Path(notes).read_text().rstrip(), ""]
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text("\n".join(lines))
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
