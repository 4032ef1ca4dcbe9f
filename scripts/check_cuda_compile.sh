#!/usr/bin/env bash
# Compile-check the torch-free CUDA kernel (ext/cuda/stitch_kernel.cu) with nvcc for sm_80 and
# sm_90. Exits non-zero on a compile error; exits 0 with "skipped: no nvcc" where nvcc is missing.
# The torch binding (ext/cuda/stitch_cuda.cpp) is not checked here: it needs a CUDA build of torch
# (setup.py builds it whenever torch.version.cuda is set and nvcc exists).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/ext/cuda/stitch_kernel.cu"

NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
  NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
fi
if [ -z "$NVCC" ]; then
  echo "check_cuda_compile: skipped: no nvcc"
  exit 0
fi

# the kernel must stay torch-free, or a bare nvcc (and this check) cannot compile it
if grep -nE '#include *[<"](torch|ATen|c10)/' "$SRC" "$ROOT/ext/cuda/stitch_kernel.h"; then
  echo "check_cuda_compile: FAILED: the CUDA kernel must not include torch headers" >&2
  exit 1
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "check_cuda_compile: $("$NVCC" --version | tail -n 1)"
for arch in 80 90; do
  echo "check_cuda_compile: nvcc -c ext/cuda/stitch_kernel.cu -arch=sm_$arch -O3"
  "$NVCC" -c "$SRC" -arch="sm_$arch" -O3 -Xcompiler -Wall -o "$TMP/stitch_kernel_sm$arch.o"
  echo "check_cuda_compile: sm_$arch ok ($(stat -c %s "$TMP/stitch_kernel_sm$arch.o") bytes)"
done
echo "check_cuda_compile: passed"
