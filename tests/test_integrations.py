"""rlhf_fast.integrations.trl: TRL's selective_log_softmax / entropy helpers
(used by its experimental trainers) patched, against the installed TRL's own
functions, including through the names its trainers imported. verl and
OpenRLHF are tested against the installed packages in test_integrations_verl.py
and test_integrations_openrlhf.py; TRL's fused-lm-head path in
test_integrations_trl.py.
"""

import importlib
import inspect
import logging

import pytest
import torch
from _compare import assert_close, assert_no_worse_than_eager

import rlhf_fast.integrations.trl as rf_trl

# ======================================================================== TRL

TRL_TRAINERS = (
    "trl.experimental.cpo.cpo_trainer",
    "trl.experimental.a2po.a2po_trainer",
    "trl.experimental.tpo.tpo_trainer",
)


@pytest.fixture(scope="module")
def trl_mods():
    utils = importlib.import_module("trl.trainer.utils")
    trainers = [importlib.import_module(m) for m in TRL_TRAINERS]
    originals = {
        n: getattr(utils, n)
        for n in ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")
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
        for n in (
            "trl.trainer.utils.selective_log_softmax",
            "trl.trainer.utils.entropy_from_logits",
            "trl.experimental.cpo.cpo_trainer.selective_log_softmax",
            "trl.experimental.a2po.a2po_trainer.selective_log_softmax",
            "trl.experimental.tpo.tpo_trainer.selective_log_softmax_and_entropy",
        ):
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
        assert_no_worse_than_eager(
            ours.detach().double(), theirs.detach().double(), ref.detach(), "logprob", "bf16 logp"
        )
        return
    assert_close(ours.detach(), theirs.detach(), "peer", "logp")


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
    assert_close(grads[0], grads[1], "peer", "dlogits")
    ge = []
    for fn in (utils.entropy_from_logits, orig["entropy_from_logits"]):
        x = logits.detach().clone().requires_grad_(True)
        (fn(x) * g).sum().backward()
        ge.append(x.grad)
    assert_close(ge[0], ge[1], "peer", "d entropy / dlogits")


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
    assert_close(lp.detach(), lp0.detach(), "peer", "logp")
    assert_close(ent.detach(), ent0.detach(), "peer", "entropy")
    e1, e0 = (
        utils.entropy_from_logits(logits.to(torch.bfloat16)),
        orig["entropy_from_logits"](logits.to(torch.bfloat16)),
    )
    assert e1.dtype == e0.dtype == torch.bfloat16
    ref = orig["entropy_from_logits"](logits.double())
    assert_no_worse_than_eager(e1.detach().double(), e0.detach().double(), ref.detach(), "entropy", "bf16 entropy")


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
