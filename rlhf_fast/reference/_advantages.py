"""Reference advantage estimators: the peers' Python loops over time, written
so that masked positions are truly ignored (torch.where, not a multiply, so a
NaN in a padded reward cannot leak) and float64-capable.

These are the tests' oracle (run in float64), the benchmarks' baseline (the
verl-style loop: T iterations of ~10 tiny kernels each, so T*10 launches), and
the fallback when no compiled kernel can run. Written for clarity, not speed.

Output dtype: float64 if any floating input is float64, else float32.
"""

from __future__ import annotations

import torch

from .._dtypes import acc_dtype
from ..specs import ESTIMATORS


def _per_row(x, B: int, dtype: torch.dtype, device) -> torch.Tensor:
    """gamma / lam as a (B,) tensor: a float is broadcast, a (B,) tensor kept."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype).reshape(-1).expand(B)
    return torch.full((B,), float(x), dtype=dtype, device=device)


def _segment(x, s: int):
    """Segment s's gamma / lam: a float, or element s of an (S,) tensor."""
    if not isinstance(x, torch.Tensor):
        return x
    x = x.reshape(-1)
    return x[s : s + 1] if x.numel() > 1 else x


def _per_segment(fn, cu_seqlens, tokens, outs, params):
    """The packed layout as a loop over segments, each one row of the padded
    reference: the definition the packed kernels are held to."""
    cu = [int(c) for c in cu_seqlens.tolist()]
    for s in range(len(cu) - 1):
        lo, hi = cu[s], cu[s + 1]
        if hi > lo:
            got = fn(*(t[None, lo:hi] for t in tokens), *(_segment(p, s) for p in params))
            for out, g in zip(outs, got if isinstance(got, tuple) else (got,)):
                out[lo:hi] = g[0]
    return outs


def gae(rewards, values, mask, *, gamma=1.0, lam=1.0, cu_seqlens=None):
    """verl's compute_gae_advantage_return without the whitening.

    rewards, values, mask: (B, T); gamma, lam: floats or (B,) tensors.
    Walks t = T-1 .. 0 keeping two carries per row: the value at the next
    valid position (`nextvalues`) and the advantage there (`lastgaelam`).
    Masked positions leave both carries unchanged (multi-turn observation
    tokens are skipped) and give advantage = return = 0.
    Returns (advantages, returns), returns = advantages + values where valid.
    Packed (total,) inputs with cu_seqlens: each segment as its own row.
    """
    acc = acc_dtype(rewards.dtype, values.dtype)
    if cu_seqlens is not None:
        outs = tuple(torch.zeros(rewards.shape, dtype=acc, device=rewards.device) for _ in range(2))
        fn = lambda r, v, m, g, lam_: gae(r, v, m, gamma=g, lam=lam_)  # noqa: E731
        return _per_segment(fn, cu_seqlens, (rewards, values, mask), outs, (gamma, lam))
    B, T = rewards.shape
    r, v = rewards.to(acc), values.to(acc)
    m = mask != 0
    g = _per_row(gamma, B, acc, rewards.device)
    gl = g * _per_row(lam, B, acc, rewards.device)
    zero = torch.zeros(B, dtype=acc, device=rewards.device)
    nextvalues, lastgaelam = zero, zero
    adv = torch.zeros(B, T, dtype=acc, device=rewards.device)
    for t in reversed(range(T)):
        mt = m[:, t]
        vt = torch.where(mt, v[:, t], zero)
        delta = torch.where(mt, r[:, t], zero) + g * nextvalues - vt
        lastgaelam = torch.where(mt, delta + gl * lastgaelam, lastgaelam)
        nextvalues = torch.where(mt, vt, nextvalues)
        adv[:, t] = torch.where(mt, lastgaelam, zero)
    returns = torch.where(m, adv + v, torch.zeros_like(adv))
    return adv, returns


def discounted_returns(rewards, mask, *, gamma=1.0, cu_seqlens=None):
    """G_t = r_t + gamma * G_(next valid t), 0 at masked positions, which the
    running return passes through unchanged (REINFORCE / REINFORCE++).
    rewards, mask: (B, T), or packed (total,) with cu_seqlens; gamma: float
    or (B,) / (S,) tensor."""
    acc = acc_dtype(rewards.dtype)
    if cu_seqlens is not None:
        out = torch.zeros(rewards.shape, dtype=acc, device=rewards.device)
        fn = lambda r, m, g: discounted_returns(r, m, gamma=g)  # noqa: E731
        return _per_segment(fn, cu_seqlens, (rewards, mask), (out,), (gamma,))[0]
    B, T = rewards.shape
    r = rewards.to(acc)
    m = mask != 0
    g = _per_row(gamma, B, acc, rewards.device)
    zero = torch.zeros(B, dtype=acc, device=rewards.device)
    running = zero
    out = torch.zeros(B, T, dtype=acc, device=rewards.device)
    for t in reversed(range(T)):
        mt = m[:, t]
        running = torch.where(mt, r[:, t] + g * running, running)
        out[:, t] = torch.where(mt, running, zero)
    return out


