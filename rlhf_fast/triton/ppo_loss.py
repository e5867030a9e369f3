"""Triton PPO losses: one pass over the (B, T) token tensors forward, one
backward.

Forward grid (B, cdiv(T, BLOCK_T)): every program reads its slice of
logprobs, old_logprobs, advantages, mask (and entropy, ref_logprobs),
writes dtok = d loss_tok / d logprobs (0 where masked) and one row of
partial sums; no atomics. A one-program epilogue folds the partials in a
fixed order, in fp64, into the loss, the stats and row_scale (B,). At
(256, 8192) the partials are 256 x 4 x 9 floats, 37 KB against 17-25 B per
token (36-52 MB) of token traffic.
Backward: grad_logprobs = g * row_scale[b] * dtok, read 4 B and write 2-4 B
per token; g is read from device memory, so nothing syncs with the host.

The launchers at the end are the torch.library triton_ops
rlhf_fast::ppo_loss_fwd_triton, ..., with the schemas of the C++ ops; their
fakes and autograd are registered in rlhf_fast/ops/_ppo_loss.py.
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
    load_f64,
    max_nan,
    max_reduce_nan,
    min_nan,
    num_warps,
    tl_acc,
    u8_mask,
)
from .rollout_correction import _rc_token_terms

# KL kinds and aggregation modes as constexpr ints (csrc/cpu/ppo_loss.cpp uses the same numbers).
KL_CODES = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}
KL_NONE = 4
AGG_CODES = {"token-mean": 0, "seq-mean-token-sum": 1, "seq-mean-token-mean": 2, "seq-mean-token-sum-norm": 3}
N_POLICY_PARTIALS = 9  # pg, entropy, kl, n, clip, clip_lower, approx_kl, ratio_sum, ratio_max
# + N_RC_PARTIALS with a rollout correction (triton/rollout_correction.py)
N_VALUE_PARTIALS = 7  # loss, n, clip, mean_r, m2_r, mean_e, m2_e
N_BASE_STATS = 8  # ops/_ppo_loss.py BASE_STATS, then rc.N_RC_STATS rollout_corr/* stats
N_LOSS_STATS = N_BASE_STATS + rc.N_RC_STATS
N_VALUE_STATS = 2  # clipfrac, explained_variance
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
def _load_params(params_ptr, a0, a1, a2, a3, ACC: tl.constexpr, FROM_PTR: tl.constexpr):
    # Python floats reach a kernel as fp32; float64 math (tests, gradcheck)
    # needs the exact fp64 bounds, so it passes them in a tensor instead.
    if FROM_PTR:
        return tl.load(params_ptr), tl.load(params_ptr + 1), tl.load(params_ptr + 2), tl.load(params_ptr + 3)
    else:
        z = tl.zeros([], ACC)  # (a Python float under the interpreter, a fp32 scalar compiled)
        return z + a0, z + a1, z + a2, z + a3


@triton.jit
def _ppo_loss_fwd_kernel(
    lp_ptr, old_ptr, adv_ptr, mask_ptr, ent_ptr, ref_ptr, dtok_ptr, part_ptr, params_ptr,
    roll_ptr, rowp_ptr, keep_ptr,
    T, lo_arg, hi_arg, dual_arg, kl_coef_arg, is_hi_arg, is_lo_arg, rs_lo_arg, rs_hi_arg,
    HAS_ENT: tl.constexpr, KL: tl.constexpr, DUAL: tl.constexpr,
    ACC: tl.constexpr, PARAMS_FROM_PTR: tl.constexpr, BLOCK_T: tl.constexpr,
    RC: tl.constexpr = False, IS: tl.constexpr = 0, ICEPOP: tl.constexpr = False, RS_LVL: tl.constexpr = -1,
    RS_K: tl.constexpr = 0, NP: tl.constexpr = 9,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    lo, hi, dual, kl_coef = _load_params(params_ptr, lo_arg, hi_arg, dual_arg, kl_coef_arg, ACC, PARAMS_FROM_PTR)
    offs = c * BLOCK_T + tl.arange(0, BLOCK_T)
    inb = offs < T
    p = b * T + offs
    valid = (tl.load(mask_ptr + p, mask=inb, other=0) != 0) & inb
    lp = tl.load(lp_ptr + p, mask=inb, other=0.0).to(ACC)
    old = tl.load(old_ptr + p, mask=inb, other=0.0).to(ACC)
    a = tl.load(adv_ptr + p, mask=inb, other=0.0).to(ACC)
    out = part_ptr + (b * n_chunks + c) * NP
    if RC:
        is_hi, is_lo, rs_lo, rs_hi = _load_params(
            params_ptr + 8, is_hi_arg, is_lo_arg, rs_lo_arg, rs_hi_arg, ACC, PARAMS_FROM_PTR
        )
        roll = tl.load(roll_ptr + p, mask=inb, other=0.0).to(ACC)
        w, keep = _rc_token_terms(
            old,
            roll,
            valid,
            b,
            rowp_ptr,
            out + 9,
            n_chunks,
            is_hi,
            is_lo,
            rs_lo,
            rs_hi,
            IS,
            ICEPOP,
            RS_LVL,
            RS_K,
            ACC,
        )
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

    tl.store(out + 0, tl.sum(tl.where(valid, loss, 0.0), axis=0))
    tl.store(out + 1, ent_sum)
    tl.store(out + 2, kl_sum)
    tl.store(out + 3, tl.sum(valid.to(ACC), axis=0))
    tl.store(out + 4, tl.sum((valid & (l2 > l1)).to(ACC), axis=0))
    tl.store(out + 5, tl.sum(low.to(ACC), axis=0))
    tl.store(out + 6, tl.sum(tl.where(valid, -xc, 0.0), axis=0))
    tl.store(out + 7, tl.sum(tl.where(valid, r, 0.0), axis=0))
    tl.store(out + 8, max_reduce_nan(tl.where(valid, r, 0.0), 0))


@triton.jit
def _row_counts(part_ptr, B, n_chunks, NP: tl.constexpr, COL: tl.constexpr, BLOCK_B: tl.constexpr):
    """(valid tokens, non-empty rows) of the batch, from column COL (the count)
    of the (B, n_chunks, NP) partials: the first pass of both epilogues, which
    need the totals before any row's aggregation weight."""
    rows = tl.arange(0, BLOCK_B)
    N = tl.zeros([BLOCK_B], tl.float64)
    S = tl.zeros([BLOCK_B], tl.float64)
    for b0 in range(0, B, BLOCK_B):
        bb = (b0 + rows).to(tl.int64)
        n_b = tl.zeros([BLOCK_B], tl.float64)
        for c in range(0, n_chunks):
            n_b += load_f64(part_ptr + (bb * n_chunks + c) * NP + COL, bb < B)
        N += n_b
        S += (n_b > 0).to(tl.float64)
    return tl.sum(N, axis=0), tl.sum(S, axis=0)


