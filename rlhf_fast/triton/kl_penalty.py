"""Triton kl_penalty: verl's per-token KL estimators of logprobs against
ref_logprobs, forward and backward, one elementwise pass each (C++ twin:
csrc/cpu/kl_penalty.cpp, estimators in csrc/include/rlhf_fast/kl_estimators.h).
_kl_term is also the KL term of the fused policy loss (ppo_policy_loss.py).

The launchers are the torch.library triton_ops rlhf_fast::kl_penalty_fwd_triton
and kl_penalty_bwd_triton, with the schemas of the C++ ops; their fakes and
autograd are registered in rlhf_fast/ops/_ppo_loss.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend
from .._dtypes import acc_dtype
from ._common import cast_out, clamp_nan, launch_on_tensor_device, num_warps, tl_acc

# KL kinds as constexpr ints (csrc/include/rlhf_fast/kl_estimators.h uses the same numbers).
KL_CODES = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}
KL_BLOCK = 2048  # elements per kl_penalty program


@triton.jit
def _kl_term(lp, ref, KIND: tl.constexpr):
    """(value, d value / d lp) of verl's kl_penalty; k3 is low_var_kl with its clamps."""
    d = lp - ref
    if KIND == 0:
        val = d
        dval = tl.full(d.shape, 1.0, d.dtype)
    elif KIND == 1:
        val = 0.5 * d * d
        dval = d
    elif KIND == 2:
        k = clamp_nan(-d, -20.0, 20.0)
        e = tl.exp(k)
        kld = e - k - 1.0
        val = clamp_nan(kld, -10.0, 10.0)
        ok = (-d >= -20.0) & (-d <= 20.0) & (kld >= -10.0) & (kld <= 10.0)
        dval = tl.where(ok, 1.0 - e, 0.0)
    else:
        val = tl.abs(d)
        dval = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    return val, dval


@triton.jit
def _kl_penalty_fwd_kernel(lp_ptr, ref_ptr, out_ptr, n, KIND: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    lp = tl.load(lp_ptr + offs, mask=inb, other=0.0).to(ACC)
    ref = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(ACC)
    val, _ = _kl_term(lp, ref, KIND)
    tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _kl_penalty_bwd_kernel(
    g_ptr, lp_ptr, ref_ptr, out_ptr, n,
    KIND: tl.constexpr, ACC: tl.constexpr, ROUND_BY_HAND: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    lp = tl.load(lp_ptr + offs, mask=inb, other=0.0).to(ACC)
    ref = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(ACC)
    _, dval = _kl_term(lp, ref, KIND)
    tl.store(out_ptr + offs, cast_out(g * dval, out_ptr.dtype.element_ty, ROUND_BY_HAND), mask=inb)


# ---------------------------------------------------------------- launchers (triton_ops)


@torch.library.triton_op("rlhf_fast::kl_penalty_fwd_triton", mutates_args=())
@launch_on_tensor_device
def kl_penalty_fwd_triton(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    out = torch.empty(logprobs.shape, dtype=acc_dtype(logprobs.dtype), device=logprobs.device)
    n = out.numel()
    if n and _backend.launches_kernels(logprobs):
        torch.library.wrap_triton(_kl_penalty_fwd_kernel)[(triton.cdiv(n, KL_BLOCK),)](
            logprobs.contiguous(), ref_logprobs.contiguous(), out, n,
            KIND=KL_CODES[kind], ACC=tl_acc(logprobs.dtype), BLOCK=KL_BLOCK, num_warps=num_warps(KL_BLOCK),
        )  # fmt: skip
    return out


@torch.library.triton_op("rlhf_fast::kl_penalty_bwd_triton", mutates_args=())
@launch_on_tensor_device
def kl_penalty_bwd_triton(
    grad: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str
) -> torch.Tensor:
    out = torch.empty_like(logprobs, memory_format=torch.contiguous_format)
    n = out.numel()
    if n and _backend.launches_kernels(logprobs):
        torch.library.wrap_triton(_kl_penalty_bwd_kernel)[(triton.cdiv(n, KL_BLOCK),)](
            grad.contiguous(), logprobs.contiguous(), ref_logprobs.contiguous(), out, n,
            KIND=KL_CODES[kind], ACC=tl_acc(logprobs.dtype), ROUND_BY_HAND=_backend.triton_interpret(),
            BLOCK=KL_BLOCK, num_warps=num_warps(KL_BLOCK),
        )  # fmt: skip
    return out
