"""Vocab-parallel log-probs + entropy on TP = 2 gloo processes (CPU): rlhf_fast's
vocab_parallel_logprobs on the shards vs all-gather of the (N, V) logits
then logprobs_from_logits (what torchtitan / Megatron RL did), forward and
forward+backward: median time, peak memory per rank, bytes each rank hands to
collectives per call.

    python -m benchmarks.bench_vocab_parallel [--quick] [--json benchmarks/results/vocab_parallel_cpu.json]

Each rank runs one thread (OMP_NUM_THREADS=1), so 2 ranks use the 2 cores of
the CI machine. Both ranks make the same number of calls (a fixed repeat
count, a barrier before each), as every call holds collectives. Times are the
slower rank's median; memory is the profiler's high-water mark of bytes
allocated during one call on rank 0 (inputs excluded; outputs, gradients and
collective buffers included). Shapes: (N, V) of the *full* vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

import rlhf_fast
from rlhf_fast.ops import vocab_parallel_logprobs

from .harness import Record, format_table, machine_facts, peak_memory

OP = "vocab_parallel_logprobs"
BASELINE = "all_gather + logprobs_from_logits"
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast")
QUICK_SHAPES = [(256, 4000)]
FULL_SHAPES = [(4096, 32000)]


class _CountBytes:
    """Bytes this rank hands to collectives (the payload it contributes)."""

    def __init__(self):
        self.sent = 0
        self._orig = {}

    def __enter__(self):
        for name in COLLECTIVES:
            f = self._orig[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(f))
        return self

    def _wrap(self, f):
        def call(t, *args, **kw):
            # all_gather(outputs: list, input): the payload is the input
            sent = args[0] if isinstance(t, (list, tuple)) else t
            self.sent += sent.numel() * sent.element_size()
            return f(t, *args, **kw)

        return call

    def __exit__(self, *exc):
        for name, f in self._orig.items():
            setattr(dist, name, f)


def gathered_logprobs(local, labels, group, sizes):
    """The baseline: every rank gathers all shards into (N, V), then the
    single-device op; backward keeps this rank's slice of the full gradient
    (all-gather's backward in Megatron / DTensor, no communication when the
    upstream gradient is replicated)."""
    parts = [local.new_empty(local.shape[:-1] + (s,)) for s in sizes]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    full = torch.cat(parts, dim=-1)
    del parts
    if local.requires_grad:
        full.requires_grad_()
    lp, ent = rlhf_fast.logprobs_from_logits(full, labels, return_entropy=True)
    return lp, ent, full


def _split(V: int, n: int) -> list[int]:
    return [V // n + (1 if r < V % n else 0) for r in range(n)]


def measure_rank(group, N: int, V: int, dtype=torch.float32, repeat: int = 5, warmup: int = 1) -> dict:
    """One rank's share of the benchmark; every rank of `group` calls it."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = _split(V, world)
    lo = sum(sizes[:rank])
    g = torch.Generator().manual_seed(1234 + rank)
    local = (torch.randn(N, sizes[rank], generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(99))
    rank_sl = slice(lo, lo + sizes[rank])

    def ours(bwd):
        def f():
            x = local.detach().requires_grad_(bwd)
            lp, ent = vocab_parallel_logprobs(
                x, labels, group=group, vocab_start=lo, vocab_size=V, return_entropy=True, validate=False
            )
            if bwd:
                (lp + 0.1 * ent).sum().backward()
                return x.grad
            return lp, ent

        return f

    def gathered(bwd):
        def f():
            x = local.detach().requires_grad_(bwd)
            lp, ent, full = gathered_logprobs(x, labels, group, sizes)
            if bwd:
                (lp + 0.1 * ent).sum().backward()
                return full.grad[:, rank_sl]
            return lp, ent

        return f

    out = {"N": N, "V": V, "dtype": str(dtype).replace("torch.", ""), "world": world}
    a, b = ours(False)(), gathered(False)()
    out["max_abs_diff_logprobs"] = float((a[0] - b[0]).abs().max())
    out["max_abs_diff_entropy"] = float((a[1] - b[1]).abs().max())
    for mode, bwd in (("fwd", False), ("fwd+bwd", True)):
        for impl, make in (("ours", ours), ("gathered", gathered)):
            fn = make(bwd)
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(repeat):
                dist.barrier(group=group)
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            med = torch.tensor([statistics.median(times)], dtype=torch.float64)
            dist.all_reduce(med, op=dist.ReduceOp.MAX, group=group)  # the slower rank
            dist.barrier(group=group)
            mem = peak_memory(fn)
            with _CountBytes() as c:
                fn()
            out[f"{mode}/{impl}"] = {
                "median_s": float(med),
                "peak_mem_bytes": mem,
                "bytes_sent": c.sent,
                "bytes_per_token": c.sent / N,
            }
    return out


def _rank_main(rank, world, port, shapes, dtypes, out_path, repeat):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = [measure_rank(None, N, V, dt, repeat=repeat) for N, V in shapes for dt in dtypes]
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(shapes, dtypes=(torch.float32,), world: int = 2, repeat: int = 5) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "out.json")
        mp.spawn(_rank_main, args=(world, _free_port(), shapes, list(dtypes), path, repeat), nprocs=world)
        with open(path) as f:
            return json.load(f)


