"""One tolerance table and one comparison helper for every test.

`assert_close(out, ref, quantity, name)` looks the bound up in TOL by the
output's dtype and what the output is; no test picks its own numbers.

Kernels are compared with a float64 reference on the same inputs by the
norm-wise relative error ||out - ref|| / ||ref||, or, for quantities whose
low-precision error is absolute (a difference of larger terms), every
element within `atol` of the reference. Low-precision outputs are held to the
error torch eager itself makes in that dtype (assert_no_worse_than_eager), so
the bound tracks the reference's own error and can still fail.
"""

from __future__ import annotations

import torch

_EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7

# What is compared:
#   logprob  log p = z - lse: a difference of O(max|z|) terms, so an fp32
#            kernel is a few ulps of max(|z|/T, 1) off however small log p is
#            (a row with log p = -0.02 at |z| ~ 3 was 2.2e-7 off, relative
#            1.05e-5); atol is in units of that scale (scale=logit_scale(...)).
#   entropy  log s - E[z - max], O(1) terms whatever H: a nearly one-hot row
#            (H ~ 1e-3) was 1.4e-7 off, so 8 ulps of 1.0 is the floor.
#   grad     gradients: relative only.
#   loss     a scalar: |out - ref| <= rtol * max(|ref|, 1). PPO token terms are
#            O(1) (randn advantages, ratios near 1); a loss that cancels to
#            ~1e-4 keeps the absolute rounding error of those terms.
#   stat     metrics that are differences of O(1) means (kl, chi2,
#            log-ppl difference): ~1e-7 absolute error per fp32 mean.
#   value    everything else (advantages, returns, per-token KL, weights).
#   offset   float64 whitening / group advantages of data offset by 1e6:
#            the mean subtraction has condition number ~1e6, so a correct
#            two-pass kernel is ~1e6 x 2.2e-16 x a few off (a one-pass
#            E[x^2] - E[x]^2 is ~1e-3 off: the bound can fail).
#   agree    two implementations of the same math in the same dtype
#            (backends, shardings, thread counts, chunkings): rounding only.
#   peer     our op against a peer library's implementation (TRL, verl,
#            OpenRLHF) in fp32, each with its own order of operations.
#   model    a whole model forward in fp32 (a tiny HF model, a few layers):
#            log-probs through attention and MLP roundings, ~1e-5 absolute.
QUANTITIES = ("logprob", "entropy", "grad", "loss", "stat", "value", "offset", "agree", "peer", "model")

# (output dtype, quantity) -> (rtol, atol). fp32 against float64: 1e-5
# relative, about 100 fp32 ulps, the acceptance bar of every fp32 kernel.
TOL: dict[tuple[torch.dtype, str], tuple[float, float]] = {
    (torch.float32, "logprob"): (1e-5, 8 * _EPS32),
    (torch.float32, "entropy"): (1e-5, 8 * _EPS32),
    (torch.float32, "grad"): (1e-5, 0.0),
    (torch.float32, "loss"): (1e-5, 0.0),
    (torch.float32, "stat"): (1e-5, 1e-6),
    (torch.float32, "value"): (1e-5, 0.0),
    (torch.float32, "agree"): (1e-5, 1e-6),
    (torch.float32, "peer"): (1e-5, 1e-5),
    (torch.float32, "model"): (1e-5, 1e-4),
    # bf16 data, bf16 output against eager bf16 (the adapters' peers): one
    # bf16 ulp at |x| ~ 4 is 3e-2.
    (torch.bfloat16, "peer"): (2e-2, 5e-2),
    # A gradient stored in bf16 / fp16: one rounding of each element (bf16:
    # 2^-8 = 3.9e-3 relative) on top of the fp32 math.
    (torch.bfloat16, "grad"): (8e-3, 0.0),
    (torch.float16, "grad"): (8e-3, 0.0),
}
for _q in QUANTITIES:
    # float64 kernels against the float64 reference: summation order only.
    TOL[(torch.float64, _q)] = {"agree": (1e-12, 1e-12), "offset": (1e-8, 0.0)}.get(_q, (1e-10, 0.0))
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION = (torch.bfloat16, torch.float16)


