"""One module per op family: validation, backend dispatch, autograd and
register_fake. Importing this package registers every op with torch.library."""
from .logprobs import logprobs_from_logits
from .ppo_loss import kl_penalty, ppo_loss, ppo_policy_loss, ppo_value_loss

__all__ = [
    "logprobs_from_logits",
    "kl_penalty",
    "ppo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
]
