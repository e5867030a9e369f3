#!/usr/bin/env bash
# One script for a lent GPU machine (H100/H200): build the CUDA extension,
# run the GPU tests and the whole benchmark suite, and write results to commit:
#   benchmarks/results/gpu-<name>-<date>.json   records + device, driver, versions, date, git commit
#   benchmarks/results/gpu-<name>-<date>.png    speedup chart
#   benchmarks/results/gpu-<name>-<date>.log    everything printed
#   docs/benchmarks.md                          regenerated from every committed result (CPU and GPU)
# Run from the repository root:
#   bash benchmarks/gpu/run_device.sh            # also copies the files to $OUT if set (device sessions)
#   QUICK=1 bash benchmarks/gpu/run_device.sh    # the suite's --quick shapes (a few minutes)
set -uo pipefail
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 RLHF_FAST_TEST_GPU=1
res=benchmarks/results
mkdir -p "$res"
stamp=$(date -u +%Y%m%d)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
base="$res/gpu-$gpu-$stamp"
quick=${QUICK:+--quick}
{
  echo "== device"; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "git $(git rev-parse --short HEAD 2>/dev/null)"
  echo "== build"
  RLHF_FAST_BUILD_CUDA=1 RLHF_FAST_CUDA_ARCHS="${RLHF_FAST_CUDA_ARCHS:-9.0}" MAX_JOBS=16 \
    python setup.py build_ext --inplace 2>&1 | tail -5
  python -m rlhf_fast.cli info
  echo "== GPU tests"
  python -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tail -40
  echo "== GPU benchmarks"
  python -m rlhf_fast.cli bench $quick --json "$base.json" --plot "$base.png" \
    --note "lent $gpu, driver $driver; run by benchmarks/gpu/run_device.sh" 2>&1 | grep -v USDT
  echo "== README section"
  python -m benchmarks.make_readme_table
} 2>&1 | tee "$base.log"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/results" "$OUT/docs"
  cp "$base".* "$OUT/results/" 2>/dev/null
  cp docs/benchmarks.md "$OUT/docs/" 2>/dev/null
fi
