"""Precision against the logits' offset: log-probs, entropy and the sampler's
log-probs must be exact to the row's *spread*, whatever its offset.

Rows are offset + spread, the spread a few units of the offset's own
spacing (so the fp32 inputs are the numbers the kernels see, and float64 on
those same numbers is the truth). Every kernel subtracts the row max before
scaling by 1 / T; folding 1 / T (or log2(e) / T) into x first rounds at the
offset's scale (0.5 absolute at 1e7, wrong outright at 1e38, NaN past
2.4e38 in base 2). Offsets 0, 1e2, 1e4, 1e7, 1e30 and the dtype's maximum,
both signs, on every backend (cpp, triton through the interpreter, the
reference).
"""

import math

import pytest
import torch
from conftest import CPU_BACKENDS

import rlhf_fast

BACKENDS = ["reference", *CPU_BACKENDS]
OFFSETS = (0.0, 1e2, 1e4, 1e7, 1e30, "max")
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float64: 1e-12}  # relative to max(1, spread / T)


def _rows(offset, sign, dtype, n=5, V=37, seed=0):
    """(n, V) logits of `dtype` in [o - 6u, o] (sign +1) or [-o, -o + 6u]
    (sign -1), u = max(1, 8 ulp(o)): a spread of a few units of the offset's
    own spacing, every value exactly representable."""
    big = torch.finfo(dtype).max if offset == "max" else float(offset)
    o = torch.tensor(big, dtype=dtype)
    ulp = float(o - torch.nextafter(o, torch.zeros((), dtype=dtype))) if big else 0.0
    u = max(1.0, 8 * ulp)
    g = torch.Generator().manual_seed(seed)
    steps = torch.rand(n, V, generator=g, dtype=torch.float64) * 6
    x = (big - u * steps) if sign > 0 else (-big + u * steps)
    x = x.to(dtype)
    assert torch.isfinite(x).all()
    return x


def _truth(x, temperature):
    """float64 log-softmax and entropy of the same numbers, shifted by the max."""
    xd = x.double()
    z = (xd - xd.amax(-1, keepdim=True)) / temperature
    logp = torch.log_softmax(z, -1)
    ent = -(logp.exp() * logp).sum(-1)
    scale = torch.clamp((z.amax(-1) - z.amin(-1)), min=1.0)
    return logp, ent, scale


def _close(got, want, scale, dtype, what):
    err = ((got.double() - want) / scale).abs()
    assert torch.isfinite(got).all(), f"{what}: non-finite {got}"
    assert float(err.max()) <= TOL[dtype], f"{what}: error {float(err.max()):.3g} relative to the spread"


