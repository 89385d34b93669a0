#!/usr/bin/env bash
# Hybrid CPU/GPU inference on the GPU machine (docs/inference.md).
#
#   check            the hybrid engine's CUDA tests (tests/test_hybrid_infer.py) and the machine's CPU
#   bench NAME ARGS  `fsmoe bench infer ARGS --out OUT/NAME` -> OUT/NAME/{results.json, sweep.png, timelines}
#
# Usage: bash scripts/device_infer.sh OUT_DIR PART ARGS...   (PYTHON=python3 by default)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: device_infer.sh OUT_DIR PART ARGS...}
PART=${2:?part: check | bench}
shift 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
PY=${PYTHON:-python3}
mkdir -p "$OUT"
case "$PART" in
  check)
    (lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core|Socket|NUMA node\(s\)|L3"; grep -o -w -E "amx_bf16|avx512_bf16|avx512f" /proc/cpuinfo | sort | uniq -c; free -g) | tee "$OUT/cpu.txt"
    "$PY" -m pytest -q -p no:cacheprovider -rfEs tests/test_hybrid_infer.py 2>&1 | tail -5 | tee "$OUT/check.txt"
    ;;
  bench)
    name=$1
    shift
    "$PY" -m fsmoe.cli bench infer --out "$OUT/$name" "$@" 2>&1 | tee "$OUT/$name.log"
    ;;
  *) echo "unknown part $PART" >&2; exit 2 ;;
esac