@triton.jit
def _row_scale(agg: tl.constexpr, n_b, N, S, norm):
    if agg == 0:
        s = tl.where(n_b >= 0, tl.where(N > 0, 1.0 / tl.maximum(N, 1.0), 0.0), 0.0)
    elif agg == 1:
        s = tl.where(n_b > 0, 1.0 / tl.maximum(S, 1.0), 0.0)
    elif agg == 2:
        s = tl.where(n_b > 0, 1.0 / (tl.maximum(S, 1.0) * tl.maximum(n_b, 1.0)), 0.0)
    else:
        s = tl.where(n_b >= 0, 1.0 / norm, 0.0)
    return s


@triton.jit
def _ppo_loss_finish_kernel(
    part_ptr, row_scale_ptr, loss_ptr, stats_ptr, params_ptr,
    B, n_chunks, entropy_coef_arg, kl_coef_arg, agg_norm_arg,
    AGG: tl.constexpr, PARAMS_FROM_PTR: tl.constexpr, BLOCK_B: tl.constexpr, NP: tl.constexpr = 9,
):  # fmt: skip
    """One program; rows in blocks of BLOCK_B, chunks in order, fp64."""
    entropy_coef, kl_coef, agg_norm, _u = _load_params(
        params_ptr + 4, entropy_coef_arg, kl_coef_arg, agg_norm_arg, agg_norm_arg, tl.float64, PARAMS_FROM_PTR
    )
    rows = tl.arange(0, BLOCK_B)
    N_all, S_all = _row_counts(part_ptr, B, n_chunks, NP, 3, BLOCK_B)
    norm = agg_norm
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
        pg = tl.zeros([BLOCK_B], tl.float64)
        en = pg
        kl = pg
        n_b = pg
        for c in range(0, n_chunks):
            q = part_ptr + (bb * n_chunks + c) * NP
            pg += load_f64(q + 0, live)
            en += load_f64(q + 1, live)
            kl += load_f64(q + 2, live)
            n_b += load_f64(q + 3, live)
            sums_clip += load_f64(q + 4, live)
            sums_low += load_f64(q + 5, live)
            sums_akl += load_f64(q + 6, live)
            sums_r += load_f64(q + 7, live)
            rmax = max_nan(rmax, load_f64(q + 8, live))
        s = _row_scale(AGG, n_b, N_all, S_all, norm)
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


