#!/usr/bin/env bash
# The hierarchical dispatcher on a GPU host (docs/hierarchical.md, "Results").
#
#   gpu    2 GPUs as 2 nodes (NCCL_P2P_DISABLE=1: no NVLink/P2P between them, traffic goes through
#          the host as it would through a NIC): `fsmoe profile` (per-level fits), then
#          `fsmoe bench dispatch` (bf16, 4096 tokens/GPU, d_model 4096) for the uniform, skewed and
#          DeepSeek group-limited routings at top-8 and top-2 -> OUT/gpu_<routing>_k<K>.json
#   fixed  2 GPUs as 2 nodes: `fsmoe profile` (per-level fits and the hierarchical dispatcher's
#          fixed cost per d), then `fsmoe bench dispatch` flat vs hier-d1 vs auto with that profile
#          and with the default fixed cost, for top-2 uniform and top-8 group-limited routing
#          -> OUT/fixed_<routing>_k<K>[_default].json
#   train  `fsmoe train --nproc 2 --ep 2` (tiny preset, NCCL, 2 nodes) with the flat dispatcher and
#          the hierarchical one at d = 1 and with d chosen per layer (expert swaps every 5 steps):
#          the loss curves must agree
#   cpu    `fsmoe bench dispatch` with 8 gloo processes as 2 nodes x 2 sockets x 2 on cores 0-15
#          (every rank a core of its own, unlike a 2-core CI machine)
#   all    gpu, train, cpu one after the other
#
# Usage: bash scripts/device_dispatch.sh OUT_DIR [PART]   (PYTHON=python3 by default; the train
# part's runs: RUNS="alltoall:0 hierarchical:1 hierarchical:0", dispatcher:dedup_depth)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${1:?usage: device_dispatch.sh OUT_DIR [gpu|fixed|train|cpu|all]}
PART=${2:-all}
LIMIT=${LIMIT:-540}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

gpu() {
  export NCCL_P2P_DISABLE=1 CUDA_VISIBLE_DEVICES=${GPUS:-0,1}
  timeout "$LIMIT" "$PY" -m fsmoe.cli profile --nproc 2 --ep 2 --topology 2 --device cuda --quick \
    --out "$OUT/profile_2nodes.json"
  for routing in grouped uniform skewed; do
    for k in 8 2; do
      timeout "$LIMIT" "$PY" -m fsmoe.cli bench dispatch --nproc 2 --ep 2 --topology 2 --device cuda \
        --dtype bfloat16 --tokens 4096 --d-model 4096 --experts 64 --top-k "$k" --routing "$routing" \
        --groups 8 --topk-groups 4 --iters 20 --warmup 5 --profile "$OUT/profile_2nodes.json" \
        --json "$OUT/gpu_${routing}_k${k}.json"
    done
  done
}

fixed() {
  export NCCL_P2P_DISABLE=1 CUDA_VISIBLE_DEVICES=${GPUS:-0,1}
  timeout "$LIMIT" "$PY" -m fsmoe.cli profile --nproc 2 --ep 2 --topology 2 --device cuda --quick \
    --out "$OUT/profile_2nodes.json"
  for rk in "uniform 2" "grouped 8"; do
    set -- $rk
    for prof in measured default; do
      local extra=(--profile "$OUT/profile_2nodes.json") tag=""
      [ "$prof" = default ] && extra=() tag=_default
      timeout "$LIMIT" "$PY" -m fsmoe.cli bench dispatch --nproc 2 --ep 2 --topology 2 --device cuda \
        --dtype bfloat16 --tokens 4096 --d-model 4096 --experts 64 --top-k "$2" --routing "$1" \
        --groups 8 --topk-groups 4 --iters 20 --warmup 5 "${extra[@]}" --json "$OUT/fixed_${1}_k${2}${tag}.json"
    done
  done
}

train() {
  export NCCL_P2P_DISABLE=1 CUDA_VISIBLE_DEVICES=${GPUS:-0,1}
  local d run disp depth
  # flat; d = 1 forced (the dedup path itself, expert swaps every 5 steps); d chosen per layer
  for run in ${RUNS:-alltoall:0 hierarchical:1 hierarchical:0}; do
    disp=${run%:*} depth=${run#*:}
    d=/tmp/fsmoe_dispatch/train_${disp}_d$depth
    rm -rf "$d"
    local extra=()
    [ "$disp" = hierarchical ] && extra=(parallel.expert_swap_every=5 model.moe.dedup_depth=$depth)
    timeout "$LIMIT" "$PY" -m fsmoe.cli train --nproc 2 --ep 2 --device cuda --steps 20 --run-dir "$d" \
      --set parallel.topology=[2] model.moe.dispatcher="'$disp'" train.log_every=5 train.ckpt_every=0 "${extra[@]}"
    cp "$d/metrics.jsonl" "$OUT/train_${disp}_d$depth.jsonl"
  done
  "$PY" - "$OUT/train_alltoall_d0.jsonl" "$OUT/train_hierarchical_d1.jsonl" "$OUT/train_hierarchical_d0.jsonl" <<'PYEOF'
import json, os, sys
flat, *hiers = ([json.loads(l) for l in open(p)] if os.path.exists(p) else [] for p in sys.argv[1:])
for name, hier in zip(("d=1", "auto"), hiers):
    for a, b in zip(flat, hier):
        print(f"{name} step {a['step']:>3}: loss flat {a['loss']:.6f} hierarchical {b['loss']:.6f} "
              f"diff {abs(a['loss'] - b['loss']):.2e}; tok/s {a['tokens_per_s']:,.0f} vs {b['tokens_per_s']:,.0f}; "
              f"d {b.get('dispatch_depth')} calibration_ms {b.get('dispatch_calibration_ms')} swaps {b.get('swap_pairs')} "
              f"swap_s {b.get('swap_s')}")
PYEOF
}

cpu() {
  taskset -c 0-15 timeout "$LIMIT" "$PY" -m fsmoe.cli bench dispatch --nproc 8 --topology 2,2,2 --device cpu \
    --tokens 512 --d-model 1024 --experts 64 --top-k 8 --routing grouped --iters 10 --warmup 3 \
    --json "$OUT/cpu8_grouped_k8.json"
}

case "$PART" in
  gpu) gpu 2>&1 | tee "$OUT/gpu.log" ;;
  fixed) fixed 2>&1 | tee "$OUT/fixed.log" ;;
  train) train 2>&1 | tee "$OUT/train.log" ;;
  cpu) cpu 2>&1 | tee "$OUT/cpu.log" ;;
  all)
    gpu 2>&1 | tee "$OUT/gpu.log"
    train 2>&1 | tee "$OUT/train.log"
    cpu 2>&1 | tee "$OUT/cpu.log" ;;
  *) echo "device_dispatch.sh: part must be gpu, fixed, train, cpu or all, got '$PART'" >&2; exit 2 ;;
esac