def to_records(results: list[dict]) -> list[Record]:
    records = []
    for r in results:
        for mode in ("fwd", "fwd+bwd"):
            o, g = r[f"{mode}/ours"], r[f"{mode}/gathered"]
            records.append(
                Record(
                    OP,
                    f"rlhf_fast TP={r['world']} gloo",
                    BASELINE,
                    f"({r['N']}, {r['V']})",
                    r["dtype"],
                    "cpu",
                    mode,
                    median_s=o["median_s"],
                    baseline_median_s=g["median_s"],
                    speedup=g["median_s"] / o["median_s"],
                    peak_mem_bytes=o["peak_mem_bytes"],
                    baseline_peak_mem_bytes=g["peak_mem_bytes"],
                    threads=1,
                )
            )
    return records


def summary(results: list[dict]) -> str:
    lines = []
    for r in results:
        for mode in ("fwd", "fwd+bwd"):
            o, g = r[f"{mode}/ours"], r[f"{mode}/gathered"]
            lines.append(
                f"({r['N']}, {r['V']}) {r['dtype']} TP={r['world']} {mode}: time {o['median_s'] * 1e3:.1f} ms vs "
                f"{g['median_s'] * 1e3:.1f} ms ({g['median_s'] / o['median_s']:.2f}x); peak memory per rank "
                f"{o['peak_mem_bytes'] / 2**20:.1f} MiB vs {g['peak_mem_bytes'] / 2**20:.1f} MiB "
                f"(ratio {o['peak_mem_bytes'] / g['peak_mem_bytes']:.3f}); bytes sent per token "
                f"{o['bytes_per_token']:.1f} vs {g['bytes_per_token']:.0f}"
            )
    return "\n".join(lines)


def run(quick: bool = True, device: str | None = None, tiny: bool = False, shapes=None) -> list:
    """For `python -m benchmarks`. tiny (benchmarks/test_bench.py's collection of
    single-process cases): nothing, a process group cannot be timed there;
    tests/test_vocab_parallel.py runs measure_rank at the quick shape instead."""
    if tiny or (device or "cpu") != "cpu":
        return []
    return to_records(spawn(shapes or (QUICK_SHAPES if quick else FULL_SHAPES)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"{QUICK_SHAPES} instead of {FULL_SHAPES}")
    p.add_argument("--shape", action="append", default=None, help="N,V of the full vocabulary (repeatable)")
    p.add_argument("--dtype", action="append", default=None, help="float32 (default) / bfloat16 (repeatable)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    shapes = (
        [tuple(int(v) for v in s.split(",")) for s in args.shape]
        if args.shape
        else (QUICK_SHAPES if args.quick else FULL_SHAPES)
    )
    dtypes = [getattr(torch, d) for d in (args.dtype or ["float32"])]
    results = spawn(shapes, dtypes, repeat=args.repeat)
    records = to_records(results)
    print(format_table(records))
    print(summary(results))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        facts = machine_facts("cpu")
        facts["ranks"] = 2
        facts["threads_per_rank"] = 1
        with open(args.json, "w") as f:
            json.dump({"machine": facts, "records": [r.as_dict() for r in records], "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
