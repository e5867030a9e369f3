"""The advantage estimators on degenerate inputs, on every backend: gradient
requests (refused, never dropped), exactly tied values in fp64 with eps = 0
(exactly 0, not +-0.93), and magnitudes near 1e30 where squares overflow
fp32 (the reference oracle scales before squaring)."""

from __future__ import annotations

import pytest
import torch
from _compare import assert_close

import rlhf_fast
from rlhf_fast import reference as ref

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_baseline")


@pytest.fixture(params=["cpp", "triton", "reference"])
def any_backend(request):
    with rlhf_fast.use_backend(request.param):
        yield request.param


def _calls(r, v, m, s, cu):
    """One call per op and layout; the backend decides which ops it serves."""
    return {
        "gae": lambda: rlhf_fast.gae(r, v, m, gamma=0.99, lam=0.95),
        "gae packed": lambda: rlhf_fast.gae(r.reshape(-1), v.reshape(-1), m.reshape(-1), cu_seqlens=cu),
        "discounted_returns": lambda: rlhf_fast.discounted_returns(r, m, gamma=0.99),
        "whiten": lambda: rlhf_fast.whiten(r, m),
        "whiten per segment": lambda: rlhf_fast.whiten(r.reshape(-1), m.reshape(-1), cu_seqlens=cu, per_segment=True),
        "group_advantages": lambda: rlhf_fast.group_advantages(s, 4),
    }


SERVES = {
    "cpp": {"gae", "gae packed", "discounted_returns", "whiten", "whiten per segment", "group_advantages"},
    "triton": {"whiten", "whiten per segment", "group_advantages"},
    "reference": {"gae", "gae packed", "discounted_returns", "whiten", "whiten per segment", "group_advantages"},
}


def test_gradient_request_raises(any_backend):
    """An input that requires grad, in grad mode: a clear error on every
    backend (the C++ ops used to return outputs whose backward left .grad
    None). Detached inputs or no_grad: the usual answer."""
    r = torch.randn(3, 8, dtype=torch.float64)
    v = torch.randn(3, 8, dtype=torch.float64)
    m = torch.rand(3, 8) > 0.3
    s = torch.randn(8, dtype=torch.float64)
    cu = torch.tensor([0, 8, 16, 24])
    plain = {k: fn() for k, fn in _calls(r, v, m, s, cu).items() if k in SERVES[any_backend]}
    for leaf in ("r", "v", "s"):
        args = {"r": r, "v": v, "s": s}
        args[leaf] = args[leaf].clone().requires_grad_(True)
        calls = _calls(args["r"], args["v"], m, args["s"], cu)
        for name in plain:
            uses = {"r": name != "group_advantages", "v": name.startswith("gae"), "s": name == "group_advantages"}
            if not uses[leaf]:
                continue
            with pytest.raises(RuntimeError, match="is not differentiable"):
                calls[name]()
            with torch.no_grad():
                got = calls[name]()
            for a, b in zip(
                got if isinstance(got, tuple) else (got,), plain[name] if isinstance(got, tuple) else (plain[name],)
            ):
                assert torch.equal(a, b), name
    g = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64, requires_grad=True)
    if any_backend != "triton":
        with pytest.raises(RuntimeError, match="is not differentiable"):
            rlhf_fast.gae(r, v, m, gamma=g)


TIE_VALUES = [-0.1, 0.1, 0.3, 1 / 3, -7.77, 1e6 + 0.1, 2.0**-30 * 3, -123456.789]


