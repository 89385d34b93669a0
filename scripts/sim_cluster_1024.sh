#!/usr/bin/env bash
# The 1,024-GPU whole-step simulations of docs/simulation.md: five presets on a fat-tree and on
# mFabric at 100G and 400G (gpt2-xl-moe also rail-optimised), Default and FSMoE schedules, then
# perf per dollar against the fat-tree. Usage: bash scripts/sim_cluster_1024.sh OUT [MP] [PP] [MICRO]
# (MP: tensor parallelism inside each server, PP: pipeline stages of MICRO microbatches; default
# 1 1 = neither). Compute from the H200 two-node profile.
set -euo pipefail
out=${1:?usage: sim_cluster_1024.sh OUT [MP] [PP] [MICRO]}
mp=${2:-1}
pp=${3:-1}
micro=${4:-$(( 4 * pp ))}
py=${PYTHON:-.venv/bin/python}
profile=benchmarks/results/schedule/gpu2/run4/profile_two_nodes_refitted_bf16.json
mkdir -p "$out"
for preset_ep in gpt2-xl-moe:64 mixtral-8x7b:8 mixtral-8x22b:8 qwen3-30b-a3b:32 deepseek-v3:64; do
  preset=${preset_ep%%:*}; ep=${preset_ep##*:}
  fabrics="leaf-spine mfabric"; [ "$preset" = gpt2-xl-moe ] && fabrics="leaf-spine rail mfabric"
  for fabric in $fabrics; do
    for nic in 100 400; do
      $py -m fsmoe.cli simulate cluster --config "$preset" --gpus 1024 --ep "$ep" --mp "$mp" --pp "$pp" --microbatches "$micro" --fabric "$fabric" \
          --nic-gbps "$nic" --profile "$profile" --policies default,fsmoe \
          --json "$out/${preset}_${fabric}_${nic}.json" > /dev/null
      echo "$preset $fabric ${nic}G done"
    done
  done
done
$py -m fsmoe.cli simulate compare "$out" --plot "$out/perf_per_dollar.png" --json "$out/perf_per_dollar.json"