def _temperatures(offset, dtype):
    # 0.7 where max / T still fits the dtype (past it, see test_overflowing_max_over_t_is_nan)
    return (1.0,) if offset == "max" else (1.0, 0.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("be", BACKENDS)
def test_logprobs_and_entropy_exact_to_the_spread(be, offset, dtype):
    for sign in (1, -1):
        x = _rows(offset, sign, dtype)
        y = torch.randint(0, x.shape[1], (x.shape[0],), generator=torch.Generator().manual_seed(1))
        for t in _temperatures(offset, dtype):
            logp, ent, scale = _truth(x, t)
            with rlhf_fast.use_backend(be):
                lp, h = rlhf_fast.logprobs_from_logits(x, y, temperature=t, return_entropy=True)
            what = f"{be} {dtype} offset {sign}*{offset} T={t}"
            _close(lp, logp.gather(1, y[:, None])[:, 0], scale, dtype, what + " log-prob")
            _close(h, ent, scale, dtype, what + " entropy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("be", BACKENDS)
def test_linear_logprobs_exact_to_the_spread(be, offset, dtype):
    """hidden = I, weight = x.T: the GEMM's logits are x exactly (products
    by 1 and 0), so the row statistics are what is measured."""
    for sign in (1, -1):
        x = _rows(offset, sign, dtype)
        n, V = x.shape
        y = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(2))
        hidden, weight = torch.eye(n, dtype=dtype), x.T.contiguous()
        for t in _temperatures(offset, dtype):
            logp, ent, scale = _truth(x, t)
            with rlhf_fast.use_backend(be):
                lp, h = rlhf_fast.linear_logprobs(hidden, weight, y, temperature=t, return_entropy=True)
            what = f"{be} {dtype} offset {sign}*{offset} T={t}"
            _close(lp, logp.gather(1, y[:, None])[:, 0], scale, dtype, what + " log-prob")
            _close(h, ent, scale, dtype, what + " entropy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("be", BACKENDS)
def test_sample_logprobs_exact_to_the_spread(be, offset, dtype):
    """The sampled token's raw and processed (top-k = 3) log-probs, greedy
    rows included; the token must be one the truncation keeps."""
    for sign in (1, -1):
        x = _rows(offset, sign, dtype)
        for t in (0.0, *_temperatures(offset, dtype)):
            t_eff = t if t > 0 else 1.0
            logp, _, scale = _truth(x, t_eff)
            for top_k in (0, 3):
                with rlhf_fast.use_backend(be):
                    out = rlhf_fast.sample(x, temperature=t, top_k=top_k, generator=torch.Generator().manual_seed(3))
                what = f"{be} {dtype} offset {sign}*{offset} T={t} top_k={top_k}"
                tok = out.tokens
                _close(out.logprobs, logp.gather(1, tok[:, None])[:, 0], scale, dtype, what + " log-prob")
                if t == 0:
                    assert torch.equal(tok, x.double().argmax(-1)), what
                    continue
                z = logp  # log-softmax differs from z by a per-row constant: the same order and ratios
                kept = z >= (z.topk(top_k, -1).values[:, -1:] if top_k else z.amin(-1, keepdim=True))
                assert bool(kept.gather(1, tok[:, None]).all()), what + ": a truncated token was drawn"
                lse_kept = torch.logsumexp(torch.where(kept, z, -math.inf), -1)
                want = z.gather(1, tok[:, None])[:, 0] - lse_kept
                _close(out.processed_logprobs, want, scale, dtype, what + " processed log-prob")


@pytest.mark.parametrize("be", BACKENDS)
def test_constant_row_at_1e38(be):
    """Four equal logits of 1e38: log p = -log 4, H = log 4 (was 0.0 and
    1.386), and the sampler's log-prob -log 4 too (was 0)."""
    x = torch.full((1, 4), 1e38)
    with rlhf_fast.use_backend(be):
        lp, h = rlhf_fast.logprobs_from_logits(x, torch.tensor([0]), return_entropy=True)
        out = rlhf_fast.sample(x, generator=torch.Generator().manual_seed(0))
    log4 = math.log(4)
    torch.testing.assert_close(lp, torch.tensor([-log4]))
    torch.testing.assert_close(h, torch.tensor([log4]))
    torch.testing.assert_close(out.logprobs, torch.tensor([-log4]))
    torch.testing.assert_close(out.processed_logprobs, torch.tensor([-log4]))


@pytest.mark.parametrize("be", BACKENDS)
def test_overflowing_max_over_t_is_nan(be):
    """max(x) / T beyond fp32 (lse = inf, which no backward could use): that
    row is NaN, the same on every backend, and the other rows are exact."""
    x = torch.tensor([[3.0e38, 2.9e38, 1.0], [1.0, 2.0, 3.0]])
    y = torch.tensor([0, 2])
    with rlhf_fast.use_backend(be):
        lp, h = rlhf_fast.logprobs_from_logits(x, y, temperature=0.5, return_entropy=True)
    assert torch.isnan(lp[0]) and torch.isnan(h[0])
    want = torch.log_softmax(x[1].double() / 0.5, -1)[2]
    torch.testing.assert_close(lp[1].double(), want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- gradients

# max |d logits - float64| relative to (|g_lp| + |g_H|) / T, the row's largest
# possible gradient: fp32 math reaches ~1e-6 at every offset; bf16 / fp16
# gradients round once to 8 bits (2^-9 = 2e-3 of an element).
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 5e-3, torch.float64: 1e-12}


def _truth_grad(x, y, temperature, g_lp, g_h):
    """float64 d(sum g_lp * log p_y + g_H * H) / d logits of the same numbers:
    (g_lp (onehot - p) - g_H p (log p + H)) / T."""
    logp, ent, _ = _truth(x, temperature)
    p = logp.exp()
    onehot = torch.nn.functional.one_hot(y, x.shape[-1]).double()
    t = torch.where(p > 0, p * (logp + ent[:, None]), torch.zeros_like(p))
    dz = g_lp.double()[:, None] * (onehot - p) - g_h.double()[:, None] * t
    return dz / temperature


def _close_grad(got, want, g_lp, g_h, temperature, dtype, what):
    assert torch.isfinite(got).all(), f"{what}: non-finite gradient {got}"
    scale = ((g_lp.abs() + g_h.abs()).double() / temperature)[:, None]
    err = ((got.double() - want) / scale).abs()
    assert float(err.max()) <= GRAD_TOL[dtype], f"{what}: gradient error {float(err.max()):.3g} of the largest"


def _upstream(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


def _grad_cases(dtype):
    """(offset, sign, x, labels, T) for every offset, both signs."""
    for offset in OFFSETS:
        for sign in (1, -1):
            x = _rows(offset, sign, dtype)
            y = torch.randint(0, x.shape[1], (x.shape[0],), generator=torch.Generator().manual_seed(1))
            for t in _temperatures(offset, dtype):
                yield offset, sign, x, y, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("be", BACKENDS)
def test_logprobs_grad_exact_to_the_spread(be, dtype):
    """The backward's p_j and log p_j + H come from the max-shifted d_j, so
    d logits is exact to the spread too (from the absolute lse, fp32 lost
    5e-4 of it at offset 1e4 and 0.29 at 1e7). With and without entropy."""
    for offset, sign, x, y, t in _grad_cases(dtype):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        g_lp, g_h = _upstream(x.shape[0], 4)
        what = f"{be} {dtype} offset {sign}*{offset} T={t}"
        for with_entropy in (True, False):
            xg = x.clone().requires_grad_()
            with rlhf_fast.use_backend(be):
                if with_entropy:
                    lp, h = rlhf_fast.logprobs_from_logits(xg, y, temperature=t, return_entropy=True)
                    loss = (lp * g_lp.to(acc)).sum() + (h * g_h.to(acc)).sum()
                else:
                    loss = (rlhf_fast.logprobs_from_logits(xg, y, temperature=t) * g_lp.to(acc)).sum()
            loss.backward()
            gh = g_h if with_entropy else torch.zeros_like(g_h)
            _close_grad(xg.grad, _truth_grad(x, y, t, g_lp, gh), g_lp, gh, t, dtype, f"{what} entropy={with_entropy}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("be", BACKENDS)
def test_linear_logprobs_grad_exact_to_the_spread(be, dtype):
    """The offset rides on the bias: hidden = I, weight = (x - o).T (exact:
    x is within a few ulps of o), bias = o, so the logits are x exactly and
    d weight = d logits.T; d bias sums the rows' d logits."""
    for offset, sign, x, y, t in _grad_cases(dtype):
        n, V = x.shape
        o = float(torch.tensor(torch.finfo(dtype).max if offset == "max" else float(offset), dtype=dtype)) * sign
        hidden = torch.eye(n, dtype=dtype)
        weight = (x.double() - o).to(dtype).T.contiguous().requires_grad_()
        bias = torch.full((V,), o, dtype=dtype, requires_grad=True)
        assert torch.equal(torch.nn.functional.linear(hidden, weight, bias), x)
        g_lp, g_h = _upstream(n, 5)
        with rlhf_fast.use_backend(be):
            lp, h = rlhf_fast.linear_logprobs(hidden, weight, y, bias=bias, temperature=t, return_entropy=True)
        ((lp * g_lp.float()).sum() + (h * g_h.float()).sum()).backward()
        want = _truth_grad(x, y, t, g_lp, g_h)
        what = f"{be} {dtype} offset {sign}*{offset} T={t}"
        _close_grad(weight.grad.T, want, g_lp, g_h, t, dtype, what + " d weight")
        bias_scale = float(((g_lp.abs() + g_h.abs()) / t).sum())
        err = float((bias.grad.double() - want.sum(0)).abs().max()) / bias_scale
        assert err <= GRAD_TOL[dtype] * 2, f"{what} d bias: error {err:.3g}"


@pytest.mark.parametrize("be", BACKENDS)
def test_vocab_parallel_grad_exact_to_the_spread(be):
    """One rank (no process group): the merge and the backward on global
    statistics; the sharded case runs in test_vocab_parallel.py."""
    from rlhf_fast.ops import vocab_parallel_logprobs

    dtype = torch.float32
    for offset, sign, x, y, t in _grad_cases(dtype):
        g_lp, g_h = _upstream(x.shape[0], 6)
        xg = x.clone().requires_grad_()
        with rlhf_fast.use_backend(be):
            lp, h = vocab_parallel_logprobs(xg, y, temperature=t, return_entropy=True)
        ((lp * g_lp.float()).sum() + (h * g_h.float()).sum()).backward()
        what = f"{be} vocab-parallel offset {sign}*{offset} T={t}"
        logp, ent, scale = _truth(x, t)
        _close(lp.detach(), logp.gather(1, y[:, None])[:, 0], scale, dtype, what + " log-prob")
        _close(h.detach(), ent, scale, dtype, what + " entropy")
        _close_grad(xg.grad, _truth_grad(x, y, t, g_lp, g_h), g_lp, g_h, t, dtype, what)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("be", ["triton", "cuda"])
def test_logprobs_grad_exact_to_the_spread_gpu(be, dtype):
    """The same gradients from the GPU kernels (compiled Triton, CUDA)."""
    for offset, sign, x, y, t in _grad_cases(dtype):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        g_lp, g_h = _upstream(x.shape[0], 4)
        xg = x.cuda().requires_grad_()
        with rlhf_fast.use_backend(be):
            lp, h = rlhf_fast.logprobs_from_logits(xg, y.cuda(), temperature=t, return_entropy=True)
        ((lp * g_lp.to(acc).cuda()).sum() + (h * g_h.to(acc).cuda()).sum()).backward()
        want = _truth_grad(x, y, t, g_lp, g_h)
        _close_grad(xg.grad.cpu(), want, g_lp, g_h, t, dtype, f"{be} {dtype} offset {sign}*{offset} T={t}")
