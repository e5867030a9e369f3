"""One private module per op family (_logprobs.py, _linear_logprobs.py,
_advantages.py, _sampling.py, _ppo_loss.py, _vocab_parallel.py): validation,
backend dispatch, autograd and register_fake. Importing this package registers
every op with torch.library.

This package is the interface: `rlhf_fast.ops.<name>` is always the function.
With public modules named after their families, `ops.ppo_loss` and
`ops.linear_logprobs` were a module or a function depending on import order
(the layout of rlhf_fast.reference, for the same reason)."""

from ._advantages import discounted_returns, gae, group_advantages, whiten
from ._linear_logprobs import linear_logprobs
from ._linear_ppo_loss import linear_ppo_loss
from ._logprobs import logprobs_from_logits
from ._packing import expand_to_tokens, pack, segment_ids, unpack
from ._ppo_loss import kl_penalty, ppo_loss, ppo_policy_loss, ppo_value_loss, rollout_mismatch
from ._sampling import SampleOutput, sample
from ._vocab_parallel import vocab_parallel_linear_logprobs, vocab_parallel_logprobs

__all__ = [
    "logprobs_from_logits",
    "linear_logprobs",
    "linear_ppo_loss",
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
    "rollout_mismatch",
    "vocab_parallel_logprobs",
    "vocab_parallel_linear_logprobs",
    "pack",
    "unpack",
    "expand_to_tokens",
    "segment_ids",
]
