#!/usr/bin/env bash
# llama.cpp's source for the GPU machine (which cannot download): the llama-cpp-python 0.3.36 source
# distribution's vendor/llama.cpp, trimmed of what llama-bench does not build (models, docs, tests,
# examples, the other GPU backends), as .peers/llama.cpp.tgz (about 9 MB; ignored by git, carried by
# the device call: scripts/device_infer.sh OUT llamacpp ...).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
${PIP:-.venv/bin/pip} download -q llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d "$tmp"
tar xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp" llama_cpp_python-0.3.36/vendor/llama.cpp
mv "$tmp"/llama_cpp_python-0.3.36/vendor/llama.cpp "$tmp"/llama.cpp
(cd "$tmp"/llama.cpp && rm -rf models docs tests benches examples media pocs gguf-py/tests tools/server/webui \
  ggml/src/ggml-{sycl,vulkan,opencl,cann,musa,hip,metal,webgpu,zdnn,kompute,hexagon})
mkdir -p .peers
tar czf .peers/llama.cpp.tgz -C "$tmp" llama.cpp
ls -la .peers/llama.cpp.tgz
