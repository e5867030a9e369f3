"""Triton PPO policy loss (ppo_loss, ppo_policy_loss): one pass over the
(B, T) token tensors forward, one backward (C++ twin:
csrc/cpu/ppo_policy_loss.cpp).

Forward grid (B, cdiv(T, BLOCK_T)), or (S, NC) over a packed stream's
segments (_ppo_common.row_span: rows as (offset, length), the same loop):
every program reads its slice of
logprobs, old_logprobs, advantages, mask (and entropy, ref_logprobs),
writes dtok = d loss_tok / d logprobs (0 where masked) and one row of
partial sums. The program that finishes last (one atomic ticket each,
_ppo_common.last_program) then folds the partials in a fixed order, in fp64,
into the loss, the stats and row_scale (B,): one launch, where a separate
one-program epilogue kernel cost a second launch and its one-SM tail (a few
microseconds, not measured, against ~15 us of token traffic at (256, 8192)
at H100 copy bandwidth). At
(256, 8192) the partials are 256 x 4 x 9 floats, 37 KB against 17-25 B per
token (36-52 MB) of token traffic. The rollout correction's terms and stats
are in rollout_correction.py, the KL term in kl_penalty.py.
Backward: grad_logprobs = g * row_scale[b] * dtok, read 4 B and write 2-4 B
per token; g is read from device memory, so nothing syncs with the host.
The value loss (ppo_value_loss.py) uses the same backward.

The launchers at the end are the torch.library triton_ops
rlhf_fast::ppo_loss_fwd_triton and ppo_loss_bwd_triton, with the schemas of
the C++ ops; their fakes and autograd are registered in rlhf_fast/ops/_ppo_loss.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend
from .._dtypes import acc_dtype
from . import rollout_correction as rc
from ._common import (
    cast_out,
    clamp_nan,
    kernel_scalars,
    launch_on_tensor_device,
    max_nan,
    max_reduce_nan,
    min_nan,
    num_warps,
    scalar_arg,
    tl_acc,
    u8_mask,
)
from ._ppo_common import (
    AGG_CODES,
    FOLD_MAX,
    FOLD_SUM,
    agg_norm_of,
    agg_row_scale,
    block_b,
    fold_chunks,
    grid_counter,
    last_program,
    load_params,
    loss_outputs,
    part_put,
    reset_counter,
    row_chunks,
    row_counts,
    row_layout,
    row_span,
    token_block,
    traced,
)
from .kl_penalty import KL_CODES, _kl_term
from .rollout_correction import _rc_token_terms, rc_epilogue

KL_NONE = 4  # no KL term (csrc/include/rlhf_fast/kl_estimators.h kNone)
N_POLICY_PARTIALS = 9  # pg, entropy, kl, n, clip, clip_lower, approx_kl, ratio_sum, ratio_max
# + N_RC_PARTIALS with a rollout correction (triton/rollout_correction.py)
N_BASE_STATS = 8  # ops/_ppo_loss.py BASE_STATS, then rc.N_RC_STATS rollout_corr/* stats
N_LOSS_STATS = N_BASE_STATS + rc.N_RC_STATS


@triton.jit
def _policy_chunk(
    lp_ptr, old_ptr, adv_ptr, mask_ptr, ent_ptr, ref_ptr, dtok_ptr, roll_ptr, rowp_ptr, keep_ptr, params_ptr,
    out, b, start, length, j, first, n_chunks, lo, hi, dual, kl_coef, is_hi_arg, is_lo_arg, rs_lo_arg, rs_hi_arg,
    HAS_ENT: tl.constexpr, KL: tl.constexpr, DUAL: tl.constexpr, ACC: tl.constexpr, PARAMS_FROM_PTR: tl.constexpr,
    BLOCK_T: tl.constexpr, RC: tl.constexpr, IS: tl.constexpr, ICEPOP: tl.constexpr, RS_LVL: tl.constexpr,
    RS_K: tl.constexpr,
):  # fmt: skip
    """Chunk j of the row at (start, length): dtok, and the chunk's partials
    put into the program's slot `out` (stored when first, else added)."""
    p, inb, valid = token_block(mask_ptr, start, length, j, BLOCK_T)
    lp = tl.load(lp_ptr + p, mask=inb, other=0.0).to(ACC)
    old = tl.load(old_ptr + p, mask=inb, other=0.0).to(ACC)
    a = tl.load(adv_ptr + p, mask=inb, other=0.0).to(ACC)
    if RC:
        is_hi, is_lo, rs_lo, rs_hi = load_params(
            params_ptr + 8, is_hi_arg, is_lo_arg, rs_lo_arg, rs_hi_arg, ACC, PARAMS_FROM_PTR
        )
        roll = tl.load(roll_ptr + p, mask=inb, other=0.0).to(ACC)
        w, keep = _rc_token_terms(
            old, roll, valid, b, rowp_ptr, out + 9, first, n_chunks,
            is_hi, is_lo, rs_lo, rs_hi, IS, ICEPOP, RS_LVL, RS_K, ACC,
        )  # fmt: skip
        if RS_LVL >= 0:
            # rejected tokens leave every term, count and the aggregation
            valid = keep
            tl.store(keep_ptr + p, keep.to(tl.uint8), mask=inb)

    x = lp - old
    xc = clamp_nan(x, -20.0, 20.0)  # NaN stays NaN: a NaN log-prob gives a NaN loss
    r = tl.exp(xc)
    l1 = -a * r  # also d l1 / d x
    l2 = -a * clamp_nan(r, lo, hi)
    g2 = tl.where((r >= lo) & (r <= hi), l1, 0.0)
    c1 = max_nan(l1, l2)
    # torch's gradient of max: all to the winner, half each on a tie
    dl = tl.where(l1 > l2, l1, tl.where(l2 > l1, g2, 0.5 * (l1 + g2)))
    loss = c1
    low = tl.zeros([BLOCK_T], tl.int1)
    if DUAL:
        l3 = -a * dual
        neg = a < 0
        d2 = tl.where(c1 < l3, dl, tl.where(c1 > l3, 0.0, 0.5 * dl))
        loss = tl.where(neg, min_nan(c1, l3), c1)
        dl = tl.where(neg, d2, dl)
        low = valid & neg & (c1 > l3)
    dl = tl.where((x >= -20.0) & (x <= 20.0), dl, 0.0)
    if RC:
        if IS > 0:  # the stop-gradient weight scales the clipped term and its gradient
            dl = dl * w
            loss = loss * w
    zero = tl.sum(tl.zeros([BLOCK_T], ACC), axis=0)
    kl_sum = zero
    if KL != 4:
        ref = tl.load(ref_ptr + p, mask=inb, other=0.0).to(ACC)
        kv, dk = _kl_term(lp, ref, KL)
        dl = dl + kl_coef * dk
        kl_sum = tl.sum(tl.where(valid, kv, 0.0), axis=0)
    tl.store(dtok_ptr + p, tl.where(valid, dl, 0.0), mask=inb)
    ent_sum = zero
    if HAS_ENT:
        ent = tl.load(ent_ptr + p, mask=inb, other=0.0).to(ACC)
        ent_sum = tl.sum(tl.where(valid, ent, 0.0), axis=0)

    part_put(out + 0, tl.sum(tl.where(valid, loss, 0.0), axis=0), first)
    part_put(out + 1, ent_sum, first)
    part_put(out + 2, kl_sum, first)
    part_put(out + 3, tl.sum(valid.to(ACC), axis=0), first)
    part_put(out + 4, tl.sum((valid & (l2 > l1)).to(ACC), axis=0), first)
    part_put(out + 5, tl.sum(low.to(ACC), axis=0), first)
    part_put(out + 6, tl.sum(tl.where(valid, -xc, 0.0), axis=0), first)
    part_put(out + 7, tl.sum(tl.where(valid, r, 0.0), axis=0), first)
    part_put(out + 8, max_reduce_nan(tl.where(valid, r, 0.0), 0), first, 1)


