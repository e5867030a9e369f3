"""What a user installing the wheel gets: the package imports without
transformers (only generation and the trainer need it) and runs every CPU op
without triton; build-only tools are not runtime dependencies; everything the
tests import is in the `test` extra."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _run(code: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cpu_ops_run_without_triton_and_transformers_stays_unloaded():
    out = _run(
        "import sys\n"
        "sys.modules['triton'] = None  # import triton now raises ImportError\n"
        "import torch, rlhf_fast\n"
        "x, y = torch.randn(4, 11), torch.randint(0, 11, (4,))\n"
        "lp = rlhf_fast.logprobs_from_logits(x, y)\n"
        "want = torch.log_softmax(x.double(), -1).gather(1, y[:, None]).squeeze(1)\n"
        "assert (lp.double() - want).abs().max() < 1e-5, lp\n"
        "adv, ret = rlhf_fast.gae(torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5))\n"
        "loss, _ = rlhf_fast.ppo_loss(torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool))\n"
        "tok = rlhf_fast.sample(torch.randn(3, 9)).tokens\n"
        "assert adv.shape == (2, 5) and loss.isfinite() and tok.shape == (3,)\n"
        "print('transformers' in sys.modules, 'triton' in sys.modules and sys.modules['triton'] is not None)\n"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"], out.stdout


def test_build_tools_are_not_runtime_dependencies():
    runtime = " ".join(PYPROJECT["project"]["dependencies"])
    build = " ".join(PYPROJECT["build-system"]["requires"])
    for tool in ("pybind11", "ninja"):
        assert tool not in runtime and tool in build, tool


def _imported_top_level(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) in ("importorskip", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value.split(".")[0])
    return names


def test_test_extra_lists_what_the_tests_import():
    # third-party packages the tests import (top level or inside a test), by
    # their distribution name; verl and OpenRLHF come from
    # scripts/install_integrations.sh (they pin CUDA wheels), torchrl from bench
    installed_elsewhere = {"torch", "triton", "transformers", "numpy", "yaml", "verl", "openrlhf", "torchrl"}
    dist_name = {"tensorboard": "tensorboard", "peft": "peft", "trl": "trl", "datasets": "datasets", "pytest": "pytest"}
    imported = set().union(*(_imported_top_level(p) for p in (ROOT / "tests").glob("*.py")))
    third_party = {m for m in imported if m in dist_name or m in installed_elsewhere}
    extra = " ".join(PYPROJECT["project"]["optional-dependencies"]["test"])
    for module in sorted(third_party - installed_elsewhere):
        assert dist_name[module] in extra, f"tests import {module} but the test extra does not list it"
    assert {"trl", "datasets", "peft"} <= third_party  # the check above saw them
