"""rlhf_fast.ppo_policy_loss / ppo_value_loss / kl_penalty / ppo_loss against
the float64 reference (verl's formulas), on every CPU backend (C++, and the
Triton kernels under the interpreter)."""

import math
import os

import numpy as np
import pytest
import torch
from _compare import assert_close, assert_no_worse_than_eager

import rlhf_fast

R = rlhf_fast.reference
AGGS = R.AGG_MODES
CLIPS = {  # name -> (clip_low, clip_high, dual_clip)
    "plain": (0.2, None, None),
    "dual": (0.2, None, 3.0),
    "clip_higher": (0.2, 0.28, None),
    "higher+dual": (0.2, 0.28, 2.0),
}


# ---------------------------------------------------------------- data


def _away(r: torch.Tensor, bounds) -> torch.Tensor:
    """Tokens whose ratio is within 1e-4 of a clip boundary: there an fp32
    kernel and the fp64 reference may pick different branches (the exact
    ties are tested in float64 below)."""
    bad = torch.zeros_like(r, dtype=torch.bool)
    for b in bounds:
        bad |= (r - b).abs() < 1e-4 * b
    return bad


def make_policy(B, T, dtype=torch.float32, *, spread=0.3, clip=(0.2, None, None), p_mask=0.25, empty_rows=(1,)):
    lp = -3 * torch.rand(B, T, dtype=torch.float64)
    old = lp - spread * torch.randn(B, T, dtype=torch.float64)
    adv = torch.randn(B, T, dtype=torch.float64)
    mask = torch.rand(B, T) > p_mask
    for b in empty_rows:
        if b < B:
            mask[b] = False
    lp, old, adv = lp.to(dtype), old.to(dtype), adv.to(dtype)
    lo, hi = 1 - clip[0], 1 + (clip[1] if clip[1] is not None else clip[0])
    bounds = [lo, hi] + ([clip[2]] if clip[2] is not None else [])
    for _ in range(20):
        bad = _away(torch.exp(lp.double() - old.double()), bounds)
        if not bad.any():
            break
        old = torch.where(bad, old - 0.05, old)
    assert not _away(torch.exp(lp.double() - old.double()), bounds).any()
    return lp, old, adv, mask


def make_value(B, T, dtype=torch.float32, clip=0.2):
    v = torch.randn(B, T, dtype=torch.float64)
    vo = v + 0.3 * torch.randn(B, T, dtype=torch.float64)
    ret = v + torch.randn(B, T, dtype=torch.float64)
    mask = torch.rand(B, T) > 0.25
    if B > 1:
        mask[1] = False
    v, vo, ret = v.to(dtype), vo.to(dtype), ret.to(dtype)
    for _ in range(20):  # keep |vf1 - vf2| and |v - bound| away from fp32 ties
        vd, vod, rd = v.double(), vo.double(), ret.double()
        vc = torch.minimum(torch.maximum(vd, vod - clip), vod + clip)
        vf1, vf2 = (vd - rd) ** 2, (vc - rd) ** 2
        bad = ((vf1 - vf2).abs() < 1e-4 * (vf1 + vf2 + 1e-3)) & (vc != vd)
        bad |= ((vd - (vod - clip)).abs() < 1e-4) | ((vd - (vod + clip)).abs() < 1e-4)
        if not bad.any():
            break
        ret = torch.where(bad, ret + 0.0625, ret)
    return v, vo, ret, mask


def _run(fn, tensors, grad_idx, **kw):
    """fn(*tensors, **kw) -> (loss, stats); grads of tensors[grad_idx]."""
    leaves = [t.detach().clone().requires_grad_(i in grad_idx) for i, t in enumerate(tensors)]
    loss, stats = fn(*leaves, **kw)
    loss.backward()
    return loss.detach(), {k: v.detach() for k, v in stats.items()}, [leaves[i].grad for i in grad_idx]


def _check(out, ref, dtype, what):
    loss, stats, grads = out
    rloss, rstats, rgrads = ref
    assert loss.dtype == dtype, f"{what}: loss dtype {loss.dtype}"
    assert_close(loss, rloss, "loss", what)
    assert set(stats) == set(rstats)
    for k in stats:
        assert torch.isfinite(stats[k]), f"{what}: stat {k} = {stats[k]}"
    keys = sorted(stats)
    assert_close(
        torch.stack([stats[k] for k in keys]),
        torch.stack([rstats[k] for k in keys]),
        "stat",
        f"{what}: stats",
        dtype=dtype,
    )
    for i, (g, rg) in enumerate(zip(grads, rgrads)):
        assert g.dtype == rg.dtype, f"{what}: grad {i} dtype {g.dtype} != {rg.dtype}"
        assert_close(g, rg, "grad", f"{what}: grad {i}")


