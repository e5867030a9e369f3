"""rlhf_fast.sample against the sort-based reference and against the exact
truncated distribution.

Every backend uses the same counter-based noise, so the kernels must pick
exactly the reference's tokens for the same seeds; the statistical tests
(1e5 draws, chi-square at p = 1e-6) then establish that those tokens follow
the truncated distribution. They run on the reference and the C++ kernel;
the Triton kernel (slow under the interpreter) is held to
token-for-token equality with them on smaller batches.
"""

import math

import pytest
import torch
import triton
import triton.language as tl
from _compare import assert_close, logit_scale

import rlhf_fast
from rlhf_fast.ops._sampling import draw_seeds, row_params, sample_with_seeds
from rlhf_fast.reference import noise_bits
from rlhf_fast.triton.sampling import _key_z, _order_key

CONFIGS = [
    dict(),
    dict(top_k=5),
    dict(top_p=0.7),
    dict(min_p=0.1),
    dict(top_k=8, top_p=0.8, min_p=0.05),
]


def _call(logits, seeds, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    temp, tk, tp, mp, filtered = row_params(logits.shape[0], logits.device, temperature, top_k, top_p, min_p)
    return sample_with_seeds(logits, seeds, temp, tk, tp, mp, filtered)


def _expected_probs(logits_row: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """The truncated distribution from its definition, float64, by sorting."""
    z = logits_row.double() / temperature
    p = torch.softmax(z, -1)
    order = torch.argsort(p, descending=True)
    keep = torch.ones_like(p, dtype=torch.bool)
    if top_k:
        keep[order[top_k:]] = False
    q = torch.where(keep, p, torch.zeros_like(p))
    q = q / q.sum()
    if top_p < 1:
        cum_before = torch.cumsum(q[order], 0) - q[order]
        drop = order[cum_before >= top_p]
        keep[drop] = False
    if min_p > 0:
        keep &= p >= min_p * p.max()
    out = torch.where(keep, p, torch.zeros_like(p))
    return out / out.sum()


def _chi2_bound(df: int, z: float = 4.753) -> float:
    # Wilson-Hilferty quantile of chi^2_df at one-sided p = 1e-6 (z = 4.753)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _assert_follows(tokens: torch.Tensor, probs: torch.Tensor, name: str) -> None:
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    excluded = probs == 0
    assert counts[excluded].sum() == 0, f"{name}: excluded tokens drawn: {excluded.nonzero().flatten().tolist()}"
    expect = probs[~excluded] * n
    chi2 = float(((counts[~excluded] - expect) ** 2 / expect).sum())
    df = int((~excluded).sum()) - 1
    if df == 0:
        return
    bound = _chi2_bound(df)
    assert chi2 < bound, f"{name}: chi2 = {chi2:.1f} > {bound:.1f} (df={df}, p=1e-6)"


# ------------------------------------------------------------ exact cases


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_tokens_as_reference(backend, cfg, dtype):
    B, V = (24, 257) if backend == "triton" else (256, 1003)
    logits = (torch.randn(B, V) * 3).to(dtype)
    logits[0, : V // 2] = float("-inf")  # -inf entries never drawn
    seeds = draw_seeds(B, logits.device, None)
    out = _call(logits, seeds, temperature=0.8, **cfg)
    with rlhf_fast.use_backend("reference"):
        want = _call(logits, seeds, temperature=0.8, **cfg)
    assert out.tokens.dtype == torch.int64 and out.logprobs.dtype == torch.float32
    assert torch.equal(out.tokens, want.tokens), (
        f"tokens differ at rows {(out.tokens != want.tokens).nonzero().flatten()}"
    )
    assert_close(out.logprobs, want.logprobs, "agree", "logprobs", scale=logit_scale(logits, 0.8))
    assert_close(out.processed_logprobs, want.processed_logprobs, "agree", "processed", scale=logit_scale(logits, 0.8))
    assert bool((out.tokens[0] >= V // 2).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logprobs_equal_logprob_kernel(backend, dtype):
    B, V = (6, 257) if backend == "triton" else (64, 1003)
    logits = (torch.randn(B, V) * 4).to(dtype)
    for temperature in (1.0, 0.6, 1.7):
        out = rlhf_fast.sample(logits, temperature=temperature, top_p=0.9, top_k=40)
        want = rlhf_fast.logprobs_from_logits(logits, out.tokens, temperature=temperature)
        assert_close(out.logprobs, want, "agree", f"T={temperature}", scale=logit_scale(logits, temperature))
        # bit-identical by construction (same row statistics); 1e-6 allows one fp32 rounding of a log-prob near -10
        # processed - raw = -log(kept mass) >= 0
        assert bool((out.processed_logprobs >= out.logprobs - 1e-6).all())
        assert bool((out.processed_logprobs <= 1e-6).all())


def test_greedy_exact(backend):
    B, V = 8, 517
    logits = torch.randn(B, V)
    logits[1, 10] = logits[1, 300] = logits[1].max() + 1  # tie: first index wins
    out = rlhf_fast.sample(logits, temperature=0.0, top_k=3, top_p=0.5)
    assert torch.equal(out.tokens, logits.argmax(-1))
    assert int(out.tokens[1]) == 10
    want = rlhf_fast.logprobs_from_logits(logits, out.tokens, temperature=1.0)
    assert_close(out.logprobs, want, "agree", "greedy", scale=logit_scale(logits))
    assert torch.equal(out.processed_logprobs, torch.zeros(B))


def test_one_hot_rows(backend):
    B, V = 6, 100
    logits = torch.full((B, V), float("-inf"))
    hot = torch.tensor([0, 99, 5, 50, 7, 3])
    logits[torch.arange(B), hot] = torch.randn(B) * 10
    for cfg in CONFIGS:
        out = rlhf_fast.sample(logits, temperature=1.3, **cfg)
        assert torch.equal(out.tokens, hot), cfg
        assert torch.equal(out.logprobs, torch.zeros(B)) and torch.equal(out.processed_logprobs, torch.zeros(B))


def test_top_k_one_is_greedy_and_min_p_one(backend):
    logits = torch.randn(12, 301) * 2
    for cfg in (dict(top_k=1), dict(min_p=1.0), dict(top_p=1e-6)):
        out = rlhf_fast.sample(logits, temperature=1.5, **cfg)
        assert torch.equal(out.tokens, logits.argmax(-1)), cfg
        assert_close(out.processed_logprobs, torch.zeros(12), "agree", str(cfg))


def test_small_and_empty_shapes(backend):
    out = rlhf_fast.sample(torch.randn(3, 1), top_p=0.5)
    assert torch.equal(out.tokens, torch.zeros(3, dtype=torch.int64))
    assert torch.equal(out.logprobs, torch.zeros(3))
    out = rlhf_fast.sample(torch.randn(0, 11), top_k=3)
    assert out.tokens.shape == (0,) and out.logprobs.shape == (0,)
    # a strided (non-contiguous rows) view is read in place
    big = torch.randn(5, 64)
    seeds = draw_seeds(5, big.device, None)
    got = _call(big[:, :37], seeds, top_k=4)
    want = _call(big[:, :37].contiguous(), seeds, top_k=4)
    assert torch.equal(got.tokens, want.tokens)


def _hard_rows(V: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows that stress a threshold search: ties at every boundary, +0 next to
    -0, -inf tokens, one value everywhere, distinct values packed into a few
    bytes of the order key, and a wide range."""
    g = torch.Generator().manual_seed(V)
    ties = torch.randint(-3, 4, (V,), generator=g).float()
    zeros = torch.randn(V, generator=g) * 1e-3
    zeros[::3], zeros[1::3] = 0.0, -0.0
    half_inf = torch.randn(V, generator=g) * 3
    half_inf[: V // 2] = float("-inf")
    rows = [torch.randn(V, generator=g) * 3, ties, zeros, half_inf, torch.zeros(V), torch.linspace(-1, 1, V)]
    return torch.stack(rows + [torch.randn(V, generator=g) * 40]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_thresholds_on_hard_rows(backend, dtype):
    # the Triton sampler keys bf16 / fp16 rows by their own 16 bits (radix
    # select for top-k, bisection plus a last-byte histogram for top-p) and
    # fp32 rows by z's 32 bits; each must keep exactly the reference's set.
    # V = 5000 spans two Triton tiles.
    for V in (7, 300, 5000) if backend == "triton" else (7, 300, 5000, 40000):
        logits = _hard_rows(V, dtype)
        seeds = draw_seeds(logits.shape[0], logits.device, None)
        for cfg in (
            dict(top_k=1), dict(top_k=3), dict(top_k=V - 1), dict(top_p=0.5), dict(top_p=0.999),
            dict(top_k=5, top_p=0.9), dict(top_k=2, top_p=0.3, min_p=0.2), dict(temperature=0.7, top_p=0.8),
        ):  # fmt: skip
            out = _call(logits, seeds, **cfg)
            with rlhf_fast.use_backend("reference"):
                want = _call(logits, seeds, **cfg)
            assert torch.equal(out.tokens, want.tokens), (V, cfg, (out.tokens != want.tokens).nonzero().flatten())
            assert_close(out.processed_logprobs, want.processed_logprobs, "agree", f"{V} {cfg}", scale=50.0)


@triton.jit
def _keys_kernel(x_ptr, key_ptr, z_ptr, token_z_ptr, inv_t, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N)
    key = _order_key(x, True)
    tl.store(key_ptr + offs, key, mask=offs < N)
    tl.store(z_ptr + offs, _key_z(key, 0.0, inv_t, x_ptr, True), mask=offs < N)
    tl.store(token_z_ptr + offs, x.to(tl.float32) * inv_t, mask=offs < N)


def test_order_key_every_16_bit_pattern():
    # the Triton sampler's key over all 65536 bf16 and fp16 bit patterns:
    # monotone in the value, -0 and +0 share a key, and the key's z is the
    # token's own z = x * (1 / T) bit for bit (so thresholds compare exactly)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
        key = torch.empty(x.shape, dtype=torch.int32)
        z, token_z = (torch.empty(x.shape, dtype=torch.float32) for _ in range(2))
        inv_t = 1.0 / 0.7
        _keys_kernel[(x.numel() // 4096,)](x, key, z, token_z, inv_t, x.numel(), BLOCK=4096)
        v = x.float()
        finite = ~v.isnan()
        assert bool(((key >= 0) & (key < 65536)).all())
        order = v[finite].argsort(stable=True)
        assert bool((key[finite][order].diff() >= 0).all()), dtype
        # distinct values, distinct keys: equal keys only for +-0
        same = (key[finite][order].diff() == 0).nonzero().flatten()
        assert bool((v[finite][order][same] == 0).all()) and same.numel() == 1
        assert torch.equal(z[finite & (v != 0)], token_z[finite & (v != 0)]), dtype
        assert bool((z[v == 0] == 0).all())
        # and that z is x * fp32(1 / T) (subnormal x left out: the interpreter
        # converts subnormal bf16 to fp32 its own way, a GPU exactly)
        normal = finite & (v.abs() >= torch.finfo(torch.float32).tiny)
        assert torch.equal(z[normal], (v * torch.tensor(inv_t, dtype=torch.float32))[normal]), dtype


def _logit_reads(monkeypatch, logits: torch.Tensor, fn) -> float:
    """Logit elements the Triton kernel loads while fn runs, per element of
    logits: the interpreter's masked loads, counted by address."""
    from triton.runtime.interpreter import InterpreterBuilder

    lo = logits.data_ptr()
    hi = lo + logits.numel() * logits.element_size()
    reads = [0]
    load = InterpreterBuilder.create_masked_load

    def counting_load(self, ptrs, mask, *args, **kwargs):
        inside = (ptrs.data >= lo) & (ptrs.data < hi) & mask.data.astype(bool)
        reads[0] += int(inside.sum())
        return load(self, ptrs, mask, *args, **kwargs)

    monkeypatch.setattr(InterpreterBuilder, "create_masked_load", counting_load)
    fn()
    return reads[0] / logits.numel()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_sampler_sweeps(monkeypatch, dtype):
    # Reads of the logits per element, worst case (a wide row, so every
    # search runs its full depth). Plain: log-sum-exp 1, the race 1 (its keys
    # need the row max). bf16: log-sum-exp with top-k's first byte
    # 1, top-k's second byte 1, top-p's 4-way search on the high byte 4 and
    # its last byte 1, the race 1. fp32: top-k 3 more bytes, top-p 12 + 1.
    # Plus the sampled token's logit, re-read once per row.
    g = torch.Generator().manual_seed(3)
    B, V = 4, 5000
    logits = (torch.randn(B, V, generator=g) * 40).to(dtype)
    seeds = draw_seeds(B, logits.device, None)
    per_row = 1 / V
    want = {
        torch.bfloat16: {"plain": 2, "min_p": 2, "top_k": 3, "top_p": 7, "all": 8},
        torch.float32: {"plain": 2, "min_p": 2, "top_k": 5, "top_p": 15, "all": 18},
    }[dtype]
    cfgs = {
        "plain": dict(), "min_p": dict(min_p=0.1), "top_k": dict(top_k=50),
        "top_p": dict(top_p=0.999), "all": dict(top_k=4000, top_p=0.999, min_p=1e-30),
    }  # fmt: skip
    with rlhf_fast.use_backend("triton"):
        for name, cfg in cfgs.items():
            reads = _logit_reads(monkeypatch, logits, lambda cfg=cfg: _call(logits, seeds, **cfg))
            assert reads <= want[name] + per_row, (name, reads)
            # and the search is as deep as claimed: a bound that is not slack
            assert reads > want[name] - 1, (name, reads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_bad_rows_give_nan_logprobs(dtype):
    # On a GPU nothing raises (no host sync): a row holding NaN or +inf, or
    # only -inf, gets NaN log-probs, raw and processed, with every filter;
    # the other rows are untouched. The kernel is called directly: the CPU
    # front end raises on such rows before any kernel runs.
    from rlhf_fast.triton.sampling import sample_fwd_triton

    B, V = 4, 300
    x = (torch.randn(B, V) * 3).to(dtype)
    x[0, 5], x[1, 7], x[2] = float("nan"), float("inf"), float("-inf")
    seeds = draw_seeds(B, x.device, None)
    temp = torch.ones(B, dtype=torch.float64)
    for k, p, mp, filtered in [(0, 1.0, 0.0, False), (5, 1.0, 0.0, True), (0, 0.9, 0.0, True), (5, 0.9, 0.1, True)]:
        args = (
            torch.full((B,), k),
            torch.full((B,), p, dtype=torch.float64),
            torch.full((B,), mp, dtype=torch.float64),
        )
        _, lp, plp = sample_fwd_triton(x, seeds, temp, *args, filtered)
        assert bool(lp[:3].isnan().all() and plp[:3].isnan().all()), (k, p, mp, lp, plp)
        assert bool(lp[3].isfinite() and plp[3].isfinite()), (k, p, mp, lp, plp)


# ------------------------------------------------------------ statistics

STAT_LOGITS = torch.log(torch.tensor([1.0 / (i + 1) ** 1.2 for i in range(20)]))[
    torch.randperm(20, generator=torch.Generator().manual_seed(0))
]


@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize(
    "cfg", CONFIGS + [dict(top_k=3, top_p=0.5)], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain"
)
def test_frequencies_match_truncated_distribution(impl, cfg):
    n = 100_000
    logits = STAT_LOGITS.unsqueeze(0).expand(n, -1).contiguous()
    with rlhf_fast.use_backend(impl):
        out = rlhf_fast.sample(logits, temperature=0.9, **cfg)
    probs = _expected_probs(STAT_LOGITS, temperature=0.9, **cfg)
    _assert_follows(out.tokens, probs, f"{impl} {cfg}")
    # processed log-prob is the log of the truncated probability
    assert_close(
        out.processed_logprobs, probs.log()[out.tokens], "logprob", "processed", scale=logit_scale(STAT_LOGITS, 0.9)
    )


def test_per_row_parameters():
    n = 60_000  # three groups of 20k rows, each with its own parameters
    logits = STAT_LOGITS.unsqueeze(0).expand(3 * n // 3, -1).contiguous()
    g = n // 3
    temperature = torch.tensor([1.0] * g + [0.5] * g + [2.0] * g)
    top_k = torch.tensor([0] * g + [4] * g + [0] * g)
    top_p = torch.tensor([0.6] * g + [1.0] * g + [1.0] * g)
    min_p = torch.tensor([0.0] * g + [0.0] * g + [0.2] * g)
    seeds = draw_seeds(n, logits.device, None)
    out = _call(logits, seeds, temperature, top_k, top_p, min_p)
    for i, cfg in enumerate([dict(top_p=0.6), dict(temperature=0.5, top_k=4), dict(temperature=2.0, min_p=0.2)]):
        rows = slice(i * g, (i + 1) * g)
        _assert_follows(out.tokens[rows], _expected_probs(STAT_LOGITS, **cfg), f"group {i} {cfg}")
        # a per-row parameter gives the same tokens as the scalar for the same seeds
        alone = _call(logits[rows], seeds[rows], **cfg)
        assert torch.equal(alone.tokens, out.tokens[rows])


def test_per_row_parameters_triton_matches_cpp():
    B, V = 16, 97
    logits = torch.randn(B, V) * 2
    seeds = draw_seeds(B, logits.device, None)
    args = (torch.rand(B) + 0.3, torch.randint(0, 10, (B,)), torch.rand(B) * 0.9 + 0.1, torch.rand(B) * 0.3)
    args[0][3] = 0.0  # one greedy row
    with rlhf_fast.use_backend("triton"):
        got = _call(logits, seeds, *args)
    with rlhf_fast.use_backend("cpp"):
        want = _call(logits, seeds, *args)
    assert torch.equal(got.tokens, want.tokens)
    assert_close(got.processed_logprobs, want.processed_logprobs, "agree", "processed", scale=logit_scale(logits))


def test_generator_reproducible_rows_independent(backend):
    logits = torch.randn(1, 50).expand(16 if backend == "triton" else 64, -1).contiguous()
    a = rlhf_fast.sample(logits, generator=torch.Generator().manual_seed(7), top_p=0.95)
    b = rlhf_fast.sample(logits, generator=torch.Generator().manual_seed(7), top_p=0.95)
    c = rlhf_fast.sample(logits, generator=torch.Generator().manual_seed(8), top_p=0.95)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    assert a.tokens.unique().numel() > 5  # identical rows draw different tokens


def test_noise_is_uniform():
    # the 32-bit hash behind every backend: uniform bits, uncorrelated rows
    seeds = draw_seeds(64, torch.device("cpu"), None)
    bits = noise_bits(seeds, 4096)
    u = (bits >> 24).flatten()  # top byte: 256 equiprobable cells, 262144 draws
    _assert_follows(u, torch.full((256,), 1 / 256, dtype=torch.float64), "noise top byte")
    lo = (bits & 0xFF).flatten()
    _assert_follows(lo, torch.full((256,), 1 / 256, dtype=torch.float64), "noise low byte")
    x = (bits.double() / 2**32) - 0.5
    corr = (x[0::2] * x[1::2]).mean() / (x.var())
    assert abs(float(corr)) < 5 * 1 / math.sqrt(x.numel() / 2)


# ------------------------------------------------------------ errors, registration


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(top_p=torch.tensor([0.5, 0.0, 0.5])), r"top_p\[1\]"),
        (dict(top_k=torch.tensor([1, 2])), "top_k"),
        (dict(temperature=torch.tensor([1.0, -1.0, 1.0])), "temperature"),
    ],
)
def test_bad_parameters_raise(backend, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        rlhf_fast.sample(torch.randn(3, 10), **kwargs)


def test_bad_logits_raise(backend):
    bad = torch.randn(4, 10)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        rlhf_fast.sample(bad)
    with pytest.raises(ValueError, match="2-D"):
        rlhf_fast.sample(torch.randn(10))
    with pytest.raises(TypeError, match="logits"):
        rlhf_fast.sample(torch.zeros(2, 3, dtype=torch.int64))


def test_opcheck():
    B, V = 4, 33
    logits = torch.randn(B, V)
    args = (
        draw_seeds(B, logits.device, None),
        torch.rand(B, dtype=torch.float64) + 0.5,
        torch.tensor([0, 3, 5, 0]),
        torch.tensor([1.0, 0.5, 0.9, 0.3], dtype=torch.float64),
        torch.zeros(B, dtype=torch.float64),
    )
    for filtered in (False, True):
        torch.library.opcheck(torch.ops.rlhf_fast.sample_fwd, (logits, *args, filtered))
    # the Triton op's fake kernel (opcheck cannot run the interpreter under
    # fake tensors): the shapes and dtypes of a real call
    from rlhf_fast.ops._sampling import _fake_fwd

    with rlhf_fast.use_backend("triton"):
        real = torch.ops.rlhf_fast.sample_fwd_triton(logits, *args, True)
    fake = _fake_fwd(logits.to("meta"), *args, True)
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]


def test_torch_compile_fullgraph():
    logits = torch.randn(8, 64)
    seeds = draw_seeds(8, logits.device, None)
    temp, tk, tp, mp, _ = row_params(8, logits.device, 0.7, 5, 0.9, 0.0)

    def f(x, s):
        out = torch.ops.rlhf_fast.sample_fwd(x, s, temp, tk, tp, mp, True)
        return out[0], out[1] * 2

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(logits, seeds)
    want = f(logits, seeds)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
