"""Every backend, the same awkward inputs, the same answer (to tolerance, NaN
where NaN) or the same error class: logprobs_from_logits, linear_logprobs and
sample on cpp, triton (through the interpreter) and the reference; also the
truncated log-probs (top_k / top_p / min_p)."""

import math

import pytest
import torch
from conftest import CPU_BACKENDS

import rlhf_fast

BACKENDS = ["reference", *CPU_BACKENDS]
NEG_INF = -math.inf


def _logit_cases():
    """name -> (logits, labels): odd V, length 1, empty, -inf tokens, an
    all--inf row, NaN and +inf rows, +-1e4 and 1e30 offsets, ignored rows."""
    g = torch.Generator().manual_seed(11)

    def rnd(*shape, scale=3.0):
        return torch.randn(*shape, generator=g) * scale

    def lab(n, V):
        return torch.randint(0, V, (n,), generator=g)

    masked = rnd(4, 7)
    masked[:, ::2] = NEG_INF
    bad = rnd(5, 7)
    bad[1] = NEG_INF
    bad[2, 3] = math.nan
    bad[3, 0] = math.inf
    big = rnd(3, 1003) + torch.tensor([[1e4], [-1e4], [1e30]])
    cases = {
        "V=1": (rnd(3, 1), torch.zeros(3, dtype=torch.int64)),
        "V=7": (rnd(6, 7), lab(6, 7)),
        "V=1003 ignored rows": (rnd(5, 1003), torch.tensor([-100, 4, 1002, -100, 0])),
        "one row": (rnd(1, 33), lab(1, 33)),
        "empty": (rnd(0, 9), lab(0, 9)),
        "-inf tokens": (masked, torch.tensor([1, 3, 5, 1])),
        "label on a -inf token": (masked, torch.tensor([0, 3, 5, 1])),
        "all -inf, NaN, +inf rows": (bad, torch.tensor([0, 2, 1, 4, 6])),
        "offsets 1e4 .. 1e30": (big, lab(3, 1003)),
        "label out of range": (rnd(2, 7), torch.tensor([1, 7])),
        "negative label": (rnd(2, 7), torch.tensor([1, -5])),
    }
    return cases


CASES = _logit_cases()


def _run(fn):
    try:
        return fn(), None
    except Exception as exc:  # the class is what must agree
        return None, type(exc)


def _agree(results, what):
    ref_out, ref_err = results["reference"]
    for be, (_, err) in results.items():
        assert err == ref_err, f"{what}: {be} gave {err}, reference {ref_err}"
    if ref_err is not None:
        return
    ref = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    for be, (out, _) in results.items():
        out = out if isinstance(out, tuple) else (out,)
        for k, (a, b) in enumerate(zip(out, ref)):
            if a.dtype in (torch.int64, torch.int32):
                assert torch.equal(a, b), f"{what}: {be} output {k} differs"
                continue
            assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{what}: {be} output {k} NaN pattern {a} vs {b}"
            ok = ~torch.isnan(b)
            torch.testing.assert_close(
                a[ok].double(), b[ok].double(), rtol=2e-5, atol=2e-5, msg=lambda m, be=be, k=k: f"{what} {be} {k}: {m}"
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_logprobs_from_logits_agree(case, dtype):
    logits, labels = CASES[case]
    logits = logits.to(dtype)
    for t in (1.0, 0.7):
        results = {}
        for be in BACKENDS:
            with rlhf_fast.use_backend(be):
                results[be] = _run(
                    lambda: rlhf_fast.logprobs_from_logits(logits, labels, temperature=t, return_entropy=True)
                )
        _agree(results, f"logprobs {case} {dtype} T={t}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [c for c, (x, _) in CASES.items() if bool(torch.isfinite(x).all())])
def test_linear_logprobs_agree(case, dtype):
    """hidden = I, weight = logits.T: the logits are exact, so the cases are
    the same rows as above through the fused linear path (finite ones: a
    -inf weight gives 0 * inf = NaN in the GEMM, another row)."""
    logits, labels = CASES[case]
    logits = logits.to(dtype)
    hidden, weight = torch.eye(logits.shape[0], dtype=dtype), logits.T.contiguous()
    results = {}
    for be in BACKENDS:
        with rlhf_fast.use_backend(be):
            results[be] = _run(lambda: rlhf_fast.linear_logprobs(hidden, weight, labels, return_entropy=True))
    _agree(results, f"linear {case} {dtype}")


SAMPLE_CFGS = (dict(), dict(temperature=0.0), dict(temperature=0.7, top_k=3), dict(top_p=0.8, min_p=0.05))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [c for c in CASES if "label" not in c])
def test_sample_agree(case, dtype):
    logits = CASES[case][0].to(dtype)
    for cfg in SAMPLE_CFGS:
        results = {}
        for be in BACKENDS:
            with rlhf_fast.use_backend(be):
                results[be] = _run(
                    lambda: tuple(rlhf_fast.sample(logits, generator=torch.Generator().manual_seed(5), **cfg))
                )
        _agree(results, f"sample {case} {dtype} {cfg}")


TRUNC_CFGS = (dict(top_k=3), dict(temperature=0.7, top_p=0.8, min_p=0.05), dict(temperature=torch.tensor(0.9)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_truncated_logprobs_agree(case, dtype):
    """logprobs_from_logits under the sampler's truncation (top-k / top-p /
    min-p, a tensor temperature): -inf outside the kept set in the same
    places, NaN rows alone, the same errors."""
    logits, labels = CASES[case]
    logits = logits.to(dtype)
    for cfg in TRUNC_CFGS:
        results = {}
        for be in BACKENDS:
            with rlhf_fast.use_backend(be):
                results[be] = _run(lambda: rlhf_fast.logprobs_from_logits(logits, labels, return_entropy=True, **cfg))
        _agree(results, f"truncated logprobs {case} {dtype} {cfg}")
