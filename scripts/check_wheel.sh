#!/usr/bin/env bash
# Builds the binary wheel (the compiled rlhf_fast._C inside) and proves a user can install and run it on a
# machine with no compiler: a fresh virtual environment that sees the installed torch (--system-site-packages),
# the wheel installed into it with --no-deps, then the ops run with PATH holding no compiler at all.
#
# The wheel is built in the source tree with pip's in-tree build, so it reuses the objects the Makefile's
# `build_ext --inplace` left in build/ (ninja finds them up to date: ~25 s on 2 cores, no recompile).
# The wheel is tied to the torch it was built against (TORCH_LIBRARY uses libtorch's C++ ABI): see the README.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" .
wheel=$(ls "$work"/dist/rlhf_fast-*.whl)
listing=$(unzip -l "$wheel")  # not piped into grep -q: with pipefail, unzip's SIGPIPE would fail the check
grep -q 'rlhf_fast/_C.*\.so' <<<"$listing" || { echo "check_wheel: $wheel has no compiled rlhf_fast._C" >&2; exit 1; }

"$PY" -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install -q --no-deps --ignore-installed "$wheel"

# No compiler reachable: PATH is one empty folder, and the venv's python is called by its full path (a link to
# it elsewhere would not find the venv's pyvenv.cfg and would run the base interpreter).
mkdir "$work/empty"
cd "$work"  # not the source tree: the import must come from the installed wheel
env -i HOME="$work" PATH="$work/empty" TRITON_INTERPRET=0 "$work/venv/bin/python" - <<'PY'
import shutil
import sys

for tool in ("c++", "g++", "gcc", "cc", "clang", "nvcc", "ninja"):
    assert shutil.which(tool) is None, f"{tool} is on PATH: the check needs a machine without a compiler"
import torch

import rlhf_fast
from rlhf_fast import _backend

assert "/venv/" in rlhf_fast.__file__, f"imported {rlhf_fast.__file__}, not the installed wheel"
assert _backend.BUILD_INFO, f"the wheel's compiled extension did not load: {_backend._C_ERROR}"
x, y = torch.randn(6, 33), torch.randint(0, 33, (6,))
lp = rlhf_fast.logprobs_from_logits(x, y)
want = torch.log_softmax(x.double(), -1).gather(1, y[:, None]).squeeze(1)
assert (lp.double() - want).abs().max() < 1e-5
adv, _ = rlhf_fast.gae(torch.randn(3, 7), torch.randn(3, 7), torch.ones(3, 7))
loss, _ = rlhf_fast.ppo_loss(torch.randn(3, 7), torch.randn(3, 7), adv, torch.ones(3, 7, dtype=torch.bool))
tokens = rlhf_fast.sample(torch.randn(4, 9)).tokens
assert loss.isfinite() and tokens.shape == (4,)
with rlhf_fast.use_backend("cpp"):  # the compiled kernels, not the reference fallback
    rlhf_fast.logprobs_from_logits(x, y)
print(f"check_wheel: the wheel installs and runs its compiled ops with no compiler on PATH "
      f"(python {sys.version.split()[0]}, torch {torch.__version__}, isa {_backend.BUILD_INFO['cpu_isa']})")
PY