# ---------------------------------------------------------------- policy loss


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_policy_loss_matches_reference(backend, agg, clip, dtype):
    cl, ch, dc = CLIPS[clip]
    lp, old, adv, mask = make_policy(6, 37, dtype, clip=(cl, ch, dc))
    kw = dict(clip_low=cl, clip_high=ch, dual_clip=dc, agg=agg)
    out = _run(rlhf_fast.ppo_policy_loss, (lp, old, adv, mask), [0], **kw)
    ref = _run(R.ppo_policy_loss, (lp.double(), old.double(), adv.double(), mask), [0], **kw)
    ref = (ref[0], ref[1], [g.to(dtype) for g in ref[2]])
    _check(out, ref, dtype, f"{backend} {agg} {clip} {dtype}")
    if clip != "plain":  # the data do reach the clipped branches
        assert out[1]["clipfrac"] > 0


@pytest.mark.parametrize("kl_kind", R.KL_KINDS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_fused_loss_with_entropy_and_kl(backend, kl_kind, agg):
    lp, old, adv, mask = make_policy(5, 29, torch.float32, clip=(0.2, 0.28, 3.0))
    ent = 3 * torch.rand(5, 29)
    ref_lp = lp + 0.2 * torch.randn(5, 29)
    kw = dict(entropy_coef=0.01, kl_coef=0.05, kl_kind=kl_kind, clip_high=0.28, dual_clip=3.0, agg=agg)

    def fused(lp_, old_, adv_, mask_, ent_, ref_, impl):
        return impl(lp_, old_, adv_, mask_, entropy=ent_, ref_logprobs=ref_, **kw)

    out = _run(lambda *a: fused(*a, rlhf_fast.ppo_loss), (lp, old, adv, mask, ent, ref_lp), [0, 4])
    ref = _run(
        lambda *a: fused(*a, R.ppo_loss),
        (lp.double(), old.double(), adv.double(), mask, ent.double(), ref_lp.double()),
        [0, 4],
    )
    ref = (ref[0], ref[1], [g.float() for g in ref[2]])
    _check(out, ref, torch.float32, f"{backend} {kl_kind} {agg}")
    assert out[1]["kl"] != 0 and out[1]["entropy"] > 0


def test_multi_chunk_rows(backend):
    """T > 2048: the Triton kernels split rows into chunks and merge them."""
    lp, old, adv, mask = make_policy(3, 2500, torch.float32, clip=(0.2, None, 3.0))
    ent = torch.rand(3, 2500)
    kw = dict(entropy_coef=0.02, dual_clip=3.0, agg="seq-mean-token-mean")
    out = _run(lambda a, b, c, d, e: rlhf_fast.ppo_loss(a, b, c, d, entropy=e, **kw), (lp, old, adv, mask, ent), [0, 4])
    ref = _run(
        lambda a, b, c, d, e: R.ppo_loss(a, b, c, d, entropy=e, **kw),
        (lp.double(), old.double(), adv.double(), mask, ent.double()),
        [0, 4],
    )
    _check(out, (ref[0], ref[1], [g.float() for g in ref[2]]), torch.float32, backend)


@pytest.mark.skipif(os.environ.get("RLHF_FAST_TEST_GPU") == "1", reason="counts the interpreter's launches (CPU run)")
@pytest.mark.parametrize(
    "correction, launches",
    [
        (None, 1),
        (dict(rollout_is="token", rollout_is_threshold=2.0), 1),
        # the sequence weight must be known before any chunk of its row: one row pass first
        (dict(rollout_is="sequence", rollout_is_threshold=2.0, rollout_rs="seq_sum_k1", rollout_rs_threshold=2.0), 2),
    ],
)
def test_triton_forward_is_one_launch(monkeypatch, correction, launches):
    """The Triton forward's epilogue runs in its last program: one launch
    (plus the row pass of a sequence-level correction), no finish kernel and
    no zero-fill, and its ticket counter is back at 0 after each call, so
    the next call's epilogue runs too (two calls give the same bits, over
    rows split into chunks)."""
    from rlhf_fast.triton import _ppo_common
    from rlhf_fast.triton import ppo_policy_loss as ppl

    names = []
    real = torch.library.wrap_triton

    def counting(kernel):
        names.append(kernel.fn.__name__)
        return real(kernel)

    monkeypatch.setattr(torch.library, "wrap_triton", counting)
    lp, old, adv, mask = make_policy(3, 2500, torch.float32, clip=(0.2, None, 3.0))
    kw = dict(entropy=torch.rand(3, 2500), entropy_coef=0.01)
    if correction:
        kw.update(
            rollout_logprobs=old + 0.01 * torch.randn(3, 2500),
            rollout_correction=rlhf_fast.RolloutCorrection(**correction),
        )
    with rlhf_fast.use_backend("triton"):
        first = rlhf_fast.ppo_loss(lp, old, adv, mask, **kw)
        n_first = len(names)
        second = rlhf_fast.ppo_loss(lp, old, adv, mask, **kw)
    assert n_first == launches and names.count("_ppo_loss_fwd_kernel") == 2, names
    assert all(int(c.item()) == 0 for c in _ppo_common._COUNTERS.values()), _ppo_common._COUNTERS
    assert torch.equal(first[0], second[0]) and torch.isfinite(first[0])
    for k in first[1]:
        assert torch.equal(first[1][k], second[1][k]), k
    assert ppl.fwd_maxnreg(lp, torch.float32, False) == {"maxnreg": 128}


@pytest.mark.gpu
@pytest.mark.parametrize("correction", [None, dict(rollout_is="token", rollout_is_threshold=2.0)])
def test_triton_last_program_epilogue_is_stable_gpu(correction):
    """The memory ordering of the one-launch forward, on a GPU: 50 calls at
    (256, 8192) give the same bits (the fold's order is fixed, so any
    difference is a partial read before it was written), and agree with the
    C++ kernels on the same inputs."""
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(256, 8192, generator=g) * 3
    old = lp + 0.05 * torch.randn(256, 8192, generator=g)
    adv = torch.randn(256, 8192, generator=g)
    mask = torch.rand(256, 8192, generator=g) > 0.1
    kw = dict(entropy=torch.rand(256, 8192, generator=g), entropy_coef=0.01, dual_clip=3.0)
    if correction:
        kw.update(rollout_logprobs=old + 0.01 * torch.randn(256, 8192, generator=g),
                  rollout_correction=rlhf_fast.RolloutCorrection(**correction))  # fmt: skip
    on_gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    with rlhf_fast.use_backend("triton"):
        runs = [rlhf_fast.ppo_loss(lp.cuda(), old.cuda(), adv.cuda(), mask.cuda(), **on_gpu) for _ in range(50)]
    with rlhf_fast.use_backend("cpp"):
        cpu = rlhf_fast.ppo_loss(lp, old, adv, mask, **kw)
    for loss, stats in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and all(torch.equal(stats[k], runs[0][1][k]) for k in stats)
    assert_close(runs[0][0].cpu(), cpu[0], "agree", "loss: triton on GPU vs cpp")
    for k in cpu[1]:
        assert_close(runs[0][1][k].cpu(), cpu[1][k], "agree", f"{k}: triton on GPU vs cpp")


def _exact_exp_point(x: float) -> float:
    """A float64 near x whose exp is the same in libm (C++), numpy (Triton
    interpreter) and torch, so every implementation sees the same ratio."""
    for _ in range(1000):
        e = math.exp(x)
        if float(np.exp(np.float64(x))) == e and torch.exp(torch.tensor(x, dtype=torch.float64)).item() == e:
            return x
        x = math.nextafter(x, math.inf)
    raise AssertionError("no agreeing exp point found")


def test_ratios_exactly_on_clip_boundaries(backend):
    """Ratios exactly at 1 - clip_low, 1 + clip_high and dual_clip (float64,
    so the tie is exact everywhere): clipfrac does not count ties and the
    gradient follows torch (clamp passes at its bounds, max/min split ties)."""
    d_hi, d_lo, d_c = _exact_exp_point(0.18), _exact_exp_point(-0.22), _exact_exp_point(1.2)
    clip_high, clip_low, dual = math.exp(d_hi) - 1, 1 - math.exp(d_lo), math.exp(d_c)
    assert 1 + clip_high == math.exp(d_hi) and 1 - clip_low == math.exp(d_lo)
    B, T = 3, 24
    lp, old, adv, mask = make_policy(B, T, torch.float64, clip=(clip_low, clip_high, dual), empty_rows=())
    old[:, :12] = 0.0
    lp[:, 0:4], lp[:, 4:8], lp[:, 8:12] = d_hi, d_lo, d_c
    adv[:, 0:12:2] = 1.5
    adv[:, 1:12:2] = -2.5
    mask[:, :12] = True
    kw = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual, agg="token-mean")
    out = _run(rlhf_fast.ppo_policy_loss, (lp, old, adv, mask), [0], **kw)
    ref = _run(R.ppo_policy_loss, (lp, old, adv, mask), [0], **kw)
    _check(out, ref, torch.float64, f"{backend} ties")
    n = mask.sum().item()
    g_unclipped = -adv * torch.exp(lp - old) / n
    # the dual-clip tie (A < 0, ratio == dual_clip) gets half the gradient
    assert_close(ref[2][0][:, 9:12:2], 0.5 * g_unclipped[:, 9:12:2], "agree", "half gradient on the boundary")
    # the clip-range ties get the whole unclipped gradient
    assert_close(ref[2][0][:, 0:8], g_unclipped[:, 0:8], "agree", "unclipped gradient")


