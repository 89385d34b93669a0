#!/usr/bin/env bash
# Kernel numerics on a CUDA device (run on the GPU machine; CPU CI runs the reference tests only).
#
# Every fast kernel against its plain-PyTorch reference, float32 and bf16 (bf16: relative error
# norm < 2e-2 against float32), odd shapes, experts with zero tokens, capacity drops (garbage in
# dropped rows must not leak), the whole MoE layer with kernels=triton vs kernels=torch (output,
# input and every parameter gradient), and no host synchronisation in forward/backward
# (torch.cuda.set_sync_debug_mode("error")); the pipelined executor on CUDA streams, with the
# Triton experts, against the sequential layer (tests/test_schedule_gpu.py); and the trainer's step
# (tests/test_train_gpu.py): every matmul and attention op on bf16 operands with fp32 master
# weights, no fp32 GEMM kernel, no host sync, bf16 losses within 5% of fp32 over 20 steps, a NaN
# step skipped by fused AdamW on the device; the op clock's CUDA events (tests/test_op_clock.py);
# our Triton grouped GEMMs for the experts against loops and torch's grouped_mm, bf16 at odd shapes,
# empty experts, dropped rows, CUDA-graph capture (tests/test_expert_gemm.py); the trainer's step
# replayed as a CUDA graph against eager steps, with its guard and checkpoints (train.cuda_graph);
# generation's decode steps replayed from CUDA graphs against eager ones (tests/test_decode_graph.py);
# the hybrid engine's in-place expert kernels against each expert alone (tests/test_zero_copy.py);
# the CPU lane beside the device path, its GPU kernels posting to the native server thread through
# pinned memory, eager and graphed (tests/test_mailbox.py).
#
# Usage: bash scripts/gpu_check.sh [extra pytest args]     (make gpu-check)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: needs a CUDA device and Triton" >&2
  exit 1
fi
"$PY" -c "import torch, triton; print('gpu_check:', torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
exec "$PY" -m pytest -q -p no:cacheprovider -rfEs --durations=15 tests/test_kernels.py tests/test_expert_gemm.py tests/test_schedule_gpu.py \
  tests/test_train_gpu.py tests/test_op_clock.py tests/test_decode_graph.py tests/test_zero_copy.py tests/test_mailbox.py "$@"
