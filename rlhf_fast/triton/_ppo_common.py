"""What the Triton PPO-loss modules share (ppo_policy_loss.py,
ppo_value_loss.py, rollout_correction.py; the C++ twin is
csrc/cpu/ppo_glue.h): the (B, T) token block a forward program owns, the
fp64 scalars, the per-chunk partials the epilogues fold, the aggregation's
per-row scale, block sizes and the forward's outputs.

Layout of a forward: grid (B, NC); a row is (offset, length) (row_span:
b * T and T for a padded (B, T) batch, cu_seqlens[b] and its segment's
length for a packed stream), and program (b, c) owns the row's chunks
c, c + NC, c + 2 NC, ... of BLOCK_T tokens (one chunk, NC = cdiv(T, BLOCK_T),
when padded), adding their sums into one row of NP partials at part[b, c, :]
(part_put: the program's own slot, no atomics). The padded and the packed
layout run this same loop; packed, NC comes from the mean segment length
(shapes only, no host sync), so a longer segment's programs loop a few
times and a shorter one's last chunks are empty. The program that finishes last
(last_program: one atomic ticket per program) then folds them in chunk
order, in fp64, so every run gives the same bits whichever program that is.
One launch per forward: the epilogue needs no kernel of its own, and the
ticket counter is reset by the program that read it last, so no zero-fill
launch either.
"""

from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl

from .._dtypes import acc_dtype
from ._common import NEG_INF, POS_INF, load_f64, max_nan, min_nan

AGG_CODES = {"token-mean": 0, "seq-mean-token-sum": 1, "seq-mean-token-mean": 2, "seq-mean-token-sum-norm": 3}
# fold_chunks reductions
FOLD_SUM: tl.constexpr = tl.constexpr(0)
FOLD_MAX: tl.constexpr = tl.constexpr(1)
FOLD_MIN: tl.constexpr = tl.constexpr(2)


@triton.jit
def row_span(cu_ptr, b, T, PACKED: tl.constexpr):
    """(offset, length) of row b: b * T and T padded; packed (T = total),
    its segment, offsets clamped into [0, total] and a negative length read
    as 0, so a bad offset never reads out of bounds."""
    if PACKED:
        lo = tl.minimum(tl.maximum(tl.load(cu_ptr + b).to(tl.int64), 0), T)
        hi = tl.minimum(tl.maximum(tl.load(cu_ptr + b + 1).to(tl.int64), lo), T)
        return lo, hi - lo
    else:
        return b * T, T + b * 0


@triton.jit
def row_chunks(length, c, n_cols, BLOCK_T: tl.constexpr):
    """The end of program column c's chunk loop `range(c, end, n_cols)`:
    at least one chunk, so every program writes its partials (an empty
    chunk gives the identities)."""
    return tl.maximum(tl.cdiv(length, BLOCK_T), c + 1)


@triton.jit
def token_block(mask_ptr, start, length, j, BLOCK_T: tl.constexpr):
    """Chunk j of the row at (start, length): (flat offsets p, in bounds,
    valid = in bounds and mask != 0)."""
    offs = j * BLOCK_T + tl.arange(0, BLOCK_T)
    inb = offs < length
    p = start + offs
    valid = (tl.load(mask_ptr + p, mask=inb, other=0) != 0) & inb
    return p, inb, valid


@triton.jit
def part_put(ptr, val, first, OP: tl.constexpr = 0):
    """A chunk's partial into the program's slot: stored by its first chunk,
    then summed (OP 0) or NaN-keeping max / min (1 / 2) with the later ones."""
    if first:
        tl.store(ptr, val)
    else:
        prev = tl.load(ptr)
        if OP == 0:
            tl.store(ptr, prev + val)
        elif OP == 1:
            tl.store(ptr, max_nan(prev, val))
        else:
            tl.store(ptr, min_nan(prev, val))


