"""`rlhf-fast bench`: runs the benchmark modules of a source checkout
(benchmarks/bench_<op>.py, each exposing run(quick) -> list[Record])."""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys


def _benchmarks_package():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, "benchmarks")):
        raise SystemExit("rlhf-fast bench runs from a source checkout (the benchmarks/ folder next to rlhf_fast/)")
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("benchmarks")


def available_ops() -> list[str]:
    pkg = _benchmarks_package()
    return sorted(m.name[len("bench_") :] for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("bench_"))


def run(quick: bool = False, op: str | None = None, json_file: str | None = None) -> int:
    import torch

    _benchmarks_package()
    from benchmarks.harness import copy_bandwidth, format_table, machine_facts, write_json

    ops = available_ops()
    if op is not None:
        if op not in ops:
            raise SystemExit(f"unknown op {op!r}; benchmarks exist for: {', '.join(ops)}")
        ops = [op]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    records = []
    for name in ops:
        mod = importlib.import_module(f"benchmarks.bench_{name}")
        print(f"== {name} ({'quick' if quick else 'full'}, {device})", flush=True)
        recs = mod.run(quick=quick)
        print(format_table(recs), flush=True)
        records += recs
    print(f"copy bandwidth: {copy_bandwidth(device):.1f} GB/s")
    if json_file:
        write_json(json_file, records, machine_facts(device))
        print(f"wrote {json_file}")
    return 0
