#!/usr/bin/env bash
# The one script for a lent H100 / H200: about 7 minutes, sized to one call of
# the device tool (15 minutes of device time in all, start-up included).
# Every step has its own timeout and writes into $OUT as soon as it has
# something, so a call cut short still returns what it measured:
#   $OUT/run.log        everything printed, streamed
#   $OUT/facts.txt      device, driver, versions, git commit, date
#   $OUT/build.log      the CUDA extension build (sm_90 only, MAX_JOBS=16)
#   $OUT/smoke.json     each Triton kernel once at a real shape vs torch, and how it compiled there
#   $OUT/gpu-tests.xml  pytest -m gpu (junit), per-test timeout
#   $OUT/compass.jsonl  the GPU targets timed against copy bandwidth and their eager peers
#   $OUT/dispatch.json  per op, the faster backend (CUDA or Triton) measured here
# Exit status: non-zero when the build, a smoke check or a GPU test failed.
# Commit what comes back under benchmarks/results/gpu-<device>-<date>/.
#
#   bash benchmarks/gpu/run_device.sh          (from the repository root; OUT defaults to ./gpu-out)
set -uo pipefail
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 RLHF_FAST_TEST_GPU=1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
PY=python3
status=0

step() {  # step NAME SECONDS CMD...: run with a timeout, log its status, never abort the script
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s) $(date -u +%H:%M:%S)"
  timeout -k 10 "$limit" "$@"
  local rc=$?
  echo "== $name: exit $rc $(date -u +%H:%M:%S)"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  echo "git $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  $PY -c "import transformers; print('transformers', transformers.__version__)" 2>/dev/null
} > "$OUT/facts.txt" 2>&1
cat "$OUT/facts.txt"

# The CUDA build (about 1.5-2 min at 16 jobs) runs beside the Triton smoke
# step, which needs no rlhf_fast._C.
(
  RLHF_FAST_BUILD_CUDA=1 RLHF_FAST_CUDA_ARCHS=9.0 MAX_JOBS=16 \
    timeout -k 10 300 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  echo $? > "$OUT/build.rc"
) &
build=$!

step smoke 180 $PY -m benchmarks.gpu.smoke --json "$OUT/smoke.json"

wait "$build"
echo "== build: exit $(cat "$OUT/build.rc" 2>/dev/null || echo missing)"
if ! $PY -c "import rlhf_fast._backend as b, sys; sys.exit(0 if b.has_cuda_kernels() else 1)"; then
  echo "== FAILED: the CUDA kernels did not build; last lines of build.log:"
  tail -40 "$OUT/build.log"
  status=1
fi
$PY -m rlhf_fast.cli info || status=1

step gpu-tests 150 $PY -m pytest tests -m gpu -q -p no:cacheprovider --timeout 60 --junitxml "$OUT/gpu-tests.xml"

step compass 240 $PY -m benchmarks.gpu.compass --out "$OUT/compass.jsonl"
# which backend won per op here: commit with `--write` to make it the GPU default
$PY -m benchmarks.gpu.dispatch_table "$OUT/compass.jsonl" > "$OUT/dispatch.json" || status=1

echo "== done, status $status $(date -u +%H:%M:%S)"
exit "$status"
