"""Every C++ CPU op family under every ISA copy this machine supports.

Each vectorised CPU kernel is compiled three times (AVX-512, AVX2+FMA,
baseline x86-64) and picked at run time through one switch
(`rlhf_fast._backend.set_cpu_isa`, RLHF_FAST_CPU_ISA). Here each family runs
under each copy against the float64 reference, and the copies are compared
with each other. Bit-for-bit equality holds where the design fixes the
summation order independently of the vector width:
  - log-probs / entropy / their gradient (16 fixed partial sums),
  - the sampler (the same row statistics; a 16-lane mass; exact counts),
  - the fused policy loss, with or without rollout correction, and its
    rollout_corr/* metrics (8 fixed lanes per row on every copy, fp64 row
    sums, fixed-order epilogue; the sequence-level row pass sums in the
    same 8 lanes before its exp),
  - the KL estimators and the value loss's gradient (elementwise),
  - GAE and discounted returns (tiles and scalar loop share one step),
  - whiten and group advantages (one copy for every ISA).
Sums that use `omp simd` reductions follow the vector width and agree only
to rounding: the value loss itself.
"""

from __future__ import annotations

import pytest
import torch
from _compare import assert_close

import rlhf_fast
from rlhf_fast import RolloutCorrection, _backend
from rlhf_fast import reference as R

ISAS = _backend.cpu_isas()
pytestmark = pytest.mark.skipif(not ISAS, reason=f"the C++ extension did not load: {_backend._C_ERROR}")
# the logits below have std 3 and T >= 0.8 (fam_logprobs, fam_sample): |z| stays under ~12,
# the scale of a log-prob's absolute fp32 rounding
LOGIT_SCALE = 12.0


def quantity(name: str) -> str:
    """What an output is, for the tolerance table."""
    if name in ("logprobs", "processed_logprobs"):
        return "logprob"
    if name == "entropy":
        return "entropy"
    if name in ("loss", "stats") or "kl" in name:
        return "stat"  # means of O(1) terms and counts / N: absolute fp32 error
    return "value"


def _under(isa, fn):
    with _backend.use_cpu_isa(isa), rlhf_fast.use_backend("cpp"):
        return fn()


