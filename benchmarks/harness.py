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

import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

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
    gb_per_s: float | None = None  # ours, for bandwidth-bound ops (bytes the op must move / median_s)
    copy_gb_per_s: float | None = None  # the machine's measured copy bandwidth, same run
    threads: int | None = None  # torch.get_num_threads() while timing (CPU)
    status: str = "ok"  # or "skipped: <why>"

    @property
    def pct_of_copy(self) -> float | None:
        """gb_per_s as a percentage of the measured copy bandwidth."""
        if self.gb_per_s is None or not self.copy_gb_per_s:
            return None
        return 100.0 * self.gb_per_s / self.copy_gb_per_s

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Case:
    """One timed callable as compare() saw it: what pytest-benchmark runs
    (benchmarks/test_bench.py) instead of timing it here."""

    id: str
    fn: Callable[[], object]
    device: str
    group: str = ""  # the case that ours and its peers share


_collector: list[Case] | None = None


@contextlib.contextmanager
def collecting(into: list[Case]):
    """Inside this block compare() times nothing: it appends a Case per
    callable (ours and each installed peer) and returns skipped records."""
    global _collector
    prev, _collector = _collector, into
    try:
        yield into
    finally:
        _collector = prev


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
    if device.startswith("cuda"):
        return statistics.median(cuda_event_times(fn, repeat))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_interleaved(fns: list[Callable[[], object]], *, warmup: int = 3, repeat: int = 15) -> list[float]:
    """Median seconds of each fn() (CPU), timed in alternating rounds (one
    call of each per round): a ratio between them then survives the slow
    drifts of a shared machine, which moved back-to-back medians of the same
    function 20-30% apart here."""
    for f in fns:
        for _ in range(warmup):
            f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for f, ts in zip(fns, times):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def cuda_event_times(fn: Callable[[], object], repeat: int) -> list[float]:
    """Seconds of each of `repeat` fn() calls between two CUDA events, each
    waited for: the GPU's time per call, not the host's launch time."""
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


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

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto prints two "USDT: profiler_start/stop" lines per call
        prof.__enter__()
    try:
        out = fn()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return int(peak)


