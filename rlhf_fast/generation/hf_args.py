"""`model.generate` arguments accepted by rlhf_fast.generate, and the ones refused.

rlhf_fast.generate samples from softmax(logits / T) truncated by top-k,
top-p and min-p, and returns each token's log-prob under exactly that
distribution, so the rollout's log-probs are the trainer's. Anything that
reshapes the distribution otherwise (repetition penalties, n-gram bans, beam
search, logits processors) would make those log-probs wrong, so it is
refused by name rather than ignored. Arguments at their neutral value
(repetition_penalty=1.0, num_beams=1) are accepted: scripts often pass them.
"""

from __future__ import annotations

import warnings

import torch

# HF name -> its neutral value(s): accepted only at them.
NEUTRAL = {
    "repetition_penalty": (1.0,),
    "num_beams": (1,),
    "num_beam_groups": (1,),
    "no_repeat_ngram_size": (0,),
    "encoder_no_repeat_ngram_size": (0,),
    "encoder_repetition_penalty": (1.0,),
    "length_penalty": (1.0,),
    "diversity_penalty": (0.0,),
    "typical_p": (1.0,),
    "epsilon_cutoff": (0.0,),
    "eta_cutoff": (0.0,),
    "min_new_tokens": (None, 0),
    "min_length": (None, 0),
    "bad_words_ids": (None,),
    "force_words_ids": (None,),
    "sequence_bias": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "renormalize_logits": (False,),
    "logits_processor": (None,),
    "stopping_criteria": (None,),
    "prefix_allowed_tokens_fn": (None,),
    "constraints": (None,),
    "stop_strings": (None,),
    "assistant_model": (None,),
    "streamer": (None,),
    "penalty_alpha": (None,),
    "guidance_scale": (None, 1.0),
    "exponential_decay_length_penalty": (None,),
    "output_scores": (False,),
    "output_logits": (False,),
    "return_dict_in_generate": (False,),
    "output_attentions": (False,),
    "output_hidden_states": (False,),
    "top_h": (None,),
    "use_cache": (True,),
    "early_stopping": (False,),
    "watermarking_config": (None,),
}
# GenerationConfig fields read here; every other non-default field must be neutral (NEUTRAL) or harmless.
READ = (
    "do_sample",
    "max_new_tokens",
    "max_length",
    "num_return_sequences",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "eos_token_id",
    "pad_token_id",
)
# model.generate arguments accepted: those fields, the config that carries them, the prompts' mask
SUPPORTED = ("generation_config", *READ, "attention_mask")


def _refuse(op: str, name: str, value) -> ValueError:
    return ValueError(
        f"{op}: {name}={value!r} is not supported: rlhf_fast.generate samples from softmax(logits / temperature) "
        f"with top-k / top-p / min-p only, so that the log-probs it returns are the trainer's. Supported "
        f"model.generate arguments: {', '.join(SUPPORTED)}. Use model.generate for {name}."
    )


