"""A preallocated KV cache for B*n rollouts built from a prefill of B prompts.

transformers' own StaticCache fits: its layers hold (rows, kv_heads,
max_cache_len, head_dim) buffers allocated once, written in place with
index_copy_ at a device-side `cumulative_length` counter (no host syncs,
addresses marked static for CUDA graphs), and the models build the
attention mask from a 2-D (rows, max_cache_len) padding mask. What it lacks
is sharing: each prompt is prefilled once into a DynamicCache (B rows) and
copied here n times (repeat_interleave), so a group of n samples costs one
prefill (TRL measured ~1.5x from this).

The cache goes to the model's forward under the name its transformers
version reads: `cache` since transformers renamed it (5.24 warns that
`past_key_values` is deprecated, removal announced for 5.40), and
`past_key_values` before (5.17 has no `cache` argument). `cache_kwarg`
decides once per model class, not per forward.
"""

from __future__ import annotations

import functools
import inspect

from transformers.cache_utils import DynamicCache, StaticCache


def cache_kwarg(model) -> str:
    """The keyword under which `model`'s forward takes a KV cache: "cache" or
    "past_key_values". Looks through PEFT and DDP wrappers (their forward
    passes **kwargs on) to the Hugging Face model's own signature."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = model.get_base_model() if hasattr(model, "get_base_model") else getattr(model, "module", model)
        if inner is model:
            break
        model = inner
    return _cache_kwarg_of(type(model))


@functools.cache
def _cache_kwarg_of(cls) -> str:
    try:
        params = inspect.signature(cls.forward).parameters  # follows the deprecation decorator's __wrapped__
    except (TypeError, ValueError):  # a forward without a readable signature
        params = {}
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    # **kwargs only (remote code, custom wrappers): the library's own spelling
    from transformers.generation import utils

    return utils.ALL_CACHE_NAMES[0]


def prefill_cache(model) -> DynamicCache:
    return DynamicCache(config=model.config)


def static_cache_from_prefill(model, prefill: DynamicCache, num_samples: int, max_cache_len: int) -> StaticCache:
    """Allocate a StaticCache for (B * num_samples) rows and max_cache_len
    positions; copy each prompt's prefilled keys / values into its n rows.
    Bytes: 2 * layers * B*n * kv_heads * max_cache_len * head_dim * dtype."""
    layers = prefill.layers
    keys0 = layers[0].keys
    B, _, P, _ = keys0.shape
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    if len(cache.layers) != len(layers):
        raise ValueError(
            f"rlhf_fast.generate: the model's StaticCache has {len(cache.layers)} layers but its prefill "
            f"produced {len(layers)}; models with sliding-window or linear layers are not supported"
        )
    cache.early_initialization(
        batch_size=B * num_samples,
        num_heads=[lay.keys.shape[1] for lay in layers],
        head_dim=[lay.keys.shape[-1] for lay in layers],
        dtype=keys0.dtype,
        device=keys0.device,
    )
    for src, dst in zip(layers, cache.layers):
        if getattr(dst, "is_sliding", False):
            # exact while P + R fits in the window (generate checks it first): the layer's
            # buffer is then min(window, max_cache_len) = max_cache_len and never rolls
            if dst.max_cache_len < max_cache_len:
                raise ValueError(
                    f"rlhf_fast.generate: {max_cache_len} tokens exceed the sliding window "
                    f"({dst.max_cache_len}); only sequences that fit in the window are "
                    "supported"
                )
            dst.cumulative_length_int = P  # the host-side count this layer type keeps beside the device one
        dst.keys[:, :, :P].copy_(src.keys.repeat_interleave(num_samples, dim=0))
        dst.values[:, :, :P].copy_(src.values.repeat_interleave(num_samples, dim=0))
        dst.cumulative_length.fill_(P)  # device tensor: the next write goes to column P
    return cache
