"""Rollout correction inside rlhf_fast.ppo_loss (importance weights, rejection,
mismatch metrics) against the float64 reference written from the definitions,
on every CPU backend (C++, Triton interpreter), and against verl 0.9.1's own
rollout_corr_helper + compute_policy_loss_vanilla (it imports on CPU)."""

import pytest
import torch
from _compare import assert_close, assert_equal

import rlhf_fast
from rlhf_fast import RolloutCorrection as RC

R = rlhf_fast.reference

SPECS = {
    "metrics_only": None,
    "token_tis": RC("token", 1.1),
    "token_icepop": RC("token", "0.8_1.25"),
    "seq_tis": RC("sequence", 1.2),
    "seq_icepop": RC("sequence", "0.8_1.25"),
    "geo_tis": RC("geometric", 1.005),
    "geo_icepop": RC("geometric", "0.99_1.01"),
    "token_k1": RC(None, 2.0, "token_k1", "0.8_1.25"),
    "token_k2": RC(None, 2.0, "token_k2", 0.01),
    "token_k3": RC(None, 2.0, "token_k3", 0.01),
    "seq_sum_k1": RC("token", 1.1, "seq_sum_k1", 1.5),
    "seq_sum_k2": RC(None, 2.0, "seq_sum_k2", 0.18),
    "seq_sum_k3": RC(None, 2.0, "seq_sum_k3", 0.18),
    "seq_mean_k1": RC("sequence", 1.2, "seq_mean_k1", "0.99_1.01"),
    "seq_mean_k2": RC(None, 2.0, "seq_mean_k2", 0.006),
    "seq_mean_k3": RC(None, 2.0, "seq_mean_k3", 0.006),
    "seq_max_k2": RC("geometric", 1.005, "seq_max_k2", 0.03),
    "seq_max_k3": RC(None, 2.0, "seq_max_k3", 0.03),
}


def make(B, T, dtype=torch.float64, gap=0.1, p_mask=0.2):
    lp = -3 * torch.rand(B, T, dtype=torch.float64)
    old = lp - 0.2 * torch.randn(B, T, dtype=torch.float64)
    roll = old + gap * torch.randn(B, T, dtype=torch.float64)
    adv = torch.randn(B, T, dtype=torch.float64)
    mask = torch.rand(B, T) > p_mask
    if B > 1:
        mask[1] = False  # an empty row
    return [t.to(dtype) for t in (lp, old, roll, adv)] + [mask]


def run(impl, lp, old, roll, adv, mask, spec, **kw):
    a = lp.detach().clone().requires_grad_()
    ent = kw.pop("entropy", None)
    e = ent.detach().clone().requires_grad_() if ent is not None else None
    if e is not None:
        kw["entropy"] = e
    loss, stats = impl(a, old, adv, mask, rollout_logprobs=roll, rollout_correction=spec, **kw)
    loss.backward()
    return loss.detach(), {k: v.detach() for k, v in stats.items()}, a.grad, (e.grad if e is not None else None)


def check(out, ref, what):
    loss, stats, g, ge = out
    rloss, rstats, rg, rge = ref
    assert set(stats) == set(rstats), what
    assert_close(loss, rloss, "loss", f"{what}: loss", dtype=g.dtype)
    # kl, chi2, log_ppl_diff are differences of O(1) means (log-probs ~ -1.5)
    for k in rstats:
        assert torch.isfinite(stats[k]), f"{what}: {k}"
        assert_close(
            stats[k].reshape(1), rstats[k].reshape(1).to(stats[k].dtype), "stat", f"{what}: {k}", dtype=g.dtype
        )
    assert_close(g, rg.to(g.dtype), "grad", f"{what}: grad")
    if rge is not None:
        assert_close(ge, rge.to(ge.dtype), "grad", f"{what}: entropy grad")


FP32_SPECS = ("metrics_only", "token_icepop", "seq_tis", "geo_icepop", "token_k3", "seq_mean_k1", "seq_max_k3")
CASES = [(n, torch.float64) for n in SPECS] + [(n, torch.float32) for n in FP32_SPECS]


def reaches_mode(spec, stats):
    """Some tokens / rows rejected, some weights truncated: the case is not vacuous."""
    if spec is None:
        return True
    ok = True
    if spec.rollout_rs is not None:
        ok &= bool(0 < stats["rollout_corr/rollout_rs_masked_fraction"] < 1)
    if spec.rollout_is is not None:
        f = stats["rollout_corr/rollout_is_ratio_fraction_high"] + stats["rollout_corr/rollout_is_ratio_fraction_low"]
        ok &= bool(0 < f < 1)
    return ok


