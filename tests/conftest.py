"""Test set-up shared by every test file.

Triton kernels run on CPU tensors under the interpreter: TRITON_INTERPRET must
be set before triton.jit decorates anything, so before rlhf_fast is imported.
Every run draws fresh random data; the seed is printed in the header and
RLHF_FAST_TEST_SEED=<n> replays a run.
"""
import os
import random

import pytest

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("RLHF_FAST_TEST_GPU") == "1" else "1")

import torch  # noqa: E402

import rlhf_fast  # noqa: E402
import rlhf_fast.ops  # noqa: E402,F401  (import rlhf_fast is lazy: this registers every op, under the interpreter setting above)

SEED = int(os.environ.get("RLHF_FAST_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return [f"rlhf_fast test seed: {SEED} (replay with RLHF_FAST_TEST_SEED={SEED})", f"torch {torch.__version__}"]


@pytest.fixture(autouse=True)
def _seeded(request):
    # A different but replayable stream per test.
    torch.manual_seed(SEED ^ (hash(request.node.nodeid) & 0x7FFFFFFF))
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device: run benchmarks/gpu/run_device.sh on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# Backends that run on this machine's CPU tensors: the C++ kernels, and the
# Triton kernels through the interpreter.
# On a GPU run (RLHF_FAST_TEST_GPU=1) Triton compiles for the GPU instead.
CPU_BACKENDS = ["cpp"] if os.environ.get("RLHF_FAST_TEST_GPU") == "1" else ["cpp", "triton"]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    with rlhf_fast.use_backend(request.param):
        yield request.param
