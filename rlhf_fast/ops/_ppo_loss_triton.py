"""Triton launchers for the PPO-loss family, registered as torch.library
triton_ops (rlhf_fast::ppo_loss_fwd_triton, ...) with the same schemas,
fakes and autograd as the C++ ops in ops/ppo_loss.py."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton.ppo_loss import (
    AGG_CODES,
    KL_CODES,
    KL_NONE,
    N_POLICY_PARTIALS,
    N_VALUE_PARTIALS,
    _kl_penalty_bwd_kernel,
    _kl_penalty_fwd_kernel,
    _ppo_loss_bwd_kernel,
    _ppo_loss_finish_kernel,
    _ppo_loss_fwd_kernel,
    _ppo_value_loss_finish_kernel,
    _ppo_value_loss_fwd_kernel,
    block_b,
    block_t,
)
from ..triton.rollout_correction import (
    IS_CODES,
    N_RC_PARTIALS,
    N_ROW_PARTIALS,
    _rollout_corr_finish_kernel,
    _rollout_row_kernel,
    block_b_rc,
    needs_row_pass,
    rs_codes,
)
from ._common import kernel_scalars, launch_on_tensor_device
from .ppo_loss import (
    LOSS_STATS,
    VALUE_STATS,
    _acc_dtype,
    _kl_setup_context,
    _loss_setup_context,
    _make_kl_backward,
    _make_loss_backward,
    _make_value_backward,
    _value_setup_context,
)


def _tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _u8(mask: torch.Tensor) -> torch.Tensor:
    return mask.contiguous().view(torch.uint8) if mask.dtype == torch.bool else mask.contiguous()


@torch.library.triton_op("rlhf_fast::ppo_loss_fwd_triton", mutates_args=())
@launch_on_tensor_device
def ppo_loss_fwd_triton(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    entropy: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    entropy_coef: float,
    kl_coef: float,
    kl_kind: str,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    agg: str,
    agg_norm: float,
    rollout_logprobs: torch.Tensor | None = None,
    rc_is: str = "none",
    rc_is_upper: float = 2.0,
    rc_is_lower: float | None = None,
    rc_rs: str = "none",
    rc_rs_lower: float = 0.0,
    rc_rs_upper: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T = logprobs.shape
    acc = _acc_dtype(logprobs.dtype)
    dev = logprobs.device
    dtok = torch.empty((B, T), dtype=acc, device=dev)
    row_scale = torch.empty((B,), dtype=acc, device=dev)
    loss = torch.zeros((), dtype=acc, device=dev)
    stats = torch.zeros((len(LOSS_STATS),), dtype=acc, device=dev)
    keep = torch.empty((B, T) if rc_rs != "none" else (0,), dtype=torch.bool, device=dev)
    rc = rollout_logprobs is not None
    is_code, (rs_lvl, rs_k) = IS_CODES[rc_is], rs_codes(rc_rs)
    if (is_code or rs_lvl >= 0) and not rc:
        raise ValueError("rlhf_fast::ppo_loss_fwd_triton: a rollout correction needs rollout_logprobs")
    if B == 0:
        return loss, stats, dtok, row_scale, keep
    bt = block_t(T)
    fwd_warps = 8 if bt >= 2048 else 4
    if rc and acc == torch.float64:
        # fp64 (the tests' dtype) with the correction's extra state: at 8
        # warps ptxas caps a thread at 128 registers and it spilled 8-24 B
        # (sm_90 / sm_80); 4 warps may use 255 registers, and 512 lanes (4
        # per thread) spill none where 1024 still spilled 32-72 B on sm_80
        bt, fwd_warps = min(bt, 512), 4
    n_chunks = max(1, triton.cdiv(T, bt))
    n_part = N_POLICY_PARTIALS + (N_RC_PARTIALS if rc else 0)
    part = torch.empty((B, n_chunks, n_part), dtype=acc, device=dev)
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    dual = 3.0 if dual_clip is None else dual_clip
    is_lo = 1.0 / rc_is_upper if rc_is_lower is None else rc_is_lower
    rc_vals = (rc_is_upper, is_lo, rc_rs_lower, rc_rs_upper)
    params, from_ptr = kernel_scalars(
        acc, dev, lo, hi, dual, kl_coef, entropy_coef, kl_coef, agg_norm, agg_norm, *rc_vals
    )  # fmt: skip
    lp = logprobs.contiguous()
    old = old_logprobs.contiguous()
    ent = entropy.contiguous() if entropy is not None else lp
    ref = ref_logprobs.contiguous() if ref_logprobs is not None else lp
    roll = rollout_logprobs.contiguous() if rc else lp
    m8 = _u8(mask)
    rowp = part
    if rc and needs_row_pass(is_code, rs_lvl):
        rowp = torch.empty((B, n_chunks, N_ROW_PARTIALS), dtype=acc, device=dev)
        torch.library.wrap_triton(_rollout_row_kernel)[(B, n_chunks)](
            old, roll, m8, rowp, T, ACC=_tl(acc), BLOCK_T=bt, num_warps=fwd_warps
        )
    torch.library.wrap_triton(_ppo_loss_fwd_kernel)[(B, n_chunks)](
        lp, old, advantages.contiguous(), m8, ent, ref, dtok, part,
        params if from_ptr else lp, roll, rowp, keep.view(torch.uint8) if keep.numel() else m8,
        T, lo, hi, dual, kl_coef, *rc_vals,
        HAS_ENT=entropy is not None, KL=KL_CODES[kl_kind] if ref_logprobs is not None else KL_NONE,
        DUAL=dual_clip is not None, ACC=_tl(acc), PARAMS_FROM_PTR=from_ptr, BLOCK_T=bt,
        RC=rc, IS=is_code, ICEPOP=rc_is_lower is not None, RS_LVL=rs_lvl, RS_K=rs_k, NP=n_part,
        num_warps=fwd_warps,
    )  # fmt: skip
    torch.library.wrap_triton(_ppo_loss_finish_kernel)[(1,)](
        part, row_scale, loss, stats, params if from_ptr else part,
        B, n_chunks, entropy_coef, kl_coef, agg_norm,
        AGG=AGG_CODES[agg], PARAMS_FROM_PTR=from_ptr, BLOCK_B=block_b(B), NP=n_part, num_warps=4,
    )  # fmt: skip
    if rc:
        torch.library.wrap_triton(_rollout_corr_finish_kernel)[(1,)](
            part, stats, params if from_ptr else part, B, n_chunks, rc_is_upper, is_lo,
            NP=n_part, OFF=N_POLICY_PARTIALS, IS=is_code, HAS_RS=rs_lvl >= 0, PARAMS_FROM_PTR=from_ptr,
            BLOCK_B=block_b_rc(B), num_warps=4,
        )  # fmt: skip
    return loss, stats, dtok, row_scale, keep


@torch.library.triton_op("rlhf_fast::ppo_loss_bwd_triton", mutates_args=())
@launch_on_tensor_device
def ppo_loss_bwd_triton(
    grad_loss: torch.Tensor,
    dtok: torch.Tensor,
    row_scale: torch.Tensor,
    mask: torch.Tensor,
    entropy_coef: float,
    has_entropy: bool,
    logp_dtype: torch.dtype,
    entropy_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T = dtok.shape
    acc = dtok.dtype
    glp = torch.empty((B, T), dtype=logp_dtype, device=dtok.device)
    gent = torch.empty((B, T) if has_entropy else (0,), dtype=entropy_dtype, device=dtok.device)
    if B * T == 0:
        return glp, gent
    # -entropy_coef * row_scale in the accumulation dtype (exact for fp64)
    ent_scale = row_scale * (-entropy_coef) if has_entropy else row_scale
    bt = block_t(T)
    torch.library.wrap_triton(_ppo_loss_bwd_kernel)[(B, triton.cdiv(T, bt))](
        grad_loss.to(acc).reshape(1), dtok.contiguous(), row_scale.contiguous(), ent_scale, _u8(mask),
        glp, gent if has_entropy else glp,
        T, HAS_ENT=has_entropy, ACC=_tl(acc), BLOCK_T=bt, num_warps=8 if bt >= 2048 else 4,
    )  # fmt: skip
    return glp, gent


@torch.library.triton_op("rlhf_fast::ppo_value_loss_fwd_triton", mutates_args=())
@launch_on_tensor_device
def ppo_value_loss_fwd_triton(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
    agg: str,
    agg_norm: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T = values.shape
    acc = _acc_dtype(values.dtype)
    dev = values.device
    dtok = torch.empty((B, T), dtype=acc, device=dev)
    row_scale = torch.empty((B,), dtype=acc, device=dev)
    loss = torch.zeros((), dtype=acc, device=dev)
    stats = torch.zeros((len(VALUE_STATS),), dtype=acc, device=dev)
    if B == 0:
        return loss, stats, dtok, row_scale
    bt = block_t(T)
    n_chunks = max(1, triton.cdiv(T, bt))
    part = torch.empty((B, n_chunks, N_VALUE_PARTIALS), dtype=acc, device=dev)
    c = 0.0 if clip is None else clip
    params, from_ptr = kernel_scalars(acc, dev, c, agg_norm, agg_norm, agg_norm, agg_norm)
    v = values.contiguous()
    torch.library.wrap_triton(_ppo_value_loss_fwd_kernel)[(B, n_chunks)](
        v, old_values.contiguous(), returns.contiguous(), _u8(mask), dtok, part, params if from_ptr else v,
        T, c, CLIP=clip is not None, ACC=_tl(acc), PARAMS_FROM_PTR=from_ptr, BLOCK_T=bt,
        num_warps=8 if bt >= 2048 else 4,
    )  # fmt: skip
    torch.library.wrap_triton(_ppo_value_loss_finish_kernel)[(1,)](
        part, row_scale, loss, stats, params if from_ptr else part,
        B, n_chunks, agg_norm,
        AGG=AGG_CODES[agg], PARAMS_FROM_PTR=from_ptr, BLOCK_B=block_b(B), num_warps=4,
    )  # fmt: skip
    return loss, stats, dtok, row_scale


@torch.library.triton_op("rlhf_fast::kl_penalty_fwd_triton", mutates_args=())
@launch_on_tensor_device
def kl_penalty_fwd_triton(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    acc = _acc_dtype(logprobs.dtype)
    out = torch.empty(logprobs.shape, dtype=acc, device=logprobs.device)
    n = out.numel()
    if n:
        torch.library.wrap_triton(_kl_penalty_fwd_kernel)[(triton.cdiv(n, 2048),)](
            logprobs.contiguous(), ref_logprobs.contiguous(), out, n, KIND=KL_CODES[kind], ACC=_tl(acc), BLOCK=2048
        )
    return out


@torch.library.triton_op("rlhf_fast::kl_penalty_bwd_triton", mutates_args=())
@launch_on_tensor_device
def kl_penalty_bwd_triton(
    grad: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str
) -> torch.Tensor:
    out = torch.empty_like(logprobs, memory_format=torch.contiguous_format)
    n = out.numel()
    if n:
        torch.library.wrap_triton(_kl_penalty_bwd_kernel)[(triton.cdiv(n, 2048),)](
            grad.contiguous(), logprobs.contiguous(), ref_logprobs.contiguous(), out, n,
            KIND=KL_CODES[kind], ACC=_tl(_acc_dtype(logprobs.dtype)), BLOCK=2048,
        )  # fmt: skip
    return out


ppo_loss_fwd_triton.register_autograd(_make_loss_backward(ppo_loss_bwd_triton), setup_context=_loss_setup_context)
ppo_value_loss_fwd_triton.register_autograd(
    _make_value_backward(ppo_loss_bwd_triton), setup_context=_value_setup_context
)
kl_penalty_fwd_triton.register_autograd(_make_kl_backward(kl_penalty_bwd_triton), setup_context=_kl_setup_context)
