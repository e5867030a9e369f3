"""The one benchmark harness: timing, peak memory, records, tables.

Timing: warm-up calls, then `repeat` timed calls, median reported (CUDA:
synchronised events around each call). Peak memory: CUDA from the caching
allocator's peak counter; CPU from the profiler's allocation events (every
c10 allocation, including kernel-internal temporaries), as the high-water
mark of live bytes allocated during one call.
Peers are imported, never copied; a peer that is not installed yields a
record with status "skipped" and the install hint.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import statistics
import time
from typing import Callable

import torch


@dataclasses.dataclass
class Record:
    op: str
    impl: str
    baseline: str | None
    shape: str
    dtype: str
    device: str
    mode: str  # "fwd" or "fwd+bwd"
    median_s: float | None = None
    baseline_median_s: float | None = None
    speedup: float | None = None
    peak_mem_bytes: int | None = None
    baseline_peak_mem_bytes: int | None = None
    gb_per_s: float | None = None
    status: str = "ok"  # or "skipped: <why>"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(
    fn: Callable[[], object], *, device: str = "cpu", warmup: int = 3, repeat: int = 15, budget_s: float = 3.0
) -> float:
    """Median seconds of fn() after warm-up. Slow peers (a 10 s Python loop)
    get fewer calls: at least 3, at most `repeat`, about `budget_s` in all."""
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1 if first < budget_s / 10 else 0):
        fn()
    _sync(device)
    repeat = max(3, min(repeat, int(budget_s / max(first, 1e-9))))
    times = []
    if device.startswith("cuda"):
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(fn: Callable[[], object], *, device: str = "cpu") -> int:
    """High-water mark of bytes allocated during one fn() call, above what was
    live before it (inputs excluded, outputs and temporaries included)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return int(peak)


def copy_bandwidth(device: str = "cpu", nbytes: int = 256 * 2**20) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + bytes written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=device, warmup=2, repeat=10)
    return 2 * nbytes / t / 1e9


def machine_facts(device: str = "cpu") -> dict:
    facts = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        import triton

        facts["triton"] = triton.__version__
    except Exception:
        facts["triton"] = None
    if device.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["cuda"] = torch.version.cuda
    else:
        facts["cpu"] = _cpu_name()
    return facts


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def compare(
    *,
    op: str,
    impl: str,
    fn: Callable[[], object],
    baselines: dict,
    shape: str,
    dtype: str,
    device: str,
    mode: str,
    bytes_moved: int | None = None,
    warmup: int = 3,
    repeat: int = 15,
) -> list[Record]:
    """Time `fn` and each baseline in the same run; one Record per baseline.
    A baseline given as a string instead of a callable is a skip reason."""
    ours = time_fn(fn, device=device, warmup=warmup, repeat=repeat)
    ours_mem = peak_memory(fn, device=device)
    gbps = bytes_moved / ours / 1e9 if bytes_moved else None
    records = [
        Record(op, impl, None, shape, dtype, device, mode, median_s=ours, peak_mem_bytes=ours_mem, gb_per_s=gbps)
    ]
    for name, base in baselines.items():
        if isinstance(base, str):
            records.append(Record(op, impl, name, shape, dtype, device, mode, status=f"skipped: {base}"))
            continue
        t = time_fn(base, device=device, warmup=warmup, repeat=repeat)
        mem = peak_memory(base, device=device)
        records.append(
            Record(
                op, impl, name, shape, dtype, device, mode,
                median_s=ours, baseline_median_s=t, speedup=t / ours,
                peak_mem_bytes=ours_mem, baseline_peak_mem_bytes=mem, gb_per_s=gbps,
            )  # fmt: skip
        )
    return records


def format_table(records: list[Record]) -> str:
    head = f"{'op':14s} {'mode':7s} {'shape':22s} {'dtype':8s} {'vs':28s} {'ours ms':>9s} {'peer ms':>9s} {'speedup':>8s} {'ours MB':>9s} {'peer MB':>9s}"
    lines = [head, "-" * len(head)]
    for r in records:
        if r.baseline is None:
            continue
        if r.status != "ok":
            lines.append(f"{r.op:14s} {r.mode:7s} {r.shape:22s} {r.dtype:8s} {r.baseline:28s} {r.status}")
            continue
        lines.append(
            f"{r.op:14s} {r.mode:7s} {r.shape:22s} {r.dtype:8s} {r.baseline:28s} "
            f"{r.median_s * 1e3:9.3f} {r.baseline_median_s * 1e3:9.3f} {r.speedup:7.2f}x "
            f"{r.peak_mem_bytes / 2**20:9.2f} {r.baseline_peak_mem_bytes / 2**20:9.2f}"
        )
    return "\n".join(lines)


def write_json(path: str, records: list[Record], facts: dict) -> None:
    with open(path, "w") as f:
        json.dump({"machine": facts, "records": [r.as_dict() for r in records]}, f, indent=1)
