"""Triton whitening and group advantages (the GAE / discounted-return scans
are CUDA: csrc/cuda/advantages.cu).

All statistics accumulate in float64: these kernels are bandwidth-bound (one
read of x per pass, 32 MB at (1024, 8192) fp32), so the fp64 adds cost nothing
visible on A100/H100, and they make x around 1e6 +- 1 whiten correctly
without any pivot tricks.

Whitening is three launches: per-chunk (count, mean, M2) in two passes over a
chunk held in registers; one program merging the chunks with Chan's formula;
an elementwise apply. Group advantages are one program per group, three
sweeps over the group (mean, M2, write); groups given by id are first sorted
(stable) by the launcher so each group is a contiguous run of a permutation.

The launchers at the end are the triton_ops rlhf_fast::whiten_triton and
rlhf_fast::group_advantages_triton; their fakes are in rlhf_fast/ops/_advantages.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend
from .._dtypes import acc_dtype
from ..specs import ESTIMATORS
from ._common import kernel_scalars, launch_on_tensor_device, num_warps, scalar_arg

WHITEN_BLOCK = 2048  # elements per stats program: 512 programs at (512, 2048)
MERGE_BLOCK = 1024
SEGMENT_BLOCK = 256  # elements per sweep step of a per-segment whitening program (segments ~200 tokens)


@triton.jit
def _whiten_stats_kernel(x_ptr, m_ptr, cnt_ptr, mean_ptr, m2_ptr, N, BLOCK: tl.constexpr):
    # mean = p + sum(x - p) / n about a pivot p (the block's largest valid x):
    # tied values give x - p = 0 exactly, so mean = p and M2 = 0 exactly
    # (sum(x) / n is not: 7 x -0.1 in fp64 whitened to -0.93 with eps = 0).
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    valid = (tl.load(m_ptr + offs, mask=inb, other=0) != 0) & inb
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float64)
    cnt = tl.sum(valid.to(tl.float64), axis=0)
    p = tl.max(tl.where(valid, x, -float("inf")), axis=0)
    p = tl.where(cnt > 0, p, 0.0)
    xp = tl.where(valid, x - p, 0.0)
    dmean = tl.sum(xp, axis=0) / tl.maximum(cnt, 1.0)
    d = tl.where(valid, xp - dmean, 0.0)
    tl.store(cnt_ptr + pid, cnt)
    tl.store(mean_ptr + pid, p + dmean)
    tl.store(m2_ptr + pid, tl.sum(d * d, axis=0))


@triton.jit
def _whiten_merge_kernel(
    cnt_ptr, mean_ptr, m2_ptr, stat_ptr, P, eps, scalars_ptr, SCALARS_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr
):
    # Chan: mean = sum n_i mu_i / n; M2 = sum M2_i + n_i (mu_i - mean)^2.
    eps = scalar_arg(eps, scalars_ptr, 0, SCALARS_FROM_PTR)
    # about a pivot p (the largest chunk mean), as the chunks are: chunks of
    # tied values have mean p exactly, and so then has the merged mean
    offs = tl.arange(0, BLOCK)
    p = tl.full([], -float("inf"), tl.float64)
    for start in range(0, P, BLOCK):
        o = start + offs
        ok = o < P
        c = tl.load(cnt_ptr + o, mask=ok, other=0.0)
        p = tl.maximum(p, tl.max(tl.where(c > 0, tl.load(mean_ptr + o, mask=ok, other=0.0), -float("inf")), axis=0))
    n_acc = tl.zeros([BLOCK], tl.float64)
    s_acc = tl.zeros([BLOCK], tl.float64)
    for start in range(0, P, BLOCK):
        o = start + offs
        ok = o < P
        c = tl.load(cnt_ptr + o, mask=ok, other=0.0)
        n_acc += c
        s_acc += tl.where(c > 0, c * (tl.load(mean_ptr + o, mask=ok, other=0.0) - p), 0.0)
    n = tl.sum(n_acc, axis=0)
    p = tl.where(n > 0, p, 0.0)
    mean = p + tl.sum(s_acc, axis=0) / tl.maximum(n, 1.0)
    q_acc = tl.zeros([BLOCK], tl.float64)
    for start in range(0, P, BLOCK):
        o = start + offs
        ok = o < P
        c = tl.load(cnt_ptr + o, mask=ok, other=0.0)
        dm = tl.load(mean_ptr + o, mask=ok, other=0.0) - mean
        q_acc += tl.load(m2_ptr + o, mask=ok, other=0.0) + tl.where(c > 0, c * dm * dm, 0.0)
    m2 = tl.sum(q_acc, axis=0)
    # n <= 1: variance 0 by definition (documented; verl raises instead)
    var = tl.where(n > 1.0, m2 / tl.maximum(n - 1.0, 1.0), 0.0)
    tl.store(stat_ptr + 0, mean)
    tl.store(stat_ptr + 1, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _whiten_apply_kernel(x_ptr, m_ptr, stat_ptr, out_ptr, N, SHIFT_MEAN: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    valid = (tl.load(m_ptr + offs, mask=inb, other=0) != 0) & inb
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float64)
    mean = tl.load(stat_ptr + 0)
    rstd = tl.load(stat_ptr + 1)
    y = (x - mean) * rstd
    if not SHIFT_MEAN:
        y += mean
    tl.store(out_ptr + offs, tl.where(valid, y, 0.0).to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _whiten_segments_kernel(
    x_ptr, m_ptr, cu_ptr, out_ptr, total, eps, scalars_ptr,
    SHIFT_MEAN: tl.constexpr, SCALARS_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # One program per packed segment, three sweeps over it (pivot sum, M2,
    # apply) in float64. Offsets are clamped into [0, total] (no host check on
    # GPU, docs/packing.md); a segment whose offsets are out of order is empty.
    eps = scalar_arg(eps, scalars_ptr, 0, SCALARS_FROM_PTR)
    s = tl.program_id(0).to(tl.int64)
    lo = tl.minimum(tl.maximum(tl.load(cu_ptr + s).to(tl.int64), 0), total)
    hi = tl.minimum(tl.maximum(tl.load(cu_ptr + s + 1).to(tl.int64), lo), total)
    offs = tl.arange(0, BLOCK)
    cnt_acc = tl.zeros([BLOCK], tl.float64)
    p = tl.full([], -float("inf"), tl.float64)  # the segment's largest valid x
    for k in range(lo, hi, BLOCK):
        o = k + offs
        valid = (tl.load(m_ptr + o, mask=o < hi, other=0) != 0) & (o < hi)
        x = tl.load(x_ptr + o, mask=valid, other=0.0).to(tl.float64)
        cnt_acc += valid.to(tl.float64)
        p = tl.maximum(p, tl.max(tl.where(valid, x, -float("inf")), axis=0))
    n = tl.sum(cnt_acc, axis=0)
    p = tl.where(n > 0, p, 0.0)
    s_acc = tl.zeros([BLOCK], tl.float64)
    for k in range(lo, hi, BLOCK):
        o = k + offs
        valid = (tl.load(m_ptr + o, mask=o < hi, other=0) != 0) & (o < hi)
        x = tl.load(x_ptr + o, mask=valid, other=0.0).to(tl.float64)
        s_acc += tl.where(valid, x - p, 0.0)
    # times the reciprocal, not a division: Triton 3.6's fp64 divide here is a
    # call whose saved registers spilled 24 B on sm_80 / sm_90 (<= 1 ulp apart)
    dmean = tl.sum(s_acc, axis=0) * (1.0 / tl.maximum(n, 1.0))
    q_acc = tl.zeros([BLOCK], tl.float64)
    for k in range(lo, hi, BLOCK):
        o = k + offs
        valid = (tl.load(m_ptr + o, mask=o < hi, other=0) != 0) & (o < hi)
        x = tl.load(x_ptr + o, mask=valid, other=0.0).to(tl.float64)
        d = tl.where(valid, (x - p) - dmean, 0.0)
        q_acc += d * d
    var = tl.where(n > 1.0, tl.sum(q_acc, axis=0) / tl.maximum(n - 1.0, 1.0), 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    for k in range(lo, hi, BLOCK):
        o = k + offs
        inb = o < hi
        valid = (tl.load(m_ptr + o, mask=inb, other=0) != 0) & inb
        x = tl.load(x_ptr + o, mask=valid, other=0.0).to(tl.float64)
        y = ((x - p) - dmean) * rstd
        if not SHIFT_MEAN:
            y += p + dmean
        tl.store(out_ptr + o, tl.where(valid, y, 0.0).to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _group_load(s_ptr, perm_ptr, start, o, ok, BY_ID: tl.constexpr):
    if BY_ID:
        idx = tl.load(perm_ptr + start + o, mask=ok, other=0)
    else:
        idx = start + o
    return idx, tl.load(s_ptr + idx, mask=ok, other=0.0).to(tl.float64)


# group_size == 1 would otherwise become a constexpr, and n.to() below needs a tensor
@triton.jit(do_not_specialize=["group_size"])
def _group_advantages_fwd_kernel(
    s_ptr, perm_ptr, len_ptr, out_ptr,
    group_size, eps, scalars_ptr,
    EST: tl.constexpr,  # 0 grpo, 1 dr_grpo, 2 rloo, 3 reinforce_baseline
    BY_ID: tl.constexpr,  # groups from ids: program p owns the run starting at sorted position p (len 0 if none)
    SCALARS_FROM_PTR: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    eps = scalar_arg(eps, scalars_ptr, 0, SCALARS_FROM_PTR)
    pid = tl.program_id(0).to(tl.int64)
    if BY_ID:
        start = pid
        n = tl.load(len_ptr + pid).to(tl.int64)
    else:
        start = pid * group_size
        n = group_size.to(tl.int64)
    offs = tl.arange(0, BLOCK)
    # deviations about a pivot (the group's first score): tied scores give
    # exactly 0, so exactly 0 advantages (the C++ kernel does the same)
    _, x0 = _group_load(s_ptr, perm_ptr, start, offs, (offs == 0) & (offs < n), BY_ID)
    p = tl.sum(x0, axis=0)
    acc = tl.zeros([BLOCK], tl.float64)
    for k in range(0, n, BLOCK):
        o = k + offs
        ok = o < n
        _, x = _group_load(s_ptr, perm_ptr, start, o, ok, BY_ID)
        acc += tl.where(ok, x - p, 0.0)
    nf = n.to(tl.float64)
    mean = tl.sum(acc, axis=0) / tl.maximum(nf, 1.0)  # of x - p
    q = tl.zeros([BLOCK], tl.float64)
    for k in range(0, n, BLOCK):
        o = k + offs
        ok = o < n
        _, x = _group_load(s_ptr, perm_ptr, start, o, ok, BY_ID)
        d = tl.where(ok, (x - p) - mean, 0.0)
        q += d * d
    nm1 = tl.maximum(nf - 1.0, 1.0)
    if EST == 0:
        scale = 1.0 / (tl.sqrt(tl.sum(q, axis=0) / nm1) + eps)
    elif EST == 2:
        scale = nf / nm1
    else:
        scale = 1.0
    scale = tl.where(nf > 1.0, scale, 0.0)  # singleton groups: 0
    for k in range(0, n, BLOCK):
        o = k + offs
        ok = o < n
        idx, x = _group_load(s_ptr, perm_ptr, start, o, ok, BY_ID)
        tl.store(out_ptr + idx, (((x - p) - mean) * scale).to(out_ptr.dtype.element_ty), mask=ok)


def group_block(n: int) -> int:
    return min(max(triton.next_power_of_2(max(n, 1)), 16), 1024)


# ---------------------------------------------------------------- launchers (triton_ops)


def _sorted_runs(ids: torch.Tensor):
    """Group ids -> (perm, run_len): perm sorts the ids stably; run_len[p] is
    the length of the run of equal ids starting at sorted position p, 0 where
    no run starts. Fixed shapes only (no unique), so torch.compile traces it."""
    N = ids.shape[0]
    sorted_ids, perm = torch.sort(ids.to(torch.int64), stable=True)
    pos = torch.arange(N, device=ids.device)
    is_start = torch.ones(N, dtype=torch.bool, device=ids.device)
    is_start[1:] = sorted_ids[1:] != sorted_ids[:-1]
    nxt = torch.full((N,), N, dtype=torch.int64, device=ids.device)
    nxt[:-1] = torch.where(is_start[1:], pos[1:], N)
    next_start = torch.flip(torch.cummin(torch.flip(nxt, (0,)), 0).values, (0,))
    return perm.contiguous(), torch.where(is_start, next_start - pos, 0).contiguous()


@torch.library.triton_op("rlhf_fast::whiten_triton", mutates_args=())
@launch_on_tensor_device
def whiten_triton(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, eps: float, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=acc_dtype(x.dtype), device=x.device)
    N = x.numel()
    if N == 0 or not _backend.launches_kernels(x):
        return out
    if cu_seqlens is not None:  # packed (total,): one mean / var per segment
        S = cu_seqlens.shape[0] - 1
        if S > 0:
            # segments never overlap once clamped, except where offsets are
            # out of order: zeros first so no output slot is left unwritten
            out.zero_()
            scalars, from_ptr = kernel_scalars(x.dtype, x.device, eps)
            torch.library.wrap_triton(_whiten_segments_kernel)[(S,)](
                x.contiguous(), mask.contiguous(), cu_seqlens.contiguous(), out, N, eps, scalars if from_ptr else out,
                SHIFT_MEAN=shift_mean, SCALARS_FROM_PTR=from_ptr, BLOCK=SEGMENT_BLOCK,
                num_warps=num_warps(SEGMENT_BLOCK),
            )  # fmt: skip
        return out
    xf, mf = x.contiguous().reshape(-1), mask.contiguous().reshape(-1)
    P = triton.cdiv(N, WHITEN_BLOCK)
    parts = torch.empty((3, P), dtype=torch.float64, device=x.device)
    stat = torch.empty(2, dtype=torch.float64, device=x.device)
    torch.library.wrap_triton(_whiten_stats_kernel)[(P,)](
        xf, mf, parts[0], parts[1], parts[2], N, BLOCK=WHITEN_BLOCK, num_warps=num_warps(WHITEN_BLOCK)
    )
    scalars, from_ptr = kernel_scalars(x.dtype, x.device, eps)
    torch.library.wrap_triton(_whiten_merge_kernel)[(1,)](
        parts[0], parts[1], parts[2], stat, P, eps, scalars if from_ptr else stat,
        SCALARS_FROM_PTR=from_ptr, BLOCK=MERGE_BLOCK, num_warps=num_warps(MERGE_BLOCK),
    )  # fmt: skip
    torch.library.wrap_triton(_whiten_apply_kernel)[(P,)](
        xf, mf, stat, out.view(-1), N, SHIFT_MEAN=shift_mean, BLOCK=WHITEN_BLOCK, num_warps=num_warps(WHITEN_BLOCK)
    )
    return out


@torch.library.triton_op("rlhf_fast::group_advantages_triton", mutates_args=())
@launch_on_tensor_device
def group_advantages_triton(
    scores: torch.Tensor, group_ids: torch.Tensor | None, group_size: int, estimator: str, eps: float
) -> torch.Tensor:
    out = torch.empty(scores.shape, dtype=acc_dtype(scores.dtype), device=scores.device)
    N = scores.shape[0]
    if N == 0 or not _backend.launches_kernels(scores):
        return out
    s = scores.contiguous()
    if group_ids is not None:
        perm, run_len = _sorted_runs(group_ids)
        grid, block, by_id = N, 128, True
    else:
        perm = run_len = s  # unused (BY_ID=False)
        grid, block, by_id = N // group_size, group_block(group_size), False
    scalars, from_ptr = kernel_scalars(scores.dtype, scores.device, eps)
    torch.library.wrap_triton(_group_advantages_fwd_kernel)[(grid,)](
        s, perm, run_len, out, group_size, eps, scalars if from_ptr else out,
        EST=ESTIMATORS.index(estimator), BY_ID=by_id, SCALARS_FROM_PTR=from_ptr, BLOCK=block,
        num_warps=num_warps(block),
    )  # fmt: skip
    return out
