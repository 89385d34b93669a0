#!/usr/bin/env bash
# Conversion time and peak host memory of `fsmoe convert` on a model of realistic shape, and a
# generation speed check on the GPU (README, "Hugging Face checkpoints").
#
#   1. scripts/make_hf_checkpoint.py writes a random-weight Qwen3-30B-A3B with LAYERS layers (bf16,
#      SHARD_GB shards, as the published checkpoint is sharded) into WORK/hf;
#   2. `fsmoe convert WORK/hf WORK/run` (HF -> fsmoe, a fresh process): time, peak RSS, largest
#      shard -> OUT/convert_in.json;
#   3. `fsmoe convert WORK/run WORK/back --to-hf` -> OUT/convert_out.json, and a check that every
#      tensor came back byte for byte;
#   4. `fsmoe generate WORK/run` with token ids on the GPU in bf16 (cache on and off) -> OUT/generate.txt.
#
# Usage: bash scripts/device_convert.sh OUT_DIR [LAYERS [SHARD_GB]]   (defaults 6 layers, 4 GB:
# about 8.6 GB of weights; PYTHON=python3, WORK=/tmp/fsmoe_convert; SETS="model.d_model=64 ..." shrinks
# the model for a quick check of the script itself)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: device_convert.sh OUT_DIR [LAYERS [SHARD_GB]]}
LAYERS=${2:-6}
SHARD_GB=${3:-4}
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/fsmoe_convert}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
rm -rf "$WORK"
mkdir -p "$WORK"
# shellcheck disable=SC2086  # SETS is a list of KEY=VALUE words
"$PY" scripts/make_hf_checkpoint.py qwen3-30b-a3b "$WORK/hf" --layers "$LAYERS" --shard-gb "$SHARD_GB" \
  ${SETS:+--set $SETS} | tee "$OUT/make.txt"
"$PY" -m fsmoe.cli convert "$WORK/hf" "$WORK/run" --report "$OUT/convert_in.json" | tee "$OUT/convert.txt"
"$PY" -m fsmoe.cli convert "$WORK/run" "$WORK/back" --to-hf --max-shard-gb "$SHARD_GB" \
  --report "$OUT/convert_out.json" | tee -a "$OUT/convert.txt"
"$PY" - "$WORK/hf" "$WORK/back" <<'EOF' | tee -a "$OUT/convert.txt"
import sys
from pathlib import Path
from safetensors import safe_open

def index(root):
    out = {}
    for f in sorted(Path(root).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: f for k in h.keys()})
    return out

a, b = index(sys.argv[1]), index(sys.argv[2])
assert sorted(a) == sorted(b), "tensor names differ"
for k in a:
    with safe_open(a[k], "pt") as x, safe_open(b[k], "pt") as y:
        assert x.get_tensor(k).view(-1).view(dtype=__import__("torch").uint8).equal(
            y.get_tensor(k).view(-1).view(dtype=__import__("torch").uint8)), k
print(f"HF -> fsmoe -> HF: {len(a)} tensors byte-identical")
EOF
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  for cache in "" "--no-cache"; do
    "$PY" -m fsmoe.cli generate "$WORK/run" --prompt-ids "1 2 3 4 5 6 7 8" --prompt-ids "9 10 11" \
      --max-new-tokens 32 --device cuda --dtype bfloat16 $cache | tee -a "$OUT/generate.txt"
  done
fi
du -sh "$WORK"/* | tee -a "$OUT/convert.txt"
rm -rf "$WORK"
