"""The suite's cases through pytest-benchmark, tiny shapes:

    pytest benchmarks/ --benchmark-only [-k logprobs] [--benchmark-json out.json]

Cases are not written twice: each bench_<op>.run(tiny=True) is called once
under harness.collecting(), where compare() records every callable it would
have timed (ours and each installed peer) instead of timing it. Peers that are
not installed show up in `python -m benchmarks`, not here.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import benchmarks
from benchmarks import harness

try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # pragma: no cover
    pytest.skip("pytest-benchmark not installed; pip install pytest-benchmark", allow_module_level=True)


def _collect() -> list[harness.Case]:
    cases: list[harness.Case] = []
    for mod in sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_")):
        with harness.collecting(cases):
            importlib.import_module(f"benchmarks.{mod}").run(quick=True, device="cpu", tiny=True)
    return cases


CASES = _collect()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bench(benchmark, case: harness.Case) -> None:
    benchmark.group = case.group  # ours and its peers side by side
    benchmark(case.fn)  # rounds from --benchmark-min-rounds / --benchmark-max-time (defaults 5, 1 s)
