"""Pure-PyTorch reference of every rlhf_fast op.

Three uses: the tests' oracle (run in float64), the benchmarks' baseline, and
the fallback when no compiled kernel can run. Written for clarity, not speed.
"""
from .logprobs import logprobs_from_logits
from .advantages import discounted_returns, gae, group_advantages, whiten
from .sampling import sample
from .linear_logprobs import linear_logprobs

__all__ = ["logprobs_from_logits", "gae", "discounted_returns", "whiten", "group_advantages", "sample", "linear_logprobs"]
