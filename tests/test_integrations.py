"""rlhf_fast.integrations: patched TRL / verl / OpenRLHF functions against the originals.

TRL is installed: its real functions are the oracle, including through the names
its trainers imported. verl and OpenRLHF need Ray / DeepSpeed / vLLM to import;
their functions are re-implemented from their documented semantics in
tests/integrations_ref/ and planted in sys.modules under the real module paths,
so patch() runs exactly as against the installed packages. Tests against the
real verl / OpenRLHF run whenever those import.
"""
import importlib
import inspect
import logging
import sys
import types

import pytest
import torch
from _compare import assert_close, assert_no_worse_than_eager

import rlhf_fast.integrations.openrlhf as rf_openrlhf
import rlhf_fast.integrations.trl as rf_trl
import rlhf_fast.integrations.verl as rf_verl

# ======================================================================== TRL

TRL_TRAINERS = ("trl.experimental.cpo.cpo_trainer", "trl.experimental.a2po.a2po_trainer", "trl.experimental.tpo.tpo_trainer")


@pytest.fixture(scope="module")
def trl_mods():
    utils = importlib.import_module("trl.trainer.utils")
    trainers = [importlib.import_module(m) for m in TRL_TRAINERS]
    originals = {
        n: getattr(utils, n) for n in ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")
    }
    yield utils, trainers, originals
    rf_trl.unpatch()


@pytest.fixture
def trl_patched(trl_mods):
    rf_trl.patch()
    yield trl_mods
    rf_trl.unpatch()


def test_trl_patch_lists_trainer_names_and_unpatch_restores(trl_mods):
    utils, (cpo, a2po, tpo), orig = trl_mods
    names = rf_trl.patch()
    try:
        for n in ("trl.trainer.utils.selective_log_softmax", "trl.trainer.utils.entropy_from_logits",
                  "trl.experimental.cpo.cpo_trainer.selective_log_softmax",
                  "trl.experimental.a2po.a2po_trainer.selective_log_softmax",
                  "trl.experimental.tpo.tpo_trainer.selective_log_softmax_and_entropy"):  # fmt: skip
            assert n in names, n
        assert cpo.selective_log_softmax is utils.selective_log_softmax is not orig["selective_log_softmax"]
        assert tpo.selective_log_softmax_and_entropy is not orig["selective_log_softmax_and_entropy"]
        for n, f in orig.items():
            assert inspect.signature(getattr(utils, n)) == inspect.signature(f)
        assert rf_trl.patch() == names  # idempotent
    finally:
        restored = rf_trl.unpatch()
    assert restored == names
    assert cpo.selective_log_softmax is orig["selective_log_softmax"]
    assert a2po.selective_log_softmax is orig["selective_log_softmax"]
    assert tpo.selective_log_softmax_and_entropy is orig["selective_log_softmax_and_entropy"]
    for n, f in orig.items():
        assert getattr(utils, n) is f
    with rf_trl.patched() as names2:
        assert names2 == names and cpo.selective_log_softmax is not orig["selective_log_softmax"]
    assert cpo.selective_log_softmax is orig["selective_log_softmax"]


def _logits(shape, dtype, requires_grad=True):
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    return x.requires_grad_(requires_grad)


def _run(fn, logits, *args, **kw):
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    g = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
    sum((o.double() * gi).sum() for o, gi in zip(outs, g) if o.requires_grad).backward()
    return outs, x.grad, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("row_mask", [False, True])