def test_dual_clip_large_negative_advantages(backend):
    """A << 0 with ratios far above dual_clip: the loss is capped at
    -A * dual_clip, the gradient is 0 and clipfrac_lower counts them."""
    lp, old, adv, mask = make_policy(4, 40, torch.float32, clip=(0.2, None, 3.0), empty_rows=())
    adv[:, :10] = -50.0
    lp[:, :10] = old[:, :10] + torch.linspace(1.5, 4.0, 10)  # ratio 4.5 .. 55 > 3
    mask[:, :10] = True
    kw = dict(dual_clip=3.0, agg="seq-mean-token-sum")
    out = _run(rlhf_fast.ppo_policy_loss, (lp, old, adv, mask), [0], **kw)
    ref = _run(R.ppo_policy_loss, (lp.double(), old.double(), adv.double(), mask), [0], **kw)
    _check(out, (ref[0], ref[1], [g.float() for g in ref[2]]), torch.float32, backend)
    assert torch.all(out[2][0][:, :10] == 0)
    assert out[1]["clipfrac_lower"].double() * mask.sum() >= 40 - 1e-4  # counts, not a rounded ratio


def test_log_ratio_clamped_at_20(backend):
    lp, old, adv, mask = make_policy(2, 16, torch.float64, empty_rows=())
    lp[0, :4] = old[0, :4] + torch.tensor([25.0, -25.0, 20.0, -20.0], dtype=torch.float64)
    out = _run(rlhf_fast.ppo_policy_loss, (lp, old, adv, mask), [0], dual_clip=3.0)
    ref = _run(R.ppo_policy_loss, (lp, old, adv, mask), [0], dual_clip=3.0)
    _check(out, ref, torch.float64, backend)
    assert out[2][0][0, :2].eq(0).all()  # beyond the clamp: no gradient


