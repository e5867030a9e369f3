"""The trainers' packed mode (config.packing, trainer/packing.py): the packed
forwards give the padded ones' log-probs and values token for token, a
minibatch of samples repacks correctly, and PPO / GRPO runs packed and padded
from one seed log the same metrics and end at the same weights, to rounding."""

import math

import pytest
import torch
from _compare import assert_close
from _tiny_models import grpo_trainer, max_param_diff, one_thread, ppo_trainer, tiny_llama  # noqa: F401

from rlhf_fast.trainer.models import ScalarHeadModel, response_logprobs, response_values
from rlhf_fast.trainer.packing import PackedRollout, packed_logprobs, packed_values
from rlhf_fast.trainer.rollout import Rollout


def _rollout(with_sampler_logprobs=False):
    """5 samples: prompts of 6, 3, 1, 5, 2 tokens left-padded to 6, responses of
    9, 1, 4, 7, 3 right-padded to 9; sample 3 dropped (its reward was NaN)."""
    g = torch.Generator().manual_seed(0)
    N, P, R = 5, 6, 9
    seq = torch.randint(3, 50, (N, P + R), generator=g)
    attn = torch.zeros(N, P + R, dtype=torch.long)
    for b, (p, r) in enumerate(zip([6, 3, 1, 5, 2], [9, 1, 4, 7, 3])):
        attn[b, P - p : P] = 1
        attn[b, P : P + r] = 1
    rm = attn[:, P:].bool().clone()
    rm[3] = False
    lp = torch.randn(N, R, generator=g) * rm if with_sampler_logprobs else None
    return Rollout(seq, attn, rm, P, {}, lp)


def test_packed_forwards_equal_the_padded_ones_token_for_token():
    model = tiny_llama(seed=1, vocab_size=50)
    critic = ScalarHeadModel.from_causal_lm(model, init_std=0.1)
    ro = _rollout()
    pk = PackedRollout.from_rollout(ro)
    gen = ro.attention_mask[:, ro.prompt_length :].bool()
    assert pk.cu_seqlens.tolist() == [0, 9, 10, 14, 21, 24]
    assert pk.cu_tokens.tolist() == [0, 15, 19, 24, 36, 41]
    assert pk.position_ids[0, 15:19].tolist() == [0, 1, 2, 3]  # restarts per sample
    assert torch.equal(pk.mask, ro.response_mask[gen])
    with torch.no_grad():
        args = (ro.sequences, ro.attention_mask, ro.response_mask, ro.prompt_length)
        lp, ent = response_logprobs(model, *args, temperature=0.7, return_entropy=True)
        plp, pent = packed_logprobs(model, pk, temperature=0.7, return_entropy=True)
        v, pv = response_values(critic, ro.sequences, ro.attention_mask, ro.prompt_length), packed_values(critic, pk)
    assert_close(plp, lp[gen], "peer", "logprobs")
    assert_close(pent[pk.mask], ent[ro.response_mask], "peer", "entropy")
    assert_close(pv, v[gen], "peer", "values")
    assert_close(pk.segment_sum(plp), lp.sum(-1), "peer", "sums")


def test_a_minibatch_of_samples_repacks_in_its_order():
    model = tiny_llama(seed=2, vocab_size=50)
    ro = _rollout(with_sampler_logprobs=True)
    pk = PackedRollout.from_rollout(ro)
    idx = torch.tensor([4, 0, 2])
    sub = pk.select(idx)
    assert sub.cu_seqlens.tolist() == [0, 3, 12, 16]
    with torch.no_grad():
        full, _ = packed_logprobs(model, pk)
        part, _ = packed_logprobs(model, sub)
    assert_close(part, pk.pick(full, idx), "peer")
    assert torch.equal(sub.sampler_logprobs, pk.pick(pk.sampler_logprobs, idx))
    sub_ro = ro.index(idx)
    assert torch.equal(sub.labels, PackedRollout.from_rollout(sub_ro).labels)


def _run(make, **kw):
    tr = make(**kw)
    metrics = tr.train()
    return tr, metrics


# the metrics that differ between runs by construction (wall-clock)
_TIMING = ("time/", "tokens_per_s/")


def _assert_same_run(padded, packed):
    (tr0, m0), (tr1, m1) = padded, packed
    assert len(m0) == len(m1)
    for step0, step1 in zip(m0, m1):
        keys = {k for k in step0 if not k.startswith(_TIMING)}
        assert keys == {k for k in step1 if not k.startswith(_TIMING)}
        for k in sorted(keys):
            a, b = step0[k], step1[k]
            if isinstance(a, float) and math.isnan(a):
                assert math.isnan(b), k
            elif isinstance(a, (int, float)):
                assert b == pytest.approx(a, rel=2e-4, abs=2e-5), f"step {step0.get('step')}: {k} {a} vs {b}"
    assert max_param_diff(tr0.policy, tr1.policy) < 1e-4


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_ppo_packed_logs_what_padded_logs(tmp_path, agg):
    padded = _run(ppo_trainer, tmp=str(tmp_path / "a"), steps=2, loss_agg=agg)
    packed = _run(ppo_trainer, tmp=str(tmp_path / "b"), steps=2, loss_agg=agg, packing=True)
    _assert_same_run(padded, packed)
    assert max_param_diff(padded[0].critic, packed[0].critic) < 1e-4


def test_ppo_packed_with_rollout_correction_logs_what_padded_logs(tmp_path):
    corr = {"rollout_is": "sequence", "rollout_is_threshold": 2.0}
    padded = _run(ppo_trainer, tmp=str(tmp_path / "a"), steps=2, rollout_correction=corr)
    packed = _run(ppo_trainer, tmp=str(tmp_path / "b"), steps=2, rollout_correction=corr, packing=True)
    assert "rollout_corr/rollout_is_mean" in packed[1][-1]
    _assert_same_run(padded, packed)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_grpo_packed_logs_what_padded_logs(agg):
    _assert_same_run(_run(grpo_trainer, loss_agg=agg), _run(grpo_trainer, loss_agg=agg, packing=True))
