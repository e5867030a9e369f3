"""Triton sampler: one program per row, no sort, no host synchronisation.

Every value is z = (x - max x) / T <= 0: the row max is subtracted before
scaling, so thresholds, the race's keys and the log-probs are exact to the
row's spread at any offset (x / T rounds at the offset's scale: the fp32
spacing is 1 at 1e7, where it would round the Gumbel noise away).
Plain sampling (FILTERED=False) is two sweeps: the online max / sum of the
log-prob kernel, then the exponential race (argmax z + Gumbel(seed, token)),
which needs the max first; the second reads a row that was just read (from
L2 where the rows in flight fit): B*V*2 bytes per sweep for bf16, 78 MB at
(256, 151936).
With top-k / top-p / min-p (FILTERED=True) the thresholds are found without
sorting, on an order key of the raw logit x (z is monotone in x, so the k-th
largest z is that of the k-th largest x, and a top-p threshold is a token's
z either way): its 16 bits for bf16 / fp16 logits, 32 for fp32.
  top-k: radix select, one byte per sweep (tl.histogram of that byte over
         the tokens that share the bytes chosen so far). The first byte's
         histogram is taken in the log-sum-exp sweep, so a 16-bit key needs
         1 more sweep, a 32-bit one 3. The last also sums the mass above
         tau_k, which top-p renormalises by.
  top-p: a 4-way search on the key without its low byte, three mass sums
         per sweep (4 sweeps for a 16-bit key, 12 for a 32-bit one), then
         one histogram sweep over the chosen byte, whose 256 keys are single
         values, so a key's mass is its count times its exp.
Then one more sweep does the race over the kept tokens and their mass.
Sweeps over a bf16 / fp16 row, worst case: plain 2, min-p 2, top-k 3, top-p
7, all three 8 (it was 67 with a 32-step bisection for each of top-k and
top-p); fp32 rows: top-k 5, top-p 15, all 18. tests/test_sampling.py counts
them under the interpreter. Triton's histogram counts and cannot sum masses,
so top-p's high byte takes a search, not one histogram sweep.
The histogram in the log-sum-exp sweep leaves that sweep's layout as it was
(the same blocked layout for every reduce in the TTGIR, Triton 3.6 and 3.9),
so the row's lse keeps the log-prob kernel's sum order.
Noise and semantics are those of rlhf_fast/reference/_sampling.py.

The launcher at the end is the triton_op rlhf_fast::sample_fwd_triton; its
fake is in rlhf_fast/ops/_sampling.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend
from ._common import LN2, LOG2E, NEG_INF, launch_on_tensor_device
from .logprobs import STRIP, row_logprob, row_lse, row_lse_finish, row_lse_step
from .logprobs import row_config as _logprobs_row_config


@triton.jit
def _mix32(x):
    # lowbias32 on uint32 lanes; multiplications wrap mod 2^32
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _gumbel(seed_lo, seed_hi, offs):
    bits = _mix32(_mix32(offs.to(tl.uint32) ^ seed_lo) + seed_hi) >> 9
    u = (bits.to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2^-23
    return -tl.log(-tl.log(u))


@triton.jit
def _order_key(x, KEY16: tl.constexpr):
    """Key monotone in the value, -0 sharing +0's key (they compare equal):
    in [0, 2^16) as int32 from a bf16 / fp16 x, in [0, 2^32) as int64 from
    an fp32 x. NaN sorts above +inf (a NaN row's log-probs are NaN anyway).
    Distinct x share a z = (x - max) / T only where x - max rounds (far
    below the max) or the product lands among fp32 subnormals; a threshold
    on z then keeps the whole tie group, as the reference does."""
    if KEY16:
        b = x.to(tl.int16, bitcast=True).to(tl.int32)
        k = tl.where(b >= 0, b + 32768, ~b)
        return tl.where(k == 32767, 32768, k)
    else:
        b = x.to(tl.int32, bitcast=True).to(tl.int64)
        k = tl.where(b >= 0, b + 2147483648, ~b)
        return tl.where(k == 2147483647, 2147483648, k)


@triton.jit
def _key_z(k, mx, inv_t, row_ptr, KEY16: tl.constexpr):
    """The z = (x - max x) / T of a key (inverse of _order_key, then the
    kernel's own product), so a key's threshold and a token's z compare bit
    for bit. Keys order the raw logits x: z is monotone in x."""
    if KEY16:
        b = tl.where(k >= 32768, k - 32768, ~k).to(tl.int16)
        x = b.to(row_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
    else:
        b = tl.where(k >= 2147483648, k - 2147483648, ~k).to(tl.int32)
        x = b.to(tl.float32, bitcast=True)
    return (x - mx) * inv_t


@triton.jit
def _load_z(row_ptr, offs, V, mx, inv_t):
    """z = (x - max x) / T <= 0 of one tile, padding -inf: the max is
    subtracted before scaling, so z is exact to the row's spread at any
    offset (x / T rounds at the offset's scale: 0.5 at 1e7)."""
    return (tl.load(row_ptr + offs, mask=offs < V, other=NEG_INF).to(tl.float32) - mx) * inv_t


@triton.jit
def _load_key(row_ptr, offs, V, mx, inv_t, KEY16: tl.constexpr):
    """(z, key, in-row mask) of one 1-D tile; padding is z = -inf, masked out."""
    valid = offs < V
    x = tl.load(row_ptr + offs, mask=valid, other=NEG_INF)
    xf = x.to(tl.float32)
    z = (xf - mx) * inv_t
    key = _order_key(x, True) if KEY16 else _order_key(xf, False)  # fp32 keys of the fp32 x (fp64 logits too)
    return z, key, valid


@triton.jit
def _radix_pick(hist, need):
    """The byte value d whose bin holds the need-th largest key, and what is
    still needed inside it."""
    bins = tl.arange(0, 256)
    at_or_above = tl.cumsum(hist, 0, reverse=True)
    d = tl.max(tl.where(at_or_above >= need, bins, -1), 0)
    return d, need - tl.sum(tl.where(bins > d, hist, 0), 0)


@triton.jit
def _top_k_key(row_ptr, V, inv_t, mx, k, hist0, KEY16: tl.constexpr, BLOCK_V: tl.constexpr):
    """Radix select: the key of the k-th largest z (1 <= k < V), one byte per
    sweep after the first (hist0, taken in the log-sum-exp sweep), and the
    mass sum(exp(z)) of the tokens at or above it (z <= 0)."""
    KEY_BITS: tl.constexpr = 16 if KEY16 else 32
    cols = tl.arange(0, BLOCK_V)
    bins = tl.arange(0, 256)
    d, need = _radix_pick(hist0, k.to(tl.int32))
    prefix = d.to(tl.int32 if KEY16 else tl.int64) << (KEY_BITS - 8)
    mass_above = tl.zeros([BLOCK_V], tl.float32)
    for level in tl.static_range(1, KEY_BITS // 8):
        shift = KEY_BITS - 8 * (level + 1)
        hist = tl.zeros([256], tl.int32)
        for start in range(0, V, BLOCK_V):
            z, key, valid = _load_key(row_ptr, start + cols, V, mx, inv_t, KEY16)
            valid = valid & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
            if shift == 0:
                # tokens in a byte above the one being resolved: all at or above tau_k
                mass_above += tl.where((key >> 8) > (prefix >> 8), tl.exp(z), 0.0)
            hist += tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=valid)
        d, need = _radix_pick(hist, need)
        prefix = prefix | (d.to(prefix.dtype) << shift)
    # hist and d are the last byte's: its keys are single values, so a key's
    # mass is its count times its exp (keys with no token, some of them NaN
    # patterns, add nothing rather than 0 * NaN)
    e = tl.exp(_key_z((prefix >> 8 << 8) | bins, mx, inv_t, row_ptr, KEY16))
    mass = tl.sum(mass_above, 0) + tl.sum(tl.where((bins >= d) & (hist > 0), hist.to(tl.float32) * e, 0.0), 0)
    return prefix, mass


@triton.jit
def _mass_ge3(row_ptr, V, inv_t, mx, k1, k2, k3, KEY16: tl.constexpr, BLOCK_V: tl.constexpr):
    """sum(exp(z)) over the tokens whose key is >= k for three keys in one
    sweep. Keys, not z thresholds: z = (x - max) / T can round two distinct
    x (or a key between tokens and the token below it) to one value, which
    would break the search's monotone predicate. Each sum adds a subset of
    the terms of the one below it in the same order, so k1 <= k2 <= k3 gives
    m1 >= m2 >= m3 in floating point too."""
    cols = tl.arange(0, BLOCK_V)
    m1 = tl.zeros([BLOCK_V], tl.float32)
    m2 = tl.zeros([BLOCK_V], tl.float32)
    m3 = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        z, key, valid = _load_key(row_ptr, start + cols, V, mx, inv_t, KEY16)
        e = tl.where(valid, tl.exp(z), 0.0)
        m1 += tl.where(key >= k1, e, 0.0)
        m2 += tl.where(key >= k2, e, 0.0)
        m3 += tl.where(key >= k3, e, 0.0)
    return tl.sum(m1, axis=0), tl.sum(m2, axis=0), tl.sum(m3, axis=0)


@triton.jit
def _top_p_key(
    row_ptr, V, inv_t, mx, lo_key, top_key, target,
    KEY16: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """The largest key K in [lo_key, top_key] whose mass sum(exp(z) over
    z >= z(K)) reaches target. First K >> 8 by a 4-way search, three mass
    sums per sweep (256 candidates -> 64 -> 16 -> 4 -> 1: 4 sweeps for a
    16-bit key, 12 for a 32-bit one), then one histogram sweep over the
    chosen byte's 256 keys, which are single values: mass = count * exp."""
    lo = lo_key >> 8  # its mass reaches target (p < 1 of the survivors)
    hi = top_key >> 8
    mass_hi = tl.zeros([], tl.float32)  # mass at or above (hi + 1) << 8: nothing above the row max
    while lo < hi:
        n = hi - lo + 1
        p1 = lo + (n + 3) // 4
        p2 = tl.minimum(lo + (2 * n + 3) // 4, hi)
        p3 = tl.minimum(lo + (3 * n + 3) // 4, hi)
        m1, m2, m3 = _mass_ge3(row_ptr, V, inv_t, mx, p1 << 8, p2 << 8, p3 << 8, KEY16, BLOCK_V)
        ok1, ok2, ok3 = m1 >= target, m2 >= target, m3 >= target
        hi = tl.where(ok3, hi, tl.where(ok2, p3 - 1, tl.where(ok1, p2 - 1, p1 - 1)))
        mass_hi = tl.where(ok3, mass_hi, tl.where(ok2, m3, tl.where(ok1, m2, m1)))
        lo = tl.where(ok3, p3, tl.where(ok2, p2, tl.where(ok1, p1, lo)))
    cols = tl.arange(0, BLOCK_V)
    bins = tl.arange(0, 256)
    hist = tl.zeros([256], tl.int32)
    for start in range(0, V, BLOCK_V):
        z, key, valid = _load_key(row_ptr, start + cols, V, mx, inv_t, KEY16)
        hist += tl.histogram((key & 255).to(tl.int32), 256, mask=valid & ((key >> 8) == lo))
    keys = (lo << 8) | bins
    e = tl.exp(_key_z(keys, mx, inv_t, row_ptr, KEY16))
    # keys with no token (some are NaN patterns) add nothing, not count * NaN
    reach = mass_hi + tl.cumsum(tl.where(hist > 0, hist.to(tl.float32) * e, 0.0), 0, reverse=True)
    allowed = keys >= lo_key
    best = tl.max(tl.where(allowed & (reach >= target), keys, -1), 0)
    # rounding can leave the byte's total a hair under what the search
    # measured for it: keep the whole byte (from its lowest allowed token)
    lowest = tl.min(tl.where(allowed & (hist > 0), keys, top_key), 0)
    return tl.where(best >= 0, best, lowest)


@triton.jit
def _row_lse_and_top_byte(
    row_ptr, V, inv_t, k_on,
    FILTERED: tl.constexpr, KEY16: tl.constexpr, BLOCK_V: tl.constexpr, STRIP: tl.constexpr,
):  # fmt: skip
    """Sweep 1: the log-prob kernel's strips and row_lse_step (bit-identical
    lse), and top-k's first byte when it truncates. -> (raw row max, its
    sum exp, log2 of it, the first byte's histogram)."""
    offs2 = tl.arange(0, BLOCK_V // STRIP)[:, None] * STRIP + tl.arange(0, STRIP)[None, :]
    m = tl.full([BLOCK_V // STRIP], NEG_INF, tl.float32)
    s = tl.zeros([BLOCK_V // STRIP], tl.float32)
    c = inv_t * LOG2E
    hist0 = tl.zeros([256], tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + offs2
        xr = tl.load(row_ptr + offs, mask=offs < V, other=NEG_INF)
        x = xr.to(tl.float32)
        m, s, _ = row_lse_step(x, m, s, s, c, False)
        if FILTERED:
            if k_on:
                # padding (-inf) lands in bin 0 and is taken out below
                key = _order_key(xr, True) if KEY16 else _order_key(x, False)  # fp32 keys: of the fp32 x
                top_byte = (key >> (8 if KEY16 else 24)).to(tl.int32)
                hist0 += tl.histogram(tl.reshape(top_byte, [BLOCK_V]), 256)
    m_raw, s_row, _ = row_lse_finish(m, s, s, c, False)
    _, log2_s = row_lse(m_raw, s_row, inv_t)
    return m_raw, s_row, log2_s, hist0


@triton.jit
def _row_threshold(
    row_ptr, V, inv_t, m_raw, mx, s_row, hist0, k, k_on, p, mp, stochastic,
    KEY16: tl.constexpr, BLOCK_V: tl.constexpr, SEARCH_BLOCK: tl.constexpr,
):  # fmt: skip
    """The kept set's threshold on z = (x - mx) / T: top-k, then top-p on the
    top-k survivors, then min-p; the max token (z = 0) is always kept.
    hist0: top-k's first byte from sweep 1, its padding still in bin 0."""
    key_k = tl.zeros([], tl.int32) if KEY16 else tl.zeros([], tl.int64)  # below every token
    tau_k = NEG_INF
    mass_k = s_row
    if k_on:
        hist0 -= tl.where(tl.arange(0, 256) == 0, tl.cdiv(V, BLOCK_V) * BLOCK_V - V, 0)
        key_k, mass_k = _top_k_key(row_ptr, V, inv_t, mx, k, hist0, KEY16, SEARCH_BLOCK)
        tau_k = _key_z(key_k, mx, inv_t, row_ptr, KEY16)
    # top-p among those: the largest key whose mass reaches p * mass_k
    tau_p = NEG_INF
    if (p < 1.0) & stochastic:
        top = _order_key(m_raw.to(row_ptr.dtype.element_ty), True) if KEY16 else _order_key(m_raw, False)
        key_p = _top_p_key(row_ptr, V, inv_t, mx, key_k, top, p * mass_k, KEY16, SEARCH_BLOCK)
        tau_p = _key_z(key_p, mx, inv_t, row_ptr, KEY16)
    tau_min = tl.where(mp > 0.0, tl.log(tl.where(mp > 0.0, mp, 1.0)), NEG_INF)
    return tl.minimum(tl.maximum(tl.maximum(tau_k, tau_p), tau_min), 0.0)


@triton.jit
def _sample_fwd_kernel(
    logits_ptr, seeds_ptr, temp_ptr, topk_ptr, topp_ptr, minp_ptr,
    tok_ptr, lp_ptr, plp_ptr,
    V, stride_row,
    FILTERED: tl.constexpr,
    KEY16: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SEARCH_BLOCK: tl.constexpr,
    STRIP: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    t = tl.load(temp_ptr + row)  # float64: 1/T rounded once, as the log-prob op
    greedy = t == 0.0
    stochastic = t != 0.0
    inv_t = (1.0 / tl.where(greedy, 1.0, t)).to(tl.float32)
    seed = tl.load(seeds_ptr + row)
    seed_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    seed_hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    k_on = False
    if FILTERED:
        k = tl.load(topk_ptr + row)
        k_on = (k > 0) & (k < V) & stochastic
    m_raw, s_row, log2_s, hist0 = _row_lse_and_top_byte(row_ptr, V, inv_t, k_on, FILTERED, KEY16, BLOCK_V, STRIP)
    # every z below is (x - m_raw) / T <= 0, the max subtracted first
    mx = tl.where(m_raw == NEG_INF, 0.0, m_raw)

    thr = NEG_INF
    if FILTERED:
        p = tl.load(topp_ptr + row).to(tl.float32)
        mp = tl.load(minp_ptr + row).to(tl.float32)
        thr = _row_threshold(
            row_ptr, V, inv_t, m_raw, mx, s_row, hist0, k, k_on, p, mp, stochastic, KEY16, BLOCK_V, SEARCH_BLOCK
        )
        thr = tl.where(greedy, NEG_INF, thr)
    # the race over the kept tokens (and their mass when truncated), in a
    # sweep of its own: its keys z + Gumbel need the row max first (keys
    # x / T + Gumbel would round the noise away at large offsets: at 1e7 the
    # fp32 spacing is 1). The row was just read, so mostly from L2.
    offs2 = tl.arange(0, BLOCK_V // STRIP)[:, None] * STRIP + tl.arange(0, STRIP)[None, :]
    best = tl.full([BLOCK_V // STRIP, STRIP], NEG_INF, tl.float32)
    best_j = tl.full([BLOCK_V // STRIP, STRIP], 0, tl.int32)
    acc = tl.zeros([BLOCK_V // STRIP, STRIP], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + offs2
        z = _load_z(row_ptr, offs, V, mx, inv_t)
        kept = (z >= thr) & (offs < V)
        if FILTERED:
            acc += tl.where(kept, tl.exp(z), 0.0)
        key = tl.where(greedy, z, z + _gumbel(seed_lo, seed_hi, offs))
        upd = (key > best) & kept
        best = tl.where(upd, key, best)
        best_j = tl.where(upd, offs, best_j)
    if FILTERED:
        log_kept = tl.log(tl.sum(tl.sum(acc, axis=1), axis=0))

    # first index of the best key across lanes (each lane kept its first)
    top_key = tl.max(tl.max(best, axis=1), axis=0)
    tok = tl.min(tl.min(tl.where(best == top_key, best_j, V), axis=1), axis=0)
    tok = tl.where(tok < V, tok, 0)
    x_tok = tl.load(row_ptr + tok).to(tl.float32)
    tl.store(tok_ptr + row, tok.to(tl.int64))
    lp = row_logprob(x_tok, m_raw, log2_s, inv_t)  # the log-prob kernel's expression and bits
    if FILTERED:
        plp = tl.where(greedy, 0.0, (x_tok - mx) * inv_t - log_kept)
    else:  # nothing truncated: the processed log-prob is the raw one
        plp = tl.where(greedy, 0.0, lp)
    tl.store(lp_ptr + row, lp)
    # a row with NaN, +inf or no finite logit has a NaN lse; the kept mass
    # can still be finite, so carry the NaN over (the documented GPU contract)
    tl.store(plp_ptr + row, tl.where(lp != lp, lp, plp))


@triton.jit
def _processed_logprobs_fwd_kernel(
    logits_ptr, labels_ptr, temp_ptr, topk_ptr, topp_ptr, minp_ptr,
    lp_ptr, ent_ptr, stats_ptr,
    V, stride_row, ignore_index,
    FILTERED: tl.constexpr,
    ENTROPY: tl.constexpr,
    KEY16: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SEARCH_BLOCK: tl.constexpr,
    STRIP: tl.constexpr,
):  # fmt: skip
    """Score a given label under the sampler's kept set: the sampler's own
    sweep 1, thresholds and kept-mass sweep (same tiles, same sum order), so
    the processed log-prob of sample's token is the same bits here."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    y = tl.load(labels_ptr + row).to(tl.int64)
    if y == ignore_index:  # never read: 0 and no gradient
        tl.store(lp_ptr + row, 0.0)
        tl.store(ent_ptr + row, 0.0)
        for i in tl.static_range(3):
            tl.store(stats_ptr + 3 * row + i, 0.0)
    else:
        inv_t = (1.0 / tl.load(temp_ptr + row)).to(tl.float32)
        k_on = False
        if FILTERED:
            k = tl.load(topk_ptr + row)
            k_on = (k > 0) & (k < V)
        m_raw, s_row, log2_s, hist0 = _row_lse_and_top_byte(row_ptr, V, inv_t, k_on, FILTERED, KEY16, BLOCK_V, STRIP)
        mx = tl.where(m_raw == NEG_INF, 0.0, m_raw)
        # an out-of-range label (unchecked on GPU) reads nothing and gives NaN
        y_ok = (y >= 0) & (y < V)
        x_y = tl.load(row_ptr + tl.where(y_ok, y, 0)).to(tl.float32)
        x_y = tl.where(y_ok, x_y, float("nan"))
        lp = row_logprob(x_y, m_raw, log2_s, inv_t)
        thr = NEG_INF
        log_m = log2_s * LN2
        ent = tl.zeros([], tl.float32)
        if FILTERED:
            p = tl.load(topp_ptr + row).to(tl.float32)
            mp = tl.load(minp_ptr + row).to(tl.float32)
            thr = _row_threshold(
                row_ptr, V, inv_t, m_raw, mx, s_row, hist0, k, k_on, p, mp, True, KEY16, BLOCK_V, SEARCH_BLOCK
            )
        if FILTERED or ENTROPY:
            # the sampler's kept-mass sweep (its race sweep's tiles and sum
            # order), with sum(e z) for the entropy
            offs2 = tl.arange(0, BLOCK_V // STRIP)[:, None] * STRIP + tl.arange(0, STRIP)[None, :]
            acc = tl.zeros([BLOCK_V // STRIP, STRIP], tl.float32)
            acc_ez = tl.zeros([BLOCK_V // STRIP, STRIP], tl.float32)
            for start in range(0, V, BLOCK_V):
                offs = start + offs2
                z = _load_z(row_ptr, offs, V, mx, inv_t)
                kept = (z >= thr) & (offs < V)
                e = tl.where(kept, tl.exp(z), 0.0)
                acc += e
                if ENTROPY:
                    acc_ez += e * tl.where(e > 0.0, z, 0.0)  # no 0 * -inf
            mass = tl.sum(tl.sum(acc, axis=1), axis=0)
            if FILTERED:
                log_m = tl.log(mass)
                z_y = (x_y - mx) * inv_t
                lp = tl.where(z_y >= thr, z_y - log_m, NEG_INF)
                lp = tl.where(x_y != x_y, x_y, lp)
            if ENTROPY:
                ent = log_m - tl.sum(tl.sum(acc_ez, axis=1), axis=0) / mass
        # a row with NaN, +inf or no finite logit has a NaN lse: NaN out
        bad = log2_s != log2_s
        tl.store(lp_ptr + row, tl.where(bad, log2_s, lp))
        tl.store(ent_ptr + row, tl.where(bad, log2_s, ent))
        tl.store(stats_ptr + 3 * row, mx)
        tl.store(stats_ptr + 3 * row + 1, thr)
        tl.store(stats_ptr + 3 * row + 2, log_m)


@triton.jit
def _processed_logprobs_bwd_kernel(
    grad_lp_ptr, grad_ent_ptr, logits_ptr, labels_ptr, temp_ptr, stats_ptr, ent_ptr, dx_ptr,
    V, stride_row, ignore_index,
    HAS_LP: tl.constexpr, HAS_ENT: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """d/dx_j with the kept set fixed, p_j = exp(z_j - log M) on kept tokens:
    log-prob inv_t (1[j = y] - p_j) (nothing when y is not kept), entropy
    -inv_t p_j (z_j - log M + H); 0 outside the kept set and on ignored rows."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    y = tl.load(labels_ptr + row).to(tl.int64)
    inv_t = (1.0 / tl.load(temp_ptr + row)).to(tl.float32)
    mx = tl.load(stats_ptr + 3 * row)
    thr = tl.load(stats_ptr + 3 * row + 1)
    log_m = tl.load(stats_ptr + 3 * row + 2)
    h = tl.load(ent_ptr + row)
    valid = y != ignore_index
    g_lp = tl.load(grad_lp_ptr + row) if HAS_LP else tl.zeros([], tl.float32)
    g_h = tl.load(grad_ent_ptr + row) if HAS_ENT else tl.zeros([], tl.float32)
    y_ok = valid & (y >= 0) & (y < V)
    z_y = (tl.load(row_ptr + tl.where(y_ok, y, 0)).to(tl.float32) - mx) * inv_t
    g_lp = tl.where(y_ok & (z_y >= thr), g_lp, 0.0)
    g_h = tl.where(valid, g_h, 0.0)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        z = _load_z(row_ptr, offs, V, mx, inv_t)
        pj = tl.where(z >= thr, tl.exp(z - log_m), 0.0)
        dh = -pj * tl.where(pj > 0.0, z - log_m + h, 0.0)  # no 0 * -inf
        g = inv_t * (g_h * dh - g_lp * pj + tl.where(offs == y, g_lp, 0.0))
        tl.store(dx_ptr + row * V + offs, g.to(dx_ptr.dtype.element_ty), mask=offs < V)


def row_config(V: int) -> dict:
    # The log-prob kernel's tile width and warps (fp32 states), so both reduce
    # the row in the same lane order and their log-sum-exp agree bit for bit.
    # The threshold searches hold three mass sums (top-p) or int64 keys (fp32
    # rows) per logit: half-width tiles keep them under 128 registers.
    cfg = _logprobs_row_config(V)
    return dict(cfg, STRIP=STRIP, SEARCH_BLOCK=max(cfg["BLOCK_V"] // 2, 16))


# ---------------------------------------------------------------- launcher (triton_op)


@torch.library.triton_op("rlhf_fast::sample_fwd_triton", mutates_args=())
@launch_on_tensor_device
def sample_fwd_triton(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    filtered: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (B, V); per-row parameters (B,) (ops/_sampling.py row_params).
    Returns tokens (B,) int64, raw and processed log-probs (B,) fp32."""
    B, V = logits.shape
    tokens = logits.new_empty((B,), dtype=torch.int64)
    lp, plp = (logits.new_empty((B,), dtype=torch.float32) for _ in range(2))
    if B > 0 and _backend.launches_kernels(logits):
        if V > 1 and logits.stride(1) != 1:
            logits = logits.contiguous()
        torch.library.wrap_triton(_sample_fwd_kernel)[(B,)](
            logits, seeds.contiguous(), temperature.contiguous(), top_k.contiguous(),
            top_p.contiguous(), min_p.contiguous(), tokens, lp, plp,
            V, logits.stride(0),
            FILTERED=filtered, KEY16=logits.dtype in (torch.bfloat16, torch.float16), **row_config(V),
        )  # fmt: skip
    return tokens, lp, plp


@torch.library.triton_op("rlhf_fast::processed_logprobs_fwd_triton", mutates_args=())
@launch_on_tensor_device
def processed_logprobs_fwd_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    ignore_index: int,
    filtered: bool,
    compute_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rlhf_fast::processed_logprobs_fwd on GPU: logits (N, V), labels and
    per-token parameters (N,) -> log-probs, entropy (N,), stats (N, 3) fp32."""
    N, V = logits.shape
    lp, ent = (logits.new_empty((N,), dtype=torch.float32) for _ in range(2))
    stats = logits.new_empty((N, 3), dtype=torch.float32)
    if N > 0 and _backend.launches_kernels(logits):
        if V > 1 and logits.stride(1) != 1:
            logits = logits.contiguous()
        torch.library.wrap_triton(_processed_logprobs_fwd_kernel)[(N,)](
            logits, labels.contiguous(), temperature.contiguous(), top_k.contiguous(),
            top_p.contiguous(), min_p.contiguous(), lp, ent, stats,
            V, logits.stride(0), ignore_index,
            FILTERED=filtered, ENTROPY=compute_entropy,
            KEY16=logits.dtype in (torch.bfloat16, torch.float16), **row_config(V),
        )  # fmt: skip
    return lp, ent, stats


@torch.library.triton_op("rlhf_fast::processed_logprobs_bwd_triton", mutates_args=())
@launch_on_tensor_device
def processed_logprobs_bwd_triton(
    grad_logprobs: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor,
    stats: torch.Tensor,
    entropy: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor:
    """d logits (N, V) in the logits' dtype; grad_* (N,) or None."""
    N, V = logits.shape
    dx = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    if N > 0 and V > 0 and _backend.launches_kernels(logits):
        if V > 1 and logits.stride(1) != 1:
            logits = logits.contiguous()
        has_lp, has_ent = grad_logprobs is not None, grad_entropy is not None
        dummy = stats  # never read when the matching HAS_* is False
        torch.library.wrap_triton(_processed_logprobs_bwd_kernel)[(N,)](
            grad_logprobs.float().contiguous() if has_lp else dummy,
            grad_entropy.float().contiguous() if has_ent else dummy,
            logits, labels.contiguous(), temperature.contiguous(), stats.contiguous(), entropy.contiguous(), dx,
            V, logits.stride(0), ignore_index,
            HAS_LP=has_lp, HAS_ENT=has_ent, BLOCK_V=row_config(V)["BLOCK_V"],
        )  # fmt: skip
    return dx