@pytest.mark.parametrize("pos", [5, 18])  # in the C++ 8-lane body and in its scalar tail (T = 20)
def test_nan_logprob_gives_nan_ratio_max(backend, pos):
    """One rule on every backend: a NaN log-prob at a valid token makes
    ratio_max NaN (the max of a set holding NaN), as the reference; at a
    masked token it is never read."""
    lp, old, adv, mask = make_policy(3, 20, empty_rows=())
    mask[:] = True
    lp[1, pos] = float("nan")
    for fn in (rlhf_fast.ppo_policy_loss, R.ppo_policy_loss):
        _, stats = fn(lp, old, adv, mask)
        assert torch.isnan(stats["ratio_max"]), f"{backend} {fn.__module__}: ratio_max {stats['ratio_max']}"
        assert torch.isnan(stats["ratio_mean"]), f"{backend} {fn.__module__}"
    mask[1, pos] = False
    _, stats = rlhf_fast.ppo_policy_loss(lp, old, adv, mask)
    _, rstats = R.ppo_policy_loss(lp.double(), old.double(), adv.double(), mask)
    assert torch.isfinite(stats["ratio_max"])
    assert_close(stats["ratio_max"], rstats["ratio_max"].float(), "stat", f"{backend} masked NaN")


@pytest.mark.parametrize("agg", AGGS)
def test_all_masked_batch_gives_zero(backend, agg):
    lp, old, adv, _ = make_policy(3, 11)
    mask = torch.zeros(3, 11, dtype=torch.bool)
    lp[0, 0] = float("nan")  # masked garbage is never read into the loss
    loss, stats, (g,) = _run(rlhf_fast.ppo_policy_loss, (lp, old, adv, mask), [0], agg=agg)
    assert loss.item() == 0.0 and torch.all(g == 0)
    assert all(v.item() == 0.0 for v in stats.values())


def test_empty_rows_excluded_from_seq_means(backend):
    lp, old, adv, mask = make_policy(4, 9, torch.float64, empty_rows=(0, 2))
    lp[0] = float("nan")
    old[2] = float("inf")
    for agg in ("seq-mean-token-sum", "seq-mean-token-mean"):
        loss, _, (g,) = _run(rlhf_fast.ppo_policy_loss, (lp, old, adv, mask), [0], agg=agg)
        sub = _run(R.ppo_policy_loss, (lp[[1, 3]], old[[1, 3]], adv[[1, 3]], mask[[1, 3]]), [0], agg=agg)
        assert_close(loss, sub[0], "loss", f"{backend} {agg}")
        assert torch.all(g[[0, 2]] == 0) and torch.isfinite(g).all()


