#!/usr/bin/env bash
# One script for a lent GPU machine (H100/H200): build the CUDA extension,
# run the GPU tests and the GPU benchmarks, write results with the device,
# versions and date. Run from the repository root:
#   bash benchmarks/gpu/run_device.sh            # results -> benchmarks/results/ (and $OUT if set)
set -uo pipefail
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 RLHF_FAST_TEST_GPU=1
out_dir="${OUT:-benchmarks/results}"
mkdir -p "$out_dir"
stamp=$(date -u +%Y%m%d)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-' )
log="$out_dir/gpu-$gpu-$stamp.log"
{
  echo "== device"; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "== build"
  RLHF_FAST_BUILD_CUDA=1 RLHF_FAST_CUDA_ARCHS="9.0" MAX_JOBS=16 python setup.py build_ext --inplace 2>&1 | tail -5
  python -m rlhf_fast.cli info
  echo "== GPU tests"
  python -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tail -40
  echo "== GPU benchmarks"
  python -m rlhf_fast.cli bench --json "$out_dir/gpu-$gpu-$stamp.json" 2>&1 | grep -v USDT
} 2>&1 | tee "$log"
