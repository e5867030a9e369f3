"""Every backend, the same awkward inputs, the same answer (to tolerance, NaN
where NaN) or the same error class: logprobs_from_logits, linear_logprobs and
sample on cpp, triton (through the interpreter) and the reference; also the
truncated log-probs (top_k / top_p / min_p), ppo_loss, ppo_value_loss, kl_penalty,
gae, discounted_returns, whiten and group_advantages."""

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


# ---------------------------------------------------------------- the loss and advantage ops


def _token_cases():
    """name -> (B, T) tensors (lp, old, adv, ref, mask) on awkward layouts:
    one token, odd widths, no rows, an all-masked row, NaN and +-inf under
    the mask, a -inf log-prob on a valid token (a label outside a kept set),
    advantages of 1e30."""
    g = torch.Generator().manual_seed(12)

    def mk(B, T):
        lp = -torch.rand(B, T, generator=g) * 3
        old = lp + 0.3 * torch.randn(B, T, generator=g)
        ref = lp + 0.5 * torch.randn(B, T, generator=g)
        adv = torch.randn(B, T, generator=g)
        mask = torch.rand(B, T, generator=g) > 0.25
        return [lp, old, adv, ref, mask]

    cases = {"1x1": mk(1, 1), "3x7": mk(3, 7), "no rows": mk(0, 5), "empty rows": mk(3, 0)}
    c = mk(4, 9)
    c[4][1] = False  # an all-masked row
    cases["all-masked row"] = c
    c = mk(3, 8)
    c[4][0, 2] = False
    for t in c[:4]:
        t[0, 2] = math.nan  # NaN padding under the mask: never read
    c[4][1, 3] = False
    c[1][1, 3] = math.inf
    cases["NaN and inf under the mask"] = c
    c = mk(3, 8)
    c[4][2, 4] = True
    c[0][2, 4] = NEG_INF  # a valid token outside the current policy's kept set
    cases["-inf log-prob"] = c
    c = mk(2, 6)
    c[2] = c[2] * 1e30
    cases["advantages 1e30"] = c
    return cases


TOKEN_CASES = _token_cases()


def _every_backend(fn) -> dict:
    """fn's result on each backend that implements the op (gae, whiten and
    discounted_returns have no Triton kernel: BackendUnavailable leaves that
    backend out; every op has the reference and C++)."""
    results = {}
    for be in BACKENDS:
        with rlhf_fast.use_backend(be):
            out = _run(fn)
        if out[1] is not rlhf_fast._backend.BackendUnavailable:
            results[be] = out
    assert {"reference", "cpp"} <= set(results)
    return results


def _loss_out(loss_and_stats):
    loss, stats = loss_and_stats
    return (loss, *(stats[k] for k in sorted(stats)))


@pytest.mark.parametrize("case", list(TOKEN_CASES))
@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(dual_clip=3.0, clip_high=0.28, agg="seq-mean-token-mean"),
        dict(kl="k3", agg="seq-mean-token-sum-norm"),
    ],
    ids=["token-mean", "dual-seq-mean", "k3-sum-norm"],
)
def test_ppo_loss_agree(case, opts):
    lp, old, adv, ref, mask = TOKEN_CASES[case]
    opts = dict(opts)
    kl = opts.pop("kl", None)
    if kl:
        opts.update(ref_logprobs=ref, kl_coef=0.1, kl_kind=kl)
    results = {}
    for be in BACKENDS:
        with rlhf_fast.use_backend(be):
            results[be] = _run(
                lambda: _loss_out(rlhf_fast.ppo_loss(lp, old, adv, mask, entropy=-lp, entropy_coef=0.01, **opts))
            )
    _agree(results, f"ppo_loss {case} {opts}")


@pytest.mark.parametrize("case", list(TOKEN_CASES))
def test_value_loss_and_kl_agree(case):
    lp, old, adv, ref, mask = TOKEN_CASES[case]
    for name, fn in (
        ("value_loss", lambda: _loss_out(rlhf_fast.ppo_value_loss(lp, old, adv, mask, clip=0.2))),
        ("kl k1", lambda: rlhf_fast.kl_penalty(lp, ref, kind="k1")),
        ("kl k3", lambda: rlhf_fast.kl_penalty(lp, ref, kind="k3")),
    ):
        _agree(_every_backend(fn), f"{name} {case}")


@pytest.mark.parametrize("case", [c for c in TOKEN_CASES if c != "-inf log-prob"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_advantages_agree(case, dtype):
    """gae, discounted_returns and whiten on the same layouts (rewards and
    values from the cases' tensors)."""
    lp, old, adv, _, mask = TOKEN_CASES[case]
    rewards, values = adv.to(dtype), old.to(dtype)
    for name, fn in (
        ("gae", lambda: rlhf_fast.gae(rewards, values, mask, gamma=0.99, lam=0.95)),
        ("returns", lambda: rlhf_fast.discounted_returns(rewards, mask, gamma=0.9)),
        ("whiten", lambda: rlhf_fast.whiten(rewards, mask)),
    ):
        _agree(_every_backend(fn), f"{name} {case} {dtype}")


@pytest.mark.parametrize(
    "scores",
    [
        torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 0.5, 0.5]),  # one group tied
        torch.tensor([1e30, -1e30, 3.0, 1e30, 2.0, 2.0]),
        torch.tensor([math.nan, 1.0, 2.0, 3.0]),  # NaN stays in its group
        torch.zeros(0),
    ],
    ids=["tied group", "1e30", "NaN", "empty"],
)
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_baseline"])
def test_group_advantages_agree(scores, estimator):
    results = _every_backend(lambda: rlhf_fast.group_advantages(scores, 2, estimator=estimator))
    _agree(results, f"group_advantages {estimator} {scores.tolist()}")
