"""One tolerance table and one comparison helper for every kernel test.

Kernels are compared with a float64 reference on the same inputs by the
norm-wise relative error ||out - ref|| / ||ref||. Low-precision inputs are
held to the error that torch eager itself makes in that dtype (times
LOW_PRECISION_FACTOR), so the tolerance tracks the reference's own error
and can fail.
"""
from __future__ import annotations

import torch

# fp32 kernels against float64: the acceptance bar of the issues (1e-5).
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-5, torch.float16: 1e-5}
LOW_PRECISION_FACTOR = 2.0


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    finite = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(out), finite) or not torch.equal(out[~finite], ref[~finite]):
        return float("inf")  # NaN / inf in different places is always a failure
    num = torch.linalg.vector_norm(out[finite] - ref[finite])
    den = torch.linalg.vector_norm(ref[finite])
    return float(num / den) if den > 0 else float(num)


def _first_mismatches(out, ref, k=5) -> str:
    out, ref = out.double().flatten(), ref.double().flatten()
    diff = (out - ref).abs().nan_to_num(float("inf"))
    both_nan = out.isnan() & ref.isnan()
    diff[both_nan | (out == ref)] = 0
    idx = diff.argsort(descending=True)[:k]
    return ", ".join(f"[{int(i)}] got {out[i].item():.8g} want {ref[i].item():.8g}" for i in idx if diff[i] > 0)


def assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float, name: str = "output", atol: float = 0.0) -> None:
    """Norm-wise relative error within rtol, or (atol > 0) every element
    within atol of the reference: for outputs that are differences of larger
    terms (log p = z - lse, entropy), whose fp32 error is absolute."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if atol > 0 and torch.isfinite(out).all() and torch.isfinite(ref).all():
        if out.numel() == 0 or float((out.double() - ref.double()).abs().max()) <= atol:
            return
    err = rel_err(out, ref)
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.1e}; worst: {_first_mismatches(out, ref)}"


def logprob_atol(logits: torch.Tensor, temperature: float = 1.0) -> float:
    """log p = z - lse is a difference of O(max|z|) terms: an fp32 kernel is
    a few ulps of max(|z|, 1) off however small log p is (a row with
    log p = -0.02 at |z| ~ 3 was 2.2e-7 off: relative 1.05e-5)."""
    z = logits.double() / temperature
    z = z[torch.isfinite(z)]
    zmax = float(z.abs().max()) if z.numel() else 0.0
    return 8 * torch.finfo(torch.float32).eps * max(zmax, 1.0)


# Entropy is a difference of O(1) terms (log s - E[z - max]) with s in [1, V]:
# an fp32 kernel's absolute error there is a few ulps of 1 whatever the size
# of H, so a nearly one-hot row (H ~ 1e-3, seen 1.4e-7 off) cannot meet a
# relative bound. 8 ulps of 1.0 is the absolute floor for fp32 entropies.
ENTROPY_ATOL = 8 * torch.finfo(torch.float32).eps


def assert_no_worse_than_eager(out, eager, ref, name="output", factor=LOW_PRECISION_FACTOR, floor=1e-6,
                               atol=0.0) -> None:  # fmt: skip
    """Low-precision inputs: at most `factor` x torch eager's own error in the
    same dtype (floor: eager can be exact on tiny cases), or every element
    within `atol` of the reference (for outputs with an absolute error floor)."""
    bound = max(factor * rel_err(eager, ref), floor)
    assert_close(out, ref, bound, name=f"{name} (eager err {rel_err(eager, ref):.2e})", atol=atol)