@pytest.mark.parametrize("name,dtype", CASES)
def test_matches_reference(backend, name, dtype):
    spec = SPECS[name]
    # 32 rows of ~36 tokens, lr ~ N(0, 0.1): each spec above rejects / truncates
    # 3-70% of its tokens or 35-70% of its rows. A draw where every row or none
    # is hit (about 1 in 400 per spec, measured over 400 seeds) tests nothing,
    # so such draws are redrawn: any seed gives a case that reaches the mode.
    for _ in range(8):
        lp, old, roll, adv, mask = make(32, 45, dtype)
        ent = torch.rand(32, 45, dtype=dtype)
        kw = dict(
            entropy=ent,
            entropy_coef=0.01,
            ref_logprobs=old + 0.05,
            kl_coef=0.1,
            dual_clip=3.0,
            agg="seq-mean-token-mean",
        )
        d = [t.double() for t in (lp, old, roll, adv)]
        kw64 = dict(kw, entropy=ent.double(), ref_logprobs=(old + 0.05).double())
        ref = run(R.ppo_loss, *d, mask, spec, **kw64)
        if reaches_mode(spec, ref[1]):
            break
    assert reaches_mode(spec, ref[1]), f"{name}: 8 draws in a row missed the mode"
    out = run(rlhf_fast.ppo_loss, lp, old, roll, adv, mask, spec, **kw)
    check(out, ref, f"{backend} {name} {dtype}")


@pytest.mark.parametrize("agg", R.AGG_MODES)
def test_every_agg(backend, agg):
    lp, old, roll, adv, mask = make(6, 33)
    for spec in (SPECS["token_tis"], SPECS["seq_mean_k1"], SPECS["geo_icepop"]):
        out = run(rlhf_fast.ppo_policy_loss, lp, old, roll, adv, mask, spec, agg=agg)
        ref = run(R.ppo_policy_loss, lp, old, roll, adv, mask, spec, agg=agg)
        check(out, ref, f"{backend} {agg} {spec}")


def test_multi_chunk_rows(backend):
    """T > the Triton block (2048): sequence weights need every chunk of the row."""
    lp, old, roll, adv, mask = make(3, 4500, torch.float32, gap=0.003)
    for spec in (RC("sequence", 1.2), RC("geometric", 1.0005), RC(None, 2.0, "seq_max_k3", 2e-5)):
        out = run(rlhf_fast.ppo_loss, lp, old, roll, adv, mask, spec)
        ref = run(R.ppo_loss, *(t.double() for t in (lp, old, roll, adv)), mask, spec)
        check(out, ref, f"{backend} {spec}")