@pytest.mark.parametrize(
    "value,n",
    [(v, n) for v in TIE_VALUES for n in (2, 3, 7, 10, 33, 100)]
    + [(-0.1, 4097), (1 / 3, 4097)],  # several Triton whitening chunks, merged
)
def test_tied_fp64_give_exactly_zero(backend, value, n):
    """fp64, eps = 0: sum(x) / n is not exact for most tied values (7 x -0.1
    is 1.4e-17 off), and (x - mean) / std of that was +-0.93. About a pivot
    the deviations are exactly 0."""
    s = torch.full((n,), value, dtype=torch.float64)
    for est in ESTIMATORS:
        assert torch.equal(rlhf_fast.group_advantages(s, n, estimator=est, eps=0.0), torch.zeros_like(s)), est
    k = min(n, 100)  # by id: one interpreted Triton program per score, so at most 200
    ids = torch.arange(2 * k) % 2  # two interleaved tied groups by id
    s2 = torch.where(ids == 0, value, -value).to(torch.float64)
    assert torch.equal(rlhf_fast.group_advantages(s2, ids, eps=0.0), torch.zeros_like(s2))
    m = torch.ones(1, n, dtype=torch.bool)
    assert torch.equal(rlhf_fast.whiten(s[None], m, eps=0.0), torch.zeros(1, n, dtype=torch.float64))
    assert torch.equal(rlhf_fast.whiten(s[None], m, eps=0.0, shift_mean=False), s[None])
    holed = torch.rand(1, n) > 0.5  # ties among the valid ones; garbage elsewhere
    x = torch.where(holed, s[None], torch.randn(1, n, dtype=torch.float64))
    assert torch.equal(rlhf_fast.whiten(x, holed, eps=0.0), torch.zeros(1, n, dtype=torch.float64))
    # and the reference agrees
    assert torch.equal(ref.group_advantages(s, n, eps=0.0), torch.zeros_like(s))
    assert torch.equal(ref.whiten(s[None], m, eps=0.0), torch.zeros(1, n, dtype=torch.float64))


def test_partial_ties_fp64_match_reference(backend):
    """Groups with some tied scores: nonzero advantages, equal to the oracle."""
    patterns = [[0.1, 0.1, 0.1, 0.7], [-0.1] * 6 + [0.2], [1 / 3, 1 / 3, 2 / 3, 2 / 3], [0.3, 0.3]]
    for p in patterns:
        s = torch.tensor(p * 3, dtype=torch.float64)
        for est in ESTIMATORS:
            got = rlhf_fast.group_advantages(s, len(p), estimator=est, eps=0.0)
            assert_close(got, ref.group_advantages(s, len(p), estimator=est, eps=0.0), "value", f"{p} {est}")
        m = torch.ones(1, s.numel(), dtype=torch.bool)
        assert_close(rlhf_fast.whiten(s[None], m, eps=0.0), ref.whiten(s[None], m, eps=0.0), "value", str(p))


@pytest.mark.parametrize("scale", [1e30, 1e35])
def test_huge_fp32_magnitudes(backend, scale):
    """|x| ~ 1e30 in fp32: the squares overflow fp32. The kernels accumulate
    in fp64; the oracle scales before squaring, so both equal the fp64
    oracle on the same numbers (whitening is scale-invariant up to eps)."""
    x = (torch.randn(4, 300) * scale).float()
    m = torch.rand(4, 300) > 0.2
    want = ref.whiten(x.double(), m)
    assert_close(ref.whiten(x, m), want.float(), "value", "reference fp32")
    assert_close(rlhf_fast.whiten(x, m), want, "value", "kernel")
    assert ref.whiten(x, m).abs().max() > 0.5
    s = (torch.randn(64) * scale).float()
    for est in ESTIMATORS:
        want = ref.group_advantages(s.double(), 8, estimator=est)
        assert_close(ref.group_advantages(s, 8, estimator=est), want.float(), "value", f"reference {est}")
        assert_close(rlhf_fast.group_advantages(s, 8, estimator=est), want, "value", est)


def test_oracle_scales_before_squaring_in_fp64():
    """1e200 in fp64: the squares overflow fp64 too; the oracle's answer is
    that of the unscaled data (eps is negligible against var ~ 1e400)."""
    x = torch.randn(3, 50, dtype=torch.float64)
    m = torch.rand(3, 50) > 0.2
    assert_close(ref.whiten(x * 1e200, m, eps=0.0), ref.whiten(x, m, eps=0.0), "value")
    s = torch.randn(40, dtype=torch.float64)
    assert_close(ref.group_advantages(s * 1e200, 8, eps=0.0), ref.group_advantages(s, 8, eps=0.0), "value")
