#!/usr/bin/env bash
# Training speed on the GPU machine (docs/performance.md): what `fsmoe train` itself reaches.
#
#   check GPU        scripts/gpu_check.sh (kernels + the trainer's step) on GPU number GPU
#   bench GPU MODEL [--set ...]
#                    `fsmoe bench train --model MODEL` (Trainer.train_step; fsmoe vs torchtitan in the
#                    same process) -> OUT/bench_MODEL.json
#   train GPUS NAME SECONDS ARGS...
#                    `fsmoe train ARGS` on the comma-separated GPUS (one GPU: plain; several:
#                    --nproc N), stopped with SIGINT after SECONDS; prints the logged records'
#                    tokens/s, MFU and peak memory -> OUT/train_NAME.jsonl
#
# Usage: bash scripts/device_train.sh OUT_DIR PART ARGS...   (PYTHON=python3 by default; FSMOE_ROOT
# runs another checkout's fsmoe, e.g. an older commit for a before/after comparison)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: device_train.sh OUT_DIR PART ARGS...}
PART=${2:?part: check | bench | train}
shift 2
ROOT=${FSMOE_ROOT:-$PWD}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
PY=${PYTHON:-python3}
mkdir -p "$OUT"

case "$PART" in
  check)
    CUDA_VISIBLE_DEVICES=$1 bash scripts/gpu_check.sh
    ;;
  bench)
    gpu=$1 model=$2
    shift 2
    CUDA_VISIBLE_DEVICES=$gpu "$PY" -m fsmoe.cli bench train --model "$model" --variants fsmoe,torchtitan \
      --json "$OUT/bench_$model.json" "$@"
    ;;
  train)
    gpus=$1 name=$2 secs=$3
    shift 3
    n=$(awk -F, '{print NF}' <<<"$gpus")
    nproc=()
    [ "$n" -gt 1 ] && nproc=(--nproc "$n")
    run_dir=/tmp/fsmoe_train/$name
    rm -rf "$run_dir"
    start=$EPOCHREALTIME
    (while [ ! -s "$run_dir/metrics.jsonl" ]; do sleep 0.2; done
     echo "train $name: first record (step $(grep -o '"step": [0-9]*' "$run_dir/metrics.jsonl" | head -1 | cut -d' ' -f2)) $(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }') s after the start") &
    watcher=$!
    (cd "$ROOT" && CUDA_VISIBLE_DEVICES=$gpus timeout -s INT -k 30 "$secs" "$PY" -m fsmoe.cli train "${nproc[@]}" \
      --run-dir "$run_dir" "$@" >"$OUT/train_$name.log" 2>&1)
    echo "train $name: exit $? (124/130 = stopped after ${secs}s, as planned)"
    kill "$watcher" 2>/dev/null
    grep -v "^\s*$" "$OUT/train_$name.log" | head -4
    cp "$run_dir/metrics.jsonl" "$OUT/train_$name.jsonl" 2>/dev/null
    "$PY" - "$run_dir/metrics.jsonl" "$name" <<'PYEOF'
import json, statistics, sys
try:
    recs = [json.loads(l) for l in open(sys.argv[1])]
except FileNotFoundError:
    sys.exit(print(f"train {sys.argv[2]}: no metrics"))
steady = recs[1:] or recs  # the first window holds warm-up (allocator, autotuning)
tps = statistics.median(r["tokens_per_s"] for r in steady)
mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
print(f"train {sys.argv[2]}: {len(recs)} records, steps {recs[0]['step']}..{recs[-1]['step']}, median tokens/s "
      f"{tps:,.0f}" + (f", MFU {100 * statistics.median(mfu):.1f}%" if mfu else "")
      + f", loss {recs[0]['loss']:.3f} -> {recs[-1]['loss']:.3f}")
PYEOF
    ;;
  *)
    echo "unknown part $PART" >&2
    exit 2
    ;;
esac
