"""Advantage estimators: rlhf_fast vs the Python loop over time (verl-style,
rlhf_fast.reference.gae), torchrl's vec_generalized_advantage_estimate, and
eager torch for whitening and group statistics.

CPU shapes (B, T) = (64, 2048) and (512, 4097-ish responses: 4096); GPU (when
one is visible) (1024, 8192), reported in GB/s against the measured copy
bandwidth. Masks are right-padded responses with 30% observation-token holes
(multi-turn), so every path does the masked work.

    python -m benchmarks.bench_advantages            # full shapes
    python -m benchmarks.bench_advantages --quick    # ~1 min on 2 cores
    python -m benchmarks.bench_advantages --threads 1 --json benchmarks/results/advantages_cpu.json
    python -m benchmarks.bench_advantages --packed-only --threads 1   # packed vs padded GAE alone

Packed rows: GAE over a packed stream (cu_seqlens) of S sequences whose
lengths are drawn from 32 to 1024 (mean ~200), against the padded op on the
same sequences padded to the longest: the padded op walks S x max_len slots,
the packed one the total tokens only.

torchrl's GAE treats masked steps as episode ends (`done`), not as skipped
tokens, so it is timed on the same tensors but is not the same function for
holed masks; the loop reference is the semantic match.
"""

from __future__ import annotations

import torch

import rlhf_fast
from rlhf_fast import reference

from .harness import Record, bench_main, compare

GAMMA, LAM = 0.99, 0.95


def _torchrl_gae():
    try:
        from torchrl.objectives.value.functional import vec_generalized_advantage_estimate
    except Exception as exc:  # not installed, or an incompatible torch
        return f"torchrl not importable ({type(exc).__name__}); pip install torchrl"
    return vec_generalized_advantage_estimate


