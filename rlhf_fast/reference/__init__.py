"""Pure-PyTorch reference of every rlhf_fast op.

Three uses: the tests' oracle (run in float64), the benchmarks' baseline, and
the fallback when no compiled kernel can run. Written for clarity, not speed.

Layout: the code lives in private modules, one per op family
(_logprobs.py, _linear_logprobs.py, _advantages.py, _sampling.py,
_ppo_loss.py, _rollout_correction.py), and this package is the only
interface: `rlhf_fast.reference.<fn>` is always the function (the eager
baseline people call), and the constants and helpers tests and ops need are
exported here by name. With public modules named after their families,
`reference.ppo_loss` and `reference.linear_logprobs` were a module until
this file ran and a function after it: one op called the module's namesake
function by the wrong name, and tests needed importlib to reach the module.
A leading underscore can never collide with a public function name.
"""

from ._advantages import ESTIMATORS, discounted_returns, gae, group_advantages, whiten
from ._linear_logprobs import linear_logprobs
from ._linear_ppo_loss import linear_ppo_loss
from ._logprobs import logprobs_from_logits
from ._packing import expand_to_tokens, pack, segment_ids, unpack
from ._ppo_loss import AGG_MODES, KL_KINDS, kl_penalty, ppo_loss, ppo_policy_loss, ppo_value_loss
from ._rollout_correction import IS_LEVELS, RC_STATS, RS_OPTIONS, RolloutCorrection
from ._sampling import noise_bits, sample

__all__ = [
    "logprobs_from_logits",
    "linear_logprobs",
    "linear_ppo_loss",
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
    "pack",
    "unpack",
    "expand_to_tokens",
    "segment_ids",
    # constants: the accepted values of the ops' string arguments, and stats names
    "AGG_MODES",
    "KL_KINDS",
    "ESTIMATORS",
    "IS_LEVELS",
    "RS_OPTIONS",
    "RC_STATS",
    # the sampler's counter-based noise, which the kernels must reproduce bit for bit
    "noise_bits",
]