def test_uncorrected_path_unchanged(backend):
    """rollout_logprobs without a correction adds metrics and changes nothing else, bit for bit."""
    lp, old, roll, adv, mask = make(5, 40, torch.float32)
    a = run(rlhf_fast.ppo_loss, lp, old, roll, adv, mask, None)
    b = run(rlhf_fast.ppo_loss, lp, old, None, adv, mask, None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert all(torch.equal(a[1][k], b[1][k]) for k in b[1])
    assert set(a[1]) - set(b[1]) == {f"rollout_corr/{k}" for k in R.RC_STATS}


def test_same_policies_give_zero_mismatch(backend):
    lp, old, _, adv, mask = make(4, 30, torch.float32)
    _, st, _, _ = run(rlhf_fast.ppo_loss, lp, old, old.clone(), adv, mask, RC("sequence", 2.0))
    for k in ("kl", "k3_kl", "chi2_token", "chi2_seq", "log_ppl_diff", "log_ppl_abs_diff"):
        assert st[f"rollout_corr/{k}"].item() == 0.0, k
    assert st["rollout_corr/ppl_ratio"].item() == 1.0
    assert st["rollout_corr/rollout_is_mean"].item() == 1.0


def test_threshold_edges(backend):
    """Weights and statistics exactly on a bound are kept (verl: clamp(max=u),
    l <= w <= u, k1 in [log l, log u], k2 / k3 <= u), and not counted as high."""
    B, T = 3, 8
    old = -torch.randint(1, 64, (B, T), dtype=torch.float64) / 16  # dyadic: old - roll recovers lr exactly
    lr = torch.tensor([0.0, 0.5, -0.5, 0.0, 0.25, -0.25, 0.5, -0.5], dtype=torch.float64).repeat(B, 1)  # rows sum to 0
    roll = old - lr
    assert torch.equal(old - roll, lr)
    lp, adv, mask = old + 0.01, torch.randn(B, T, dtype=torch.float64), torch.ones(B, T, dtype=torch.bool)
    n0 = (lr == 0).sum().item() / lr.numel()
    cases = [
        (RC("token", 1.0), "rollout_is_ratio_fraction_high", (lr > 0).double().mean().item()),
        (RC("token", "1.0_1.0"), "rollout_is_mean", n0),  # only exp(0) = 1 survives IcePop [1, 1]
        (RC(None, 2.0, "token_k1", "1.0_1.0"), "rollout_rs_masked_fraction", 1 - n0),  # k1 = 0 is inside [0, 0]
        (RC(None, 2.0, "token_k2", 0.125), "rollout_rs_masked_fraction", 0.0),  # 0.5 * 0.5^2 = 0.125 exactly
        (RC(None, 2.0, "token_k2", 0.03125), "rollout_rs_masked_fraction", (lr.abs() == 0.5).double().mean().item()),
        (RC(None, 2.0, "seq_max_k2", 0.125), "rollout_rs_seq_masked_fraction", 0.0),
        (RC(None, 2.0, "seq_sum_k1", "1.0_1.0"), "rollout_rs_seq_masked_fraction", 0.0),  # rows sum to 0 exactly
    ]
    for spec, key, want in cases:
        _, st, g, _ = run(rlhf_fast.ppo_loss, lp, old, roll, adv, mask, spec)
        _, rst, rg, _ = run(R.ppo_loss, lp, old, roll, adv, mask, spec)
        assert st[f"rollout_corr/{key}"].item() == pytest.approx(want, abs=1e-15), (spec, key)
        assert rst[f"rollout_corr/{key}"].item() == pytest.approx(want, abs=1e-15), (spec, key, "reference")
        assert_close(g, rg, "grad", f"{backend} {spec}")


def test_rejected_rows_and_all_masked(backend):
    lp, old, roll, adv, mask = make(4, 20)
    roll[2] = old[2] + 1.0  # row 2 is far from the trainer: rejected by seq_mean_k1
    spec = RC(None, 2.0, "seq_mean_k1", "0.5_2.0")
    out = run(rlhf_fast.ppo_loss, lp, old, roll, adv, mask, spec, agg="seq-mean-token-mean")
    ref = run(R.ppo_loss, lp, old, roll, adv, mask, spec, agg="seq-mean-token-mean")
    check(out, ref, backend)
    assert out[2][2].abs().sum() == 0 and out[2][0].abs().sum() > 0
    # same loss as dropping row 2 from the mask by hand
    m2 = mask.clone()
    m2[2] = False
    want = run(R.ppo_loss, lp, old, None, adv, m2, None, agg="seq-mean-token-mean")
    assert out[0].item() == pytest.approx(want[0].item(), rel=1e-12)
    # everything rejected, or nothing valid: loss 0, zero gradients, zero metrics
    for spec, m in ((RC(None, 2.0, "token_k1", "1.5_2.0"), mask), (RC("sequence", 2.0), torch.zeros_like(mask))):
        ent = torch.rand(4, 20, dtype=torch.float64)
        loss, st, g, ge = run(rlhf_fast.ppo_loss, lp, old, roll, adv, m, spec, entropy=ent, entropy_coef=0.1)
        assert loss.item() == 0 and g.abs().sum() == 0 and ge.abs().sum() == 0
        assert all(torch.isfinite(v) for v in st.values())


def test_gradcheck(backend):
    lp, old, roll, adv, mask = make(3, 7)
    ent = torch.rand(3, 7, dtype=torch.float64)
    for spec in (RC("token", 1.1, "token_k1", "0.9_1.1"), RC("sequence", "0.5_2.0", "seq_sum_k2", 0.05)):

        def f(x, e):
            return rlhf_fast.ppo_loss(
                x,
                old,
                adv,
                mask,
                entropy=e,
                entropy_coef=0.1,
                ref_logprobs=old,
                kl_coef=0.2,
                rollout_logprobs=roll,
                rollout_correction=spec,
                agg="seq-mean-token-sum",
            )[0]

        # Under the Triton interpreter each forward is ~0.3 s (up to four kernels),
        # and the full Jacobian needs 168 of them (92 s): fast mode checks
        # u^T J v for random u, v against the same finite differences.
        inputs = (lp.clone().requires_grad_(), ent.clone().requires_grad_())
        assert torch.autograd.gradcheck(f, inputs, eps=1e-7, fast_mode=backend == "triton")


def _opcheck(backend, device="cpu"):
    interp = backend == "triton" and device == "cpu"  # see test_ppo_loss._opcheck_all
    utils = ("test_schema", "test_autograd_registration") if interp else torch.library._OPCHECK_DEFAULT_UTILS
    fwd = torch.ops.rlhf_fast.ppo_loss_fwd_triton if backend == "triton" else torch.ops.rlhf_fast.ppo_loss_fwd
    lp, old, roll, adv, mask = (t.to(device) for t in make(3, 8, torch.float32))
    ent = torch.rand(3, 8, device=device).requires_grad_()
    lp.requires_grad_()
    base = (lp, old, adv, mask, ent, None, 0.01, 0.0, "k3", 0.2, 0.28, 3.0, "seq-mean-token-mean", 8.0, roll)
    for rc_args in (
        RC("token", 2.0, "token_k3", 0.01).kernel_args(),
        RC("geometric", "0.5_2.0").kernel_args(),
        RC(None, 2.0, "seq_mean_k1", 1.1).kernel_args(),
    ):
        torch.library.opcheck(fwd, base + rc_args, test_utils=utils)


def test_opcheck(backend):
    _opcheck(backend)


@pytest.mark.gpu
def test_opcheck_triton_gpu():
    _opcheck("triton", "cuda")


def test_torch_compile_fullgraph():
    lp, old, roll, adv, mask = make(4, 16, torch.float32)
    spec = RC("sequence", 1.5, "token_k1", "0.8_1.25")

    def step(x):
        loss, st = rlhf_fast.ppo_loss(x, old, adv, mask, rollout_logprobs=roll, rollout_correction=spec)
        return loss, st["rollout_corr/chi2_seq"]

    a, b = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    out, chi = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")(a)
    out.backward()
    want, wchi = step(b)
    want.backward()
    assert torch.equal(out, want) and torch.equal(chi, wchi) and torch.equal(a.grad, b.grad)


def test_cpp_deterministic_across_threads():
    lp, old, roll, adv, mask = make(64, 300, torch.float32)
    spec = RC("sequence", 2.0, "seq_mean_k3", 0.01)
    prev = torch.get_num_threads()
    try:
        with rlhf_fast.use_backend("cpp"):
            torch.set_num_threads(1)
            one = run(rlhf_fast.ppo_loss, lp, old, roll, adv, mask, spec)
            torch.set_num_threads(max(2, prev))
            many = run(rlhf_fast.ppo_loss, lp, old, roll, adv, mask, spec)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one[0], many[0]) and torch.equal(one[2], many[2])
    assert all(torch.equal(one[1][k], many[1][k]) for k in one[1])