def _grad_of(fn, *inputs):
    """fn's outputs and the gradient of sum(w * out) for every input."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(7)
    total = sum((o * torch.rand(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outs)
    total.backward()
    return [o.detach() for o in outs] + [x.grad for x in xs]


def _tokens(B=7, T=301, dtype=torch.float32):
    """(B, T) PPO inputs: T = 301 spans a 256-token block and leaves a tail of
    5 past the 8-lane groups; row 2 is empty, the rest have holes."""
    lp = -3 * torch.rand(B, T, dtype=torch.float64)
    old = lp - 0.3 * torch.randn(B, T, dtype=torch.float64)
    ref = lp + 0.2 * torch.randn(B, T, dtype=torch.float64)
    roll = old + 0.05 * torch.randn(B, T, dtype=torch.float64)
    adv = torch.randn(B, T, dtype=torch.float64)
    ent = 2 * torch.rand(B, T, dtype=torch.float64)
    mask = torch.rand(B, T) > 0.2
    mask[2] = False
    return [t.to(dtype) for t in (lp, old, adv, ent, ref, roll)] + [mask]


# ---------------------------------------------------------------- the families
# Each returns (outputs under the active copy, float64 reference outputs, the
# names of the outputs that must be equal bit for bit between copies).


def fam_logprobs():
    logits = torch.randn(5, 3, 1037) * 3  # 1037 = 64 * 16 + 13: a vector tail
    labels = torch.randint(0, 1037, (5, 3))
    labels[1, 2] = -100

    def f(impl):
        return lambda x: impl(x, labels, temperature=1.3, return_entropy=True)

    got = _grad_of(f(rlhf_fast.logprobs_from_logits), logits)
    want = _grad_of(f(R.logprobs_from_logits), logits.double())
    return (
        dict(zip(("logprobs", "entropy", "d_logits"), got)),
        dict(zip(("logprobs", "entropy", "d_logits"), want)),
        "all",
    )


def fam_sample():
    from rlhf_fast.ops._sampling import row_params, sample_with_seeds

    logits = torch.randn(64, 1003) * 3
    seeds = torch.arange(64, dtype=torch.int64) * 7919 + 11
    args = row_params(64, logits.device, 0.8, 8, 0.8, 0.05)
    got = sample_with_seeds(logits, seeds, *args)
    with rlhf_fast.use_backend("reference"):
        want = sample_with_seeds(logits, seeds, *args)
    names = ("tokens", "logprobs", "processed_logprobs")
    return dict(zip(names, got)), dict(zip(names, want)), "all"


def _policy(kl_kind, rc):
    lp, old, adv, ent, ref, roll, mask = _tokens()

    def f(impl, old_t, adv_t, ref_t, roll_t):
        def call(a, e):
            extra = {} if rc is None else {"rollout_logprobs": roll_t, "rollout_correction": rc}
            loss, stats = impl(
                a,
                old_t,
                adv_t,
                mask,
                entropy=e,
                ref_logprobs=ref_t,
                entropy_coef=0.01,
                kl_coef=0.1,
                kl_kind=kl_kind,
                dual_clip=3.0,
                agg="seq-mean-token-mean",
                **extra,
            )
            return loss, torch.stack([stats[k] for k in sorted(stats)])

        return call

    got = _grad_of(f(rlhf_fast.ppo_loss, old, adv, ref, roll), lp, ent)
    want = _grad_of(f(R.ppo_loss, old.double(), adv.double(), ref.double(), roll.double()), lp.double(), ent.double())
    names = ("loss", "stats", "d_logprobs", "d_entropy")
    return dict(zip(names, got)), dict(zip(names, want)), names


def fam_policy_k3():
    return _policy("k3", None)


def fam_policy_abs():
    return _policy("abs", None)


def fam_policy_token_is():
    return _policy("k1", RolloutCorrection("token", 1.1))


def fam_policy_seq_is():
    return _policy("k2", RolloutCorrection("sequence", 1.2, "seq_mean_k3", 0.01))


# Every compile-time mode of the rollout-correction token pass (the weight:
# per row / truncated / IcePop; token rejection: none / k1 / k2 / k3), so
# that the AVX2 block written with intrinsics (which the AVX-512 copy runs
# too) is held to the baseline copy's lane-by-lane rc::token bit for bit. Thresholds sit inside the spread of old - rollout
# (0.05), so tokens fall on both sides of each bound.
def fam_policy_icepop_token_k1():
    return _policy("k3", RolloutCorrection("token", "0.95_1.05", "token_k1", "0.97_1.03"))


def fam_policy_token_is_k2():
    return _policy("k1", RolloutCorrection("token", 1.04, "token_k2", 0.0005))


def fam_policy_geo_is_k3():
    return _policy("k2", RolloutCorrection("geometric", 1.01, "token_k3", 0.0005))


def fam_policy_seq_rs_only():
    return _policy("k3", RolloutCorrection(None, 2.0, "seq_sum_k1", "0.5_2"))


def fam_value_loss():
    v, vo, ret, _, _, _, mask = _tokens()
    kw = {"clip": 0.2, "agg": "token-mean"}

    def f(impl, vo_t, ret_t):
        def call(a):
            loss, stats = impl(a, vo_t, ret_t, mask, **kw)
            return loss, torch.stack([stats[k] for k in sorted(stats)])

        return call

    got = _grad_of(f(rlhf_fast.ppo_value_loss, vo, ret), v)
    want = _grad_of(f(R.ppo_value_loss, vo.double(), ret.double()), v.double())
    names = ("loss", "stats", "d_values")
    return dict(zip(names, got)), dict(zip(names, want)), ("d_values",)


def fam_kl_penalty():
    lp, _, _, _, ref, _, _ = _tokens()
    got, want = {}, {}
    for kind in ("k1", "k2", "k3", "abs"):
        g = _grad_of(lambda a, k=kind: rlhf_fast.kl_penalty(a, ref, kind=k), lp)
        w = _grad_of(lambda a, k=kind: R.kl_penalty(a, ref.double(), kind=k), lp.double())
        for name, x, y in zip(("kl", "d_logprobs"), g, w):
            got[f"{kind} {name}"], want[f"{kind} {name}"] = x, y
    return got, want, "all"


def fam_advantages():
    B, T = 37, 1001  # 16- and 8-row tiles, then a rest for the scalar loop; ragged first tiles
    r, v = torch.randn(B, T), torch.randn(B, T)
    m = torch.rand(B, T) > 0.3
    scores, groups = torch.randn(48), torch.arange(48) // 6
    got = dict(zip(("advantages", "returns"), rlhf_fast.gae(r, v, m, gamma=0.99, lam=0.95)))
    got["discounted"] = rlhf_fast.discounted_returns(r, m, gamma=0.99)
    got["whiten"] = rlhf_fast.whiten(r, m)
    got["grpo"] = rlhf_fast.group_advantages(scores, groups, estimator="grpo")
    r64, v64 = r.double(), v.double()
    want = dict(zip(("advantages", "returns"), R.gae(r64, v64, m, gamma=0.99, lam=0.95)))
    want["discounted"] = R.discounted_returns(r64, m, gamma=0.99)
    want["whiten"] = R.whiten(r64, m)
    want["grpo"] = R.group_advantages(scores.double(), groups, estimator="grpo")
    return got, want, "all"


FAMILIES = {name[4:]: fn for name, fn in sorted(globals().items()) if name.startswith("fam_")}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_copy_against_float64(family, isa):
    torch.manual_seed(1234)
    got, want, _ = _under(isa, FAMILIES[family])
    assert got.keys() == want.keys()
    for name in got:
        if name == "tokens":
            assert torch.equal(got[name], want[name]), f"{isa} {family}: tokens differ from the reference"
        else:
            q = quantity(name)
            scale = LOGIT_SCALE if q == "logprob" else 1.0
            assert_close(got[name], want[name], q, f"{isa} {family} {name}", scale=scale)


@pytest.mark.skipif(len(ISAS) < 2, reason=f"this CPU runs only the {ISAS[:1]} copy: nothing to compare")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_copies_agree(family):
    outs = {}
    for isa in ISAS:
        torch.manual_seed(1234)  # the same inputs for every copy
        outs[isa], _, exact = _under(isa, FAMILIES[family])
    exact = tuple(outs[ISAS[0]]) if exact == "all" else exact
    base = outs[ISAS[0]]
    for isa in ISAS[1:]:
        for name, x in outs[isa].items():
            if name in exact:
                assert torch.equal(x, base[name]), (
                    f"{family} {name}: the {isa} copy differs from {ISAS[0]} "
                    f"(max |diff| {(x.double() - base[name].double()).abs().max().item():.3g})"
                )
            else:
                assert_close(x, base[name], "agree", f"{family} {name}: {isa} vs {ISAS[0]}")


def test_switch_reaches_every_copy():
    """set_cpu_isa changes what runs (the build reports it) and refuses what
    the CPU lacks; use_cpu_isa restores the previous copy."""
    start = rlhf_fast._backend._C.build_info()["cpu_isa"]
    for isa in ISAS:
        with _backend.use_cpu_isa(isa):
            assert _backend._C.build_info()["cpu_isa"] == isa
    assert _backend._C.build_info()["cpu_isa"] == start
    with pytest.raises(ValueError, match="not available"):
        _backend.set_cpu_isa("sse9")
