#!/usr/bin/env bash
# Installs the stacks the integration adapters are tested against (verl 0.9.1, OpenRLHF 0.11.2,
# TRL 1.16.0) on a CPU machine without pulling any CUDA wheel or touching the installed torch.
#
# verl and OpenRLHF pin CUDA-only packages (vllm, flash-attn, a CUDA torch): they are unpacked with
# --no-deps, then only the pure-Python modules they import are added. The second step resolves
# dependencies, so it is checked first with --dry-run and refused if torch would be (re)installed.
# Idempotent: returns in ~1 s when everything is already at the pinned versions.
set -euo pipefail

PY=${PYTHON:-python3}
STACKS=(verl==0.9.1 openrlhf==0.11.2 trl==1.16.0)
LIGHT=(ray omegaconf codetiming tensordict "deepspeed" peft torchdata aiohttp pylatexenc)

if "$PY" - <<'PY'
import importlib.metadata as md, sys
want = {"verl": "0.9.1", "openrlhf": "0.11.2", "trl": "1.16.0"}
light = ["ray", "omegaconf", "codetiming", "tensordict", "deepspeed", "peft", "torchdata", "aiohttp", "pylatexenc"]
try:
    ok = all(md.version(k) == v for k, v in want.items()) and all(md.version(p) for p in light)
except md.PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
PY
then
    echo "integrations: already installed"; exit 0
fi

export DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1   # deepspeed: no compiled ops, no CUDA toolkit needed
torch_before=$("$PY" -c "import torch; print(torch.__version__)")

plan=$("$PY" -m pip install --dry-run "${LIGHT[@]}" 2>&1 | grep '^Would install' || true)
if grep -qiE '(^| )(torch|nvidia-[a-z0-9_-]+|triton)-[0-9]' <<<"$plan"; then
    echo "refusing: the dependency plan would install torch/CUDA wheels: $plan" >&2; exit 1
fi
"$PY" -m pip install -q "${LIGHT[@]}"
"$PY" -m pip install -q --no-deps "${STACKS[@]}"

torch_after=$("$PY" -c "import torch; print(torch.__version__)")
[[ "$torch_before" == "$torch_after" ]] || { echo "torch changed: $torch_before -> $torch_after" >&2; exit 1; }
"$PY" -c "import verl, openrlhf, trl, ray; print('integrations: verl', verl.__version__, 'openrlhf ok, trl', trl.__version__, 'ray', ray.__version__)"