def tol(dtype: torch.dtype, quantity: str) -> tuple[float, float]:
    """(rtol, atol) for an output of `dtype` holding `quantity`. Low-precision
    outputs without an entry of their own are fp32 math on low-precision
    values (the kernels accumulate in fp32): the fp32 bound applies."""
    if quantity not in QUANTITIES:
        raise KeyError(f"unknown quantity {quantity!r}: one of {QUANTITIES}")
    if (dtype, quantity) in TOL:
        return TOL[(dtype, quantity)]
    if not dtype.is_floating_point:
        return (0.0, 0.0)  # tokens, counts: exact
    if dtype in LOW_PRECISION:
        return TOL[(torch.float32, quantity)]
    raise KeyError(f"no tolerance for {dtype} {quantity}")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    finite = torch.isfinite(ref)
    o, r = out[~finite], ref[~finite]
    if not torch.equal(torch.isfinite(out), finite) or not bool(((o == r) | (o.isnan() & r.isnan())).all()):
        return float("inf")  # NaN / inf in different places is always a failure
    num = torch.linalg.vector_norm(out[finite] - ref[finite])
    den = torch.linalg.vector_norm(ref[finite])
    return float(num / den) if den > 0 else float(num)


def _first_mismatches(out, ref, k=5) -> str:
    out, ref = out.detach().double().flatten(), ref.detach().double().flatten()
    diff = (out - ref).abs().nan_to_num(float("inf"))
    both_nan = out.isnan() & ref.isnan()
    diff[both_nan | (out == ref)] = 0
    idx = diff.argsort(descending=True)[:k]
    return ", ".join(f"[{int(i)}] got {out[i].item():.8g} want {ref[i].item():.8g}" for i in idx if diff[i] > 0)


def _within(out, ref, rtol, atol, name) -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if atol > 0 and torch.isfinite(out).all() and torch.isfinite(ref).all():
        if out.numel() == 0 or float((out.detach().double() - ref.detach().double()).abs().max()) <= atol:
            return
    err = rel_err(out, ref)
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.1e}; worst: {_first_mismatches(out, ref)}"


def assert_close(
    out: torch.Tensor,
    ref: torch.Tensor,
    quantity: str,
    name: str = "output",
    *,
    scale: float = 1.0,
    dtype: torch.dtype | None = None,
) -> None:
    """`out` matches `ref` within TOL[(dtype, quantity)]: norm-wise relative
    error within rtol, or every element within atol * scale. dtype defaults
    to out's (pass it when out was upcast before the comparison)."""
    out, ref = torch.as_tensor(out), torch.as_tensor(ref)
    rtol, atol = tol(dtype or out.dtype, quantity)
    if quantity == "loss":
        assert out.numel() == 1 and ref.numel() == 1, f"{name}: a loss is a scalar"
        err = abs(out.double().item() - ref.double().item())
        bound = rtol * max(abs(ref.double().item()), 1.0)
        assert err <= bound, f"{name}: loss {out.item()} vs {ref.item()} (err {err:.2e} > {bound:.1e})"
        return
    _within(out, ref, rtol, atol * scale, name)


def assert_equal(out: torch.Tensor, ref: torch.Tensor, name: str = "output") -> None:
    """Bit-for-bit: for guarantees (batch invariance, determinism) and for
    results that are exact by construction."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert (
        torch.equal(out, ref)
        or (out.isnan() == ref.isnan()).all()
        and torch.equal(out.nan_to_num(0.0), ref.nan_to_num(0.0))
    ), f"{name}: not bit-identical; worst: {_first_mismatches(out, ref)}"


def logit_scale(logits: torch.Tensor, temperature: float = 1.0) -> float:
    """max(|z| / T, 1) over the finite logits: the scale of a log-prob's
    absolute rounding error (see `logprob` above)."""
    z = logits.detach().double() / temperature
    z = z[torch.isfinite(z)]
    return max(float(z.abs().max()) if z.numel() else 0.0, 1.0)


def assert_no_worse_than_eager(
    out, eager, ref, quantity: str, name="output", factor=LOW_PRECISION_FACTOR, scale: float = 1.0, floor: float = 1e-6
) -> None:
    """Low-precision inputs: at most `factor` x torch eager's own error in the
    same dtype (floor: eager can be exact on tiny cases), or every element
    within the quantity's fp32 atol * scale (outputs with an absolute floor)."""
    bound = max(factor * rel_err(eager, ref), floor)
    _, atol = tol(torch.float32, quantity)
    _within(out, ref, bound, atol * scale, name=f"{name} (eager err {rel_err(eager, ref):.2e})")