@triton.jit
def _ppo_loss_fwd_kernel(
    lp_ptr, old_ptr, adv_ptr, mask_ptr, ent_ptr, ref_ptr, dtok_ptr, part_ptr, params_ptr,
    roll_ptr, rowp_ptr, keep_ptr, counter_ptr, row_scale_ptr, loss_ptr, stats_ptr, cu_ptr,
    B, T, lo_arg, hi_arg, dual_arg, kl_coef_arg, is_hi_arg, is_lo_arg, rs_lo_arg, rs_hi_arg,
    entropy_coef_arg, agg_norm_arg,
    HAS_ENT: tl.constexpr, KL: tl.constexpr, DUAL: tl.constexpr,
    ACC: tl.constexpr, PARAMS_FROM_PTR: tl.constexpr, BLOCK_T: tl.constexpr, AGG: tl.constexpr,
    BLOCK_B: tl.constexpr, RC: tl.constexpr = False, IS: tl.constexpr = 0, ICEPOP: tl.constexpr = False,
    RS_LVL: tl.constexpr = -1, RS_K: tl.constexpr = 0, NP: tl.constexpr = 9, BLOCK_B_RC: tl.constexpr = 16,
    N_RC: tl.constexpr = 18, RC_OFF: tl.constexpr = 9, PACKED: tl.constexpr = False,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    start, length = row_span(cu_ptr, b, T, PACKED)
    lo, hi, dual, kl_coef = load_params(params_ptr, lo_arg, hi_arg, dual_arg, kl_coef_arg, ACC, PARAMS_FROM_PTR)
    out = part_ptr + (b * n_chunks + c) * NP
    if PACKED:
        for j in range(c, row_chunks(length, c, n_chunks, BLOCK_T), n_chunks):
            _policy_chunk(
                lp_ptr, old_ptr, adv_ptr, mask_ptr, ent_ptr, ref_ptr, dtok_ptr, roll_ptr, rowp_ptr, keep_ptr,
                params_ptr, out, b, start, length, j, j == c, n_chunks, lo, hi, dual, kl_coef,
                is_hi_arg, is_lo_arg, rs_lo_arg, rs_hi_arg,
                HAS_ENT, KL, DUAL, ACC, PARAMS_FROM_PTR, BLOCK_T, RC, IS, ICEPOP, RS_LVL, RS_K,
            )  # fmt: skip
    else:
        # padded: one chunk per program, no loop (a loop here cost the fp64
        # sm_80 specialisation 80 B of spills at 255 registers, where this has none)
        _policy_chunk(
            lp_ptr, old_ptr, adv_ptr, mask_ptr, ent_ptr, ref_ptr, dtok_ptr, roll_ptr, rowp_ptr, keep_ptr,
            params_ptr, out, b, start, length, c, True, n_chunks, lo, hi, dual, kl_coef,
            is_hi_arg, is_lo_arg, rs_lo_arg, rs_hi_arg,
            HAS_ENT, KL, DUAL, ACC, PARAMS_FROM_PTR, BLOCK_T, RC, IS, ICEPOP, RS_LVL, RS_K,
        )  # fmt: skip

    if last_program(counter_ptr):
        _ppo_loss_epilogue(
            part_ptr, row_scale_ptr, loss_ptr, stats_ptr, params_ptr, cu_ptr, B, T, n_chunks, entropy_coef_arg,
            kl_coef_arg, agg_norm_arg, AGG, PARAMS_FROM_PTR, BLOCK_B, NP, not RC, N_RC, PACKED,
        )  # fmt: skip
        if RC:
            rc_epilogue(
                part_ptr, stats_ptr, params_ptr, B, n_chunks, is_hi_arg, is_lo_arg,
                NP, RC_OFF, IS, RS_LVL >= 0, PARAMS_FROM_PTR, BLOCK_B_RC,
            )  # fmt: skip
        reset_counter(counter_ptr)


@triton.jit
def _ppo_loss_epilogue(
    part_ptr, row_scale_ptr, loss_ptr, stats_ptr, params_ptr, cu_ptr,
    B, T, n_chunks, entropy_coef_arg, kl_coef_arg, agg_norm_arg,
    AGG: tl.constexpr, PARAMS_FROM_PTR: tl.constexpr, BLOCK_B: tl.constexpr, NP: tl.constexpr,
    ZERO_RC_STATS: tl.constexpr, N_RC: tl.constexpr, PACKED: tl.constexpr,
):  # fmt: skip
    """The forward's last program: rows in blocks of BLOCK_B, chunks in
    order, fp64, into the loss, the stats and row_scale. ZERO_RC_STATS (no
    rollout correction): also writes 0 to the N_RC rollout_corr/* slots after
    the 8 loss stats, so the launcher's outputs need no zero-fill launch."""
    entropy_coef, kl_coef, agg_norm, _u = load_params(
        params_ptr + 4, entropy_coef_arg, kl_coef_arg, agg_norm_arg, agg_norm_arg, tl.float64, PARAMS_FROM_PTR
    )
    if AGG == 3:
        agg_norm = agg_norm_of(agg_norm, cu_ptr, B, T, PACKED, BLOCK_B)
    rows = tl.arange(0, BLOCK_B)
    N_all, S_all = row_counts(part_ptr, B, n_chunks, NP, 3, BLOCK_B)
    acc = tl.zeros([BLOCK_B], tl.float64)
    sums_pg = acc
    sums_ent = acc
    sums_kl = acc
    sums_clip = acc
    sums_low = acc
    sums_akl = acc
    sums_r = acc
    rmax = acc
    for b0 in range(0, B, BLOCK_B):
        bb = (b0 + rows).to(tl.int64)
        live = bb < B
        # the columns of _ppo_loss_fwd_kernel's partials
        pg = fold_chunks(part_ptr, bb, live, n_chunks, NP, 0, FOLD_SUM, BLOCK_B)
        en = fold_chunks(part_ptr, bb, live, n_chunks, NP, 1, FOLD_SUM, BLOCK_B)
        kl = fold_chunks(part_ptr, bb, live, n_chunks, NP, 2, FOLD_SUM, BLOCK_B)
        n_b = fold_chunks(part_ptr, bb, live, n_chunks, NP, 3, FOLD_SUM, BLOCK_B)
        sums_clip += fold_chunks(part_ptr, bb, live, n_chunks, NP, 4, FOLD_SUM, BLOCK_B)
        sums_low += fold_chunks(part_ptr, bb, live, n_chunks, NP, 5, FOLD_SUM, BLOCK_B)
        sums_akl += fold_chunks(part_ptr, bb, live, n_chunks, NP, 6, FOLD_SUM, BLOCK_B)
        sums_r += fold_chunks(part_ptr, bb, live, n_chunks, NP, 7, FOLD_SUM, BLOCK_B)
        rmax = max_nan(rmax, fold_chunks(part_ptr, bb, live, n_chunks, NP, 8, FOLD_MAX, BLOCK_B))
        s = agg_row_scale(AGG, n_b, N_all, S_all, agg_norm)
        tl.store(row_scale_ptr + bb, s.to(row_scale_ptr.dtype.element_ty), mask=live)
        sums_pg += tl.where(live, s * pg, 0.0)
        sums_ent += tl.where(live, s * en, 0.0)
        sums_kl += tl.where(live, s * kl, 0.0)
    pg_loss = tl.sum(sums_pg, axis=0)
    ent_loss = tl.sum(sums_ent, axis=0)
    kl_loss = tl.sum(sums_kl, axis=0)
    inv_n = tl.where(N_all > 0, 1.0 / tl.maximum(N_all, 1.0), 0.0)
    ty = stats_ptr.dtype.element_ty
    tl.store(loss_ptr, (pg_loss - entropy_coef * ent_loss + kl_coef * kl_loss).to(ty))
    tl.store(stats_ptr + 0, pg_loss.to(ty))
    tl.store(stats_ptr + 1, ent_loss.to(ty))
    tl.store(stats_ptr + 2, kl_loss.to(ty))
    tl.store(stats_ptr + 3, (tl.sum(sums_clip, axis=0) * inv_n).to(ty))
    tl.store(stats_ptr + 4, (tl.sum(sums_low, axis=0) * inv_n).to(ty))
    tl.store(stats_ptr + 5, (tl.sum(sums_akl, axis=0) * inv_n).to(ty))
    tl.store(stats_ptr + 6, (tl.sum(sums_r, axis=0) * inv_n).to(ty))
    tl.store(stats_ptr + 7, max_reduce_nan(rmax, 0).to(ty))
    if ZERO_RC_STATS:
        k = tl.arange(0, 32)
        tl.store(stats_ptr + 8 + k, tl.zeros([32], tl.float64).to(ty), mask=k < N_RC)


@triton.jit
def _ppo_loss_bwd_kernel(
    g_ptr, dtok_ptr, row_scale_ptr, mask_ptr, glp_ptr, gent_ptr, params_ptr, cu_ptr,
    T, neg_entropy_coef_arg,
    HAS_ENT: tl.constexpr, ACC: tl.constexpr, ROUND_BY_HAND: tl.constexpr, PARAMS_FROM_PTR: tl.constexpr,
    BLOCK_T: tl.constexpr, PACKED: tl.constexpr = False,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    start, length = row_span(cu_ptr, b, T, PACKED)
    g = tl.load(g_ptr).to(ACC)
    rs = tl.load(row_scale_ptr + b).to(ACC)
    for j in range(c, tl.cdiv(length, BLOCK_T), n_chunks):
        offs = j * BLOCK_T + tl.arange(0, BLOCK_T)
        inb = offs < length
        p = start + offs
        d = tl.load(dtok_ptr + p, mask=inb, other=0.0).to(ACC)
        tl.store(glp_ptr + p, cast_out((g * rs) * d, glp_ptr.dtype.element_ty, ROUND_BY_HAND), mask=inb)
        if HAS_ENT:
            valid = tl.load(mask_ptr + p, mask=inb, other=0) != 0
            # -entropy_coef in the accumulation dtype (fp64: the exact double
            # from params_ptr; a Python float argument reaches the kernel as fp32)
            neg_coef = tl.zeros([], ACC) + scalar_arg(neg_entropy_coef_arg, params_ptr, 0, PARAMS_FROM_PTR)
            ge = tl.where(valid, g * (rs * neg_coef), 0.0)
            tl.store(gent_ptr + p, cast_out(ge, gent_ptr.dtype.element_ty, ROUND_BY_HAND), mask=inb)


# ---------------------------------------------------------------- launchers (triton_ops)


def fwd_maxnreg(x: torch.Tensor, acc: torch.dtype, has_rc: bool) -> dict:
    """The forward's register cap, as a launch option. Left to itself, ptxas
    holds a kernel to a register target of its own (64, 80 or 128 here) and,
    with the last program's epilogue in the kernel (cold code, run once),
    spilled in the streaming code to stay there: 12-128 B per thread without
    a correction, 48-472 B with one (Triton 3.6 / 3.9, sm_90 / sm_80), where
    the forward alone spilled none. An explicit cap keeps them in registers:
    128 without a correction (122 used, 2 programs per SM, as the forward
    alone had at 107), 168 with one (1 per SM, as at its former 152), 255 for
    fp64 (the tests' dtype: 1388 B spilled at 128). Not passed while
    torch.compile traces the op: torch's kernel wrapper passes num_warps /
    num_stages on as launch options, not maxnreg."""
    if traced(x):
        return {}
    return {"maxnreg": 255 if acc == torch.float64 else (168 if has_rc else 128)}


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
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    acc, dev = acc_dtype(logprobs.dtype), logprobs.device
    has_rc = rollout_logprobs is not None
    # fp64 (the tests' dtype) with the correction's extra state: at 8
    # warps ptxas caps a thread at 128 registers and it spilled 8-24 B
    # (sm_90 / sm_80); 4 warps may use 255 registers, and 512 lanes (4
    # per thread) spill none where 1024 still spilled 32-72 B on sm_80
    B, T, bt, n_chunks = row_layout(logprobs, cu_seqlens, 512 if has_rc and acc == torch.float64 else 0)
    loss, stats, dtok, row_scale = loss_outputs(logprobs, N_LOSS_STATS, B)
    keep = torch.empty(logprobs.shape if rc_rs != "none" else (0,), dtype=torch.bool, device=dev)
    is_code, (rs_lvl, rs_k) = rc.IS_CODES[rc_is], rc.rs_codes(rc_rs)
    if (is_code or rs_lvl >= 0) and not has_rc:
        raise ValueError("rlhf_fast::ppo_loss_fwd_triton: a rollout correction needs rollout_logprobs")
    if B == 0 or not _backend.launches_kernels(logprobs):
        return loss.zero_(), stats.zero_(), dtok, row_scale, keep  # the kernels write them otherwise
    n_part = N_POLICY_PARTIALS + (rc.N_RC_PARTIALS if has_rc else 0)
    part = torch.empty((B, n_chunks, n_part), dtype=acc, device=dev)
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    dual = 3.0 if dual_clip is None else dual_clip
    is_lo = 1.0 / rc_is_upper if rc_is_lower is None else rc_is_lower
    rc_vals = (rc_is_upper, is_lo, rc_rs_lower, rc_rs_upper)
    params, from_ptr = kernel_scalars(
        acc, dev, lo, hi, dual, kl_coef, entropy_coef, kl_coef, agg_norm, agg_norm, *rc_vals
    )
    lp = logprobs.contiguous()
    old = old_logprobs.contiguous()
    ent = entropy.contiguous() if entropy is not None else lp
    ref = ref_logprobs.contiguous() if ref_logprobs is not None else lp
    roll = rollout_logprobs.contiguous() if has_rc else lp
    m8 = u8_mask(mask)
    warps = num_warps(bt)
    packed = cu_seqlens is not None
    cu = cu_seqlens if packed else m8  # a placeholder the kernels never read
    rowp = rc.launch_row_pass(old, roll, m8, part, cu, T, is_code, rs_lvl, bt, warps, packed) if has_rc else part
    torch.library.wrap_triton(_ppo_loss_fwd_kernel)[(B, n_chunks)](
        lp, old, advantages.contiguous(), m8, ent, ref, dtok, part,
        params if from_ptr else lp, roll, rowp, keep.view(torch.uint8) if keep.numel() else m8,
        grid_counter(lp), row_scale, loss, stats, cu,
        B, T, lo, hi, dual, kl_coef, *rc_vals, entropy_coef, agg_norm,
        HAS_ENT=entropy is not None, KL=KL_CODES[kl_kind] if ref_logprobs is not None else KL_NONE,
        DUAL=dual_clip is not None, ACC=tl_acc(acc), PARAMS_FROM_PTR=from_ptr, BLOCK_T=bt,
        AGG=AGG_CODES[agg], BLOCK_B=block_b(B, warps), RC=has_rc, IS=is_code, ICEPOP=rc_is_lower is not None,
        RS_LVL=rs_lvl, RS_K=rs_k, NP=n_part, BLOCK_B_RC=rc.block_b_rc(B, warps),
        N_RC=rc.N_RC_STATS, RC_OFF=N_POLICY_PARTIALS, PACKED=packed, num_warps=warps,
        **fwd_maxnreg(lp, acc, has_rc),
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
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, bt, n_chunks = row_layout(dtok, cu_seqlens)
    acc = dtok.dtype
    glp = torch.empty(dtok.shape, dtype=logp_dtype, device=dtok.device)
    gent = torch.empty(dtok.shape if has_entropy else (0,), dtype=entropy_dtype, device=dtok.device)
    if B == 0 or dtok.numel() == 0 or not _backend.launches_kernels(dtok):
        return glp, gent
    # one launch: -entropy_coef * row_scale is formed in the kernel (fp64 reads the exact coefficient from params)
    params, from_ptr = kernel_scalars(acc, dtok.device, -entropy_coef) if has_entropy else (None, False)
    m8 = u8_mask(mask)
    torch.library.wrap_triton(_ppo_loss_bwd_kernel)[(B, n_chunks)](
        grad_loss.to(acc).reshape(1), dtok.contiguous(), row_scale.contiguous(), m8,
        glp, gent if has_entropy else glp, params if from_ptr else row_scale,
        cu_seqlens if cu_seqlens is not None else m8,
        T, -entropy_coef,
        HAS_ENT=has_entropy, ACC=tl_acc(acc), ROUND_BY_HAND=_backend.triton_interpret(), PARAMS_FROM_PTR=from_ptr,
        BLOCK_T=bt, PACKED=cu_seqlens is not None, num_warps=num_warps(bt),
    )  # fmt: skip
    return glp, gent
