"""rlhf_fast.ppo_loss (policy loss + entropy bonus + k3 KL loss, dual clip,
forward + backward) against the eager reference chain (verl's formulas, one
(B, T) tensor per step) and torch.compile of that chain, in one run.

CPU: (64, 4096) fp32 (quick: (16, 1024)). GPU: (256, 8192) fp32 and bf16,
with GB/s against the measured copy bandwidth.

With rollout correction (op "ppo_loss+rollout_correction"): the same step
plus rollout_logprobs and a RolloutCorrection (token TIS; and verl's
decoupled_seq_is_rs preset, sequence TIS + seq_sum_k1 rejection, which needs
the row pass) against the eager reference chain of the same correction and
against rlhf_fast.ppo_loss without correction (the cost of correcting).

Packed (op "ppo_loss packed"): the same step on a packed stream (cu_seqlens)
of responses whose lengths are drawn from 32 to 1024 tokens (mean ~200),
against the same op on those responses right-padded to the longest, which
is what a padded batch costs (the packed call does the valid tokens' work).
    python -m benchmarks.bench_ppo_loss [--full] [--device cuda] [--threads N] [--json PATH]
    python -m benchmarks.bench_ppo_loss --packed-only [--full] --threads 1   # packed vs padded alone
"""

from __future__ import annotations

import torch

import rlhf_fast

try:
    from .harness import bench_main, compare
except ImportError:  # run as a script
    from harness import bench_main, compare

reference = rlhf_fast.reference
KW = dict(entropy_coef=0.01, kl_coef=0.05, kl_kind="k3", clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg="token-mean")


