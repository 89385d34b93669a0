#!/usr/bin/env bash
# The scheduler's measurements on a GPU host (docs/scheduler.md, "Results"):
#
#   gpu   tests/test_schedule_gpu.py (CUDA-stream executor = unpipelined layer), then
#         `fsmoe bench schedule` on the GPU grid (bf16, one GPU), pinned to cores 0-3
#   cpu   `fsmoe bench schedule` with 4 gloo processes as 2 simulated nodes x 2 (EP2 x ESP2) on
#         cores 4-15 of the same host: every rank and its lane threads get cores of their own,
#         unlike a 2-core CI machine where 4 ranks share 2 cores
#   both  the two at once (each on its own cores)
#   train `fsmoe train` (tiny preset, 4 gloo processes as 2 nodes x 2, EP2 x ESP2, FSMoE schedule)
#         recording an 8-step timeline: per-op error in metrics.jsonl (cores 0-3)
#   cpu+train  the two at once
#   multi `fsmoe bench schedule` over NCCL on every GPU of a multi-GPU machine: 4+ GPUs as
#         2 simulated nodes x 2 (EP2 x ESP2), 2 GPUs as one NVLink node (EP2), or with TWO_NODES=1
#         as 2 nodes x 1 (NCCL_P2P_DISABLE=1); QUICK=1 for --quick-sweep, PROFILE=P.json to skip
#         the start-up profile (docs/scheduler.md, "over NCCL")
#
# Usage: bash scripts/device_schedule.sh OUT_DIR PART [FIRST_CONFIG] [N_CONFIGS] [GPU_CONFIGS]
# Each part writes OUT_DIR/<part>.tgz (results.json, ops.jsonl, report.md, traces, Gantt PNGs)
# and OUT_DIR/<part>.log; merge CPU parts with `fsmoe bench schedule --merge DIR DIR`.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${1:?usage: device_schedule.sh OUT_DIR PART [FIRST] [N] [GPU_N]}
PART=${2:-both}
FIRST=${3:-0}
N=${4:-12}
GPU_N=${5:-20}
LIMIT=${LIMIT:-540}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

gpu() {
  local d=/tmp/fsmoe_sched/gpu
  taskset -c 0-3 timeout "$LIMIT" "$PY" -m pytest -q -p no:cacheprovider tests/test_schedule_gpu.py
  taskset -c 0-3 timeout "$LIMIT" "$PY" -m fsmoe.cli bench schedule --nproc 1 --ep 1 --esp 1 --gpus-per-node 1 \
    --configs "$GPU_N" --iters 5 --warmup 2 --device cuda --run-dir "$d"
  tar -czf "$OUT/gpu.tgz" -C "$d" .
}

cpu() {
  local d=/tmp/fsmoe_sched/cpu_$FIRST
  taskset -c 4-15 timeout "$LIMIT" "$PY" -m fsmoe.cli bench schedule --nproc 4 --ep 2 --esp 2 --gpus-per-node 2 \
    --configs "$N" --first-config "$FIRST" --iters 5 --warmup 1 --device cpu --run-dir "$d"
  tar -czf "$OUT/cpu_$FIRST.tgz" -C "$d" .
}

train() {
  local d=/tmp/fsmoe_sched/train
  rm -rf "$d"
  taskset -c 0-3 timeout "$LIMIT" "$PY" -m fsmoe.cli train --nproc 4 --ep 2 --esp 2 --gpus-per-node 2 --steps 14 \
    --timeline 8 --device cpu --set parallel.schedule=fsmoe --run-dir "$d"
  "$PY" - "$d/metrics.jsonl" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    if "op_error_median_offline" in d:
        print("train timeline:", {k: v for k, v in d.items() if k.startswith("op_") or k == "timeline_ops"})
PYEOF
  tar -czf "$OUT/train.tgz" -C "$d" metrics.jsonl profile.json profile_refit.json timeline.png config.json
}

multi() {
  local d=/tmp/fsmoe_sched/multi n
  n=$(nvidia-smi -L | wc -l)
  if [ "$n" -ge 4 ]; then set -- --nproc 4 --ep 2 --esp 2 --gpus-per-node 2
  elif [ "$n" -ge 2 ] && [ "${TWO_NODES:-0}" = 1 ]; then set -- --nproc 2 --ep 2 --esp 1 --gpus-per-node 1
  elif [ "$n" -ge 2 ]; then set -- --nproc 2 --ep 2 --esp 1 --gpus-per-node 2
  else echo "device_schedule.sh multi: needs 2 or more GPUs, found $n" >&2; return 2; fi
  # TWO_NODES=1: NCCL through host memory (about a 400 Gb/s NIC), the two GPUs as two nodes
  [ "${TWO_NODES:-0}" = 1 ] && export NCCL_P2P_DISABLE=1
  timeout "$LIMIT" "$PY" -m fsmoe.cli bench schedule "$@" --configs "$GPU_N" --first-config "$FIRST" --iters 5 \
    --warmup 2 --device cuda ${QUICK:+--quick-sweep} ${PROFILE:+--profile "$PROFILE"} --run-dir "$d"
  tar -czf "$OUT/multi.tgz" -C "$d" .
}

case "$PART" in
  gpu) gpu 2>&1 | tee "$OUT/gpu.log" ;;
  cpu) cpu 2>&1 | tee "$OUT/cpu_$FIRST.log" ;;
  both)
    gpu >"$OUT/gpu.log" 2>&1 &
    cpu >"$OUT/cpu_$FIRST.log" 2>&1 &
    wait
    tail -n 40 "$OUT/gpu.log" "$OUT/cpu_$FIRST.log" ;;
  train) train 2>&1 | tee "$OUT/train.log" ;;
  multi) multi 2>&1 | tee "$OUT/multi.log" ;;
  cpu+train)
    train >"$OUT/train.log" 2>&1 &
    cpu >"$OUT/cpu_$FIRST.log" 2>&1 &
    wait
    tail -n 30 "$OUT/train.log" "$OUT/cpu_$FIRST.log" ;;
  *) echo "device_schedule.sh: part must be gpu, cpu, both, train, cpu+train or multi, got '$PART'" >&2; exit 2 ;;
esac