@triton.jit
def agg_norm_of(agg_norm, cu_ptr, B, T, PACKED: tl.constexpr, BLOCK_B: tl.constexpr):
    """seq-mean-token-sum-norm's divisor (fp64): agg_norm, or for a packed
    stream given agg_norm = 0 the longest segment (offsets clamped as in
    row_span), read from cu_seqlens here: no host sync."""
    if PACKED:
        rows = tl.arange(0, BLOCK_B)
        m = tl.zeros([BLOCK_B], tl.int64)
        for b0 in range(0, B, BLOCK_B):
            bb = (b0 + rows).to(tl.int64)
            live = bb < B
            lo = tl.minimum(tl.maximum(tl.load(cu_ptr + bb, mask=live, other=0).to(tl.int64), 0), T)
            hi = tl.minimum(tl.maximum(tl.load(cu_ptr + bb + 1, mask=live, other=0).to(tl.int64), lo), T)
            m = tl.maximum(m, tl.where(live, hi - lo, 0))
        longest = tl.maximum(tl.max(m, axis=0).to(tl.float64), 1.0)
        return tl.where(agg_norm > 0, agg_norm, longest)
    else:
        return agg_norm


def packed_grid(total: int, n_rows: int, block: int = 0):
    """(BLOCK_T, NC) of a packed stream: the block from the mean segment
    length (shapes only: no host sync), NC so a mean segment is one chunk
    per program; block caps BLOCK_T (0: no cap)."""
    mean = triton.cdiv(total, max(n_rows, 1))
    bt = block_t(mean) if block == 0 else min(block_t(mean), block)
    return bt, max(1, triton.cdiv(mean, bt))


@triton.jit
def last_program(counter_ptr):
    """True in the last program of the grid to get here, which then owns the
    epilogue and must reset the counter (reset_counter). The barrier puts
    every thread's partial stores before the ticket; the ticket's acq_rel
    (GPU scope) publishes them and, in the last program, orders its loads of
    the other programs' partials after all of theirs (the threadfence
    reduction pattern of the CUDA samples, with the fence in the atomic)."""
    tl.debug_barrier()
    n = tl.num_programs(0) * tl.num_programs(1)
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    return ticket == n - 1


@triton.jit
def reset_counter(counter_ptr):
    tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def load_params(params_ptr, a0, a1, a2, a3, ACC: tl.constexpr, FROM_PTR: tl.constexpr):
    # Python floats reach a kernel as fp32; float64 math (tests, gradcheck)
    # needs the exact fp64 bounds, so it passes them in a tensor instead.
    if FROM_PTR:
        return tl.load(params_ptr), tl.load(params_ptr + 1), tl.load(params_ptr + 2), tl.load(params_ptr + 3)
    else:
        z = tl.zeros([], ACC)  # (a Python float under the interpreter, a fp32 scalar compiled)
        return z + a0, z + a1, z + a2, z + a3


