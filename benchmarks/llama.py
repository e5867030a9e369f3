"""The random-weight Llama the end-to-end benchmarks share (bench_generation,
bench_ppo_step): built from a config, nothing downloaded."""

from __future__ import annotations


def llama_config(vocab: int, hidden: int, layers: int):
    """FFN 4h; a query head per 64 of width (at least 2) and a KV head per 128
    (at least 1): head_dim 64, two query heads per KV head from h = 256 on;
    4096 positions; no EOS, so every sampled response runs to its full length
    (exactly B*R tokens)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 2),
        num_key_value_heads=max(hidden // 128, 1),
        max_position_embeddings=4096,
        eos_token_id=None,
        bos_token_id=1,
        pad_token_id=0,
    )


def causal_lm(cfg, device):
    """LlamaForCausalLM(cfg) on device, with generate's EOS also off."""
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM(cfg).to(device)
    m.generation_config.eos_token_id = None
    return m
