"""`python -m benchmarks`: runs the benchmark modules of a source checkout
(benchmarks/bench_<op>.py, each exposing run(quick, device=None) -> list[Record])
in one process, so every ratio is against a peer timed in the same run.

The benchmarks live beside the package, not in it (a wheel ships only
rlhf_fast/), so they run from a checkout's root: `python -m benchmarks --quick`."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
import traceback


def available_ops() -> list[str]:
    pkg = importlib.import_module("benchmarks")
    return sorted(m.name[len("bench_") :] for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("bench_"))


def run(
    quick: bool = False,
    op: str | list[str] | None = None,
    json_file: str | None = None,
    plot_file: str | None = None,
    threads: int | None = None,
    note: str | None = None,
) -> int:
    """Runs the selected families; prints one table each, then writes the JSON
    records (with machine facts and the measured copy bandwidth) and the PNG
    chart. A family that raises is reported and the others still run; the
    exit status is then 1."""
    import torch

    from benchmarks.harness import attach_bandwidth, copy_bandwidth, format_table, machine_facts, write_json

    ops = available_ops()
    if op:
        wanted = [op] if isinstance(op, str) else list(op)
        unknown = [o for o in wanted if o not in ops]
        if unknown:
            raise SystemExit(f"unknown op {', '.join(map(repr, unknown))}; benchmarks exist for: {', '.join(ops)}")
        ops = wanted
    if threads:
        # On a shared 2-core box a parallel region waits for a time slice
        # (~16 ms) whenever the other core is busy: 1 thread measures the work.
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = {"cpu": copy_bandwidth("cpu")}
    if device == "cuda":
        bandwidth["cuda"] = copy_bandwidth("cuda")
    print("copy bandwidth: " + ", ".join(f"{d} {bw:.1f} GB/s" for d, bw in bandwidth.items()), flush=True)
    records, failed = [], []
    for name in ops:
        size = "quick" if quick else "full"
        print(f"== {name} ({size}, {device}, {torch.get_num_threads()} CPU threads)", flush=True)
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(f"benchmarks.bench_{name}")
            recs = mod.run(quick=quick)
        except Exception:  # one broken family must not hide the others' results
            traceback.print_exc()
            failed.append(name)
            continue
        for dev, bw in bandwidth.items():
            attach_bandwidth([r for r in recs if r.device.startswith(dev)], bw)
        print(format_table(recs), flush=True)
        print(f"({time.perf_counter() - t0:.0f} s)", flush=True)
        records += recs
    facts = machine_facts(device)
    facts["copy_gb_per_s"] = bandwidth
    facts["command"] = "python -m benchmarks " + " ".join(sys.argv[1:])
    facts["quick"] = quick
    if note:
        facts["note"] = note
    if failed:
        facts["failed"] = failed
    if json_file:
        write_json(json_file, records, facts)
        print(f"wrote {json_file}")
    if plot_file:
        from benchmarks.plot import write_chart

        where = facts.get("gpu") or facts.get("cpu")
        write_chart(plot_file, records, f"rlhf_fast speedup over each peer, {where}, {facts['date'][:10]}")
        print(f"wrote {plot_file}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