def test_bad_inputs_raise():
    lp, old, roll, adv, mask = make(2, 5, torch.float32)
    bad = [
        (lambda: RC("token", 0.0), ValueError, "must be > 0"),
        (lambda: RC("token", -1.0), ValueError, "must be > 0"),
        (lambda: RC("token", "2.0_1.0"), ValueError, "lower bound 2.0 > upper bound 1.0"),
        (lambda: RC("token", "0_1.0"), ValueError, "must be > 0"),
        (lambda: RC("tokens"), ValueError, "rollout_is must be None or one of"),
        (lambda: RC(None, 2.0, "seq_max_k1", 2.0), ValueError, "rollout_rs must be None or one of"),
        (lambda: RC(None, 2.0, "token_k1,seq_sum_k1", 2.0), ValueError, "one option"),
        (lambda: RC(None, 2.0, "token_k2", None), ValueError, "needs rollout_rs_threshold"),
        (lambda: RC(None, 2.0, "token_k2", "0.1_0.2"), ValueError, "upper bound only"),
        (lambda: RC("token", True), TypeError, "must be a number"),
        (lambda: RC.from_dict({"rollout_is": "token", "bypass_mode": True}), ValueError, "unknown keys"),
        (
            lambda: rlhf_fast.ppo_loss(lp, old, adv, mask, rollout_logprobs=roll[:, :4]),
            ValueError,
            "rollout_logprobs must have the shape",
        ),
        (
            lambda: rlhf_fast.ppo_loss(lp, old, adv, mask, rollout_correction=RC("token")),
            ValueError,
            "needs rollout_logprobs",
        ),
        (
            lambda: rlhf_fast.ppo_loss(
                lp, old, adv, mask, rollout_logprobs=roll, rollout_correction={"rollout_is": "token"}
            ),
            TypeError,
            "must be a rlhf_fast.RolloutCorrection",
        ),
        (
            lambda: rlhf_fast.ppo_loss(lp, old, adv, mask, rollout_logprobs=roll.long()),
            TypeError,
            "rollout_logprobs must have dtype",
        ),
    ]
    for fn, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            fn()
    with pytest.raises(RuntimeError, match="rollout_is must be none"):  # the op checks too
        torch.ops.rlhf_fast.ppo_loss_fwd(
            lp, old, adv, mask, None, None, 0.0, 0.0, "k3", 0.2, 0.2, None, "token-mean", 5.0, roll, "seq"
        )
    with pytest.raises(RuntimeError, match="needs rollout_logprobs"):
        torch.ops.rlhf_fast.ppo_loss_fwd(
            lp, old, adv, mask, None, None, 0.0, 0.0, "k3", 0.2, 0.2, None, "token-mean", 5.0, None, "token"
        )


