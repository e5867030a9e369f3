"""Triton PPO value loss (the critic's clipped squared error): one pass over
the (B, T) tokens forward, then a one-program fp64 epilogue (C++ twin:
csrc/cpu/ppo_value_loss.cpp). Backward is the policy loss's scale-and-cast,
rlhf_fast::ppo_loss_bwd_triton (ppo_policy_loss.py): d loss / d values =
g * row_scale[b] * dtok.

Forward grid (B, cdiv(T, BLOCK_T)), or (S, NC) over a packed stream's
segments (_ppo_common.row_span): each program writes dtok and 7 partials
(loss, n, clip, and the chunk's (mean, M2) of R and of R - v, for
explained_variance); the epilogue merges those with Chan's formula.

The launcher is the torch.library triton_op rlhf_fast::ppo_value_loss_fwd_triton,
with the schema of the C++ op; its fake and autograd are registered in
rlhf_fast/ops/_ppo_loss.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend
from .._dtypes import acc_dtype
from ._common import clamp_nan, kernel_scalars, launch_on_tensor_device, load_f64, max_nan, num_warps, tl_acc, u8_mask
from ._ppo_common import (
    AGG_CODES,
    agg_norm_of,
    agg_row_scale,
    block_b,
    load_params,
    loss_outputs,
    part_put,
    row_chunks,
    row_counts,
    row_layout,
    row_span,
    token_block,
)

N_VALUE_PARTIALS = 7  # loss, n, clip, mean_r, m2_r, mean_e, m2_e
N_VALUE_STATS = 2  # clipfrac, explained_variance


@triton.jit
def _ppo_value_loss_fwd_kernel(
    v_ptr, vo_ptr, ret_ptr, mask_ptr, dtok_ptr, part_ptr, params_ptr, cu_ptr,
    T, clip_arg,
    CLIP: tl.constexpr, ACC: tl.constexpr, PARAMS_FROM_PTR: tl.constexpr, BLOCK_T: tl.constexpr,
    PACKED: tl.constexpr = False,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    start, length = row_span(cu_ptr, b, T, PACKED)
    cr, _u1, _u2, _u3 = load_params(params_ptr, clip_arg, clip_arg, clip_arg, clip_arg, ACC, PARAMS_FROM_PTR)
    out = part_ptr + (b * n_chunks + c) * 7
    for j in range(c, row_chunks(length, c, n_chunks, BLOCK_T), n_chunks):
        first = j == c
        p, inb, valid = token_block(mask_ptr, start, length, j, BLOCK_T)
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
        # from registers, merged across chunks with Chan's formula (a
        # program's later chunks into its slot here, the slots in the epilogue).
        n = tl.sum(valid.to(ACC), axis=0)
        inv = tl.where(n > 0, 1.0 / tl.maximum(n, 1.0), 0.0)
        err = ret - v
        mr = tl.sum(tl.where(valid, ret, 0.0), axis=0) * inv
        me = tl.sum(tl.where(valid, err, 0.0), axis=0) * inv
        m2r = tl.sum(tl.where(valid, (ret - mr) * (ret - mr), 0.0), axis=0)
        m2e = tl.sum(tl.where(valid, (err - me) * (err - me), 0.0), axis=0)
        part_put(out + 0, tl.sum(tl.where(valid, 0.5 * vf, 0.0), axis=0), first)
        part_put(out + 2, tl.sum(clipped.to(ACC), axis=0), first)
        if first:
            tl.store(out + 1, n)
            tl.store(out + 3, mr)
            tl.store(out + 4, m2r)
            tl.store(out + 5, me)
            tl.store(out + 6, m2e)
        else:
            n0 = tl.load(out + 1)
            mr0 = tl.load(out + 3)
            me0 = tl.load(out + 5)
            nn = n0 + n
            w = tl.where(nn > 0, n / tl.maximum(nn, 1.0), 0.0)
            dr = mr - mr0
            de = me - me0
            tl.store(out + 1, nn)
            tl.store(out + 3, mr0 + dr * w)
            tl.store(out + 4, tl.load(out + 4) + m2r + dr * dr * n0 * w)
            tl.store(out + 5, me0 + de * w)
            tl.store(out + 6, tl.load(out + 6) + m2e + de * de * n0 * w)


@triton.jit
def _ppo_value_loss_finish_kernel(
    part_ptr, row_scale_ptr, loss_ptr, stats_ptr, params_ptr, cu_ptr,
    B, T, n_chunks, agg_norm_arg,
    AGG: tl.constexpr, PARAMS_FROM_PTR: tl.constexpr, BLOCK_B: tl.constexpr, PACKED: tl.constexpr = False,
):  # fmt: skip
    agg_norm, _u1, _u2, _u3 = load_params(
        params_ptr + 1, agg_norm_arg, agg_norm_arg, agg_norm_arg, agg_norm_arg, tl.float64, PARAMS_FROM_PTR
    )
    if AGG == 3:
        agg_norm = agg_norm_of(agg_norm, cu_ptr, B, T, PACKED, BLOCK_B)
    rows = tl.arange(0, BLOCK_B)
    N_all, S_all = row_counts(part_ptr, B, n_chunks, 7, 1, BLOCK_B)
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
        s = agg_row_scale(AGG, n_b, N_all, S_all, norm)
        tl.store(row_scale_ptr + bb, s.to(row_scale_ptr.dtype.element_ty), mask=live)
        loss_acc += tl.where(live, s * lsum, 0.0)
    inv_n = tl.where(N_all > 0, 1.0 / tl.maximum(N_all, 1.0), 0.0)
    ev = tl.where(N_all > 0, 1.0 - (m2e_tot * inv_n) / (m2r_tot * inv_n + 1e-8), 0.0)
    ty = stats_ptr.dtype.element_ty
    tl.store(loss_ptr, tl.sum(loss_acc, axis=0).to(ty))
    tl.store(stats_ptr + 0, (tl.sum(clip_acc, axis=0) * inv_n).to(ty))
    tl.store(stats_ptr + 1, ev.to(ty))


# ---------------------------------------------------------------- launcher (triton_op)


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
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    acc, dev = acc_dtype(values.dtype), values.device
    B, T, bt, n_chunks = row_layout(values, cu_seqlens)
    loss, stats, dtok, row_scale = loss_outputs(values, N_VALUE_STATS, B)
    if B == 0 or not _backend.launches_kernels(values):
        return loss.zero_(), stats.zero_(), dtok, row_scale  # the finish kernel writes them otherwise
    part = torch.empty((B, n_chunks, N_VALUE_PARTIALS), dtype=acc, device=dev)
    c = 0.0 if clip is None else clip
    params, from_ptr = kernel_scalars(acc, dev, c, agg_norm, agg_norm, agg_norm, agg_norm)
    v = values.contiguous()
    m8 = u8_mask(mask)
    torch.library.wrap_triton(_ppo_value_loss_fwd_kernel)[(B, n_chunks)](
        v, old_values.contiguous(), returns.contiguous(), m8, dtok, part, params if from_ptr else v,
        cu_seqlens if cu_seqlens is not None else m8,
        T, c, CLIP=clip is not None, ACC=tl_acc(acc), PARAMS_FROM_PTR=from_ptr, BLOCK_T=bt,
        PACKED=cu_seqlens is not None, num_warps=num_warps(bt),
    )  # fmt: skip
    torch.library.wrap_triton(_ppo_value_loss_finish_kernel)[(1,)](
        part, row_scale, loss, stats, params if from_ptr else part, cu_seqlens if cu_seqlens is not None else m8,
        B, T, n_chunks, agg_norm,
        AGG=AGG_CODES[agg], PARAMS_FROM_PTR=from_ptr, BLOCK_B=block_b(B), PACKED=cu_seqlens is not None,
        num_warps=num_warps(block_b(B)),
    )  # fmt: skip
    return loss, stats, dtok, row_scale
