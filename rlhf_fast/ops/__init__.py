"""One module per op family: validation, backend dispatch, autograd and
register_fake. Importing this package registers every op with torch.library."""

from .advantages import discounted_returns, gae, group_advantages, whiten
from .linear_logprobs import linear_logprobs
from .logprobs import logprobs_from_logits
from .ppo_loss import kl_penalty, ppo_loss, ppo_policy_loss, ppo_value_loss
from .sampling import SampleOutput, sample

__all__ = [
    "logprobs_from_logits",
    "linear_logprobs",
    "gae",
    "discounted_returns",
    "whiten",
    "group_advantages",
    "SampleOutput",
    "sample",
    "kl_penalty",
    "ppo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
]
