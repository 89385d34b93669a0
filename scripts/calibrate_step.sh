#!/usr/bin/env bash
# The whole-step predictor (`fsmoe simulate step`) against `fsmoe train` on this host: each setting
# trains with --trace, profiles the same run at its shapes (`fsmoe profile --config`), then
# compares (by phase). Usage:
#   bash scripts/calibrate_step.sh OUT [CONFIG] [STEPS] [SETTINGS...]
# SETTINGS are NPROC:EP pairs (default 1:1 2:2 4:4 4:2 8:8); results in OUT/np<N>_ep<EP>/step.json.
# Environment: DEVICE=cpu|cuda|auto (default cpu: gloo on the cores; cuda: one GPU per process),
# SET="KEY=VALUE ..." config overrides given to both train and profile, PYTHON (default .venv/bin/python).
set -euo pipefail
out=${1:?usage: calibrate_step.sh OUT [CONFIG] [STEPS] [NPROC:EP ...]}
config=${2:-tiny}
steps=${3:-40}
shift $(( $# < 3 ? $# : 3 ))
settings=("$@")
[ ${#settings[@]} -gt 0 ] || settings=(1:1 2:2 4:4 4:2 8:8)
py=${PYTHON:-.venv/bin/python}
device=${DEVICE:-cpu}
read -r -a overrides <<< "${SET:-}"
mkdir -p "$out"
for s in "${settings[@]}"; do
  n=${s%%:*}; ep=${s##*:}; dir="$out/np${n}_ep${ep}"
  rm -rf "$dir"; mkdir -p "$dir"
  echo "== $n processes, EP $ep ($device)"
  $py -m fsmoe.cli train --config "$config" --device "$device" --nproc "$n" --ep "$ep" --steps "$steps" \
      --run-dir "$dir/run" --trace --set train.eval_every=1000 train.ckpt_every=0 "${overrides[@]}" \
      > "$dir/train.log" 2>&1
  $py -m fsmoe.cli profile --config "$config" --device "$device" --nproc "$n" --ep "$ep" --out "$dir/profile.json" \
      ${overrides[@]:+--set "${overrides[@]}"} > "$dir/profile.log" 2>&1
  $py -m fsmoe.cli simulate step "$dir/run" --profile "$dir/profile.json" --json "$dir/step.json" | tail -n 12
done
