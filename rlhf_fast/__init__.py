"""rlhf_fast: fused kernels for PPO-style RLHF.

Importing never fails because the compiled extension is missing: calls fall
back to the pure-PyTorch reference and rlhf_fast.info() says why.
"""
from . import reference
from ._backend import BACKENDS, BackendUnavailable, use_backend
from ._backend import info as _info_dict
from .generation import GenerateOutput, generate
from .ops import (
    SampleOutput,
    discounted_returns,
    gae,
    group_advantages,
    kl_penalty,
    linear_logprobs,
    logprobs_from_logits,
    ppo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sample,
    whiten,
)
from .ops.vocab_parallel import vocab_parallel_linear_logprobs, vocab_parallel_logprobs
from .reference.rollout_correction import RolloutCorrection

__version__ = "0.1.0"


def info(print_it: bool = False) -> dict:
    """What runs here: torch, the compiled extension and its build, and for
    every backend whether it is available on CPU and CUDA tensors, or why not."""
    report = _info_dict()
    report["rlhf_fast"] = __version__
    if print_it:
        from .cli import format_info

        print(format_info(report))
    return report


__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "info",
    "generate",
    "GenerateOutput",
    "linear_logprobs",
    "kl_penalty",
    "logprobs_from_logits",
    "ppo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "RolloutCorrection",
    "reference",
    "sample",
    "SampleOutput",
    "use_backend",
    "gae",
    "discounted_returns",
    "whiten",
    "group_advantages",
    "vocab_parallel_logprobs",
    "vocab_parallel_linear_logprobs",
]
