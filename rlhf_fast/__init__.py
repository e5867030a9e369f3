"""rlhf_fast: fused kernels for PPO-style RLHF.

Importing never fails because the compiled extension is missing: calls fall
back to the pure-PyTorch reference and rlhf_fast.info() says why.

`import rlhf_fast` is cheap: the public names load on first use (PEP 562
__getattr__). Registering the ops imports torch's compiler stack
(torch.library.triton_op pulls in torch._inductor: ~2.7 s of the ~9 s an eager
import took on a 2-core box) and `generate` imports transformers (~1.5 s), so
neither happens until an op or `generate` is touched, and `rlhf-fast --help`
stays instant. `import rlhf_fast.ops` registers every op explicitly.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the submodule that defines it
_LAZY = {
    "BACKENDS": "._backend",
    "BackendUnavailable": "._backend",
    "use_backend": "._backend",
    "generate": ".generation",
    "GenerateOutput": ".generation",
    "SampleOutput": ".ops",
    "discounted_returns": ".ops",
    "gae": ".ops",
    "group_advantages": ".ops",
    "kl_penalty": ".ops",
    "linear_logprobs": ".ops",
    "linear_ppo_loss": ".ops",
    "logprobs_from_logits": ".ops",
    "ppo_loss": ".ops",
    "ppo_policy_loss": ".ops",
    "ppo_value_loss": ".ops",
    "sample": ".ops",
    "whiten": ".ops",
    "vocab_parallel_logprobs": ".ops",
    "vocab_parallel_linear_logprobs": ".ops",
    "RolloutCorrection": ".specs",
    "pack": ".ops",
    "unpack": ".ops",
    "expand_to_tokens": ".ops",
    "segment_ids": ".ops",
}
_SUBMODULES = {"reference", "ops", "generation", "trainer", "integrations", "demo", "cli", "bench", "triton"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    if not name.startswith("__"):  # rlhf_fast.ops, rlhf_fast._backend, ...: the submodule, imported now
        try:
            return importlib.import_module("." + name, __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'rlhf_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


def info(print_it: bool = False) -> dict:
    """What runs here: torch, the compiled extension and its build, and for
    every backend whether it is available on CPU and CUDA tensors, or why not."""
    from ._backend import info as _info_dict

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
    "linear_ppo_loss",
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
    "pack",
    "unpack",
    "expand_to_tokens",
    "segment_ids",
]