def _inputs(B: int, T: int, device: str):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(B, T, generator=g)
    v = torch.randn(B, T, generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    m = (torch.arange(T)[None, :] < lengths[:, None]) & (torch.rand(B, T, generator=g) > 0.3)
    return r.to(device), v.to(device), m.to(device)


def _compare(device, **case) -> list[Record]:
    """compare() of ours (fp32, forward) on device: what every case here shares."""
    return compare(impl="rlhf_fast", dtype="float32", device=device, mode="fwd", **case)


def _gae_records(B, T, device, warmup, repeat, loop_repeat) -> list[Record]:
    r, v, m = _inputs(B, T, device)
    shape = f"({B}, {T})"
    nbytes = B * T * (4 + 4 + 1 + 4 + 4)  # r, v, mask read; adv, returns written
    recs = []
    ours = lambda: rlhf_fast.gae(r, v, m, gamma=GAMMA, lam=LAM)  # noqa: E731
    loop = lambda: reference.gae(r, v, m, gamma=GAMMA, lam=LAM)  # noqa: E731
    recs += _compare(
        device,
        op="gae",
        fn=ours,
        baselines={"verl-style loop (reference.gae)": loop},
        shape=shape,
        bytes_moved=nbytes,
        warmup=1,
        repeat=loop_repeat,
    )
    trl = _torchrl_gae()
    if not isinstance(trl, str):
        done = (~m).unsqueeze(-1)
        rr, vv = r.unsqueeze(-1), v.unsqueeze(-1)
        # torchrl takes next_state_value explicitly: v shifted left, 0 at the end
        nv = torch.cat([vv[:, 1:], torch.zeros_like(vv[:, :1])], 1)
        trl_fn = lambda: trl(GAMMA, LAM, vv, nv, rr, done, done, time_dim=-2)  # noqa: E731
    else:
        trl_fn = trl
    recs += _compare(
        device,
        op="gae",
        fn=ours,
        baselines={"torchrl vec_generalized_advantage_estimate": trl_fn},
        shape=shape,
        bytes_moved=nbytes,
        warmup=warmup,
        repeat=repeat,
    )[1:]
    dr = lambda: rlhf_fast.discounted_returns(r, m, gamma=GAMMA)  # noqa: E731
    dr_loop = lambda: reference.discounted_returns(r, m, gamma=GAMMA)  # noqa: E731
    recs += _compare(
        device,
        op="discounted_returns",
        fn=dr,
        baselines={"loop (reference)": dr_loop},
        shape=shape,
        bytes_moved=B * T * 9,
        warmup=1,
        repeat=loop_repeat,
    )
    return recs


def _stats_records(B, T, device, warmup, repeat) -> list[Record]:
    r, _, m = _inputs(B, T, device)
    shape = f"({B}, {T})"
    recs = _compare(
        device,
        op="whiten",
        fn=lambda: rlhf_fast.whiten(r, m),
        baselines={"eager torch (reference.whiten)": lambda: reference.whiten(r, m)},
        shape=shape,
        bytes_moved=B * T * (4 + 1) * 2 + B * T * 4,
        warmup=warmup,
        repeat=repeat,
    )
    # group advantages over N = 16 * B scores (16 samples per prompt), by size and by shuffled ids
    N = 16 * B
    s = torch.randn(N, device=device)
    ids = torch.randperm(N, device=device) // 16
    for groups, label in ((16, "size 16"), (ids, "shuffled ids")):
        recs += _compare(
            device,
            op="group_adv",
            fn=lambda g=groups: rlhf_fast.group_advantages(s, g, estimator="grpo"),
            baselines={f"eager torch, {label}": lambda g=groups: reference.group_advantages(s, g, estimator="grpo")},
            shape=f"N={N}",
            bytes_moved=N * 8,
            warmup=warmup,
            repeat=repeat,
        )
    return recs


def packed_lengths(S: int, generator: torch.Generator) -> torch.Tensor:
    """S lengths in [32, 1024], mean ~200: 32 + an exponential of mean 170,
    clipped (a long tail of long responses, as in RL rollouts)."""
    e = torch.empty(S).exponential_(1 / 170, generator=generator)
    return (32 + e).round().clamp(max=1024).to(torch.int64)


def _packed_records(S, device, warmup, repeat) -> list[Record]:
    g = torch.Generator().manual_seed(1)
    lengths = packed_lengths(S, g)
    T = int(lengths.max())
    attn = torch.arange(T)[None, :] < lengths[:, None]
    r, v = torch.randn(S, T, generator=g), torch.randn(S, T, generator=g)
    m = attn & (torch.rand(S, T, generator=g) > 0.3)  # multi-turn holes inside each response
    (rp, cu), (vp, _), (mp, _) = (rlhf_fast.pack(x, attn) for x in (r, v, m))
    r, v, m, rp, vp, mp, cu = (x.to(device) for x in (r, v, m, rp, vp, mp, cu))
    total = int(lengths.sum())
    packed = lambda: rlhf_fast.gae(rp, vp, mp, gamma=GAMMA, lam=LAM, cu_seqlens=cu)  # noqa: E731
    padded = lambda: rlhf_fast.gae(r, v, m, gamma=GAMMA, lam=LAM)  # noqa: E731
    name = f"padded gae, padded to the longest ({S} x {T} = {S * T} slots)"
    return _compare(
        device,
        op="gae packed",
        fn=packed,
        baselines={name: padded},
        shape=f"S={S}, total={total}, mean len {total / S:.0f}",
        bytes_moved=total * 17,
        warmup=warmup,
        repeat=repeat,
        interleave=(name,),
    )


def packed_summary(records: list[Record]) -> str:
    """Per token: ours per valid token, the padded op per slot it walks."""
    lines = []
    for r in records:
        if r.op == "gae packed" and r.baseline and r.status == "ok":
            total = int(r.shape.split("total=")[1].split(",")[0])
            slots = int(r.baseline.split("= ")[1].split(" ")[0])
            ours, peer = r.median_s / total * 1e9, r.baseline_median_s / slots * 1e9
            lines.append(
                f"{r.shape}: packed {r.speedup:.2f}x faster than padded; {ours:.2f} ns per valid token packed, "
                f"{peer:.2f} ns per slot padded ({ours / peer:.2f}x), {r.baseline_median_s / total * 1e9:.2f} ns "
                "per valid token padded"
            )
    return "\n".join(lines)


def run_packed(quick: bool = True, device: str | None = None) -> list[Record]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    recs = []
    for S in (256,) if quick else (512, 2048):
        recs += _packed_records(S, "cpu", warmup=3, repeat=21)
    if device == "cuda":
        recs += _packed_records(4096, "cuda", warmup=5, repeat=50)
    return recs


def run(quick: bool = True, device: str | None = None, tiny: bool = False) -> list[Record]:
    """CPU shapes always (the loop baselines are CPU-bound anyway), plus the
    GPU shape when device is "cuda" (default: when one is visible).
    tiny: (4, 64), for pytest-benchmark (benchmarks/test_bench.py)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    recs: list[Record] = []
    cpu_shapes = [(4, 64)] if tiny else [(16, 512), (64, 2048)] if quick else [(64, 2048), (512, 4096)]
    for B, T in cpu_shapes:
        recs += _gae_records(B, T, "cpu", warmup=3, repeat=15 if quick else 10, loop_repeat=3)
        recs += _stats_records(B, T, "cpu", warmup=3, repeat=15 if quick else 10)
    if not tiny:
        recs += run_packed(quick=quick, device="cpu")
    if device == "cuda":
        B, T = (8, 256) if tiny else (128, 8192) if quick else (1024, 8192)
        gpu = _gae_records(B, T, "cuda", warmup=5, repeat=50, loop_repeat=3)
        gpu += _stats_records(B, T, "cuda", warmup=5, repeat=50)
        gpu += _packed_records(256 if tiny else 4096, "cuda", warmup=5, repeat=50)
        recs += gpu
    return recs


if __name__ == "__main__":
    import sys

    if "--packed-only" in sys.argv:
        sys.argv.remove("--packed-only")
        bench_main(run_packed, quick_by_default=False, bandwidth=True, summary=packed_summary)
    else:
        bench_main(run, quick_by_default=False, bandwidth=True, summary=packed_summary)
