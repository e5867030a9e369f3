"""Test set-up shared by every test file.

Triton kernels run on CPU tensors under the interpreter: TRITON_INTERPRET must
be set before triton.jit decorates anything, so before rlhf_fast is imported.
The default run is deterministic: every test draws its data from a fixed seed
(printed in the header) mixed with a stable hash of its node id, so CI never
flakes. RLHF_FAST_TEST_SEED=<n> runs another seed, RLHF_FAST_TEST_SEED=random
a fresh one (`make fuzz SEEDS=N` loops over N of them and prints a failing seed
so it can be replayed).
"""

import os
import random
import zlib

import pytest

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("RLHF_FAST_TEST_GPU") == "1" else "1")

import torch

import rlhf_fast
import rlhf_fast.ops

DEFAULT_SEED = 20240917


def _seed_from_env():
    raw = os.environ.get("RLHF_FAST_TEST_SEED", "").strip()
    if raw == "":
        return DEFAULT_SEED
    if raw == "random":
        return random.SystemRandom().randrange(2**31)
    return int(raw)


SEED = _seed_from_env()
# pytest-xdist workers start after this file is imported in the controller and
# inherit its environment: they draw from the seed the header prints.
os.environ["RLHF_FAST_TEST_SEED"] = str(SEED)
# `pytest -n W` on C cores: C // W intra-op threads per worker, not C each.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_report_header(config):
    return [f"rlhf_fast test seed: {SEED} (replay with RLHF_FAST_TEST_SEED={SEED})", f"torch {torch.__version__}"]


def pytest_terminal_summary(terminalreporter):
    # -q hides the header: say the seed again where a failure is read.
    terminalreporter.write_line(f"rlhf_fast test seed: {SEED} (replay with RLHF_FAST_TEST_SEED={SEED})")


@pytest.fixture(autouse=True)
def _seeded(request):
    # A different but replayable stream per test. crc32, not hash(): str hashes
    # change with PYTHONHASHSEED, so hash() made even a fixed seed unreplayable.
    torch.manual_seed(SEED ^ zlib.crc32(request.node.nodeid.encode()))
    yield


# Cases of the kernel-family files that take 30-180 s each on 2 shared cores
# (Triton-interpreter sweeps, torch.compile of the fused op): `make test-fast`
# skips them, `make test` runs them. Node-id prefixes, relative to tests/.
SLOW_CASES = (
    "test_logprobs.py::test_torch_compile_fullgraph[",
    "test_logprobs.py::test_gradcheck_float64[triton",
    "test_sampling.py::test_thresholds_on_hard_rows[triton",
    "test_sampling.py::test_generator_reproducible_rows_independent[triton",
    "test_ppo_loss.py::test_gradcheck[triton",
    "test_processed_logprobs.py::test_scores_every_token_as_a_distribution[triton",
    "test_processed_logprobs.py::test_bit_identical_to_sample_processed_logprobs[triton",
)


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow
    for item in items:
        if item.nodeid.removeprefix("tests/").startswith(SLOW_CASES):
            item.add_marker(slow)
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