@triton.jit
def _ppo_loss_bwd_kernel(
    g_ptr, dtok_ptr, row_scale_ptr, ent_scale_ptr, mask_ptr, glp_ptr, gent_ptr,
    T,
    HAS_ENT: tl.constexpr, ACC: tl.constexpr, ROUND_BY_HAND: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    inb = offs < T
    p = b * T + offs
    g = tl.load(g_ptr).to(ACC)
    s = g * tl.load(row_scale_ptr + b).to(ACC)
    d = tl.load(dtok_ptr + p, mask=inb, other=0.0).to(ACC)
    tl.store(glp_ptr + p, cast_out(s * d, glp_ptr.dtype.element_ty, ROUND_BY_HAND), mask=inb)
    if HAS_ENT:
        valid = tl.load(mask_ptr + p, mask=inb, other=0) != 0
        # ent_scale = -entropy_coef * row_scale, made by the launcher in the
        # accumulation dtype (a Python float argument would be fp32)
        ge = tl.where(valid, g * tl.load(ent_scale_ptr + b).to(ACC), 0.0)
        tl.store(gent_ptr + p, cast_out(ge, gent_ptr.dtype.element_ty, ROUND_BY_HAND), mask=inb)


@triton.jit
def _ppo_value_loss_fwd_kernel(
    v_ptr, vo_ptr, ret_ptr, mask_ptr, dtok_ptr, part_ptr, params_ptr,
    T, clip_arg,
    CLIP: tl.constexpr, ACC: tl.constexpr, PARAMS_FROM_PTR: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    cr, _u1, _u2, _u3 = _load_params(params_ptr, clip_arg, clip_arg, clip_arg, clip_arg, ACC, PARAMS_FROM_PTR)
    offs = c * BLOCK_T + tl.arange(0, BLOCK_T)
    inb = offs < T
    p = b * T + offs
    valid = (tl.load(mask_ptr + p, mask=inb, other=0) != 0) & inb
    v = tl.load(v_ptr + p, mask=inb, other=0.0).to(ACC)
    ret = tl.load(ret_ptr + p, mask=inb, other=0.0).to(ACC)
    d = v - ret
    vf = d * d
    dl = 2.0 * d
    clipped = tl.zeros([BLOCK_T], tl.int1)
    if CLIP:
        vo = tl.load(vo_ptr + p, mask=inb, other=0.0).to(ACC)
        lo = vo - cr
        hi = vo + cr
        e2 = clamp_nan(v, lo, hi) - ret
        vf2 = e2 * e2
        g2 = tl.where((v >= lo) & (v <= hi), 2.0 * e2, 0.0)
        dl = tl.where(vf > vf2, dl, tl.where(vf2 > vf, g2, 0.5 * (dl + g2)))
        clipped = valid & (vf2 > vf)
        vf = max_nan(vf, vf2)
    tl.store(dtok_ptr + p, tl.where(valid, 0.5 * dl, 0.0), mask=inb)
    # chunk-local (n, mean, M2) of R and R - v: centred on the chunk mean
    # from registers, merged across chunks with Chan's formula.
    n = tl.sum(valid.to(ACC), axis=0)
    inv = tl.where(n > 0, 1.0 / tl.maximum(n, 1.0), 0.0)
    err = ret - v
    mr = tl.sum(tl.where(valid, ret, 0.0), axis=0) * inv
    me = tl.sum(tl.where(valid, err, 0.0), axis=0) * inv
    out = part_ptr + (b * n_chunks + c) * 7
    tl.store(out + 0, tl.sum(tl.where(valid, 0.5 * vf, 0.0), axis=0))
    tl.store(out + 1, n)
    tl.store(out + 2, tl.sum(clipped.to(ACC), axis=0))
    tl.store(out + 3, mr)
    tl.store(out + 4, tl.sum(tl.where(valid, (ret - mr) * (ret - mr), 0.0), axis=0))
    tl.store(out + 5, me)
    tl.store(out + 6, tl.sum(tl.where(valid, (err - me) * (err - me), 0.0), axis=0))


@triton.jit
def _ppo_value_loss_finish_kernel(
    part_ptr, row_scale_ptr, loss_ptr, stats_ptr, params_ptr,
    B, n_chunks, agg_norm_arg,
    AGG: tl.constexpr, PARAMS_FROM_PTR: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    agg_norm, _u1, _u2, _u3 = _load_params(
        params_ptr + 1, agg_norm_arg, agg_norm_arg, agg_norm_arg, agg_norm_arg, tl.float64, PARAMS_FROM_PTR
    )
    rows = tl.arange(0, BLOCK_B)
    N_all, S_all = _row_counts(part_ptr, B, n_chunks, 7, 1, BLOCK_B)
    norm = agg_norm
    loss_acc = tl.zeros([BLOCK_B], tl.float64)
    clip_acc = loss_acc
    # running (n, mean, M2) for R and R - v; each block of partials is
    # combined exactly (sum n_i, weighted mean, sum M2_i + n_i (mean_i - mean)^2)
    # and then merged into the running total (Chan et al.).
    n_tot = tl.sum(loss_acc, axis=0)
    mr_tot = n_tot
    m2r_tot = n_tot
    me_tot = n_tot
    m2e_tot = n_tot
    for b0 in range(0, B, BLOCK_B):
        bb = (b0 + rows).to(tl.int64)
        live = bb < B
        lsum = tl.zeros([BLOCK_B], tl.float64)
        n_b = lsum
        for c in range(0, n_chunks):
            q = part_ptr + (bb * n_chunks + c) * 7
            lsum += load_f64(q + 0, live)
            n_i = load_f64(q + 1, live)
            n_b += n_i
            clip_acc += load_f64(q + 2, live)
            mr_i = load_f64(q + 3, live)
            m2r_i = load_f64(q + 4, live)
            me_i = load_f64(q + 5, live)
            m2e_i = load_f64(q + 6, live)
            n_blk = tl.sum(n_i, axis=0)
            inv_blk = tl.where(n_blk > 0, 1.0 / tl.maximum(n_blk, 1.0), 0.0)
            mr_blk = tl.sum(n_i * mr_i, axis=0) * inv_blk
            me_blk = tl.sum(n_i * me_i, axis=0) * inv_blk
            m2r_blk = tl.sum(m2r_i + n_i * (mr_i - mr_blk) * (mr_i - mr_blk), axis=0)
            m2e_blk = tl.sum(m2e_i + n_i * (me_i - me_blk) * (me_i - me_blk), axis=0)
            nn = n_tot + n_blk
            w = tl.where(nn > 0, n_blk / tl.maximum(nn, 1.0), 0.0)
            dr = mr_blk - mr_tot
            de = me_blk - me_tot
            m2r_tot = m2r_tot + m2r_blk + dr * dr * n_tot * w
            m2e_tot = m2e_tot + m2e_blk + de * de * n_tot * w
            mr_tot = mr_tot + dr * w
            me_tot = me_tot + de * w
            n_tot = nn
        s = _row_scale(AGG, n_b, N_all, S_all, norm)
        tl.store(row_scale_ptr + bb, s.to(row_scale_ptr.dtype.element_ty), mask=live)
        loss_acc += tl.where(live, s * lsum, 0.0)
    inv_n = tl.where(N_all > 0, 1.0 / tl.maximum(N_all, 1.0), 0.0)
    ev = tl.where(N_all > 0, 1.0 - (m2e_tot * inv_n) / (m2r_tot * inv_n + 1e-8), 0.0)
    ty = stats_ptr.dtype.element_ty
    tl.store(loss_ptr, tl.sum(loss_acc, axis=0).to(ty))
    tl.store(stats_ptr + 0, (tl.sum(clip_acc, axis=0) * inv_n).to(ty))
    tl.store(stats_ptr + 1, ev.to(ty))


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


def block_t(T: int) -> int:
    # 2048 tokens x 5 fp32 inputs = 40 KB per program in flight: enough
    # bytes to stream at full bandwidth, few enough registers at 8 warps.
    return max(16, min(2048, triton.next_power_of_2(max(T, 1))))


def block_b(B: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(max(B, 1))))


# ---------------------------------------------------------------- launchers (triton_ops)


def _loss_outputs(x: torch.Tensor, n_stats: int):
    """(loss, stats, dtok, row_scale) of a (B, T) loss forward, in the
    accumulation dtype: loss and stats zeroed (an empty batch returns them)."""
    (B, T), acc = x.shape, acc_dtype(x.dtype)
    loss = torch.zeros((), dtype=acc, device=x.device)
    stats = torch.zeros((n_stats,), dtype=acc, device=x.device)
    return loss, stats, x.new_empty((B, T), dtype=acc), x.new_empty((B,), dtype=acc)


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
    acc, dev = acc_dtype(logprobs.dtype), logprobs.device
    loss, stats, dtok, row_scale = _loss_outputs(logprobs, N_LOSS_STATS)
    keep = torch.empty((B, T) if rc_rs != "none" else (0,), dtype=torch.bool, device=dev)
    has_rc = rollout_logprobs is not None
    is_code, (rs_lvl, rs_k) = rc.IS_CODES[rc_is], rc.rs_codes(rc_rs)
    if (is_code or rs_lvl >= 0) and not has_rc:
        raise ValueError("rlhf_fast::ppo_loss_fwd_triton: a rollout correction needs rollout_logprobs")
    if B == 0 or not _backend.launches_kernels(logprobs):
        return loss, stats, dtok, row_scale, keep
    bt = block_t(T)
    if has_rc and acc == torch.float64:
        # fp64 (the tests' dtype) with the correction's extra state: at 8
        # warps ptxas caps a thread at 128 registers and it spilled 8-24 B
        # (sm_90 / sm_80); 4 warps may use 255 registers, and 512 lanes (4
        # per thread) spill none where 1024 still spilled 32-72 B on sm_80
        bt = min(bt, 512)
    n_chunks = max(1, triton.cdiv(T, bt))
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
    rowp = rc.launch_row_pass(old, roll, m8, part, is_code, rs_lvl, bt, num_warps(bt)) if has_rc else part
    torch.library.wrap_triton(_ppo_loss_fwd_kernel)[(B, n_chunks)](
        lp, old, advantages.contiguous(), m8, ent, ref, dtok, part,
        params if from_ptr else lp, roll, rowp, keep.view(torch.uint8) if keep.numel() else m8,
        T, lo, hi, dual, kl_coef, *rc_vals,
        HAS_ENT=entropy is not None, KL=KL_CODES[kl_kind] if ref_logprobs is not None else KL_NONE,
        DUAL=dual_clip is not None, ACC=tl_acc(acc), PARAMS_FROM_PTR=from_ptr, BLOCK_T=bt,
        RC=has_rc, IS=is_code, ICEPOP=rc_is_lower is not None, RS_LVL=rs_lvl, RS_K=rs_k, NP=n_part,
        num_warps=num_warps(bt),
    )  # fmt: skip
    torch.library.wrap_triton(_ppo_loss_finish_kernel)[(1,)](
        part, row_scale, loss, stats, params if from_ptr else part,
        B, n_chunks, entropy_coef, kl_coef, agg_norm,
        AGG=AGG_CODES[agg], PARAMS_FROM_PTR=from_ptr, BLOCK_B=block_b(B), NP=n_part, num_warps=num_warps(block_b(B)),
    )  # fmt: skip
    if has_rc:
        rc.launch_finish(part, stats, params, from_ptr, is_code, rs_lvl, rc_is_upper, is_lo, off=N_POLICY_PARTIALS)
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
    if B * T == 0 or not _backend.launches_kernels(dtok):
        return glp, gent
    # -entropy_coef * row_scale in the accumulation dtype (exact for fp64)
    ent_scale = row_scale * (-entropy_coef) if has_entropy else row_scale
    bt = block_t(T)
    torch.library.wrap_triton(_ppo_loss_bwd_kernel)[(B, triton.cdiv(T, bt))](
        grad_loss.to(acc).reshape(1), dtok.contiguous(), row_scale.contiguous(), ent_scale, u8_mask(mask),
        glp, gent if has_entropy else glp,
        T, HAS_ENT=has_entropy, ACC=tl_acc(acc), ROUND_BY_HAND=_backend.triton_interpret(), BLOCK_T=bt,
        num_warps=num_warps(bt),
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
    acc, dev = acc_dtype(values.dtype), values.device
    loss, stats, dtok, row_scale = _loss_outputs(values, N_VALUE_STATS)
    if B == 0 or not _backend.launches_kernels(values):
        return loss, stats, dtok, row_scale
    bt = block_t(T)
    n_chunks = max(1, triton.cdiv(T, bt))
    part = torch.empty((B, n_chunks, N_VALUE_PARTIALS), dtype=acc, device=dev)
    c = 0.0 if clip is None else clip
    params, from_ptr = kernel_scalars(acc, dev, c, agg_norm, agg_norm, agg_norm, agg_norm)
    v = values.contiguous()
    torch.library.wrap_triton(_ppo_value_loss_fwd_kernel)[(B, n_chunks)](
        v, old_values.contiguous(), returns.contiguous(), u8_mask(mask), dtok, part, params if from_ptr else v,
        T, c, CLIP=clip is not None, ACC=tl_acc(acc), PARAMS_FROM_PTR=from_ptr, BLOCK_T=bt,
        num_warps=num_warps(bt),
    )  # fmt: skip
    torch.library.wrap_triton(_ppo_value_loss_finish_kernel)[(1,)](
        part, row_scale, loss, stats, params if from_ptr else part,
        B, n_chunks, agg_norm,
        AGG=AGG_CODES[agg], PARAMS_FROM_PTR=from_ptr, BLOCK_B=block_b(B), num_warps=num_warps(block_b(B)),
    )  # fmt: skip
    return loss, stats, dtok, row_scale


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
