#!/usr/bin/env bash
# The whole-step predictor (`fsmoe simulate step`) against `fsmoe train` on this CPU host, with
# gloo at several process counts: each setting trains, profiles the same run at its shapes
# (`fsmoe profile --config`), then compares. Usage:
#   bash scripts/calibrate_step_cpu.sh OUT [CONFIG] [STEPS] [SETTINGS...]
# SETTINGS are NPROC:EP pairs (default 1:1 2:2 4:4 4:2 8:8); results in OUT/<setting>/step.json.
set -euo pipefail
out=${1:?usage: calibrate_step_cpu.sh OUT [CONFIG] [STEPS] [NPROC:EP ...]}
config=${2:-tiny}
steps=${3:-40}
shift $(( $# < 3 ? $# : 3 ))
settings=("$@")
[ ${#settings[@]} -gt 0 ] || settings=(1:1 2:2 4:4 4:2 8:8)
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
for s in "${settings[@]}"; do
  n=${s%%:*}; ep=${s##*:}; dir="$out/np${n}_ep${ep}"
  rm -rf "$dir"; mkdir -p "$dir"
  echo "== $n processes, EP $ep"
  $py -m fsmoe.cli train --config "$config" --nproc "$n" --ep "$ep" --steps "$steps" --run-dir "$dir/run" --trace \
      --set train.eval_every=1000 train.ckpt_every=0 > "$dir/train.log" 2>&1
  $py -m fsmoe.cli profile --config "$config" --nproc "$n" --ep "$ep" --out "$dir/profile.json" > "$dir/profile.log" 2>&1
  $py -m fsmoe.cli simulate step "$dir/run" --profile "$dir/profile.json" --json "$dir/step.json" | tail -n 4
done
