"""Triton rollout correction for the fused PPO loss (triton/ppo_policy_loss.py);
definitions in rlhf_fast/reference/_rollout_correction.py, C++ twin in
csrc/include/rlhf_fast/rollout_correction.h.

Token-level corrections need nothing but the token: the forward kernel calls
_rc_token_terms on its block. Sequence / geometric weights and the seq_*
rejection options need row totals first, and a row is split over
cdiv(T, BLOCK_T) programs (or a packed segment over NC, _ppo_common.row_span),
so _rollout_row_kernel writes per-program row
partials (7 floats) that every chunk of the row then folds in the same
order: the same row weight in every chunk, no atomics. That re-reads old and
rollout (8 B / token in fp32) for those modes only.
rc_epilogue folds the 12 per-chunk metric partials into the 18
rollout_corr/* stats, in the forward's last program after the loss epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import NEG_INF, POS_INF, clamp_nan, max_nan, min_nan, tl_acc
from ._ppo_common import (
    FOLD_MAX,
    FOLD_MIN,
    FOLD_SUM,
    fold_chunks,
    load_params,
    part_put,
    row_chunks,
    row_span,
    token_block,
)

IS_CODES = {"none": 0, "token": 1, "sequence": 2, "geometric": 3}
RS_LEVELS = {"token": 0, "seq_sum": 1, "seq_mean": 2, "seq_max": 3}
N_ROW_PARTIALS = 7  # n, sum lr, sum k1, sum k2, sum k3, max k2, max k3
N_RC_PARTIALS = 12  # n0, old, rollout, lr, k3, rho^2, w, max w, min w, n_high, n_low, n_rejected
N_RC_STATS = 18  # the rollout_corr/* stats (reference.RC_STATS), written after the 8 loss stats


def rs_codes(rs: str) -> tuple[int, int]:
    """("seq_mean_k1" -> (2, 1)); "none" -> (-1, 0)."""
    if rs == "none":
        return -1, 0
    level, k = rs.rsplit("_", 1)
    return RS_LEVELS[level], int(k[1])


def needs_row_pass(is_code: int, rs_level: int) -> bool:
    return is_code >= 2 or rs_level >= 1


@triton.jit
def _rollout_row_kernel(
    old_ptr, roll_ptr, mask_ptr, rowp_ptr, cu_ptr, T,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, PACKED: tl.constexpr = False,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    start, length = row_span(cu_ptr, b, T, PACKED)
    out = rowp_ptr + (b * n_chunks + c) * 7
    for j in range(c, row_chunks(length, c, n_chunks, BLOCK_T), n_chunks):
        first = j == c
        p, inb, valid = token_block(mask_ptr, start, length, j, BLOCK_T)
        o = tl.load(old_ptr + p, mask=inb, other=0.0).to(ACC)
        r = tl.load(roll_ptr + p, mask=inb, other=0.0).to(ACC)
        d = tl.where(valid, o - r, 0.0)
        cl = clamp_nan(d, -20.0, 20.0)
        q2 = 0.5 * cl * cl
        q3 = tl.exp(cl) - 1.0 - cl
        part_put(out + 0, tl.sum(valid.to(ACC), axis=0), first)
        part_put(out + 1, tl.sum(d, axis=0), first)
        part_put(out + 2, tl.sum(-cl, axis=0), first)
        part_put(out + 3, tl.sum(q2, axis=0), first)
        part_put(out + 4, tl.sum(q3, axis=0), first)
        part_put(out + 5, tl.max(tl.where(valid, q2, 0.0), axis=0), first, 1)
        part_put(out + 6, tl.max(tl.where(valid, q3, 0.0), axis=0), first, 1)


@triton.jit
def _rc_token_terms(
    old, roll, valid, b, rowp_ptr, part_out, first, n_chunks, is_hi, is_lo, rs_lo, rs_hi,
    IS: tl.constexpr, ICEPOP: tl.constexpr, RS_LVL: tl.constexpr, RS_K: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """(w, keep) for one block of tokens; puts the block's 12 metric partials
    at part_out (stored by the program's first block, added by later ones)."""
    o = tl.where(valid, old, 0.0)
    r = tl.where(valid, roll, 0.0)
    d = o - r
    cl = clamp_nan(d, -20.0, 20.0)
    e = tl.exp(cl)
    k3 = e - 1.0 - cl
    row_raw = tl.sum(tl.zeros([1], tl.float64), axis=0) + 1.0
    row_pass = row_raw > 0.0
    if IS >= 2 or RS_LVL >= 1:
        # the row's totals, chunk partials folded in order (same bits in every chunk)
        rn = row_raw * 0.0
        rlr = rn
        rk = rn
        rmx = rn
        for c in range(0, n_chunks):
            q = rowp_ptr + (b * n_chunks + c) * 7
            rn += tl.load(q + 0).to(tl.float64)
            rlr += tl.load(q + 1).to(tl.float64)
            if RS_LVL == 1 or RS_LVL == 2:
                rk += tl.load(q + 1 + RS_K).to(tl.float64)
            if RS_LVL == 3:
                rmx = tl.maximum(rmx, tl.load(q + 3 + RS_K).to(tl.float64))
        if IS == 2:
            row_raw = tl.exp(tl.minimum(tl.maximum(rlr, -20.0), 20.0))
        if IS == 3:
            row_raw = tl.exp(tl.minimum(tl.maximum(tl.where(rn > 0, rlr / tl.maximum(rn, 1.0), 0.0), -20.0), 20.0))
        if RS_LVL >= 1:
            stat = rk
            if RS_LVL == 2:
                stat = tl.where(rn > 0, rk / tl.maximum(rn, 1.0), 0.0)
            if RS_LVL == 3:
                stat = rmx
            row_pass = stat <= rs_hi
            if RS_K == 1:
                row_pass = row_pass & (stat >= rs_lo)
    if IS == 1:
        raw = e
    else:
        raw = tl.zeros_like(e) + row_raw.to(ACC)
    if ICEPOP:
        w = tl.where((raw >= is_lo) & (raw <= is_hi), raw, 0.0)
    else:
        w = tl.where(raw > is_hi, is_hi, raw)
    if RS_LVL == 0:
        if RS_K == 1:
            st = -cl
            ok = (st <= rs_hi) & (st >= rs_lo)
        elif RS_K == 2:
            ok = 0.5 * cl * cl <= rs_hi
        else:
            ok = k3 <= rs_hi
        keep = valid & ok
    else:
        keep = valid & (tl.zeros_like(o) + row_pass.to(ACC) > 0)
    fv = valid.to(ACC)
    part_put(part_out + 0, tl.sum(fv, axis=0), first)
    part_put(part_out + 1, tl.sum(o, axis=0), first)
    part_put(part_out + 2, tl.sum(r, axis=0), first)
    part_put(part_out + 3, tl.sum(d, axis=0), first)
    part_put(part_out + 4, tl.sum(fv * k3, axis=0), first)
    part_put(part_out + 5, tl.sum(fv * e * e, axis=0), first)
    part_put(part_out + 6, tl.sum(fv * w, axis=0), first)
    part_put(part_out + 7, tl.max(tl.where(valid, w, NEG_INF), axis=0), first, 1)
    part_put(part_out + 8, tl.min(tl.where(valid, w, POS_INF), axis=0), first, 2)
    part_put(part_out + 9, tl.sum((valid & (raw > is_hi)).to(ACC), axis=0), first)
    part_put(part_out + 10, tl.sum((valid & (raw < is_lo)).to(ACC), axis=0), first)
    part_put(part_out + 11, tl.sum((valid & (keep == 0)).to(ACC), axis=0), first)
    return w, keep


@triton.jit
def rc_epilogue(
    part_ptr, stats_ptr, params_ptr, B, n_chunks, is_hi_arg, is_lo_arg,
    NP: tl.constexpr, OFF: tl.constexpr, IS: tl.constexpr, HAS_RS: tl.constexpr,
    PARAMS_FROM_PTR: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """The rollout_corr/* stats (RC_STATS order) at stats[8:], run by the
    forward's last program (ppo_policy_loss.py)."""
    is_hi, is_lo, _u1, _u2 = load_params(
        params_ptr + 8, is_hi_arg, is_lo_arg, is_hi_arg, is_lo_arg, tl.float64, PARAMS_FROM_PTR
    )
    rows = tl.arange(0, BLOCK_B)
    z = tl.zeros([BLOCK_B], tl.float64)
    N = z
    S = z
    sw = z
    nh = z
    nl = z
    nrej = z
    slr = z
    sk3 = z
    srho2 = z
    mxw = z + NEG_INF
    mnw = z + POS_INF
    seq_rej = z
    chi2s = z
    tppl = z
    rppl = z
    tlp = z
    rlp = z
    dd = z
    ad = z
    pr = z
    seq_hi = z
    seq_lo = z
    seq_mx = z + NEG_INF
    seq_mn = z + POS_INF
    for b0 in range(0, B, BLOCK_B):
        bb = (b0 + rows).to(tl.int64)
        live = bb < B
        # the columns _rc_token_terms stored (from OFF on)
        n0 = fold_chunks(part_ptr, bb, live, n_chunks, NP, OFF + 0, FOLD_SUM, BLOCK_B)
        so = fold_chunks(part_ptr, bb, live, n_chunks, NP, OFF + 1, FOLD_SUM, BLOCK_B)
        sr = fold_chunks(part_ptr, bb, live, n_chunks, NP, OFF + 2, FOLD_SUM, BLOCK_B)
        lr = fold_chunks(part_ptr, bb, live, n_chunks, NP, OFF + 3, FOLD_SUM, BLOCK_B)
        sk3 += fold_chunks(part_ptr, bb, live, n_chunks, NP, OFF + 4, FOLD_SUM, BLOCK_B)
        srho2 += fold_chunks(part_ptr, bb, live, n_chunks, NP, OFF + 5, FOLD_SUM, BLOCK_B)
        sw += fold_chunks(part_ptr, bb, live, n_chunks, NP, OFF + 6, FOLD_SUM, BLOCK_B)
        mxw = max_nan(mxw, fold_chunks(part_ptr, bb, live, n_chunks, NP, OFF + 7, FOLD_MAX, BLOCK_B))
        mnw = min_nan(mnw, fold_chunks(part_ptr, bb, live, n_chunks, NP, OFF + 8, FOLD_MIN, BLOCK_B))
        nh += fold_chunks(part_ptr, bb, live, n_chunks, NP, OFF + 9, FOLD_SUM, BLOCK_B)
        nl += fold_chunks(part_ptr, bb, live, n_chunks, NP, OFF + 10, FOLD_SUM, BLOCK_B)
        rej = fold_chunks(part_ptr, bb, live, n_chunks, NP, OFF + 11, FOLD_SUM, BLOCK_B)
        N += n0
        nrej += rej
        slr += lr
        ne = live & (n0 > 0)
        inv = 1.0 / tl.maximum(n0, 1.0)
        S += ne.to(tl.float64)
        seq_rej += (ne & (rej > 0)).to(tl.float64)
        chi2s += tl.where(ne, tl.exp(2.0 * tl.minimum(tl.maximum(lr, -20.0), 20.0)), 0.0)
        mo = so * inv
        mr = sr * inv
        tppl += tl.where(ne, tl.exp(-mo), 0.0)
        rppl += tl.where(ne, tl.exp(-mr), 0.0)
        tlp += tl.where(ne, -mo, 0.0)
        rlp += tl.where(ne, -mr, 0.0)
        dd += tl.where(ne, mr - mo, 0.0)
        ad += tl.where(ne, tl.abs(mr - mo), 0.0)
        pr += tl.where(ne, tl.exp(mr - mo), 0.0)
        lrow = lr
        if IS == 3:
            lrow = lr * inv
        raw = tl.exp(tl.minimum(tl.maximum(lrow, -20.0), 20.0))
        seq_hi += (ne & (raw > is_hi)).to(tl.float64)
        seq_lo += (ne & (raw < is_lo)).to(tl.float64)
        seq_mx = tl.maximum(seq_mx, tl.where(ne, raw, NEG_INF))
        seq_mn = tl.minimum(seq_mn, tl.where(ne, raw, POS_INF))
    Nt = tl.sum(N, axis=0)
    St = tl.sum(S, axis=0)
    iN = tl.where(Nt > 0, 1.0 / tl.maximum(Nt, 1.0), 0.0)
    iS = tl.where(St > 0, 1.0 / tl.maximum(St, 1.0), 0.0)
    has_is = (Nt > 0) & (IS > 0)
    zero = Nt * 0.0
    if IS >= 2:
        w_max = tl.max(seq_mx, axis=0)
        w_min = tl.min(seq_mn, axis=0)
        f_hi = tl.sum(seq_hi, axis=0) * iS
        f_lo = tl.sum(seq_lo, axis=0) * iS
    else:
        w_max = tl.max(mxw, axis=0)
        w_min = tl.min(mnw, axis=0)
        f_hi = tl.sum(nh, axis=0) * iN
        f_lo = tl.sum(nl, axis=0) * iN
    ty = stats_ptr.dtype.element_ty
    out = stats_ptr + 8
    tl.store(out + 0, tl.where(has_is, tl.sum(sw, axis=0) * iN, zero).to(ty))
    tl.store(out + 1, tl.where(has_is, w_max, zero).to(ty))
    tl.store(out + 2, tl.where(has_is, w_min, zero).to(ty))
    tl.store(out + 3, tl.where(has_is, f_hi, zero).to(ty))
    tl.store(out + 4, tl.where(has_is, f_lo, zero).to(ty))
    tl.store(out + 5, (tl.sum(nrej, axis=0) * iN if HAS_RS else zero).to(ty))
    tl.store(out + 6, (tl.sum(seq_rej, axis=0) * iS if HAS_RS else zero).to(ty))
    tl.store(out + 7, (-tl.sum(slr, axis=0) * iN).to(ty))
    tl.store(out + 8, (tl.sum(sk3, axis=0) * iN).to(ty))
    tl.store(out + 9, tl.where(Nt > 0, tl.sum(srho2, axis=0) * iN - 1.0, zero).to(ty))
    tl.store(out + 10, tl.where(St > 0, tl.sum(chi2s, axis=0) * iS - 1.0, zero).to(ty))
    tl.store(out + 11, (tl.sum(tppl, axis=0) * iS).to(ty))
    tl.store(out + 12, (tl.sum(rppl, axis=0) * iS).to(ty))
    tl.store(out + 13, (tl.sum(tlp, axis=0) * iS).to(ty))
    tl.store(out + 14, (tl.sum(rlp, axis=0) * iS).to(ty))
    tl.store(out + 15, (tl.sum(dd, axis=0) * iS).to(ty))
    tl.store(out + 16, (tl.sum(ad, axis=0) * iS).to(ty))
    tl.store(out + 17, (tl.sum(pr, axis=0) * iS).to(ty))


def block_b_rc(B: int, warps: int) -> int:
    # 24 fp64 row accumulators, at most one row per thread of the forward's
    # program (128 rows x 24 x 8 B = 24 KB of registers at 4 warps)
    return max(16, min(128, 32 * warps, triton.next_power_of_2(max(B, 1))))


# ---------------------------------------------------------------- launch steps of rlhf_fast::ppo_loss_fwd_triton


def launch_row_pass(
    old, roll, m8, part, cu, T: int, is_code: int, rs_lvl: int, block_t: int, warps: int, packed: bool
) -> torch.Tensor:
    """The row partials the sequence / geometric modes need, or `part`
    itself (a placeholder the kernel never reads) for token-level ones.
    The forward's grid and rows: T is the row length (padded) or the total
    (packed, cu the cu_seqlens)."""
    if not needs_row_pass(is_code, rs_lvl):
        return part
    B, n_chunks, _ = part.shape
    rowp = torch.empty((B, n_chunks, N_ROW_PARTIALS), dtype=part.dtype, device=part.device)
    torch.library.wrap_triton(_rollout_row_kernel)[(B, n_chunks)](
        old, roll, m8, rowp, cu, T, ACC=tl_acc(part.dtype), BLOCK_T=block_t, PACKED=packed, num_warps=warps
    )
    return rowp
