#!/usr/bin/env bash
# DeepSpeed-MoE as a peer in `fsmoe train` on 2 GPUs (model.moe.impl=deepspeed, docs/performance.md):
# the same decoder, data, optimizer step and metrics as our runs; only the MoE layers differ.
#
# Installs the wheels in .whl-peers/ (deepspeed built with DS_BUILD_OPS=0, hjson, pydantic and its
# deps; on a machine with pip access: `DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation
# deepspeed==0.19.8 -w .whl-peers` and `pip download --no-deps -d .whl-peers hjson pydantic
# pydantic-core annotated-types typing-inspection typing-extensions`) into /tmp/peers-site, on
# PYTHONPATH only: the machine's torch and packages stay as they are. Then, with scripts/device_train.sh's `train` part, gpt2-xl-moe cut to 8 layers, EP2, global
# batch 16 x 1024, bf16, each run stopped after a fixed number of seconds:
#
#   nvl_ds, nvl_default, nvl_fsmoe     over NVLink: the DeepSpeed peer, our default path, our FSMoE schedule
#   two_ds, two_default, two_fsmoe     the two GPUs as two nodes (NCCL_P2P_DISABLE=1, --gpus-per-node 1)
#
# All runs use the same router config: top-2 GShard, capacity factor CAPACITY (default 1.25, the
# setting DeepSpeed-MoE and the FSMoE paper use; CAPACITY=none runs dropless: DeepSpeed's
# drop_tokens=False). NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends).
#
# Usage: bash scripts/device_peers.sh OUT_DIR [SECONDS_DS SECONDS_DEFAULT SECONDS_FSMOE]
#   (defaults 55 50 65: startup is ~30 s before the first record, FSMoE's adds its start-up profile)
#   RUNS="nvl_ds nvl_default ..." picks runs; PYTHON=python3 by default.
# OUT_DIR receives train_NAME.jsonl per run, summary.txt (median tokens/s and MFU without the first
# record, and the ratio to our default path in the same setting) and logs.tar.gz (every run's log).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: device_peers.sh OUT_DIR [SECONDS_DS SECONDS_DEFAULT SECONDS_FSMOE]}
S_DS=${2:-55} S_DEF=${3:-50} S_FS=${4:-65}
RUNS=${RUNS:-nvl_ds nvl_default nvl_fsmoe two_ds two_default two_fsmoe}
CAPACITY=${CAPACITY:-1.25}
PY=${PYTHON:-python3}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOGS=/tmp/fsmoe_peers_logs
rm -rf "$LOGS" && mkdir -p "$LOGS"

"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers-site \
  .whl-peers/*.whl || { echo "wheel install failed: build .whl-peers/ first (see the header)"; exit 1; }
export PYTHONPATH=/tmp/peers-site
"$PY" - <<'PYEOF' || exit 1
import time, torch
t = time.perf_counter()
import deepspeed
from deepspeed.accelerator import get_accelerator
from deepspeed.moe.layer import MoE  # noqa: F401
print(f"deepspeed {deepspeed.__version__} from {deepspeed.__file__} (import {time.perf_counter() - t:.1f} s), "
      f"accelerator {get_accelerator().device_name()}; torch {torch.__version__} from {torch.__file__}, "
      f"{torch.cuda.device_count()} GPUs")
PYEOF

COMMON=(--config gpt2-xl-moe --set model.n_layers=8 train.batch_size=16 parallel.ep=2 train.log_every=5
        train.eval_every=100000 train.ckpt_every=100000 "model.moe.router.capacity_factor=$CAPACITY")
[ "$CAPACITY" = none ] && COMMON=("${COMMON[@]:0:${#COMMON[@]}-1}")
for run in $RUNS; do
  setting=${run%%_*} variant=${run#*_}
  case $variant in
    ds) secs=$S_DS extra=(model.moe.impl=deepspeed) ;;
    default) secs=$S_DEF extra=(parallel.schedule=default) ;;
    fsmoe) secs=$S_FS extra=(parallel.schedule=fsmoe) ;;
    *) echo "unknown run $run"; continue ;;
  esac
  if [ "$setting" = two ]; then
    NCCL_P2P_DISABLE=1 bash scripts/device_train.sh "$LOGS" train 0,1 "$run" "$secs" "${COMMON[@]}" "${extra[@]}" \
      --gpus-per-node 1
  else
    bash scripts/device_train.sh "$LOGS" train 0,1 "$run" "$secs" "${COMMON[@]}" "${extra[@]}"
  fi
  cp "$LOGS/train_$run.jsonl" "$OUT/" 2>/dev/null
  grep -m3 -i -E "error|Traceback|interrupted" "$LOGS/train_$run.log" | head -3
done
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null

"$PY" - "$LOGS" "$CAPACITY" $RUNS <<'PYEOF' | tee "$OUT/summary.txt"
import json, statistics, sys
from pathlib import Path
logs, capacity, runs = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
print(f"gpt2-xl-moe 8 layers, EP2, 16 x 1024 tokens, bf16, capacity factor {capacity}; median of the records "
      "after the first")
med = {}
for run in runs:
    f = logs / f"train_{run}.jsonl"
    recs = [json.loads(l) for l in f.read_text().splitlines()] if f.exists() else []
    if len(recs) < 2:
        print(f"{run:12s} no steady records ({len(recs)})")
        continue
    steady = recs[1:]
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    mfu = statistics.median(r["mfu"] for r in steady if r.get("mfu") is not None) if steady[0].get("mfu") else float("nan")
    med[run] = tps
    print(f"{run:12s} {tps:10,.0f} tokens/s  MFU {100 * mfu:5.1f}%  steps {recs[0]['step']}..{recs[-1]['step']}  "
          f"dropped/step {statistics.median(r['dropped'] for r in steady):.0f}  loss {recs[0]['loss']:.3f} -> "
          f"{recs[-1]['loss']:.3f}")
for setting in ("nvl", "two"):  # each peer against our default path in the same setting
    d = med.get(f"{setting}_default")
    if d:
        print(setting, ", ".join(f"{v}/default {med[f'{setting}_{v}'] / d:.3f}x" for v in ("ds", "fsmoe")
                                 if f"{setting}_{v}" in med))
PYEOF
