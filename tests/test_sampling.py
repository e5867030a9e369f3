"""rlhf_fast.sample against the sort-based reference and against the exact
truncated distribution.

Every backend uses the same counter-based noise, so the kernels must pick
exactly the reference's tokens for the same seeds; the statistical tests
(1e5 draws, chi-square at p = 1e-6) then establish that those tokens follow
the truncated distribution. They run on the reference and the C++ kernel;
the Triton kernel (interpreter: ~10 ms per row and bisection) is held to
token-for-token equality with them on smaller batches.
"""

import math

import pytest
import torch
from _compare import assert_close, logit_scale

import rlhf_fast
from rlhf_fast.ops._sampling import draw_seeds, row_params, sample_with_seeds
from rlhf_fast.reference import noise_bits

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
        # bit-identical by construction (same row statistics); 1e-6 is the bar
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