def resolve(op: str, model, input_ids, args: dict, do_sample, generation_config, extra: dict) -> dict:
    """Fill args (max_new_tokens, num_samples, temperature, top_k, top_p,
    min_p, eos_token_id, pad_token_id; None = not given) from
    generation_config, then the defaults; check extra (other model.generate
    keyword arguments). Explicit arguments win over generation_config, as in
    model.generate. do_sample=False is greedy (temperature 0);
    do_sample=None keeps rlhf_fast's default of sampling.
    model.generation_config is not read for sampling parameters: an RL
    run's temperature should be the one its config names."""
    for name, value in extra.items():
        if name not in NEUTRAL:
            raise TypeError(
                f"{op}: unexpected keyword argument {name!r}; supported model.generate arguments: "
                f"{', '.join(SUPPORTED)}"
            )
        if not _is_neutral(value, NEUTRAL[name]):
            raise _refuse(op, name, value)
    out = dict(args)
    if generation_config is not None:
        gc = generation_config.to_dict() if hasattr(generation_config, "to_dict") else dict(generation_config)
        diff = generation_config.to_diff_dict() if hasattr(generation_config, "to_diff_dict") else gc
        for name, value in diff.items():
            if name in NEUTRAL and not _is_neutral(value, NEUTRAL[name]):
                raise _refuse(op, f"generation_config.{name}", value)
        if do_sample is None:
            do_sample = gc.get("do_sample")
        if out["num_samples"] is None and gc.get("num_return_sequences") not in (None, 1):
            out["num_samples"] = gc["num_return_sequences"]
        for name in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "eos_token_id", "pad_token_id"):
            if out[name] is None and gc.get(name) is not None:
                out[name] = gc[name]
        if out["max_new_tokens"] is None and gc.get("max_length") is not None:
            out["max_new_tokens"] = gc["max_length"] - input_ids.shape[1]
    if do_sample is False:
        if out["temperature"] not in (None, 0, 0.0) and generation_config is None:
            # model.generate ignores temperature when do_sample=False; so do we, but say so once
            warnings.warn(f"{op}: do_sample=False is greedy; temperature={out['temperature']} is ignored", stacklevel=3)
        out["temperature"] = 0.0
    elif do_sample is True and out["temperature"] == 0:
        raise ValueError(f"{op}: do_sample=True needs temperature > 0 (temperature 0 is greedy)")
    defaults = {"num_samples": 1, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    for name, value in defaults.items():
        if out[name] is None:
            out[name] = value
    if out["top_k"] is None:
        out["top_k"] = 0
    if out["max_new_tokens"] is None:
        raise ValueError(
            f"{op}: max_new_tokens is required (as an argument, or in generation_config as "
            "max_new_tokens or max_length)"
        )
    return out


def _is_neutral(value, neutral) -> bool:
    try:
        return any(value is n or value == n for n in neutral)
    except Exception:
        return False


def warn_right_padding(op: str, attention_mask: torch.Tensor) -> None:
    """Right-padded prompts: the response then follows pad tokens, and its
    log-probs differ from the trainer's forward over left-padded sequences."""
    if attention_mask.numel() and bool((attention_mask[:, -1] == 0).any()):
        warnings.warn(
            f"{op}: some prompts are right-padded (attention_mask ends in 0). Their responses are generated after "
            "the padding, so the returned log-probs differ from the trainer's forward over left-padded "
            "sequences (more than rounding). Left-pad the prompts: tokenizer.padding_side = 'left'.",
            stacklevel=3,
        )


def check_sliding_window(op: str, model, total_len: int) -> None:
    """Sliding-window attention (Mistral, Gemma 2/3, Qwen2 with use_sliding_window):
    exact here when the prompt + response fit in the window (it then hides
    nothing); longer sequences would need a rolling cache, which the shared-
    prefix static cache does not implement. Checked before the prefill."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    window = getattr(cfg, "sliding_window", None)
    if window is None:
        return
    types = getattr(cfg, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return
    if total_len > window:
        raise ValueError(
            f"{op}: {type(model).__name__} uses sliding-window attention (config.sliding_window={window}) and "
            f"prompt + max_new_tokens = {total_len} tokens exceed the window; rlhf_fast.generate supports "
            "sliding-window models only when the whole sequence fits in the window. Shorten the prompts or "
            "max_new_tokens, or use model.generate."
        )


# where Hugging Face configs keep the number of positions: GPT-2 / GPT-J / BLOOM-style first (GPT2Config maps
# max_position_embeddings onto n_positions, so the error then names the attribute the user set)
CONTEXT_ATTRS = ("n_positions", "max_position_embeddings")


def context_length(model) -> tuple[str, int] | None:
    """(config attribute, value) of the model's number of positions, or None when its config names none."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for name in CONTEXT_ATTRS:
        v = getattr(cfg, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return name, v
    return None


def check_prompt_rows(op: str, model, attention_mask: torch.Tensor, max_new_tokens: int) -> None:
    """attention_mask (B, P), B >= 1. Refuses a row with no prompt token (its
    first response token would be sampled from nothing: a pad's logits), and
    a longest prompt + max_new_tokens past the model's positions: learned
    position embeddings (GPT-2) fail with an IndexError inside the forward,
    RoPE models (Llama) extrapolate silently past what they were trained on.
    One host sync, before the prefill."""
    lo, hi = torch.stack(torch.aminmax(attention_mask.sum(-1))).tolist()
    if lo == 0:
        rows = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
        shown = ", ".join(map(str, rows[:8])) + (f" and {len(rows) - 8} more" if len(rows) > 8 else "")
        raise ValueError(
            f"{op}: attention_mask row(s) {shown} are all zeros: such a prompt has no token to condition on. "
            "Drop the empty prompts (or give each at least one token, e.g. a BOS)."
        )
    ctx = context_length(model)
    if ctx is not None and hi + max_new_tokens > ctx[1]:
        raise ValueError(
            f"{op}: the longest prompt ({hi} tokens) + max_new_tokens ({max_new_tokens}) = {hi + max_new_tokens} "
            f"positions exceed the model's context, config.{ctx[0]} = {ctx[1]}. Shorten the prompts or lower "
            "max_new_tokens."
        )
