#!/usr/bin/env bash
# Expert placement measurements on a GPU host (docs/placement.md, "Results"):
#
#   gpu    `fsmoe bench placement` over NCCL on 2 GPUs: static vs FlexMoE vs EPLB-style, side by
#          side in one run, skewed synthetic routing (hot experts on one GPU), fp32; at the skew
#          of the earlier figures (0.3) and at a stronger one (0.6)
#   cpu    the same over gloo with 4 and with 8 CPU processes, pinned to cores 2-15 (each rank a
#          core of its own, unlike a 2-core CI machine where the ranks share two cores)
#   trace  `fsmoe train` of gpt2-xl-moe cut to 8 layers (16 experts, early training) on 2 GPUs,
#          static with --trace, then with parallel.placement=flexmoe (tokens/s, rank balance,
#          pause side by side), then the policies replayed on the static run's trace
#          (`fsmoe bench placement --trace`: balance on the next window, bytes moved), last window
#          and EMA 0.5; the FlexMoE run moves experts behind compute (placement_wait_s /
#          placement_hidden_s in its metrics)
#
# Usage: bash scripts/device_placement.sh OUT_DIR [gpu|cpu|trace|all]   (PYTHON=python3 by default;
# CORES=2-15 and NPROCS="4 8" set the cpu part's cores and process counts)
# Each part writes OUT_DIR/<part>*.json and OUT_DIR/<part>*.log and stays under 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${1:?usage: device_placement.sh OUT_DIR [gpu|cpu|trace|all]}
PART=${2:-all}
LIMIT=${LIMIT:-280}
CORES=${CORES:-2-15}
NPROCS=${NPROCS:-4 8}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

gpu() {
  local skew
  for skew in 0.3 0.6; do
    timeout "$LIMIT" "$PY" -m fsmoe.cli bench placement --nproc 2 --device cuda --experts 16 --layers 2 \
      --d-model 2048 --d-ff 4096 --batch 8 --seq-len 1024 --skew "$skew" --interval 4 --rebalances 3 --iters 10 \
      --json "$OUT/gpu_skew$skew.json"
  done
}

cpu() {
  local n
  for n in $NPROCS; do
    OMP_NUM_THREADS=1 taskset -c "$CORES" timeout "$LIMIT" "$PY" -m fsmoe.cli bench placement --nproc "$n" \
      --device cpu --experts $((8 * n)) --layers 2 --d-model 128 --d-ff 512 --batch 8 --seq-len 128 --skew 0.3 \
      --interval 4 --rebalances 3 --iters 8 --json "$OUT/cpu$n.json"
  done
}

trace() {
  local d=/tmp/fsmoe_placement p
  rm -rf "$d"
  for p in static flexmoe; do  # the same run, static (traced) and FlexMoE (rebalancing every 8 steps)
    timeout "$LIMIT" "$PY" -m fsmoe.cli train --nproc 2 --ep 2 --config gpt2-xl-moe --steps 48 --run-dir "$d/$p" \
      $([ "$p" = static ] && echo --trace) --set model.n_layers=8 model.moe.num_experts=16 train.batch_size=8 \
      train.warmup_steps=10 train.log_every=8 train.eval_every=1000 train.ckpt_every=0 parallel.placement="'$p'" \
      parallel.placement_interval=8
    cp "$d/$p/metrics.jsonl" "$OUT/train_$p.jsonl" 2>/dev/null
  done
  cp "$d/static/routing_trace.jsonl.gz" "$OUT/" 2>/dev/null
  "$PY" - "$OUT/train_static.jsonl" "$OUT/train_flexmoe.jsonl" <<'PYEOF'
import json, statistics, sys
for path in sys.argv[1:]:
    try:
        recs = [json.loads(line) for line in open(path)][1:]  # the first window holds warm-up
    except FileNotFoundError:
        print(path, "missing"); continue
    print(path, "median tokens/s", round(statistics.median(r["tokens_per_s"] for r in recs)),
          "rank_balance", [r.get("rank_balance") for r in recs], "imbalance", [round(r["imbalance"], 2) for r in recs],
          "pause_s", [r.get("placement_pause_s") for r in recs if "placement_pause_s" in r],
          "wait_s", [r.get("placement_wait_s") for r in recs if "placement_wait_s" in r],
          "hidden_s", [r.get("placement_hidden_s") for r in recs if "placement_hidden_s" in r])
PYEOF
  "$PY" -m fsmoe.cli bench placement --trace "$OUT/routing_trace.jsonl.gz" --interval 8 --extra-slots 0.125 \
    --json "$OUT/replay.json" --plot "$OUT/replay.png"
  "$PY" -m fsmoe.cli bench placement --trace "$OUT/routing_trace.jsonl.gz" --interval 8 --extra-slots 0.125 \
    --ema 0.5 --json "$OUT/replay_ema.json"
}

case "$PART" in
  gpu) gpu 2>&1 | tee "$OUT/gpu.log" ;;
  cpu) cpu 2>&1 | tee "$OUT/cpu.log" ;;
  trace) trace 2>&1 | tee "$OUT/trace.log" ;;
  all)
    gpu >"$OUT/gpu.log" 2>&1
    cpu >"$OUT/cpu.log" 2>&1
    trace >"$OUT/trace.log" 2>&1
    tail -n 8 "$OUT/gpu.log" "$OUT/cpu.log" "$OUT/trace.log" ;;
  *) echo "device_placement.sh: part must be gpu, cpu, trace or all, got '$PART'" >&2; exit 2 ;;
esac
