"""The GPU compass: the GPU performance targets, timed in one short run.

    python3 -m benchmarks.gpu.compass --out $OUT/compass.jsonl

Each line of the output is one record, written as soon as it is measured:
median per-call time (CUDA events around each call), back-to-back time (20
calls between two events: what a CUDA graph or a busy stream sees), GB/s over
the bytes the op must move and that as a share of the device-to-device copy
bandwidth measured in the same run, and the eager peer's median. No
torch.compile peers: compiling them would eat the lease.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

if __name__ == "__main__":  # the GPU run compiles every kernel; importing this module changes nothing
    os.environ["TRITON_INTERPRET"] = "0"

import torch

import rlhf_fast
from rlhf_fast import reference

from ..harness import cuda_event_times

DEV = "cuda"


def timed(fn, repeat=20, warmup=3) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = cuda_event_times(fn, repeat)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(repeat):
        fn()
    b.record()
    b.synchronize()
    return dict(median_s=statistics.median(times), back_to_back_s=a.elapsed_time(b) / 1e3 / repeat)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    x = torch.empty(2**30, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), repeat=10)["median_s"]
    return 2 * x.numel() / t


class Writer:
    def __init__(self, path, copy_bw):
        self.path, self.copy_bw = path, copy_bw

    def __call__(self, name, shape, dtype, ours, peer=None, peer_name=None, nbytes=None, **extra):
        rec = dict(op=name, shape=shape, dtype=dtype, **{f"ours_{k}": v for k, v in ours.items()})
        if nbytes:
            rec["gb_per_s"] = nbytes / ours["median_s"] / 1e9
            rec["pct_of_copy"] = 100 * nbytes / ours["median_s"] / self.copy_bw
        if peer is not None:
            rec.update(peer=peer_name, peer_median_s=peer["median_s"], speedup=peer["median_s"] / ours["median_s"])
        rec.update(extra)
        print(json.dumps(rec), flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def each_backend(self, name, shape, dtype, measure, *peer, **extra):
        """One record per GPU backend of ours: measure() -> timed(...) under
        it; a backend that fails writes its error instead of a time."""
        for be in ("triton", "cuda"):
            try:
                with rlhf_fast.use_backend(be):
                    ours = measure()
            except Exception as exc:
                self(name, shape, dtype, dict(median_s=float("nan")), backend=be, error=repr(exc)[:300])
                continue
            self(name, shape, dtype, ours, *peer, backend=be, **extra)


def _eager_logprobs(x, y):
    return x.float().log_softmax(-1).gather(-1, y[:, None])[:, 0]


def logprobs(w):
    for N, V in ((16384, 151936), (4096, 32000)):
        x = torch.randn(N, V, device=DEV, dtype=torch.bfloat16)
        y = torch.randint(0, V, (N,), device=DEV)
        peer = timed(lambda x=x: _eager_logprobs(x, y), repeat=5) if N * V < 2**31 else None
        fwd = functools.partial(rlhf_fast.logprobs_from_logits, x, y, return_entropy=True)
        w.each_backend(
            "logprobs fwd+entropy",
            (N, V),
            "bf16",
            lambda f=fwd: timed(f),
            peer,
            "eager log_softmax+gather",
            nbytes=N * V * 2,
        )
        if N == 4096:
            xg = x.detach().requires_grad_()

            def ours_fb():
                lp = rlhf_fast.logprobs_from_logits(xg, y)
                return torch.autograd.grad(lp.sum(), xg)

            def eager_fb():
                return torch.autograd.grad(_eager_logprobs(xg, y).sum(), xg)

            peer_fb = timed(eager_fb, repeat=5)
            # fwd reads N*V, bwd reads N*V and writes N*V
            w.each_backend(
                "logprobs fwd+bwd", (N, V), "bf16", lambda: timed(ours_fb), peer_fb, "eager", nbytes=3 * N * V * 2
            )
        del x, fwd  # 4.6 GiB of logits at N=16384
        torch.cuda.empty_cache()


def linear(w):
    N, H, V = 8192, 4096, 131072
    h = torch.randn(N, H, device=DEV, dtype=torch.bfloat16) / H**0.5
    wt = torch.randn(V, H, device=DEV, dtype=torch.bfloat16)
    y = torch.randint(0, V, (N,), device=DEV)
    peer = timed(lambda: torch.nn.functional.linear(h, wt), repeat=10)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ours = timed(lambda: rlhf_fast.linear_logprobs(h, wt, y), repeat=10)
    extra = torch.cuda.max_memory_allocated() - base
    w(
        "linear_logprobs fwd",
        (N, H, V),
        "bf16",
        ours,
        peer,
        "F.linear (cuBLAS)",
        extra_mem_frac_of_logits=extra / (N * V * 2),
    )


def gae(w):
    B, T = 1024, 8192
    r, v = torch.randn(B, T, device=DEV), torch.randn(B, T, device=DEV)
    m = torch.ones(B, T, device=DEV, dtype=torch.bool)
    ours = timed(lambda: rlhf_fast.gae(r, v, m, gamma=1.0, lam=0.95))
    with rlhf_fast.use_backend("reference"):
        peer = timed(lambda: rlhf_fast.gae(r[:, :512], v[:, :512], m[:, :512], gamma=1.0, lam=0.95), repeat=3)
    # reads r, v, mask; writes advantages, returns
    w("gae", (B, T), "fp32", ours, peer, "reference loop (T=512 slice: scale x16)", nbytes=B * T * (4 + 4 + 1 + 4 + 4))


def ppo(w):
    B, T = 256, 8192
    lp = (torch.randn(B, T, device=DEV) * 0.3).requires_grad_()
    old, adv = lp.detach() + 0.1, torch.randn(B, T, device=DEV)
    mask = torch.rand(B, T, device=DEV) > 0.2

    def fb():
        out = rlhf_fast.ppo_loss(lp, old, adv, mask)
        loss = out[0] if isinstance(out, tuple) else out.loss
        return torch.autograd.grad(loss, lp)

    ours = timed(fb)
    with rlhf_fast.use_backend("reference"):
        peer = timed(fb, repeat=5)
    w("ppo_loss fwd+bwd", (B, T), "fp32", ours, peer, "reference (eager)", nbytes=B * T * (4 * 3 + 1 + 4))


def ppo_rc(w, B=256, T=8192):
    """The rollout-correction goals at (256, 8192) fp32: the fused step (the
    CPU benchmark's: entropy, k3 KL, dual clip) with each correction of
    benchmarks/bench_ppo_loss.py against the same step without one, timed in
    alternating rounds, and against the eager reference chain of the same
    correction. Goals: <= 1.15x the uncorrected step, >= 10x the chain."""
    from ..bench_ppo_loss import CORRECTIONS, KW, _inputs

    lp, old, adv, mask, ent, ref = _inputs(B, T, torch.float32, DEV)
    roll = old + 0.01 * torch.randn(B, T, device=DEV)
    lp.requires_grad_()
    ent.requires_grad_()

    def step(loss_fn, **correction):
        def fn():
            loss, _ = loss_fn(lp, old, adv, mask, entropy=ent, ref_logprobs=ref, **correction, **KW)
            return torch.autograd.grad(loss, (lp, ent))

        return fn

    plain = step(rlhf_fast.ppo_loss)
    for name, spec in CORRECTIONS.items():
        correction = dict(rollout_logprobs=roll, rollout_correction=spec)
        ours_fn = step(rlhf_fast.ppo_loss, **correction)
        timed(ours_fn, repeat=3)  # warm both (Triton compiles)
        timed(plain, repeat=3)
        t_ours, t_plain = [], []
        for _ in range(5):  # alternating rounds: drift of clocks or neighbours hits both
            t_ours += cuda_event_times(ours_fn, 8)
            t_plain += cuda_event_times(plain, 8)
        ours, uncorrected = statistics.median(t_ours), statistics.median(t_plain)
        peer = timed(step(reference.ppo_loss, **correction), repeat=5)
        w(
            f"ppo_loss+rollout_correction fwd+bwd ({name})",
            (B, T),
            "fp32",
            dict(median_s=ours),
            peer,
            "eager reference chain (same correction)",
            # the uncorrected step's bytes plus rollout_logprobs read once
            nbytes=B * T * (6 * 4 + 1 + 4 + 4 + 1 + 2 * 4),
            uncorrected_median_s=uncorrected,
            slowdown_vs_uncorrected=ours / uncorrected,
        )


def sampler(w):
    B, V = 128, 131072
    x = torch.randn(B, V, device=DEV, dtype=torch.bfloat16) * 3

    def sort_top_p():
        p = (x.float() / 0.8).softmax(-1)
        sp, idx = p.sort(-1, descending=True)
        keep = sp.cumsum(-1) - sp < 0.9
        sp = sp * keep
        return idx.gather(-1, torch.multinomial(sp, 1))

    peer = timed(sort_top_p)
    ours = timed(lambda: rlhf_fast.sample(x, temperature=0.8, top_p=0.9))
    w("sample top-p", (B, V), "bf16", ours, peer, "sort-based top-p", nbytes=B * V * 2)


# ppo_rc last: its Triton specialisations compile cold, and a compass step cut
# short by its timeout still keeps every row written before
FAMILIES = dict(logprobs=logprobs, linear=linear, gae=gae, ppo=ppo, sampler=sampler, ppo_rc=ppo_rc)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", action="append")
    args = ap.parse_args()
    bw = copy_bandwidth()
    w = Writer(args.out, bw)
    w("copy", "1 GiB", "u8", dict(median_s=2**31 / bw), copy_gb_per_s=bw / 1e9, device=torch.cuda.get_device_name())
    failed = 0
    for name, fam in FAMILIES.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            fam(w)
        except Exception as exc:
            failed += 1
            w(name, "-", "-", dict(median_s=float("nan")), error=f"{type(exc).__name__}: {exc}"[:500])
        print(f"== {name} {time.perf_counter() - t0:.1f} s", flush=True)
        torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