@contextlib.contextmanager
def _quiet_stderr():
    """fd 2 to /dev/null (C++ logging bypasses sys.stderr); nothing but the
    profiler's start/stop runs inside."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


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
        "cpu_count": os.cpu_count(),
        "device": device,
        "git_commit": _git_commit(),
        # settings that change what is measured
        "env": {
            k: os.environ[k]
            for k in (
                "OMP_NUM_THREADS",
                "OMP_WAIT_POLICY",
                "RLHF_FAST_BACKEND",
                "RLHF_FAST_CPU_ISA",
                "CUDA_VISIBLE_DEVICES",
            )
            if k in os.environ
        },
    }
    # versions of us and of every peer the suite imports (None: not installed)
    for dist in _DISTS:
        try:
            facts[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            facts[dist] = None
    if device.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["cuda"] = torch.version.cuda
    else:
        facts["cpu"] = _cpu_name()
    return facts


_DISTS = (
    "triton",
    "rlhf_fast",
    "transformers",
    "trl",
    "torchrl",
    "liger-kernel",
    "flashinfer-python",
    "flash-attn",
    "verl",
)


def _git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        git = ["git", "-C", root]
        out = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("-dirty" if dirty else "")) or None


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
    interleave: tuple[str, ...] = (),
) -> list[Record]:
    """Time `fn` and each baseline in the same run; one Record per baseline.
    A baseline given as a string instead of a callable is a skip reason.
    interleave (CPU): the baselines timed with fn in alternating rounds
    (time_interleaved), for a ratio that has a target bound. Only peers of
    similar cost and footprint belong there: a call that follows a 60 ms
    eager chain finds the caches evicted (the uncorrected step measured
    25-40% slower as the call after the eager chain than timed on its own)."""
    if _collector is not None:
        key = f"{op}-{mode}-{shape}-{dtype}"
        seen = {c.id for c in _collector}  # a family may compare ours against two peer sets
        for name, f in [(impl, fn)] + [(n, b) for n, b in baselines.items() if not isinstance(b, str)]:
            if f"{key}-{name}" not in seen:
                _collector.append(Case(f"{key}-{name}", f, device, key))
        return [Record(op, impl, None, shape, dtype, device, mode, status="skipped: collecting cases")]
    interleaved = {}
    if interleave and device == "cpu":
        timed = [n for n in interleave if not isinstance(baselines[n], str)]
        medians = time_interleaved([fn] + [baselines[n] for n in timed], warmup=warmup, repeat=repeat)
        interleaved = dict(zip(timed, medians[1:]))
        ours = medians[0]
    else:
        ours = time_fn(fn, device=device, warmup=warmup, repeat=repeat)
    ours_mem = peak_memory(fn, device=device)
    gbps = bytes_moved / ours / 1e9 if bytes_moved else None
    threads = torch.get_num_threads() if device == "cpu" else None
    ours_fields = {"median_s": ours, "peak_mem_bytes": ours_mem, "gb_per_s": gbps, "threads": threads}

    def record(baseline: str | None, **peer) -> Record:  # every record carries our numbers
        return Record(op, impl, baseline, shape, dtype, device, mode, **ours_fields, **peer)

    records = [record(None)]
    for name, base in baselines.items():
        if isinstance(base, str):
            records.append(record(name, status=f"skipped: {base}"))
            continue
        try:
            t = interleaved[name] if name in interleaved else time_fn(base, device=device, warmup=warmup, repeat=repeat)
            mem = peak_memory(base, device=device)
        except Exception as exc:  # a peer that breaks (missing API, OOM) must not lose our records
            if device == "cuda":
                torch.cuda.empty_cache()
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            records.append(record(name, status=f"skipped: peer failed: {reason}"))
            continue
        records.append(record(name, baseline_median_s=t, speedup=t / ours, baseline_peak_mem_bytes=mem))
    return records


def attach_bandwidth(records: list[Record], copy_gb_per_s: float) -> list[Record]:
    """Stamp the measured copy bandwidth on every record that has a GB/s, so
    `pct_of_copy` reads as "how close to a memory copy" in the same run."""
    for r in records:
        if r.gb_per_s is not None:
            r.copy_gb_per_s = copy_gb_per_s
    return records


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.3f}"


def _mb(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.2f}"


def format_table(records: list[Record]) -> str:
    """One line per (case, peer): our median, the peer's, the ratio
    (peer / ours: > 1 means we are faster), peak MiB of one call, our GB/s
    (and % of the measured copy bandwidth). A case whose peers are all
    skipped still shows our time; a skipped peer shows why."""
    with_peer = {(r.op, r.mode, r.shape, r.dtype) for r in records if r.baseline is not None}
    rows = []
    for r in records:
        if r.baseline is None and (r.op, r.mode, r.shape, r.dtype) in with_peer:
            continue
        bw = "-" if r.gb_per_s is None else f"{r.gb_per_s:.1f}"
        if r.pct_of_copy is not None:
            bw += f" ({r.pct_of_copy:.0f}%)"
        if r.status != "ok":
            peer = [_ms(r.median_s), "", "", _mb(r.peak_mem_bytes), "", bw, r.status]
        else:
            speed = "-" if r.speedup is None else f"{r.speedup:.2f}x"
            peer = [
                _ms(r.median_s),
                _ms(r.baseline_median_s),
                speed,
                _mb(r.peak_mem_bytes),
                _mb(r.baseline_peak_mem_bytes),
                bw,
                "",
            ]
        rows.append([r.op, r.mode, r.shape, r.dtype, r.baseline or "(ours alone)"] + peer)
    head = ["op", "mode", "shape", "dtype", "vs", "ours ms", "peer ms", "speedup", "ours MB", "peer MB", "GB/s", ""]
    widths = [max([len(h)] + [len(row[k]) for row in rows]) for k, h in enumerate(head)]
    right = {5, 6, 7, 8, 9, 10}

    def line(cells):
        padded = (c.rjust(w) if k in right else c.ljust(w) for k, (c, w) in enumerate(zip(cells, widths)))
        return " ".join(padded).rstrip()

    out = [line(head), "-" * len(line(head))]
    out += [line(row) for row in rows]
    return "\n".join(out)


def write_json(path: str, records: list[Record], facts: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": facts, "records": [r.as_dict() for r in records]}, f, indent=1)


def bench_main(
    run: Callable[..., list],
    *,
    quick_by_default: bool,
    summary: Callable[[list], str] | None = None,
    argv=None,
    default_device: str | None = None,
    bandwidth: bool = False,
) -> list:
    """The command line every bench_<op>.py shares: --quick / --full pick the
    shapes (the module's default otherwise), --device (default_device; None:
    run's own, CUDA when visible), --threads sets torch's threads for ours and
    the peers alike, --json writes records + machine facts. bandwidth: stamp
    each device's measured copy bandwidth on the records (the table's % of
    copy)."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small shapes")
    ap.add_argument("--full", action="store_true", help="the production-size shapes")
    ap.add_argument("--device", default=default_device, help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for every implementation")
    ap.add_argument("--json", default=None, help="write records + machine facts here")
    args = ap.parse_args(argv)
    if args.threads:
        # On a shared 2-core box a parallel region waits for a time slice
        # (~16 ms) whenever the other core is busy: 1 thread measures the work.
        torch.set_num_threads(args.threads)
    quick = args.quick or (quick_by_default and not args.full)
    records = run(quick=quick, device=args.device)
    devices = sorted({r.device for r in records}) or [args.device or "cpu"]
    facts = machine_facts(next((d for d in devices if d.startswith("cuda")), devices[0]))
    if bandwidth:
        facts["copy_gb_per_s"] = {}
        for dev in devices:
            bw = facts["copy_gb_per_s"][dev] = copy_bandwidth(dev)
            attach_bandwidth([r for r in records if r.device == dev], bw)
    print(format_table(records))
    if summary is not None:
        print(summary(records))
    if args.json:
        write_json(args.json, records, facts)
    return records
