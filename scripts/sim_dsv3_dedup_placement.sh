#!/usr/bin/env bash
# DeepSeek-V3 at 1,024 GPUs (EP 64, fat-tree, skewed routing) under every combination of expert
# placement and dedup depth, Default and FSMoE schedules: the table of docs/simulation.md
# ("Dedup and expert placement at scale"). Compute from the H200 two-node profile.
# Usage: bash scripts/sim_dsv3_dedup_placement.sh OUT
set -euo pipefail
out=${1:?usage: sim_dsv3_dedup_placement.sh OUT}
py=${PYTHON:-.venv/bin/python}
profile=benchmarks/results/schedule/gpu2/run4/profile_two_nodes_refitted_bf16.json
mkdir -p "$out"
for nic in 400 100; do
  for placement in static flexmoe eplb; do
    for depth in 0 auto; do
      $py -m fsmoe.cli simulate cluster --config deepseek-v3 --gpus 1024 --ep 64 --fabric leaf-spine \
          --nic-gbps "$nic" --profile "$profile" --policies default,fsmoe --routing skewed \
          --placement "$placement" --dedup-depth "$depth" --json "$out/dsv3_${nic}_${placement}_d${depth}.json" > /dev/null
      echo "$nic $placement d=$depth done"
    done
  done
done