def _inputs(B, T, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    lp = -3 * torch.rand(B, T, generator=g)
    old = lp - 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    ent = 3 * torch.rand(B, T, generator=g)
    ref = lp + 0.2 * torch.randn(B, T, generator=g)
    # right-padded responses of random length, as in a rollout batch
    lengths = torch.randint(T // 4, T + 1, (B, 1), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return to(lp), to(old), to(adv), mask.to(device), to(ent), to(ref)


def _step(loss_fn, lp, old, adv, mask, ent, ref, **correction):
    """One forward + backward; gradients w.r.t. logprobs and entropy.
    correction: rollout_logprobs= and rollout_correction=, or nothing."""

    def fn():
        loss, _ = loss_fn(lp, old, adv, mask, entropy=ent, ref_logprobs=ref, **correction, **KW)
        return torch.autograd.grad(loss, (lp, ent))

    return fn


def _verl_skip() -> str | None:
    try:
        from verl.trainer.ppo import core_algos  # noqa: F401
    except Exception:
        return "verl not installed (pip install verl); its chain is the same as the eager reference"
    return None


def _compare(B, T, dtype, device, **case) -> list:
    """compare() of one fwd+bwd case at (B, T): the settings every case shares."""
    return compare(
        shape=f"({B}, {T})",
        dtype=str(dtype).replace("torch.", ""),
        device=device,
        mode="fwd+bwd",
        warmup=5,
        # 60 on CPU: with 15 calls of 4-8 ms, medians moved 20-30% between runs here
        repeat=30 if device == "cuda" else 60,
        **case,
    )


def bench(B, T, dtype, device) -> list:
    lp, old, adv, mask, ent, ref = _inputs(B, T, dtype, device)
    lp.requires_grad_()
    ent.requires_grad_()
    compiled = torch.compile(reference.ppo_loss)
    baselines = {
        "eager reference chain": _step(reference.ppo_loss, lp, old, adv, mask, ent, ref),
        "torch.compile(reference)": _step(compiled, lp, old, adv, mask, ent, ref),
    }
    skip = _verl_skip()
    if skip:
        baselines["verl core_algos"] = skip
    e = lp.element_size()
    # fwd: 5 token tensors + mask in, dtok (fp32) out; bwd: dtok (+ mask) in, 2 grads out
    bytes_moved = B * T * (5 * e + 1 + 4 + 4 + 1 + 2 * e)
    return _compare(
        B,
        T,
        dtype,
        device,
        op="ppo_loss",
        impl="rlhf_fast",
        fn=_step(rlhf_fast.ppo_loss, lp, old, adv, mask, ent, ref),
        baselines=baselines,
        bytes_moved=bytes_moved,
    )


CORRECTIONS = {
    "token TIS": rlhf_fast.RolloutCorrection("token", 2.0),
    "seq TIS + seq_sum_k1": rlhf_fast.RolloutCorrection("sequence", 2.0, "seq_sum_k1", "0.5_2.0"),
}


def bench_corrected(B, T, dtype, device) -> list:
    lp, old, adv, mask, ent, ref = _inputs(B, T, dtype, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    # the sampler's log-probs: the trainer's plus a small engine mismatch
    roll = (old.float().cpu() + 0.01 * torch.randn(B, T, generator=g)).to(device=device, dtype=dtype)
    lp.requires_grad_()
    ent.requires_grad_()
    records = []
    for name, spec in CORRECTIONS.items():
        baselines = {
            "eager reference chain (same correction)": _step(
                reference.ppo_loss, lp, old, adv, mask, ent, ref, rollout_logprobs=roll, rollout_correction=spec
            ),
            "rlhf_fast.ppo_loss without correction": _step(rlhf_fast.ppo_loss, lp, old, adv, mask, ent, ref),
        }
        e = lp.element_size()
        bytes_moved = B * T * (6 * e + 1 + 4 + 4 + 1 + 2 * e)  # + rollout_logprobs read once
        records += _compare(
            B,
            T,
            dtype,
            device,
            op="ppo_loss+rollout_correction",
            impl=f"rlhf_fast ({name})",
            fn=_step(rlhf_fast.ppo_loss, lp, old, adv, mask, ent, ref, rollout_logprobs=roll, rollout_correction=spec),
            baselines=baselines,
            bytes_moved=bytes_moved,
            # the ratio against the uncorrected step (1.15x goal), measured in
            # alternating rounds, so machine drift does not enter it
            interleave=("rlhf_fast.ppo_loss without correction",),
        )
    return records


def spread_lengths(S: int, seed: int = 0) -> torch.Tensor:
    """S response lengths in [32, 1024], mean ~200: 32 + an exponential of
    mean 168, cut at 1024 (a rollout batch's long tail)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.rand(S, generator=g, dtype=torch.float64)
    return (32 - 168 * torch.log1p(-u)).clamp(max=1024).long()


def bench_packed(S, dtype, device) -> list:
    lengths = spread_lengths(S)
    T = int(lengths.max())
    lp, old, adv, _, ent, ref = _inputs(S, T, dtype, device)
    inside = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(device)
    # a loss mask inside each response (prompt / observation tokens are 0)
    g = torch.Generator(device="cpu").manual_seed(2)
    mask = (torch.rand(S, T, generator=g) > 0.1).to(device) & inside
    packed = [rlhf_fast.pack(t, inside)[0] for t in (lp, old, adv, mask, ent, ref)]
    cu = rlhf_fast.pack(lp, inside)[1]
    for t in (lp, ent, packed[0], packed[4]):
        t.requires_grad_()
    plp, pold, padv, pmask, pent, pref = packed

    def packed_fn():
        loss, _ = rlhf_fast.ppo_loss(plp, pold, padv, pmask, entropy=pent, ref_logprobs=pref, cu_seqlens=cu, **KW)
        return torch.autograd.grad(loss, (plp, pent))

    total = int(lengths.sum())
    e = lp.element_size()
    return _compare(
        S,
        T,
        dtype,
        device,
        op="ppo_loss packed",
        impl=f"rlhf_fast packed ({total} tokens)",
        fn=packed_fn,
        baselines={
            f"rlhf_fast padded to the longest ({S * T} tokens)": _step(rlhf_fast.ppo_loss, lp, old, adv, mask, ent, ref)
        },
        bytes_moved=total * (5 * e + 1 + 4 + 4 + 1 + 2 * e),
        interleave=(f"rlhf_fast padded to the longest ({S * T} tokens)",),
    )


def run(quick: bool = True, device: str | None = None, tiny: bool = False) -> list:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if tiny:
        shapes, dtypes = [(4, 64)], [torch.float32]
    elif device == "cuda":
        shapes = [(32, 2048)] if quick else [(256, 8192)]
        dtypes = [torch.float32, torch.bfloat16]
    else:
        shapes = [(16, 1024)] if quick else [(64, 4096)]
        dtypes = [torch.float32]
    records = []
    for B, T in shapes:
        for dt in dtypes:
            records += bench(B, T, dt, device)
            records += bench_corrected(B, T, dt, device)
    if not tiny:
        for dt in dtypes:
            records += bench_packed(64 if quick else 256, dt, device)
    return records


def run_packed(quick: bool = True, device: str | None = None, tiny: bool = False) -> list:
    """Only the packed-vs-padded rows (S = 64 quick, 256 full; 8 tiny)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    S = 8 if tiny else (64 if quick else (1024 if device == "cuda" else 256))
    dtypes = [torch.float32, torch.bfloat16] if device == "cuda" and not tiny else [torch.float32]
    return [r for dt in dtypes for r in bench_packed(S, dt, device)]


if __name__ == "__main__":
    import sys

    if "--packed-only" in sys.argv:
        sys.argv.remove("--packed-only")
        bench_main(run_packed, quick_by_default=True, default_device="cpu", bandwidth=True)
    else:
        bench_main(run, quick_by_default=True, default_device="cpu", bandwidth=True)