def test_trl_selective_log_softmax_matches_original(trl_patched, dtype, temperature, row_mask):
    utils, (cpo, *_), orig = trl_patched
    B, T, V = 3, 5, 1003
    logits = _logits((B, T, V), dtype)
    index = torch.randint(0, V, (B, T))
    kw = {"temperature": temperature}
    if row_mask:
        kw["row_mask"] = torch.rand(B, T) > 0.3
    before = logits.detach().clone()
    (ours,), g_ours, _ = _run(cpo.selective_log_softmax, logits, index, **kw)
    torch.manual_seed(1)
    (theirs,), g_theirs, _ = _run(orig["selective_log_softmax"], logits, index, **kw)
    assert torch.equal(logits.detach(), before)  # never mutates: TRL divides out of place
    assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape
    if dtype == torch.bfloat16:  # TRL's own bf16 log_softmax rounds; compare both to float64
        (ref,), g_ref, _ = _run(orig["selective_log_softmax"], logits.double(), index, **kw)
        assert_no_worse_than_eager(ours.detach().double(), theirs.detach().double(), ref.detach(), "bf16 logp")
        return
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert_close(ours.detach().double(), theirs.detach().double(), tol, "logp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trl_gradients_match(trl_patched, dtype):
    utils, (cpo, *_), orig = trl_patched
    logits = _logits((4, 6, 257), dtype)
    index = torch.randint(0, 257, (4, 6))
    mask = torch.rand(4, 6) > 0.25
    g = torch.randn(4, 6, dtype=dtype)
    grads = []
    for fn in (cpo.selective_log_softmax, orig["selective_log_softmax"]):
        x = logits.detach().clone().requires_grad_(True)
        (fn(x, index, temperature=0.8, row_mask=mask) * g).sum().backward()
        grads.append(x.grad)
    assert_close(grads[0].double(), grads[1].double(), 1e-12 if dtype == torch.float64 else 5e-6, "dlogits")
    ge = []
    for fn in (utils.entropy_from_logits, orig["entropy_from_logits"]):
        x = logits.detach().clone().requires_grad_(True)
        (fn(x) * g).sum().backward()
        ge.append(x.grad)
    assert_close(ge[0].double(), ge[1].double(), 1e-11 if dtype == torch.float64 else 5e-5, "d entropy / dlogits")


@pytest.mark.parametrize("entropy_requires_grad", [True, False])
def test_trl_logprob_and_entropy(trl_patched, entropy_requires_grad):
    utils, (_, _, tpo), orig = trl_patched
    logits = _logits((2, 7, 311), torch.float32)
    index = torch.randint(0, 311, (2, 7))
    mask = torch.rand(2, 7) > 0.3
    kw = dict(entropy_requires_grad=entropy_requires_grad, temperature=1.3, row_mask=mask)
    lp, ent = tpo.selective_log_softmax_and_entropy(logits, index, **kw)
    lp0, ent0 = orig["selective_log_softmax_and_entropy"](logits, index, **kw)
    assert lp.dtype == lp0.dtype and ent.dtype == ent0.dtype
    assert ent.requires_grad == ent0.requires_grad == entropy_requires_grad
    assert_close(lp.detach().double(), lp0.detach().double(), 2e-6, "logp")
    assert_close(ent.detach().double(), ent0.detach().double(), 2e-5, "entropy")
    e1, e0 = utils.entropy_from_logits(logits.to(torch.bfloat16)), orig["entropy_from_logits"](logits.to(torch.bfloat16))
    assert e1.dtype == e0.dtype == torch.bfloat16
    ref = orig["entropy_from_logits"](logits.double())
    assert_no_worse_than_eager(e1.detach().double(), e0.detach().double(), ref.detach(), "bf16 entropy")


def test_trl_falls_back_for_uncovered_arguments(trl_patched, caplog):
    utils, _, orig = trl_patched
    logits = _logits((2, 3, 50), torch.float32, requires_grad=False)
    topk = torch.randint(0, 50, (2, 3, 4))  # (..., K): TRL gathers K per row; our kernel takes one label
    with caplog.at_level(logging.WARNING, logger="rlhf_fast.integrations"):
        out = utils.selective_log_softmax(logits, topk)
        utils.selective_log_softmax(logits, topk)
    assert torch.equal(out, orig["selective_log_softmax"](logits, topk))
    msgs = [r.getMessage() for r in caplog.records if "selective_log_softmax" in r.getMessage()]
    assert len(msgs) == 1 and "(..., K)" in msgs[0], msgs  # said once
    with pytest.raises(ValueError, match="temperature must be positive"):
        utils.selective_log_softmax(logits, topk[..., 0], temperature=0.0)
    with pytest.raises(ValueError, match="outside"):  # a bad label still raises, and is not silently ignored
        utils.selective_log_softmax(logits, torch.full((2, 3), -100))


# ======================================================================== planting oracles


def _plant(mapping):
    saved = {n: sys.modules.get(n) for n in mapping}
    for name, mod in mapping.items():
        sys.modules[name] = mod
    return saved


def _restore(saved):
    for name, mod in saved.items():
        if mod is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = mod


def _pkg(name):
    m = types.ModuleType(name)
    m.__path__ = []
    return m


@pytest.fixture
def fake_verl():
    tf = importlib.import_module("integrations_ref.verl_torch_functional")
    core = importlib.import_module("integrations_ref.verl_core_algos")
    actor = types.ModuleType("verl.workers.actor.dp_actor")  # a trainer that imported by name
    actor.kl_penalty, actor.agg_loss, actor.logprobs_from_logits = core.kl_penalty, core.agg_loss, tf.logprobs_from_logits
    mods = {n: _pkg(n) for n in ("verl", "verl.utils", "verl.trainer", "verl.trainer.ppo", "verl.workers", "verl.workers.actor")}
    mods.update({"verl.utils.torch_functional": tf, "verl.trainer.ppo.core_algos": core, "verl.workers.actor.dp_actor": actor})
    saved = _plant(mods)
    orig = {n: getattr(core, n) for n in ("compute_gae_advantage_return", "compute_policy_loss",
                                          "compute_policy_loss_vanilla", "kl_penalty")}  # fmt: skip
    orig.update(logprobs_from_logits=tf.logprobs_from_logits, entropy_from_logits=tf.entropy_from_logits)
    try:
        yield tf, core, actor, orig
    finally:
        rf_verl.unpatch()
        _restore(saved)


def test_verl_patch_covers_registries_and_by_name_imports(fake_verl):
    tf, core, actor, orig = fake_verl
    names = rf_verl.patch()
    assert "verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY['vanilla']" in names
    assert "verl.trainer.ppo.core_algos.ADV_ESTIMATOR_REGISTRY['gae']" in names
    assert "verl.workers.actor.dp_actor.kl_penalty" in names and "verl.workers.actor.dp_actor.logprobs_from_logits" in names
    assert "verl.trainer.ppo.core_algos.agg_loss" not in names  # deliberately not replaced
    assert core.get_policy_loss_fn("vanilla") is core.compute_policy_loss_vanilla is not orig["compute_policy_loss_vanilla"]
    assert core.ADV_ESTIMATOR_REGISTRY["gae"] is core.compute_gae_advantage_return
    assert actor.kl_penalty is core.kl_penalty is not orig["kl_penalty"]
    rf_verl.unpatch()
    assert core.get_policy_loss_fn("vanilla") is orig["compute_policy_loss_vanilla"]
    assert core.ADV_ESTIMATOR_REGISTRY["gae"] is orig["compute_gae_advantage_return"]
    assert actor.kl_penalty is orig["kl_penalty"] and tf.logprobs_from_logits is orig["logprobs_from_logits"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verl_logprobs_and_entropy(fake_verl, dtype):
    tf, _, actor, orig = fake_verl
    rf_verl.patch()
    logits = _logits((3, 9, 1003), dtype)
    labels = torch.randint(0, 1003, (3, 9))
    (lp,), g_lp, gs = _run(actor.logprobs_from_logits, logits, labels)
    (lp0,), g_lp0, _ = _run(orig["logprobs_from_logits"], logits, labels)
    (ent,), _, _ = _run(tf.entropy_from_logits, logits)
    (ent0,), _, _ = _run(orig["entropy_from_logits"], logits)
    assert lp.dtype == lp0.dtype == dtype and ent.dtype == ent0.dtype == dtype
    if dtype == torch.float32:
        assert_close(lp.detach().double(), lp0.detach().double(), 2e-6, "logp")
        assert_close(ent.detach().double(), ent0.detach().double(), 2e-5, "entropy")
        x = logits.detach().clone().requires_grad_(True)
        (orig["logprobs_from_logits"](x, labels) * gs[0].float()).sum().backward()
        assert_close(g_lp.double(), x.grad.double(), 5e-6, "dlogits")
    else:
        ref = orig["logprobs_from_logits"](logits.double(), labels).detach()
        assert_no_worse_than_eager(lp.detach().double(), lp0.detach().double(), ref, "bf16 logp")
    tf.FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE = True  # verl would take flash-attn's CE: fp32 out
    try:
        assert actor.logprobs_from_logits(logits, labels).dtype == torch.float32
    finally:
        tf.FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE = False


def _mask(B, T, holes=True):
    lengths = torch.randint(1, T + 1, (B,))
    m = (torch.arange(T) < lengths[:, None]).long()
    if holes:  # multi-turn observation tokens inside the response
        m = m * (torch.rand(B, T) > 0.2).long()
        m[:, 0] = 1
    return m


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_verl_gae_matches_every_position(fake_verl, gamma, lam):
    _, core, _, orig = fake_verl
    rf_verl.patch()
    B, T = 6, 37
    r, v, m = torch.randn(B, T), torch.randn(B, T), _mask(B, T)
    adv, ret = core.ADV_ESTIMATOR_REGISTRY["gae"](r, v, m, gamma, lam)
    adv0, ret0 = orig["compute_gae_advantage_return"](r, v, m, gamma, lam)
    assert adv.dtype == adv0.dtype and ret.dtype == ret0.dtype and not adv.requires_grad
    torch.testing.assert_close(ret, ret0, rtol=1e-5, atol=1e-5)  # masked positions included
    torch.testing.assert_close(adv, adv0, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="bool"):  # verl's `1 - mask` raises on a bool mask; so does the patched function
        core.compute_gae_advantage_return(r, v, m.bool(), gamma, lam)


class _Cfg(dict):
    __getattr__ = dict.__getitem__


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("clips", [(0.2, None, 3.0), (0.2, 0.28, 3.0), (0.1, 0.3, 1.5)])
def test_verl_policy_loss_matches(fake_verl, mode, clips):
    _, core, _, orig = fake_verl
    rf_verl.patch()
    B, T = 5, 33
    old = -torch.rand(B, T) * 3
    lp0 = old + torch.randn(B, T) * 0.4
    adv = torch.randn(B, T)
    m = _mask(B, T)
    if mode != "seq-mean-token-mean":
        m[2] = 0  # an empty row: verl's seq-mean-token-sum still counts it
    low, high, c = clips
    outs = []
    for fn in (core.compute_policy_loss, orig["compute_policy_loss"]):
        lp = lp0.clone().requires_grad_(True)
        res = fn(old, lp, adv, m, cliprange=low, cliprange_high=high, clip_ratio_c=c, loss_agg_mode=mode)
        res[0].backward()
        outs.append((res, lp.grad))
    (r1, g1), (r0, g0) = outs
    for a, b, name in zip(r1, r0, ("pg_loss", "clipfrac", "ppo_kl", "clipfrac_lower")):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(g1, g0, rtol=2e-5, atol=1e-7)
    cfg = _Cfg(clip_ratio=low, clip_ratio_low=None, clip_ratio_high=high, clip_ratio_c=c)
    v1 = core.get_policy_loss_fn("vanilla")(old, lp0, adv, m, loss_agg_mode=mode, config=cfg)
    v0 = orig["compute_policy_loss_vanilla"](old, lp0, adv, m, loss_agg_mode=mode, config=cfg)
    for a, b in zip(v1, v0):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


def test_verl_policy_loss_fallbacks(fake_verl, caplog):
    _, core, _, orig = fake_verl
    rf_verl.patch()
    old, lp, adv, m = -torch.rand(3, 8), -torch.rand(3, 8), torch.randn(3, 8), _mask(3, 8)
    m[1] = 0
    with caplog.at_level(logging.WARNING, logger="rlhf_fast.integrations"):
        out = core.compute_policy_loss(old, lp, adv, m, cliprange=0.2, loss_agg_mode="seq-mean-token-mean")
    assert torch.isnan(out[0])  # verl's 0/0 on the empty row, reproduced by falling back
    assert any("seq-mean-token-mean" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        core.compute_policy_loss(old, lp, adv, m, cliprange=0.2, loss_agg_mode="token-mean-unbiased")


@pytest.mark.parametrize("kind", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"])
def test_verl_kl_penalty(fake_verl, kind):
    _, core, actor, orig = fake_verl
    rf_verl.patch()
    ref = -torch.rand(4, 17) * 4
    lp0 = ref + torch.randn(4, 17) * 3  # wide enough for k3's clamps to bite
    res = []
    for fn in (actor.kl_penalty, orig["kl_penalty"]):
        lp = lp0.clone().requires_grad_(True)
        out = fn(lp, ref, kind)
        out.sum().backward()
        res.append((out, lp.grad))
    assert res[0][0].dtype == res[1][0].dtype
    torch.testing.assert_close(res[0][0].detach(), res[1][0].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError):
        actor.kl_penalty(lp0, ref, "full")


# ======================================================================== OpenRLHF


@pytest.fixture
def fake_openrlhf():
    utils = importlib.import_module("integrations_ref.openrlhf_utils")
    loss = importlib.import_module("integrations_ref.openrlhf_loss")
    em = importlib.import_module("integrations_ref.openrlhf_experience_maker")
    actor = types.ModuleType("openrlhf.models.actor")
    actor.log_probs_from_logits = utils.log_probs_from_logits
    mods = {n: _pkg(n) for n in ("openrlhf", "openrlhf.models", "openrlhf.trainer", "openrlhf.trainer.ppo_utils")}
    mods.update({"openrlhf.models.utils": utils, "openrlhf.models.loss": loss, "openrlhf.models.actor": actor,
                 "openrlhf.trainer.ppo_utils.experience_maker": em})  # fmt: skip
    saved = _plant(mods)
    orig = dict(log_probs_from_logits=utils.log_probs_from_logits, compute_approx_kl=utils.compute_approx_kl,
                policy=loss.PolicyLoss.forward, value=loss.ValueLoss.forward,
                gae=em.ExperienceMaker.get_advantages_and_returns)  # fmt: skip
    try:
        yield utils, loss, em, actor, orig
    finally:
        rf_openrlhf.unpatch()
        _restore(saved)


def test_openrlhf_patch_and_unpatch(fake_openrlhf):
    utils, loss, em, actor, orig = fake_openrlhf
    names = rf_openrlhf.patch()
    for n in ("openrlhf.models.utils.log_probs_from_logits", "openrlhf.models.actor.log_probs_from_logits",
              "openrlhf.models.loss.PolicyLoss.forward", "openrlhf.models.loss.ValueLoss.forward",
              "openrlhf.trainer.ppo_utils.experience_maker.ExperienceMaker.get_advantages_and_returns"):  # fmt: skip
        assert n in names, n
    assert em.RemoteExperienceMaker.get_advantages_and_returns is not orig["gae"]  # inherited
    rf_openrlhf.unpatch()
    assert loss.PolicyLoss.forward is orig["policy"] and actor.log_probs_from_logits is orig["log_probs_from_logits"]
    assert em.ExperienceMaker.get_advantages_and_returns is orig["gae"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_openrlhf_log_probs_mutates_like_original(fake_openrlhf, dtype, temperature):
    utils, _, _, actor, orig = fake_openrlhf
    rf_openrlhf.patch()
    base = (torch.randn(2, 11, 500) * 2).to(dtype)
    labels = torch.randint(0, 500, (2, 11))
    a, b = base.clone(), base.clone()
    lp = actor.log_probs_from_logits(a, labels, temperature=temperature)
    lp0 = orig["log_probs_from_logits"](b, labels, temperature=temperature)
    assert torch.equal(a, b)  # the logits were divided in place, exactly as OpenRLHF does
    assert lp.dtype == lp0.dtype == dtype
    if dtype == torch.float32:
        assert_close(lp.double(), lp0.double(), 2e-6, "logp")
    else:
        ref = orig["log_probs_from_logits"](b.double(), labels)
        assert_no_worse_than_eager(lp.double(), lp0.double(), ref, "bf16 logp")


def test_openrlhf_approx_kl(fake_openrlhf, caplog):
    utils, _, _, _, orig = fake_openrlhf
    rf_openrlhf.patch()
    lp, base = -torch.rand(3, 9).to(torch.bfloat16), -torch.rand(3, 9).to(torch.bfloat16)
    for k in ("k1", "k2"):
        out, out0 = utils.compute_approx_kl(lp, base, kl_estimator=k), orig["compute_approx_kl"](lp, base, kl_estimator=k)
        assert out.dtype == out0.dtype == torch.float32
        torch.testing.assert_close(out, out0, rtol=1e-6, atol=1e-7)
    big = torch.full((1, 2), -30.0)
    with caplog.at_level(logging.WARNING, logger="rlhf_fast.integrations"):
        k3 = utils.compute_approx_kl(torch.zeros(1, 2), big, kl_estimator="k3")
    assert torch.equal(k3, orig["compute_approx_kl"](torch.zeros(1, 2), big, kl_estimator="k3"))  # unclamped, as OpenRLHF
    assert any("k3" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("with_mask", [True, False])
def test_openrlhf_policy_loss(fake_openrlhf, dual_clip, token_level, with_mask):
    _, loss_mod, _, _, orig = fake_openrlhf
    rf_openrlhf.patch()
    crit = loss_mod.PolicyLoss(0.2, 0.28, dual_clip=dual_clip, token_level_loss=token_level)
    B, T = 4, 21
    old = -torch.rand(B, T) * 3
    lp0 = old + torch.randn(B, T) * 0.5
    adv = torch.randn(B, T)
    mask = _mask(B, T).bool() if with_mask else None
    res = []
    for fwd in (crit.forward, lambda *a: orig["policy"](crit, *a)):
        lp = lp0.clone().requires_grad_(True)
        out = fwd(lp, old, adv, mask)
        out[0].backward()
        res.append((out, lp.grad))
    (o1, g1), (o0, g0) = res
    assert len(o1) == len(o0) == 3
    for a, b in zip(o1, o0):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=2e-5, atol=1e-7)
    lp_far = lp0.clone()
    lp_far[0, 0] = old[0, 0] + 25  # our op clamps log-ratios at 20: falls back to keep OpenRLHF's number
    torch.testing.assert_close(crit(lp_far, old, adv, mask)[0], orig["policy"](crit, lp_far, old, adv, mask)[0])


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("token_level", [True, False])
def test_openrlhf_value_loss(fake_openrlhf, clip_eps, token_level):
    _, loss_mod, _, _, orig = fake_openrlhf
    rf_openrlhf.patch()
    crit = loss_mod.ValueLoss(clip_eps=clip_eps, token_level_loss=token_level)
    B, T = 4, 19
    old, ret, m = torch.randn(B, T), torch.randn(B, T), _mask(B, T).bool()
    v0 = old + torch.randn(B, T) * 0.4
    res = []
    for fwd in (crit.forward, lambda *a: orig["value"](crit, *a)):
        v = v0.clone().requires_grad_(True)
        out = fwd(v, old, ret, m)
        out.backward()
        res.append((out, v.grad))
    torch.testing.assert_close(res[0][0].detach(), res[1][0].detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(res[0][1], res[1][1], rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("holes", [False, True])
def test_openrlhf_gae(fake_openrlhf, holes):
    _, _, em, _, orig = fake_openrlhf
    rf_openrlhf.patch()
    maker = em.RemoteExperienceMaker()
    B, T = 5, 29
    v, r, m = torch.randn(B, T), torch.randn(B, T), _mask(B, T, holes=holes).bool()
    adv, ret = maker.get_advantages_and_returns(v, r, m, 1.0, 0.95)
    adv0, ret0 = orig["gae"](maker, v, r, m, 1.0, 0.95)
    torch.testing.assert_close(adv, adv0, rtol=1e-5, atol=1e-5)  # holes decay the carry, as OpenRLHF
    torch.testing.assert_close(ret, ret0, rtol=1e-5, atol=1e-5)
    adv_l, _ = maker.get_advantages_and_returns([v[0], v[1, :7]], [r[0], r[1, :7]], None, 0.99, 0.9)
    adv_l0, _ = orig["gae"](maker, [v[0], v[1, :7]], [r[0], r[1, :7]], None, 0.99, 0.9)
    for a, b in zip(adv_l, adv_l0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ======================================================================== the real packages, when importable


def _importable(path):
    try:
        importlib.import_module(path)
        return None
    except Exception as e:  # ImportError, or Ray / DeepSpeed / vLLM missing underneath
        return f"{path} does not import here ({type(e).__name__}: {e}); it needs Ray / DeepSpeed / vLLM"


def test_real_verl_when_importable():
    why = _importable("verl.trainer.ppo.core_algos")
    if why:
        pytest.skip(why)
    core = importlib.import_module("verl.trainer.ppo.core_algos")
    gae0, kl0 = core.compute_gae_advantage_return, core.kl_penalty
    with rf_verl.patched() as names:
        assert "verl.trainer.ppo.core_algos.compute_gae_advantage_return" in names
        r, v, m = torch.randn(4, 16), torch.randn(4, 16), _mask(4, 16)
        for a, b in zip(core.compute_gae_advantage_return(r, v, m, 1.0, 0.95), gae0(r, v, m, 1.0, 0.95)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        lp, ref = -torch.rand(4, 16), -torch.rand(4, 16)
        torch.testing.assert_close(core.kl_penalty(lp, ref, "low_var_kl"), kl0(lp, ref, "low_var_kl"))
    assert core.compute_gae_advantage_return is gae0 and core.kl_penalty is kl0


def test_real_openrlhf_when_importable():
    why = _importable("openrlhf.models.utils")
    if why:
        pytest.skip(why)
    utils = importlib.import_module("openrlhf.models.utils")
    f0 = utils.log_probs_from_logits
    with rf_openrlhf.patched() as names:
        assert "openrlhf.models.utils.log_probs_from_logits" in names
        logits, labels = torch.randn(2, 5, 40), torch.randint(0, 40, (2, 5))
        torch.testing.assert_close(utils.log_probs_from_logits(logits.clone(), labels), f0(logits.clone(), labels))
    assert utils.log_probs_from_logits is f0
