#!/usr/bin/env bash
# Hybrid CPU/GPU inference on the GPU machine (docs/inference.md).
#
#   check            the hybrid engine's and the graphed decode's CUDA tests (tests/test_hybrid_infer.py,
#                    tests/test_decode_graph.py) and the machine's CPU
#   bench NAME ARGS  `fsmoe bench infer ARGS --out OUT/NAME` -> OUT/NAME/{results.json, sweep.png, timelines}
#   cpu [THREADS]    the CPU experts' kernel on this host against torch's GEMM, 1 to 256 tokens per expert
#                    (benchmarks/cpu_expert_kernels.py): as built here (AMX tiles from 4 tokens where
#                    present), with bf16 dot products only, and on a Mixtral-sized expert -> OUT/cpu_*.txt
#   llamacpp NAME N_CPU_MOE GGUF_ARGS...
#                    llama.cpp itself on the same shapes: builds llama-bench with CUDA from
#                    .peers/llama.cpp.tgz (carry it: llama.cpp's source, trimmed of models, docs, tests and
#                    other backends), writes random bf16 weights as GGUF (scripts/write_gguf.py GGUF_ARGS,
#                    e.g. --config qwen3-30b-a3b --set model.n_layers=24), and runs llama-bench with every
#                    layer on the GPU but the experts of the first N_CPU_MOE layers (--n-cpu-moe, a
#                    comma-separated list runs each; all layers = `-ot exps=CPU`), prefill 512 and
#                    decode 16 tokens -> OUT/NAME_llamacpp.json. The stripped static build comes back as
#                    OUT/llama-bench.tar.xz.NN; copied to .peers/ and carried, it is used instead of
#                    building again.
#
# Usage: bash scripts/device_infer.sh OUT_DIR PART ARGS...   (PYTHON=python3 by default)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: device_infer.sh OUT_DIR PART ARGS...}
PART=${2:?part: check | bench | cpu | llamacpp}
shift 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
PY=${PYTHON:-python3}
mkdir -p "$OUT"
case "$PART" in
  check)
    (lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core|Socket|NUMA node\(s\)|L3"; grep -o -w -E "amx_bf16|avx512_bf16|avx512f" /proc/cpuinfo | sort | uniq -c; free -g) | tee "$OUT/cpu.txt"
    "$PY" -m pytest -q -p no:cacheprovider -rfEs tests/test_hybrid_infer.py tests/test_decode_graph.py 2>&1 | tail -5 | tee "$OUT/check.txt"
    ;;
  bench)
    name=$1
    shift
    "$PY" -m fsmoe.cli bench infer --out "$OUT/$name" "$@" 2>&1 | tee "$OUT/$name.log"
    ;;
  llamacpp)
    name=$1 ncpumoe=$2
    shift 2
    bin=/tmp/llama.cpp/build/bin/llama-bench
    if ls .peers/llama-bench.tar.xz.* > /dev/null 2>&1; then  # built by an earlier call (it came back in OUT)
      cat .peers/llama-bench.tar.xz.* | tar xJf - -C / || exit 1
    fi
    # the weights are written while llama-bench builds (one on the GPU and the disk, one on the cores)
    "$PY" scripts/write_gguf.py /tmp/model.gguf "$@" > "$OUT/${name}_gguf.log" 2>&1 &
    gguf=$!
    if [ ! -x "$bin" ]; then
      src=/tmp/llama.cpp
      rm -rf "$src" && tar xzf .peers/llama.cpp.tgz -C /tmp || exit 1
      cmake -S "$src" -B "$src/build" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF \
        > "$OUT/${name}_build.log" 2>&1 &&
        cmake --build "$src/build" --target llama-bench -j "$(nproc)" >> "$OUT/${name}_build.log" 2>&1 || {
          tail -20 "$OUT/${name}_build.log"; exit 1; }
      # in parts of 15 MiB: files come back from the GPU machine up to 16 MiB each
      strip "$bin" && tar cf - "$bin" | xz -T0 -6 | split -b 15m -d - "$OUT/llama-bench.tar.xz." && ls -la "$OUT"
    fi
    wait $gguf || { tail -5 "$OUT/${name}_gguf.log"; exit 1; }
    "$bin" -m /tmp/model.gguf -ngl 99 --n-cpu-moe "$ncpumoe" -p 512 -n 16 -r 3 \
      -t "$(( $(nproc) - 1 ))" -o json > "$OUT/${name}_llamacpp.json" 2> "$OUT/${name}_llamacpp.log"
    tail -5 "$OUT/${name}_llamacpp.log"
    rm -f /tmp/model.gguf
    ;;
  cpu)
    threads=${1:-$(( $(nproc) - 1 ))}
    for variant in "tiles:" "dot_products:-mno-amx-tile -mno-amx-bf16"; do
      FSMOE_CACHE_DIR=/tmp/fsmoe_cpu_kernel FSMOE_CPU_KERNEL_FLAGS="${variant#*:}" \
        "$PY" benchmarks/cpu_expert_kernels.py --threads "$threads" --reps 100 > "$OUT/cpu_${variant%%:*}.txt" 2>&1
      echo "== ${variant%%:*}"; grep "8 per call  \|linear W" "$OUT/cpu_${variant%%:*}.txt"
    done
    # a Mixtral-8x7B expert (352 MiB): prefill's tokens per expert
    FSMOE_CACHE_DIR=/tmp/fsmoe_cpu_kernel "$PY" benchmarks/cpu_expert_kernels.py --threads "$threads" --d 4096 \
      --f 14336 --experts 6 --reps 12 --tokens 16,64,128,256,512 > "$OUT/cpu_tiles_mixtral.txt" 2>&1
    echo "== tiles, Mixtral's expert"; grep "8 per call  \|linear W\|native kernel" "$OUT/cpu_tiles_mixtral.txt"
    ;;
  *) echo "unknown part $PART" >&2; exit 2 ;;
esac
