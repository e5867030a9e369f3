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
    "processed_logprobs_fwd",
    "processed_logprobs_bwd",
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


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_autograd_skips_torch_librarys_per_call_schema_walk(monkeypatch, backend):
    """The ops' autograd (rlhf_fast/ops/_autograd.py; the Triton ops'
    overrides triton_op's own) fills defaulted arguments from a tuple read
    once: torch.library's fill_defaults, which walks the schema on every
    call (0.6 ms per ppo_loss call here), must not run, and setup_context
    must still see every argument with its default."""
    reason = _backend.why_unavailable(backend, torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    import torch._library.utils as library_utils

    def walk(*_):
        raise AssertionError(f"torch.library's fill_defaults ran on an rlhf_fast {backend} op call")

    monkeypatch.setattr(library_utils, "fill_defaults", walk)
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(3, 7, generator=g)).requires_grad_()
    old = lp.detach() + 0.1 * torch.randn(3, 7, generator=g)
    adv, mask = torch.randn(3, 7, generator=g), torch.rand(3, 7, generator=g) > 0.3
    logits = torch.randn(5, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (5,), generator=g)
    with rlhf_fast.use_backend(backend):
        loss, _ = rlhf_fast.ppo_loss(lp, old, adv, mask)  # rollout arguments left to their defaults
        (g_lp,) = torch.autograd.grad(loss, lp)
        want = rlhf_fast.reference.ppo_loss(lp, old, adv, mask)[0]
        (w_lp,) = torch.autograd.grad(want, lp)
        torch.testing.assert_close(g_lp, w_lp)
        out = rlhf_fast.logprobs_from_logits(logits, labels)
        (g_logits,) = torch.autograd.grad(out.sum(), logits)
        (w_logits,) = torch.autograd.grad(rlhf_fast.reference.logprobs_from_logits(logits, labels).sum(), logits)
        torch.testing.assert_close(g_logits, w_logits)


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
    from rlhf_fast.ops import _logprobs as ops_logprobs

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


# ops family (rlhf_fast/ops/_<family>.py) -> its Triton modules (rlhf_fast/triton/<name>.py)
FAMILIES = {
    "logprobs": ("logprobs",),
    "linear_logprobs": ("linear_logprobs",),
    "advantages": ("advantages",),
    "sampling": ("sampling",),
    "ppo_loss": ("ppo_policy_loss", "ppo_value_loss", "kl_penalty"),
}


@pytest.mark.skipif(not _backend.HAVE_TRITON, reason="triton is not importable")
def test_every_family_is_wired_the_same_way():
    """rlhf_fast/triton/<name>.py holds the kernels and their triton_op
    launchers, rlhf_fast/ops/_<family>.py the checks, dispatch, fakes and
    autograd (no launcher), for every family alike."""
    from torch._library.custom_ops import CustomOpDef

    import rlhf_fast.ops as ops_pkg
    import rlhf_fast.triton as triton_pkg

    def launchers(mod):
        return sorted(n for n, v in vars(mod).items() if isinstance(v, CustomOpDef))

    for family, kernel_modules in FAMILIES.items():
        ops = getattr(ops_pkg, f"_{family}")
        assert launchers(ops) == [], f"ops/_{family}.py defines launchers {launchers(ops)}"
        assert "Naming chain" in ops.__doc__, f"ops/_{family}.py lost its naming chain"
        for name in kernel_modules:
            kernels = getattr(triton_pkg, name)
            assert launchers(kernels), f"triton/{name}.py defines no triton_op"
            assert all(n.endswith("_triton") for n in launchers(kernels)), launchers(kernels)


def test_ops_names_are_never_modules():
    """rlhf_fast.ops.<name> is a function or a class: the family modules are
    private (_<family>.py), as in rlhf_fast.reference."""
    import types

    import rlhf_fast.ops as ops_pkg

    public = [n for n in dir(ops_pkg) if not n.startswith("_")]
    assert [n for n in public if isinstance(getattr(ops_pkg, n), types.ModuleType)] == []
    assert set(ops_pkg.__all__) <= set(public)
    assert callable(ops_pkg.ppo_loss) and callable(ops_pkg.linear_logprobs) and callable(ops_pkg.sample)


def _naming_chain(doc: str) -> str:
    start = doc.index("Naming chain")
    return doc[start:].split("\n\n")[0]


@pytest.mark.parametrize("family", sorted(FAMILIES) + ["vocab_parallel"])
def test_naming_chains_are_true(family):
    """Every file, kernel, launcher, op and function a family's "Naming
    chain" docstring names exists, so the chain cannot go stale when a file
    is split or renamed."""
    import importlib
    import os
    import re

    import rlhf_fast.reference as reference

    root = os.path.join(os.path.dirname(__file__), "..")
    ops = importlib.import_module(f"rlhf_fast.ops._{family}")
    chain = " ".join(_naming_chain(ops.__doc__).split())
    csrc = "".join(
        open(os.path.join(d, f)).read()
        for d, _, files in os.walk(os.path.join(root, "csrc"))
        for f in files
        if f.endswith((".cpp", ".cu", ".h", ".cuh"))
    )
    paths = re.findall(r"[\w/]+\.(?:py|cpp|cu)\b", chain)
    assert paths, chain
    for path in paths:
        assert "/" in path, f"ops/_{family}.py: name {path} by its path from the repository root"
        full = os.path.join(root, "rlhf_fast", path) if path.startswith("triton/") else os.path.join(root, path)
        assert os.path.isfile(full), f"ops/_{family}.py names {path}, which does not exist"
    for name in re.findall(r"\b(\w+_(?:cpu|cuda))\b", chain):
        assert name in csrc or name in open(ops.__file__).read(), f"ops/_{family}.py names {name}: not found"
    for name in re.findall(r"torch\.ops\.rlhf_fast\.(\w+)", chain):
        assert hasattr(torch.ops.rlhf_fast, name), f"ops/_{family}.py names torch.ops.rlhf_fast.{name}"
    for name in re.findall(r"(?<![\w.])rlhf_fast\.(\w+)", chain):
        assert hasattr(rlhf_fast, name), f"ops/_{family}.py names rlhf_fast.{name}"
    for name in re.findall(r"(?<![\w.])reference\.(\w+)", chain):
        assert hasattr(reference, name), f"ops/_{family}.py names reference.{name}"
    if _backend.HAVE_TRITON:
        triton_modules = [importlib.import_module(f"rlhf_fast.triton.{m}") for m in FAMILIES.get(family, ())]
        for name in re.findall(r"\b(_\w+_kernel)\b", chain):
            assert any(hasattr(m, name) for m in triton_modules), f"ops/_{family}.py names {name}: not a kernel"
        for name in re.findall(r"\b([a-z]\w+_triton)\b", chain):  # "_bwd_triton" abbreviates the one before
            assert hasattr(torch.ops.rlhf_fast, name), f"ops/_{family}.py names {name}: no such triton_op"


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
