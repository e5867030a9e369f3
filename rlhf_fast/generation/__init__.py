"""Rollout generation for RLHF: a static KV cache, a decode loop, and the
fused sampler (which returns the sampled tokens' log-probs)."""

from .generate import GenerateOutput, generate

__all__ = ["GenerateOutput", "generate"]
