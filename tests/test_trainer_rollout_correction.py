"""PPO / GRPO trainers: the sampler's log-probs are recorded at generate time,
the rollout/trainer mismatch metrics are always logged, and the
`rollout_correction:` config block applies verl's correction in ppo_loss."""

import math

import pytest
from _tiny_models import grpo_trainer, max_param_diff, one_thread, ppo_trainer, tiny_llama  # noqa: F401

from rlhf_fast.trainer import GRPOConfig, PPOConfig

MISMATCH = (
    "rollout_corr/kl",
    "rollout_corr/k3_kl",
    "rollout_corr/chi2_token",
    "rollout_corr/chi2_seq",
    "rollout_corr/log_ppl_diff",
    "rollout_corr/ppl_ratio",
)


@pytest.mark.parametrize("make", [ppo_trainer, grpo_trainer])
def test_mismatch_metrics_logged_by_default(make):
    trainer = make()
    assert trainer.rollout_correction is None  # off by default
    exp = trainer.make_experience()
    ro = exp.rollout
    assert ro.logprobs is not None and ro.logprobs.shape == ro.response_mask.shape
    m = exp.metrics
    for k in MISMATCH:
        assert k in m and math.isfinite(m[k]), k
    # the same kernels sample and re-score, but the decode step (one token, KV cache) and the
    # trainer's full-sequence forward run different GEMM shapes: fp32 rounding, not a policy gap
    gap = (exp.old_logprobs - ro.logprobs)[ro.response_mask].abs().max().item()
    assert gap < 1e-4, gap
    assert abs(m["rollout_corr/kl"]) < 1e-5 and abs(m["rollout_corr/chi2_token"]) < 1e-4
    assert m["rollout_corr/ppl_ratio"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("make", [ppo_trainer, grpo_trainer])
def test_correction_applied_and_logged(make):
    trainer = make(
        rollout_correction={
            "rollout_is": "token",
            "rollout_is_threshold": 2.0,
            "rollout_rs": "token_k1",
            "rollout_rs_threshold": "0.5_2.0",
        }
    )
    rows = trainer.train(1)
    row = rows[0]
    # mismatch ~0, so the weights are ~1 and nothing is rejected
    assert row["rollout_corr/rollout_is_mean"] == pytest.approx(1.0, abs=1e-4)
    assert row["rollout_corr/rollout_rs_masked_fraction"] == 0.0
    assert row["applied"] >= 1


def test_rejecting_every_token_stops_learning():
    """token_k1 keeps ratios in [1.5, 2] only: with a ~0 gap every token is rejected,
    so the loss and every gradient are 0 and the policy does not move."""
    trainer = grpo_trainer(
        rollout_correction={"rollout_rs": "token_k1", "rollout_rs_threshold": "1.5_2.0"}, weight_decay=0.0
    )
    rows = trainer.train(1)
    assert rows[0]["rollout_corr/rollout_rs_masked_fraction"] == 1.0
    assert max_param_diff(trainer.policy, tiny_llama(0)) == 0.0
    free = grpo_trainer()
    free.train(1)
    assert max_param_diff(free.policy, tiny_llama(0)) > 1e-4  # the same run without the correction learns


def test_config_block_validated():
    for bad, msg in (
        ({"rollout_is": "tokens"}, "rollout_is must be"),
        ({"rollout_is": "token", "foo": 1}, "unknown"),
        ({"rollout_is": "token", "rollout_is_threshold": -1.0}, "must be > 0"),
        ("token", "mapping"),
    ):
        with pytest.raises(ValueError, match=msg):
            PPOConfig(rollout_correction=bad)
    assert GRPOConfig(rollout_correction=None).rollout_correction is None
    assert PPOConfig().rollout_correction is None


# ---------------------------------------------------------------- logprobs_mode under truncation


@pytest.mark.parametrize("make", [ppo_trainer, grpo_trainer])
def test_truncated_rollout_scored_under_its_own_sampling(make):
    """With top-k / top-p / min-p, logprobs_mode "processed" (the default) takes the old and
    reference log-probs under the rollout's truncation: the rollout's processed log-probs and
    the trainer's agree to rounding, and the ratio stays ~1. "raw" keeps the tempered-only
    log-probs, which under truncation differ by the log of the kept mass."""
    sampling = dict(temperature=0.9, top_k=20, top_p=0.8, min_p=0.01)
    proc = make(**sampling)
    assert proc.config.logprobs_mode == "processed"
    exp = proc.make_experience()
    ro = exp.rollout
    m = ro.response_mask
    gap = (exp.old_logprobs - ro.logprobs)[m].abs().max().item()
    assert gap < 1e-4, gap
    assert abs(exp.metrics["rollout_corr/kl"]) < 1e-5
    assert exp.metrics["ref_outside_kept_frac"] >= 0.0
    # truncation renormalises onto fewer tokens: the processed log-prob is never below the raw one
    raw = make(logprobs_mode="raw", **sampling)
    exp_raw = raw.make_experience()
    assert bool((exp.old_logprobs[m] >= exp_raw.old_logprobs[m] - 1e-5).all())
    assert (exp.old_logprobs[m] - exp_raw.old_logprobs[m]).mean().item() > 1e-3
    # the raw trainer's own rollout log-probs are the raw ones: its gap is ~0 too
    assert (exp_raw.old_logprobs - exp_raw.rollout.logprobs)[m].abs().max().item() < 1e-4
    row = proc.train(1)[0]
    assert math.isfinite(row["pg_loss"]) and 0.0 <= row["outside_kept_frac"] <= 1.0
