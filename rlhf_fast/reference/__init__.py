"""Pure-PyTorch reference of every rlhf_fast op.

Three uses: the tests' oracle (run in float64), the benchmarks' baseline, and
the fallback when no compiled kernel can run. Written for clarity, not speed.
"""
from .logprobs import logprobs_from_logits
from .advantages import discounted_returns, gae, group_advantages, whiten
from .sampling import sample
from .linear_logprobs import linear_logprobs
from .ppo_loss import kl_penalty, ppo_loss, ppo_policy_loss, ppo_value_loss
from .rollout_correction import RolloutCorrection

__all__ = [
    "logprobs_from_logits",
    "linear_logprobs",
    "gae",
    "discounted_returns",
    "whiten",
    "group_advantages",
    "sample",
    "kl_penalty",
    "ppo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "RolloutCorrection",
]