def test_bf16_inputs(backend):
    lp, old, adv, mask = make_policy(4, 33, torch.bfloat16, clip=(0.2, 0.28, 3.0))
    ent = torch.rand(4, 33).bfloat16()
    kw = dict(entropy_coef=0.01, clip_high=0.28, dual_clip=3.0)

    def call(impl, *t):
        return impl(t[0], t[1], t[2], t[3], entropy=t[4], **kw)

    out = _run(lambda *t: call(rlhf_fast.ppo_loss, *t), (lp, old, adv, mask, ent), [0, 4])
    eager = _run(lambda *t: call(R.ppo_loss, *t), (lp, old, adv, mask, ent), [0, 4])
    ref = _run(lambda *t: call(R.ppo_loss, *t), (lp.double(), old.double(), adv.double(), mask, ent.double()), [0, 4])
    assert out[0].dtype == torch.float32
    assert_close(out[0], ref[0], "loss", "bf16 loss")  # fp32 math on the bf16 values
    for g, ge, gr in zip(out[2], eager[2], ref[2]):
        assert g.dtype == torch.bfloat16
        assert_no_worse_than_eager(g, ge, gr, "grad", "bf16 grad")


def test_mask_dtypes_agree(backend):
    lp, old, adv, mask = make_policy(3, 10)
    base = rlhf_fast.ppo_policy_loss(lp, old, adv, mask)[0]
    for m in (mask.to(torch.uint8), mask.float(), mask.long()):
        assert torch.equal(rlhf_fast.ppo_policy_loss(lp, old, adv, m)[0], base)


# ---------------------------------------------------------------- value loss


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", [0.2, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_loss_matches_reference(backend, agg, clip, dtype):
    v, vo, ret, mask = make_value(5, 23, dtype, clip=clip or 0.2)
    out = _run(rlhf_fast.ppo_value_loss, (v, vo, ret, mask), [0], clip=clip, agg=agg)
    ref = _run(R.ppo_value_loss, (v.double(), vo.double(), ret.double(), mask), [0], clip=clip, agg=agg)
    _check(out, (ref[0], ref[1], [g.to(dtype) for g in ref[2]]), dtype, f"{backend} {agg} {clip}")
    if clip is not None:
        assert out[1]["clipfrac"] > 0