def whiten(x, mask, *, shift_mean=True, eps=1e-8, cu_seqlens=None):
    """verl's masked_whiten with unbiased variance, two passes:
    (x - mean) * rsqrt(var + eps) (+ mean if not shift_mean) at valid
    positions, 0 at masked ones. With n <= 1 valid elements the variance is
    taken as 0 (verl raises): one valid element gives 0 (shift_mean) or x
    itself; none gives all zeros. An element equal to the mean maps to 0
    whatever eps is, so eps=0 on constant input gives 0, not 0 * inf = NaN.
    cu_seqlens: packed (total,) x, one mean / var per segment."""
    acc = acc_dtype(x.dtype)
    if cu_seqlens is not None:
        out = torch.zeros(x.shape, dtype=acc, device=x.device)
        fn = lambda xs, ms: whiten(xs, ms, shift_mean=shift_mean, eps=eps)  # noqa: E731
        return _per_segment(fn, cu_seqlens, (x, mask), (out,), ())[0]
    m = mask != 0
    if x.numel() == 0:  # no rows or no columns: an empty result, as the kernels give
        return torch.zeros(x.shape, dtype=acc, device=x.device)
    xv = torch.where(m, x.to(acc), torch.zeros((), dtype=acc, device=x.device))
    n = m.sum()
    # mean = lo + mean(x - lo), lo the smallest valid x: exact for constant
    # input (sum(x) / n is not, e.g. 0.1 x 1000), so eps=0 gives 0 there
    lo = torch.where(m, x.to(acc), torch.full((), float("inf"), dtype=acc, device=x.device)).amin()
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    # deviations as (x - lo) - mean(x - lo), never x - round(mean): the mean's
    # own rounding (up to half an ulp of |x|) does not enter them
    dmean = torch.where(m, xv - lo, torch.zeros_like(xv)).sum() / n.clamp(min=1)
    mean = lo + dmean
    centered = torch.where(m, (xv - lo) - dmean, torch.zeros((), dtype=acc, device=x.device))
    # scaled by the largest |x - mean| before squaring: at |x| ~ 1e30 in
    # fp32 the squares overflow (var = inf whitened everything to 0)
    scale = centered.abs().amax() if centered.numel() else torch.zeros((), dtype=acc)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    cs = centered / scale
    var_s = (cs * cs).sum() / (n - 1).clamp(min=1)
    var_s = torch.where(n > 1, var_s, torch.zeros_like(var_s))
    var = var_s * scale * scale
    # where var overflows, (c / scale) * rsqrt(var / scale^2 + eps / scale^2)
    scaled = cs * torch.rsqrt(var_s + eps / scale / scale)
    out = torch.where(torch.isfinite(var), centered * torch.rsqrt(var + eps), scaled)
    out = torch.where(centered == 0, centered, out)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros_like(out))


def group_advantages(scores, groups, *, estimator="grpo", eps=1e-6):
    """Outcome advantages relative to the other samples of the same prompt.

    scores: (N,); groups: int (contiguous groups of that size) or (N,) int
    tensor of group ids (any values, any order). Per group of size n, mean
    and unbiased std in two passes:
      grpo               (s - mean) / (std + eps)
      dr_grpo            s - mean
      rloo               (s - mean) * n / (n - 1)   (= s - mean of the others)
      reinforce_baseline s - mean
    Singleton groups give 0 for every estimator, and grpo gives 0 for a score
    equal to its group's mean (so eps=0 on tied scores gives 0, not NaN).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
    acc = acc_dtype(scores.dtype)
    s = scores.to(acc)
    N = s.shape[0]
    if isinstance(groups, int):
        ids = torch.arange(N, device=s.device) // groups
    else:
        ids = groups.to(torch.int64)
    _, dense = torch.unique(ids, return_inverse=True)
    G = int(dense.max()) + 1 if N else 0
    cnt = torch.zeros(G, dtype=acc, device=s.device).index_add_(0, dense, torch.ones_like(s))
    # mean = lo + mean(s - lo), lo the group's smallest score: exact for tied scores
    lo = torch.full((G,), float("inf"), dtype=acc, device=s.device).scatter_reduce_(0, dense, s, "amin")
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    # deviations as (s - lo) - mean(s - lo), never s - round(mean) (as whiten)
    dmean = torch.zeros(G, dtype=acc, device=s.device).index_add_(0, dense, s - lo[dense]) / cnt
    c = (s - lo[dense]) - dmean[dense]
    # std = scale * std(c / scale), scale the group's largest |c|: the squares
    # of c at |s| ~ 1e30 in fp32 overflow (std = inf gave every advantage 0)
    scale = torch.zeros(G, dtype=acc, device=s.device).scatter_reduce_(0, dense, c.abs(), "amax")
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    cs = c / scale[dense]
    m2s = torch.zeros(G, dtype=acc, device=s.device).index_add_(0, dense, cs * cs)
    n = cnt[dense]
    single = n <= 1
    nm1 = torch.where(single, torch.ones_like(n), n - 1)
    if estimator == "grpo":
        std = scale[dense] * (m2s[dense] / nm1).sqrt()
        out = torch.where(c == 0, c, c / (std + eps))
    elif estimator == "rloo":
        out = c * n / nm1
    else:
        out = c
    return torch.where(single, torch.zeros_like(out), out)