@triton.jit
def fold_chunks(
    part_ptr, bb, live, n_chunks,
    NP: tl.constexpr, COL: tl.constexpr, OP: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """Column COL of the (B, n_chunks, NP) partials folded over each row's
    chunks in chunk order, in fp64, for the BLOCK_B rows bb: the sum
    (FOLD_SUM; 0 past B), or the NaN-keeping max / min (FOLD_MAX / FOLD_MIN;
    -inf / +inf past B)."""
    if OP == 0:
        t = tl.zeros([BLOCK_B], tl.float64)
    elif OP == 1:
        t = tl.full([BLOCK_B], NEG_INF, tl.float64)
    else:
        t = tl.full([BLOCK_B], POS_INF, tl.float64)
    for c in range(0, n_chunks):
        q = part_ptr + (bb * n_chunks + c) * NP + COL
        if OP == 0:
            t += load_f64(q, live)
        elif OP == 1:
            t = max_nan(t, tl.load(q, mask=live, other=NEG_INF).to(tl.float64))
        else:
            t = min_nan(t, tl.load(q, mask=live, other=POS_INF).to(tl.float64))
    return t


@triton.jit
def row_counts(part_ptr, B, n_chunks, NP: tl.constexpr, COL: tl.constexpr, BLOCK_B: tl.constexpr):
    """(valid tokens, non-empty rows) of the batch, from column COL (the count)
    of the (B, n_chunks, NP) partials: the first pass of both epilogues, which
    need the totals before any row's aggregation weight."""
    rows = tl.arange(0, BLOCK_B)
    N = tl.zeros([BLOCK_B], tl.float64)
    S = tl.zeros([BLOCK_B], tl.float64)
    for b0 in range(0, B, BLOCK_B):
        bb = (b0 + rows).to(tl.int64)
        n_b = fold_chunks(part_ptr, bb, bb < B, n_chunks, NP, COL, FOLD_SUM, BLOCK_B)
        N += n_b
        S += (n_b > 0).to(tl.float64)
    return tl.sum(N, axis=0), tl.sum(S, axis=0)


@triton.jit
def agg_row_scale(agg: tl.constexpr, n_b, N, S, norm):
    """Each row's aggregation weight (AGG_CODES), from its valid tokens n_b
    and the batch's N tokens and S non-empty rows."""
    if agg == 0:
        s = tl.where(n_b >= 0, tl.where(N > 0, 1.0 / tl.maximum(N, 1.0), 0.0), 0.0)
    elif agg == 1:
        s = tl.where(n_b > 0, 1.0 / tl.maximum(S, 1.0), 0.0)
    elif agg == 2:
        s = tl.where(n_b > 0, 1.0 / (tl.maximum(S, 1.0) * tl.maximum(n_b, 1.0)), 0.0)
    else:
        s = tl.where(n_b >= 0, 1.0 / norm, 0.0)
    return s


def block_t(T: int) -> int:
    # 2048 tokens x 5 fp32 inputs = 40 KB per program in flight: enough
    # bytes to stream at full bandwidth, few enough registers at 8 warps.
    return max(16, min(2048, triton.next_power_of_2(max(T, 1))))


def block_b(B: int, warps: int = 32) -> int:
    # the epilogue's rows per step; in a forward's last program at most one
    # fp64 row per thread (its ~11 row accumulators then cost ~22 registers)
    return max(16, min(1024, 32 * warps, triton.next_power_of_2(max(B, 1))))


def traced(t: torch.Tensor) -> bool:
    """A fake or functional tensor: the launcher is being traced
    (torch.compile, opcheck), not run."""
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    return is_fake(t) or isinstance(t, FunctionalTensor)


_COUNTERS: dict = {}
_COUNTERS_LOCK = threading.Lock()


def grid_counter(like: torch.Tensor) -> torch.Tensor:
    """The int32 ticket counter of last_program, on like's device: 0 between
    launches (the last program resets it), so it is made once per device and
    stream (per thread on CPU, the interpreter's) and reused, never zeroed
    per call. Two launches on one stream run in order, so they never share
    it at once. Meta, fake and traced tensors (offline compile, torch.compile)
    get a fresh one: a traced graph owns its allocations. A CUDA graph
    captured after a first eager call replays with the counter's address and
    leaves it 0, as it found it."""
    dev = like.device
    if dev.type == "meta" or traced(like):
        return torch.zeros(1, dtype=torch.int32, device=dev)
    if dev.type == "cuda":
        key = (dev.type, dev.index, torch.cuda.current_stream(dev).stream_id)
    else:
        key = (dev.type, dev.index, threading.get_ident())
    counter = _COUNTERS.get(key)
    if counter is None:
        with _COUNTERS_LOCK:
            counter = _COUNTERS.setdefault(key, torch.zeros(1, dtype=torch.int32, device=dev))
    return counter


def loss_outputs(x: torch.Tensor, n_stats: int, n_rows: int):
    """(loss, stats, dtok, row_scale) of a loss forward over x's tokens
    ((B, T) or packed (total,)) in n_rows rows, in the accumulation dtype,
    uninitialised: the kernels' epilogues write every element (a zero-fill
    would be two more launches per call); a launcher that returns early
    (empty batch) zeroes loss and stats itself."""
    acc = acc_dtype(x.dtype)
    loss = torch.empty((), dtype=acc, device=x.device)
    stats = torch.empty((n_stats,), dtype=acc, device=x.device)
    return loss, stats, x.new_empty(x.shape, dtype=acc), x.new_empty((n_rows,), dtype=acc)


def row_layout(x: torch.Tensor, cu_seqlens, block: int = 0):
    """(n_rows, T or total, BLOCK_T, NC) of a loss launch: padded (B, T)
    rows one chunk per program, or a packed stream's segments (packed_grid)."""
    if cu_seqlens is None:
        B, T = x.shape
        bt = block_t(T) if block == 0 else min(block_t(T), block)
        return B, T, bt, max(1, triton.cdiv(T, bt))
    S, total = cu_seqlens.shape[0] - 1, x.shape[0]
    return (S, total, *packed_grid(total, S, block))