def test_value_loss_ties_and_bf16(backend):
    # v on the clip bound (clamp passes, vf1 == vf2) and v outside with
    # vf1 == vf2 (R midway): torch gives 2(v - R) and (v - R) there.
    v = torch.tensor([[1.0, 2.0, 0.3]], dtype=torch.float64)
    vo = torch.tensor([[0.75, 0.0, 0.1]], dtype=torch.float64)
    ret = torch.tensor([[0.5, 1.5, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = _run(rlhf_fast.ppo_value_loss, (v, vo, ret, mask), [0], clip=0.25)
    out2 = _run(rlhf_fast.ppo_value_loss, (v, vo, ret, mask), [0], clip=1.0)
    ref = _run(R.ppo_value_loss, (v, vo, ret, mask), [0], clip=0.25)
    ref2 = _run(R.ppo_value_loss, (v, vo, ret, mask), [0], clip=1.0)
    _check(out, ref, torch.float64, "value ties 0.25")
    _check(out2, ref2, torch.float64, "value ties 1.0")
    assert ref2[2][0][0, 1].item() == pytest.approx(0.5 * 0.5 / 3)  # half of (v - R) / n
    vb, vob, rb, mb = (t.bfloat16() if t.is_floating_point() else t for t in make_value(4, 17))
    o = _run(rlhf_fast.ppo_value_loss, (vb, vob, rb, mb), [0])
    e = _run(R.ppo_value_loss, (vb, vob, rb, mb), [0])
    r = _run(R.ppo_value_loss, (vb.double(), vob.double(), rb.double(), mb), [0])
    assert_close(o[0], r[0], "loss", "bf16 value loss")
    assert_no_worse_than_eager(o[2][0], e[2][0], r[2][0], "grad", "bf16 value grad")


def test_value_loss_all_masked(backend):
    v, vo, ret, _ = make_value(2, 5)
    loss, stats, (g,) = _run(rlhf_fast.ppo_value_loss, (v, vo, ret, torch.zeros(2, 5, dtype=torch.bool)), [0])
    assert loss.item() == 0 and torch.all(g == 0) and all(s.item() == 0 for s in stats.values())


# ---------------------------------------------------------------- KL penalty


@pytest.mark.parametrize("kind", R.KL_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_kl_penalty(backend, kind, dtype):
    lp = (-3 * torch.rand(4, 19, dtype=torch.float64)).to(dtype)
    ref = (lp.double() + torch.randn(4, 19, dtype=torch.float64)).to(dtype)
    ref[0, :4] = (lp[0, :4].double() + torch.tensor([30.0, -30.0, 12.0, 0.0], dtype=torch.float64)).to(dtype)
    ref[1, 0] = lp[1, 0]  # abs at 0: gradient 0, as torch
    g = torch.randn(4, 19)
    a = lp.detach().clone().requires_grad_()
    out = rlhf_fast.kl_penalty(a, ref, kind=kind)
    out.backward(g.to(out.dtype))
    a64 = lp.double().requires_grad_()
    want = R.kl_penalty(a64, ref.double(), kind=kind)
    want.backward(g.double())
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out.detach(), want.detach().to(out.dtype), "value", f"{kind} value")
    assert a.grad.dtype == dtype
    if dtype == torch.bfloat16:
        ae = lp.detach().clone().requires_grad_()
        R.kl_penalty(ae, ref, kind=kind).backward(g)
        assert_no_worse_than_eager(a.grad, ae.grad, a64.grad, "grad", f"{kind} grad")
    else:
        assert_close(a.grad, a64.grad.to(dtype), "grad", f"{kind} grad")


# ---------------------------------------------------------------- autograd / registration


def test_gradcheck(backend):
    lp, old, adv, mask = make_policy(3, 7, torch.float64, clip=(0.2, 0.28, 2.5))
    ent = torch.rand(3, 7, dtype=torch.float64)
    ref = lp + 0.1 * torch.randn(3, 7, dtype=torch.float64)

    def f(lp_, ent_):
        return rlhf_fast.ppo_loss(
            lp_,
            old,
            adv,
            mask,
            entropy=ent_,
            ref_logprobs=ref,
            entropy_coef=0.1,
            kl_coef=0.2,
            clip_high=0.28,
            dual_clip=2.5,
            agg="seq-mean-token-mean",
        )[0]

    assert torch.autograd.gradcheck(f, (lp.requires_grad_(), ent.requires_grad_()), eps=1e-7)
    v, vo, ret, m = make_value(3, 7, torch.float64)
    assert torch.autograd.gradcheck(lambda x: rlhf_fast.ppo_value_loss(x, vo, ret, m)[0], (v.requires_grad_(),))
    for kind in R.KL_KINDS:
        x = lp.detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda y: rlhf_fast.kl_penalty(y, ref, kind=kind), (x,))


def _opcheck_ops(backend):
    sfx = "_triton" if backend == "triton" else ""
    ops = torch.ops.rlhf_fast
    return (
        getattr(ops, f"ppo_loss_fwd{sfx}"),
        getattr(ops, f"ppo_loss_bwd{sfx}"),
        getattr(ops, f"ppo_value_loss_fwd{sfx}"),
        getattr(ops, f"kl_penalty_fwd{sfx}"),
        getattr(ops, f"kl_penalty_bwd{sfx}"),
    )


def _opcheck_all(backend, device="cpu"):
    # Under TRITON_INTERPRET the interpreter launches kernels even on fake
    # tensors (it copies every argument to host), so on CPU the Triton ops
    # get the schema and autograd-registration checks only; the fake-tensor
    # and AOT checks of the Triton ops run in test_opcheck_triton_gpu.
    interp = backend == "triton" and device == "cpu"
    utils = ("test_schema", "test_autograd_registration") if interp else torch.library._OPCHECK_DEFAULT_UTILS

    def opcheck(op, args):
        torch.library.opcheck(op, args, test_utils=utils)

    fwd, bwd, vfwd, kfwd, kbwd = _opcheck_ops(backend)
    lp, old, adv, mask = (t.to(device) for t in make_policy(3, 8, clip=(0.2, None, 3.0)))
    ent, ref = torch.rand(3, 8, device=device), lp + 0.1
    lp.requires_grad_()
    ent.requires_grad_()
    args = (lp, old, adv, mask, ent, ref, 0.01, 0.1, "k3", 0.2, 0.28, 3.0, "seq-mean-token-mean", 8.0)
    opcheck(fwd, args)
    opcheck(fwd, (lp, old, adv, mask, None, None, 0.0, 0.0, "k1", 0.2, 0.2, None, "token-mean", 8.0))
    _, _, dtok, rs, _ = fwd(*args)
    opcheck(bwd, (torch.tensor(1.5, device=device), dtok, rs, mask, 0.01, True, torch.float32, torch.float32))
    opcheck(bwd, (torch.tensor(1.5, device=device), dtok, rs, mask, 0.0, False, torch.bfloat16, torch.float32))
    v, vo, ret, vm = (t.to(device) for t in make_value(3, 8))
    opcheck(vfwd, (v.requires_grad_(), vo, ret, vm, 0.2, "token-mean", 8.0))
    opcheck(vfwd, (v, vo, ret, vm, None, "seq-mean-token-sum-norm", 3.0))
    opcheck(kfwd, (lp, ref, "k3"))
    opcheck(kbwd, (torch.randn(3, 8, device=device), lp.detach(), ref, "abs"))


def test_opcheck(backend):
    _opcheck_all(backend)


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", ["triton"])
def test_opcheck_triton_gpu(gpu_backend):
    _opcheck_all(gpu_backend, device="cuda")


def test_torch_compile_fullgraph():
    lp, old, adv, mask = make_policy(4, 16, clip=(0.2, 0.28, 3.0))
    ent, ref = torch.rand(4, 16), lp + 0.1 * torch.randn(4, 16)

    def step(lp_, ent_):
        loss, stats = rlhf_fast.ppo_loss(
            lp_,
            old,
            adv,
            mask,
            entropy=ent_,
            ref_logprobs=ref,
            entropy_coef=0.01,
            kl_coef=0.1,
            clip_high=0.28,
            dual_clip=3.0,
        )
        vloss, _ = rlhf_fast.ppo_value_loss(lp_, old, adv, mask)
        return loss + 0.5 * vloss, stats["clipfrac"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a, e = lp.clone().requires_grad_(), ent.clone().requires_grad_()
    out, cf = compiled(a, e)
    out.backward()
    b, f = lp.clone().requires_grad_(), ent.clone().requires_grad_()
    want, wcf = step(b, f)
    want.backward()
    assert torch.equal(out, want) and torch.equal(cf, wcf)
    assert torch.equal(a.grad, b.grad) and torch.equal(e.grad, f.grad)


def test_cpp_deterministic_across_threads():
    lp, old, adv, mask = make_policy(64, 300, clip=(0.2, None, 3.0))
    with rlhf_fast.use_backend("cpp"):
        prev = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = _run(rlhf_fast.ppo_policy_loss, (lp, old, adv, mask), [0], dual_clip=3.0)
            torch.set_num_threads(max(2, prev))
            many = _run(rlhf_fast.ppo_policy_loss, (lp, old, adv, mask), [0], dual_clip=3.0)
        finally:
            torch.set_num_threads(prev)
    assert torch.equal(one[0], many[0]) and torch.equal(one[2][0], many[2][0])
    assert all(torch.equal(one[1][k], many[1][k]) for k in one[1])


def test_cpp_large_shape():
    lp, old, adv, mask = make_policy(64, 4096, clip=(0.2, 0.28, 3.0))
    ent = torch.rand(64, 4096)
    kw = dict(entropy_coef=0.01, clip_high=0.28, dual_clip=3.0, agg="seq-mean-token-mean")
    with rlhf_fast.use_backend("cpp"):
        out = _run(
            lambda a, b, c, d, e: rlhf_fast.ppo_loss(a, b, c, d, entropy=e, **kw), (lp, old, adv, mask, ent), [0, 4]
        )
    ref = _run(
        lambda a, b, c, d, e: R.ppo_loss(a, b, c, d, entropy=e, **kw),
        (lp.double(), old.double(), adv.double(), mask, ent.double()),
        [0, 4],
    )
    _check(out, (ref[0], ref[1], [g.float() for g in ref[2]]), torch.float32, "cpp (64, 4096)")


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_empty_inputs(backend, shape):
    z = torch.zeros(shape)
    loss, stats = rlhf_fast.ppo_loss(z, z, z, z.bool(), entropy=z, entropy_coef=0.1)
    assert loss.item() == 0 and all(v.item() == 0 for v in stats.values())
    assert rlhf_fast.ppo_value_loss(z, z, z, z.bool())[0].item() == 0
    assert rlhf_fast.kl_penalty(z, z).shape == shape


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (4, 37)])
def test_forward_writes_every_output_element(backend, shape):
    """The Triton launchers allocate loss and stats uninitialised (no
    zero-fill launch): the finish kernels must write every element, the
    rollout_corr/* slots included when there is no correction, and an
    early return must zero them. torch.empty gives NaN here (deterministic
    mode fills uninitialised memory), so a missed element shows."""
    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(shape, generator=g)
    old, adv = lp + 0.1 * torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.3
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        loss, stats, *_ = torch.ops.rlhf_fast.ppo_loss_fwd(
            lp, old, adv, mask, None, None, 0.0, 0.0, "k3", 0.2, 0.2, None, "token-mean", 1.0
        )
        if backend == "triton":
            loss_t, stats_t, *_ = torch.ops.rlhf_fast.ppo_loss_fwd_triton(
                lp, old, adv, mask, None, None, 0.0, 0.0, "k3", 0.2, 0.2, None, "token-mean", 1.0
            )
            assert torch.isfinite(loss_t) and torch.isfinite(stats_t).all(), stats_t
            assert_close(stats_t, stats, "stat", f"triton stats {shape}")
            v_loss, v_stats, *_ = torch.ops.rlhf_fast.ppo_value_loss_fwd_triton(
                lp, old, adv, mask, 0.2, "token-mean", 1.0
            )
            assert torch.isfinite(v_loss) and torch.isfinite(v_stats).all(), v_stats
        assert torch.isfinite(loss) and torch.isfinite(stats).all(), stats
        assert (stats[8:] == 0).all()  # no rollout correction: its metrics read 0
    finally:
        torch.use_deterministic_algorithms(prev)


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise():
    lp, old, adv, mask = make_policy(2, 5)
    bad = [
        (lambda: rlhf_fast.ppo_policy_loss(lp, old[:, :4], adv, mask), ValueError, "old_logprobs must have the shape"),
        (lambda: rlhf_fast.ppo_policy_loss(lp, old, adv, mask[:, :4]), ValueError, "mask must have the shape"),
        (lambda: rlhf_fast.ppo_policy_loss(lp[0], old[0], adv[0], mask[0]), ValueError, "must be 2-D"),
        (lambda: rlhf_fast.ppo_policy_loss(lp, old, adv, mask, clip_low=0.0), ValueError, "clip_low"),
        (lambda: rlhf_fast.ppo_policy_loss(lp, old, adv, mask, clip_high=-0.1), ValueError, "clip_high"),
        (lambda: rlhf_fast.ppo_policy_loss(lp, old, adv, mask, dual_clip=1.0), ValueError, "dual_clip"),
        (lambda: rlhf_fast.ppo_policy_loss(lp, old, adv, mask, agg="mean"), ValueError, "agg must be one of"),
        (lambda: rlhf_fast.ppo_policy_loss(lp, old, adv, mask, agg_norm=0), ValueError, "agg_norm"),
        (lambda: rlhf_fast.ppo_policy_loss(lp.long(), old, adv, mask), TypeError, "logprobs must have dtype"),
        (lambda: rlhf_fast.ppo_loss(lp, old, adv, mask, kl_coef=0.1), ValueError, "needs ref_logprobs"),
        (lambda: rlhf_fast.ppo_loss(lp, old, adv, mask, entropy_coef=0.1), ValueError, "needs entropy"),
        (lambda: rlhf_fast.ppo_loss(lp, old, adv, mask, ref_logprobs=lp, kl_kind="k4"), ValueError, "kind"),
        (lambda: rlhf_fast.ppo_loss(lp, old, adv, mask, kl_coef=float("nan"), ref_logprobs=lp), ValueError, "finite"),
        (lambda: rlhf_fast.kl_penalty(lp, old, kind="mse2"), ValueError, "kind must be one of"),
        (lambda: rlhf_fast.kl_penalty(lp, old[:1]), ValueError, "ref_logprobs must have the shape"),
        (lambda: rlhf_fast.ppo_value_loss(lp, old, adv, mask, clip=0.0), ValueError, "clip"),
        (lambda: rlhf_fast.ppo_value_loss(lp, old, adv, mask, agg="sum"), ValueError, "agg must be one of"),
        (lambda: rlhf_fast.ppo_value_loss(lp, old, adv[:1], mask), ValueError, "returns must have the shape"),
    ]
    for fn, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            fn()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_gpu_triton_matches_reference(dtype, agg):
    """The compiled Triton kernels on CUDA, multi-chunk rows, against the fp64 reference on CPU."""
    lp, old, adv, mask = make_policy(8, 5000, dtype, clip=(0.2, 0.28, 3.0))
    ent, ref_lp = torch.rand(8, 5000).to(dtype), (lp.float() + 0.2 * torch.randn(8, 5000)).to(dtype)
    kw = dict(entropy_coef=0.01, kl_coef=0.05, clip_high=0.28, dual_clip=3.0, agg=agg)

    def call(impl, t):
        return impl(t[0], t[1], t[2], t[3], entropy=t[4], ref_logprobs=t[5], **kw)

    cpu = (lp, old, adv, mask, ent, ref_lp)
    with rlhf_fast.use_backend("triton"):
        out = _run(lambda *t: call(rlhf_fast.ppo_loss, t), tuple(x.cuda() for x in cpu), [0, 4])
    ref = _run(lambda *t: call(R.ppo_loss, t), tuple(x.double() if x.is_floating_point() else x for x in cpu), [0, 4])
    eager = _run(lambda *t: call(R.ppo_loss, t), cpu, [0, 4])
    assert_close(out[0].cpu(), ref[0], "loss", "gpu loss")
    for k in out[1]:
        assert_close(out[1][k].cpu(), ref[1][k].float(), "stat", f"gpu stat {k}")
    for g, ge, gr in zip(out[2], eager[2], ref[2]):
        if dtype == torch.float32:
            assert_close(g.cpu(), gr.float(), "grad", "gpu grad")
        else:
            assert_no_worse_than_eager(g.cpu(), ge, gr, "grad", "gpu bf16 grad")
    v, vo, ret, vm = make_value(8, 5000, dtype)
    with rlhf_fast.use_backend("triton"):
        vout = _run(rlhf_fast.ppo_value_loss, (v.cuda(), vo.cuda(), ret.cuda(), vm.cuda()), [0], agg=agg)
    vref = _run(R.ppo_value_loss, (v.double(), vo.double(), ret.double(), vm), [0], agg=agg)
    assert_close(vout[0].cpu(), vref[0], "loss", "gpu value loss")
    assert_close(
        torch.stack([vout[1][k].cpu() for k in sorted(vout[1])]),
        torch.stack([vref[1][k].float() for k in sorted(vref[1])]),
        "stat",
        "gpu value stats",
    )
