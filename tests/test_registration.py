"""Backends, dispatch, build facts and the command line."""

import subprocess
import sys

import pytest
import torch

import rlhf_fast
from rlhf_fast import _backend

# Every schema in csrc/ops.cpp (checked against the file below).
SCHEMAS = (
    "logprobs_fwd",
    "logprobs_bwd",
    "gae",
    "discounted_returns",
    "whiten",
    "group_advantages",
    "sample_fwd",
    "linear_logprobs_fwd",
    "linear_logprobs_bwd",
    "ppo_loss_fwd",
    "ppo_loss_bwd",
    "ppo_value_loss_fwd",
    "kl_penalty_fwd",
    "kl_penalty_bwd",
)


def test_every_schema_is_registered_with_cpu_kernel_and_fake():
    import os
    import re

    src = open(os.path.join(os.path.dirname(__file__), "..", "csrc", "ops.cpp")).read()
    assert set(re.findall(r'"(\w+)\(Tensor', src)) == set(SCHEMAS)
    for name in SCHEMAS:
        op = getattr(torch.ops.rlhf_fast, name).default
        assert op.has_kernel_for_dispatch_key("CPU"), f"{name} has no CPU kernel"
        # register_fake is what serves meta tensors (a C++ op has no Meta
        # kernel of its own); opcheck in each family's tests runs the fakes
        assert op.has_kernel_for_dispatch_key("Meta"), f"{name} has no register_fake"


def test_build_info_reports_the_build():
    info = rlhf_fast.info()
    assert info["extension_loaded"], info["extension_error"]
    build = info["build"]
    assert "cpp" in build["backends"]
    assert build["openmp"] is True and build["omp_max_threads"] >= 1
    assert build["cpu_isa"] in ("baseline", "avx2", "avx512")
    assert info["backends"]["reference"]["cpu"] == "available"
    assert info["backends"]["cpp"]["cpu"] == "available"
    assert "CUDA" in info["backends"]["cuda"]["cpu"]  # says why: cuda runs on CUDA tensors


def test_automatic_choice_on_cpu_is_cpp():
    assert _backend.choose("x", torch.device("cpu"), ("triton", "cuda", "cpp")) == "cpp"
    assert _backend.choose("x", torch.device("cpu"), ()) == "reference"


def test_env_var_forces_a_backend(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert _backend.choose("x", torch.device("cpu"), ("cpp",)) == "reference"
    from rlhf_fast.ops import logprobs as ops_logprobs

    calls = []
    real = ops_logprobs.reference.logprobs_from_logits
    monkeypatch.setattr(
        ops_logprobs.reference, "logprobs_from_logits", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    rlhf_fast.logprobs_from_logits(torch.randn(3, 9), torch.tensor([1, 2, 3]))
    assert calls == [1]  # the reference ran, not the C++ op
    monkeypatch.delenv(_backend.ENV_VAR)
    rlhf_fast.logprobs_from_logits(torch.randn(3, 9), torch.tensor([1, 2, 3]))
    assert calls == [1]  # automatic choice: the C++ op


@pytest.mark.parametrize(
    "forced, device, match",
    [
        ("cuda", "cpu", "runs on CUDA tensors"),
        ("nonsense", "cpu", "not a backend"),
    ],
)
def test_forcing_an_unavailable_backend_raises(monkeypatch, forced, device, match):
    monkeypatch.setenv(_backend.ENV_VAR, forced)
    with pytest.raises(_backend.BackendUnavailable, match=match):
        rlhf_fast.logprobs_from_logits(torch.randn(2, 5, device=device), torch.tensor([0, 1], device=device))


def test_triton_is_not_chosen_on_cpu_unless_forced():
    assert _backend.why_unavailable("triton", torch.device("cpu")) is None  # the interpreter is on in tests
    assert _backend.choose("x", torch.device("cpu"), ("triton", "cpp")) == "cpp"


def test_use_backend_context_restores():
    with rlhf_fast.use_backend("reference"):
        assert _backend.forced_backend() == "reference"
    assert _backend.forced_backend() is None
    with pytest.raises(_backend.BackendUnavailable):
        with rlhf_fast.use_backend("fastest-please"):
            pass


def test_cli_info_runs():
    out = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "compiled extension: loaded" in out.stdout
    assert "cpp" in out.stdout and "reference" in out.stdout


def test_import_without_extension_falls_back():
    # sys.modules[name] = None makes `import rlhf_fast._C` fail, as a missing
    # or broken build would: import works, calls use the reference.
    code = (
        "import sys; sys.modules['rlhf_fast._C'] = None;"
        "import torch, rlhf_fast;"
        "r = rlhf_fast.info(); assert not r['extension_loaded'], r;"
        "assert 'cpp' in r['backends'] and 'did not load' in r['backends']['cpp']['cpu'];"
        "print(rlhf_fast.logprobs_from_logits(torch.zeros(2, 4), torch.tensor([0, 1])).tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "-1.386" in out.stdout  # log(1/4)
    assert "compiled extension not loaded" in out.stderr


FAMILIES = ("logprobs", "linear_logprobs", "advantages", "sampling", "ppo_loss")


@pytest.mark.skipif(not _backend.HAVE_TRITON, reason="triton is not importable")
def test_every_family_is_wired_the_same_way():
    """rlhf_fast/triton/<family>.py holds the kernels and their triton_op
    launchers, rlhf_fast/ops/<family>.py the checks, dispatch, fakes and
    autograd (no launcher), for every family alike."""
    import importlib

    from torch._library.custom_ops import CustomOpDef

    def launchers(mod):
        return sorted(n for n, v in vars(mod).items() if isinstance(v, CustomOpDef))

    for family in FAMILIES:
        kernels = importlib.import_module(f"rlhf_fast.triton.{family}")
        ops = importlib.import_module(f"rlhf_fast.ops.{family}")
        assert launchers(kernels), f"triton/{family}.py defines no triton_op"
        assert all(n.endswith("_triton") for n in launchers(kernels)), launchers(kernels)
        assert launchers(ops) == [], f"ops/{family}.py defines launchers {launchers(ops)}"
        assert "Naming chain" in ops.__doc__, f"ops/{family}.py lost its naming chain"


def test_reference_names_are_never_modules():
    """rlhf_fast.reference.<name> is a function, a class or a constant: its
    modules are private (_<family>.py), so no import can rebind a public name."""
    import types

    import rlhf_fast.reference as reference

    public = [n for n in dir(reference) if not n.startswith("_")]
    assert [n for n in public if isinstance(getattr(reference, n), types.ModuleType)] == []
    assert set(reference.__all__) <= set(public)
    assert callable(reference.ppo_loss) and callable(reference.linear_logprobs)
    assert "token-mean" in reference.AGG_MODES and "k3" in reference.KL_KINDS and reference.RC_STATS
