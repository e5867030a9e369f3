#!/usr/bin/env bash
# Compiles the torch-free CUDA sources with nvcc alone, no torch and no GPU
# needed: every csrc/cuda/*.cu, and every csrc/include/rlhf_fast/*.cuh in a
# translation unit of its own (which catches a header that leans on an
# include it does not make). sm_80 and sm_90, as setup.py builds by default.
# The *_ops.cpp glue needs a CUDA build of torch and is not compiled here.
#
# Prints "ok FILE" per file; on an error prints nvcc's output, checks the
# remaining files, and exits 1. Without nvcc it says so and exits 0.
#
#   scripts/check_cuda_compile.sh            # from anywhere in the repo
#   NVCC=/opt/cuda/bin/nvcc scripts/check_cuda_compile.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

nvcc="${NVCC:-}"
if [[ -z "$nvcc" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    nvcc="$(command -v nvcc)"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    nvcc=/usr/local/cuda/bin/nvcc
  else
    echo "skipped: nvcc not found on PATH or at /usr/local/cuda/bin/nvcc"
    exit 0
  fi
fi

flags=(-std=c++20 -O3 -I csrc/include
       -gencode arch=compute_80,code=sm_80
       -gencode arch=compute_90,code=sm_90)

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

failed=0
# compile LABEL SOURCE: one nvcc run, "ok LABEL" or its errors.
compile() {
  local label="$1" src="$2"
  if "$nvcc" "${flags[@]}" -c "$src" -o "$tmp/x.o" >"$tmp/log" 2>&1; then
    echo "ok $label"
  else
    echo "FAIL $label"
    cat "$tmp/log"
    failed=1
  fi
}

shopt -s nullglob
sources=(csrc/cuda/*.cu)
headers=(csrc/include/rlhf_fast/*.cuh)
if (( ${#sources[@]} + ${#headers[@]} == 0 )); then
  echo "nothing to check: no csrc/cuda/*.cu or csrc/include/rlhf_fast/*.cuh"
  exit 0
fi

for f in "${sources[@]}"; do
  compile "$f" "$f"
done
for h in "${headers[@]}"; do
  tu="$tmp/include_$(basename "$h" .cuh).cu"
  printf '#include "rlhf_fast/%s"\n' "$(basename "$h")" >"$tu"
  compile "$h" "$tu"
done

if (( failed )); then
  echo "check_cuda_compile: FAILED ($("$nvcc" --version | tail -n 1))"
  exit 1
fi
