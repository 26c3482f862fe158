#!/usr/bin/env bash
# Compile every CUDA kernel source for sm_80 (int4 tensor-core path) and sm_90a (Hopper), with
# nvcc only (no GPU and no torch needed: the CUDA core never includes torch headers). Fails on
# any compiler error, and on any wgmma that ptxas serializes (its C7510-C7519 notes: a silent
# slowdown of the Hopper GEMM); ptxas reports spills. The torch binding is built by the JIT on a
# GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null; then
  for d in /usr/local/cuda/bin /usr/local/cuda-13.0/bin; do [ -x "$d/nvcc" ] && NVCC="$d/nvcc"; done
fi
command -v "$NVCC" >/dev/null || { echo "check_kernels_compile: nvcc not found" >&2; exit 1; }
# The half-precision switches torch.utils.cpp_extension always passes to nvcc: code that compiles
# without them can still fail the JIT build on the GPU machine.
TORCH_FLAGS=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# compile SRC OBJ NVCC-ARGS...: ptxas's verbose report goes to a log; what it warns of is shown.
compile() {
  local src=$1 obj=$2
  shift 2
  if ! "$NVCC" -std=c++17 -O3 -Ikernels "${TORCH_FLAGS[@]}" -Xptxas -v,-warn-spills "$@" -c "$src" -o "$obj" \
    > "$obj.log" 2>&1; then
    cat "$obj.log" >&2
    return 1
  fi
  grep -v "ptxas info\|bytes stack frame\|^$" "$obj.log" || true
  if grep -q "wgmma.mma_async instructions are serialized" "$obj.log"; then
    grep "wgmma.mma_async instructions are serialized" "$obj.log" >&2
    echo "check_kernels_compile: ptxas serializes wgmma in ${src} ($*)" >&2
    return 1
  fi
}
for src in kernels/*.cu scripts/read_pattern_bench.cu; do
  for arch in 80 90a; do
    echo "nvcc sm_${arch}: ${src}"
    compile "$src" "$out/$(basename "$src").sm${arch}.o" "-gencode=arch=compute_${arch},code=sm_${arch}"
  done
done
# Experiment switches whose code is otherwise never compiled (docs/BENCHMARKS.md): sm_90a only.
for flag in -DCOMET_WIDE_PIPELINE=0 -DCOMET_WIDE_PIPELINE=2; do
  echo "nvcc sm_90a ${flag}: kernels/w4ax_wgmma.cu"
  compile kernels/w4ax_wgmma.cu "$out/w4ax_wgmma.variant.o" "-gencode=arch=compute_90a,code=sm_90a" "$flag"
done
echo "kernel sources compile"