# ---------------------------------------------------------------- against verl 0.9.1 itself


VERL_CASES = [
    ("token", 2.0, None, None),
    ("token", "0.5_1.5", None, None),
    ("sequence", 2.0, None, None),
    ("sequence", "0.5_5.0", None, None),
    (None, 2.0, "token_k1", "0.8_1.25"),
    (None, 2.0, "token_k3", 0.01),
    ("sequence", 2.0, "seq_sum_k1", "0.5_2.0"),
    (None, 2.0, "seq_mean_k1", "0.98_1.02"),
    ("token", 2.0, "seq_mean_k3", 0.01),
    (None, 2.0, "seq_max_k2", 0.08),
]


@pytest.mark.parametrize("case", range(len(VERL_CASES)))
def test_against_verl(backend, case):
    helper = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    is_, is_thr, rs, rs_thr = VERL_CASES[case]
    lp, old, roll, adv, mask = make(6, 40, gap=0.15)
    mask[1, :3] = True  # verl counts empty rows in its row means: keep every row non-empty here
    w, new_mask, metrics = helper.compute_rollout_correction_and_rejection_mask(
        old,
        roll,
        mask.double(),
        rollout_is=is_,
        rollout_is_threshold=is_thr,
        rollout_rs=rs,
        rollout_rs_threshold=rs_thr,
    )
    cfg = type("Cfg", (dict,), {})(clip_ratio_c=3.0)
    cfg.clip_ratio, cfg.clip_ratio_low, cfg.clip_ratio_high = 0.2, None, 0.28
    cfg.global_batch_info = {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None}
    x = lp.clone().requires_grad_()
    vloss, _ = core_algos.compute_policy_loss_vanilla(
        old, x, adv, new_mask, "token-mean", cfg, w.batch["rollout_is_weights"] if w is not None else None
    )
    vloss.backward()
    spec = RC(is_, is_thr, rs, rs_thr)
    loss, st, g, _ = run(rlhf_fast.ppo_loss, lp, old, roll, adv, mask, spec, clip_high=0.28, dual_clip=3.0)
    if new_mask.sum() == 0:
        # every sequence rejected: verl's token-mean is 0/0 (NaN loss and grads);
        # ours is documented as 0 with zero gradients (docs/rollout_correction.md)
        assert vloss.isnan() and loss.item() == 0.0
        assert_equal(g, torch.zeros_like(g), "grad with every token rejected")
    else:
        assert loss.item() == pytest.approx(vloss.item(), rel=1e-10, abs=1e-12)
        assert_close(g, x.grad, "peer", "grad vs verl")
    compared = 0
    for k, v in metrics.items():
        if k in st:  # verl takes some of its means in fp32 (.float().mean()): 1e-6
            assert st[k].item() == pytest.approx(v, rel=1e-6, abs=1e-7), k
            compared += 1
    assert compared >= 11 + (5 if is_ else 0) + (2 if rs else 0)
