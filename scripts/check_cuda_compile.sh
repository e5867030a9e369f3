#!/usr/bin/env bash
# Compiles the torch-free CUDA sources with nvcc alone, no torch and no GPU
# needed: every csrc/cuda/*.cu, and every csrc/include/rlhf_fast/*.cuh in a
# translation unit of its own (which catches a header that leans on an
# include it does not make). sm_80 and sm_90, as setup.py builds by default.
# The *_ops.cpp glue (torch-side: checks, guards, streams) is syntax-checked
# with the host compiler against the CPU wheel's ATen/cuda headers, nvcc's
# CUDA runtime headers and scripts/cuda_glue_stubs (the math libraries'
# handle types): it cannot link without a CUDA torch, but a typo or a wrong
# type in it fails here instead of on the GPU machine.
#
# Prints "ok FILE" per file; on an error prints nvcc's output, checks the
# remaining files, and exits 1. Without nvcc it says so and exits 0.
# The kernels in csrc/cuda/*.cu are streaming scans and row passes: a spill
# is a local-memory round trip per element, so `ptxas -v` reporting any
# spill bytes for them fails the check too (registers per kernel printed).
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
  if "$nvcc" "${flags[@]}" -Xptxas -v -c "$src" -o "$tmp/x.o" >"$tmp/log" 2>&1; then
    # fp64 specialisations (the tests' dtype; 8 B on sm_90 in the GAE scan)
    # may spill; the fp32 / bf16 production kernels may not
    if ! spilled="$(python3 - "$tmp/log" <<'PY'
import re, subprocess, sys
text = open(sys.argv[1]).read()
bad = []
pattern = (r"Compiling entry function '([^']+)' for '(sm_\d+)'\s*\n(?:[^\n]*Function properties[^\n]*\n)?"
           r"\s*\d+ bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
found = re.findall(pattern, text)
if not found and "Compiling entry function" in text:
    sys.exit("could not read ptxas -v spill lines")
for name, sm, st, ld in found:
    if int(st) + int(ld) == 0:
        continue
    pretty = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
    if "<" in pretty and "double" not in pretty.split("<", 1)[1].split(">", 1)[0]:
        bad.append(f"{pretty} [{sm}]: {st} B spill stores, {ld} B spill loads")
print("\n".join(bad))
sys.exit(1 if bad else 0)
PY
)"; then
      echo "FAIL $label: spills"
      echo "$spilled"
      failed=1
      return
    fi
    regs="$(grep -oE "Used [0-9]+ registers" "$tmp/log" | awk '{print $2}' | sort -n | tail -1 || true)"  # none in a header-only unit
    echo "ok $label${regs:+ (at most $regs registers; no fp32 / bf16 spills)}"
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

# The glue: g++ -fsyntax-only, C++20 as setup.py builds it.
glue=(csrc/cuda/*_ops.cpp)
cuda_include="$("$nvcc" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
# -I flags for torch's headers and Python's; empty when torch or its
# ATen/cuda headers are missing (then the glue is skipped, and says so).
torch_flags="$(python3 - 2>/dev/null <<'PY' || true
import os, sysconfig
import torch.utils.cpp_extension as c
paths = c.include_paths()
assert any(os.path.exists(os.path.join(p, "ATen/cuda/CUDAContext.h")) for p in paths)
print(" ".join("-I" + p for p in paths + [sysconfig.get_paths()["include"]]))
PY
)"
if (( ${#glue[@]} )); then
  if [[ -z "$torch_flags" ]]; then
    echo "skipped the *_ops.cpp glue: torch or its ATen/cuda headers not found"
  else
    for f in "${glue[@]}"; do
      # shellcheck disable=SC2086  # torch_flags is a list of -I flags
      if "${CXX:-g++}" -std=c++20 -fsyntax-only $torch_flags -I scripts/cuda_glue_stubs \
           -I "$cuda_include/targets/x86_64-linux/include" -I "$cuda_include/include" -I csrc/include -I csrc \
           "$f" >"$tmp/log" 2>&1; then
        echo "ok $f (host syntax check)"
      else
        echo "FAIL $f (host syntax check)"
        cat "$tmp/log"
        failed=1
      fi
    done
  fi
fi

if (( failed )); then
  echo "check_cuda_compile: FAILED ($("$nvcc" --version | tail -n 1))"
  exit 1
fi
