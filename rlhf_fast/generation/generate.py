"""rlhf_fast.generate: rollouts for RLHF from a Hugging Face causal LM.

prefill (B prompts, once) -> static KV cache for B*n rows -> decode loop:
each step one forward of (B*n, 1) tokens and one fused sample that also
returns the token's log-prob, so the rollout's log-probs are the trainer's
(logprobs_from_logits numerics) without a second forward.
Host syncs: none per step except the early-exit check, which reads the
`done` flags once every `sync_every` steps (default 8): at most 7 wasted
steps, against a sync per step in HF generate. One more at the end trims
the output to the longest response.
"""

from __future__ import annotations

import dataclasses

import torch

from ..ops._common import check_int
from ..ops._sampling import draw_seeds, row_params, sample_with_seeds
from .hf_args import check_prompt_rows, check_sliding_window, warn_right_padding
from .hf_args import resolve as resolve_hf_args
from .static_cache import cache_kwarg, prefill_cache, static_cache_from_prefill

OP = "rlhf_fast.generate"
_GOLDEN = 0x9E3779B97F4A7C15  # Weyl step: decorrelates per-step seeds


def _step_salt(t: int) -> int:
    """(t + 1) * golden mod 2^64 as a signed int64 (xor-ed into the row seeds)."""
    v = (_GOLDEN * (t + 1)) & 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= (1 << 63) else v


@dataclasses.dataclass
class GenerateOutput:
    sequences: torch.Tensor  # (B*n, P+R) int64: prompt (as given, padding kept) then response
    response_mask: torch.Tensor  # (B*n, R) bool: generated tokens up to and including EOS
    # (B*n, R) fp32: log p(token) under softmax(logits / T), the raw (tempered, untruncated)
    # log-prob that logprobs_from_logits(logits, tokens, temperature=T) returns; 0 where masked
    logprobs: torch.Tensor
    lengths: torch.Tensor  # (B*n,) int64: response lengths (response_mask.sum(-1))
    prompt_length: int  # P
    # (B*n, R) fp32: log p(token) under the distribution it was drawn from (temperature, then
    # top-k / top-p / min-p, renormalised), as logprobs_from_logits(..., top_k=, top_p=, min_p=)
    # scores it, bit for bit; equal to `logprobs` without truncation; 0 where masked and on
    # greedy rows. vLLM's logprobs_mode="processed_logprobs" is this one.
    processed_logprobs: torch.Tensor


def _expand(value, B: int, n: int):
    if isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == B:
        return value.repeat_interleave(n)
    return value


def _eos_ids(model, eos_token_id):
    if eos_token_id is None:
        gc = getattr(model, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])]


class _DecodeStep:
    """One decode forward: (rows, 1) tokens at their positions -> (rows, V)
    next-token logits. A plain callable so that torch.compile can wrap it
    (mode="reduce-overhead": CUDA graphs; every input lives at a fixed address)."""

    def __init__(self, model, cache, attention_mask):
        self.model, self.mask = model, attention_mask
        self.cache_kw = {cache_kwarg(model): cache}  # "cache" or "past_key_values": decided once

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=tokens.unsqueeze(1),
            attention_mask=self.mask,
            position_ids=positions.unsqueeze(1),
            use_cache=True,
            **self.cache_kw,
        )
        return out.logits[:, -1, :]


@torch.no_grad()
def _all_done(done: torch.Tensor, group) -> bool:
    if group is None:
        return bool(done.all())
    import torch.distributed as dist

    flag = done.all().to(torch.int32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    num_samples: int | None = None,
    temperature=None,
    top_k=None,
    top_p=None,
    min_p=None,
    eos_token_id=None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
    sync_every: int = 8,
    sync_group=None,
    do_sample: bool | None = None,
    generation_config=None,
    **generate_kwargs,
) -> GenerateOutput:
    """Sample `num_samples` responses per prompt from a Hugging Face causal LM.

    input_ids, attention_mask: (B, P) prompts, left- (or right-) padded as
        for model.generate; attention_mask None means no padding.
    temperature / top_k / top_p / min_p: as rlhf_fast.sample; scalars or (B,)
        tensors (one value per prompt, shared by its samples). temperature 0
        is greedy and equals model.generate(do_sample=False) token for token.
    eos_token_id: int or list; None takes model.generation_config's. A row
        stops after its EOS and is padded with pad_token_id (default: the
        first EOS, else 0); the loop exits once every row is done (checked
        every `sync_every` steps).
    sync_group: a torch.distributed process group (e.g. dist.group.WORLD)
        whose ranks must run the same number of forwards, as with an FSDP2-
        sharded model (every forward all-gathers weights): the early exit then
        waits until every rank's rows are done (an all-reduce per check).
    generator: on the model's device; seeds for all B*n rows are drawn once,
        each row an independent counter-based stream (samples of one prompt differ).
    compile: torch.compile the decode step (mode="reduce-overhead" on CUDA:
        CUDA graphs over the static cache; default mode on CPU).
    Returns GenerateOutput(sequences (B*n, P+R), response_mask (B*n, R),
    logprobs (B*n, R) fp32 (tempered, untruncated), lengths (B*n,), prompt_length P,
    processed_logprobs (B*n, R) fp32 (under the truncated distribution drawn from)), rows ordered
    prompt-major (the n samples of prompt 0 first). B = 0 gives empty
    outputs (R = 0) without calling the model; P = 0 is an error.
    max_new_tokens, num_samples, sync_every: ints >= 1; pad_token_id: an int
    in [0, model.config.vocab_size).
    model.generate's own arguments (generation/hf_args.py): do_sample (False:
    greedy; None/True: sample), generation_config (a GenerationConfig or dict
    filling what is not given explicitly: max_new_tokens / max_length,
    temperature, top_k, top_p, min_p, eos/pad ids, num_return_sequences),
    num_return_sequences, max_length. Defaults: temperature 1, top_k 0, top_p 1,
    min_p 0, num_samples 1. Arguments that would change the distribution
    (repetition_penalty, num_beams > 1, no_repeat_ngram_size, logits_processor,
    ...) raise ValueError by name; at their neutral values they are accepted.
    Right-padded prompts warn (their log-probs differ from the trainer's).
    Sliding-window models (Mistral, Gemma 2) are exact while prompt +
    max_new_tokens fit in the window and raise before the prefill otherwise.
    The longest prompt + max_new_tokens must fit in the model's positions
    (config.max_position_embeddings, or n_positions for GPT-2), and every
    row of attention_mask must hold a prompt token: ValueError before the
    prefill otherwise.
    """
    nrs = generate_kwargs.pop("num_return_sequences", None)
    max_length = generate_kwargs.pop("max_length", None)
    if max_new_tokens is None and max_length is not None and isinstance(input_ids, torch.Tensor):
        max_new_tokens = max_length - input_ids.shape[-1]  # HF: max_length counts the prompt
    if num_samples is None and nrs is not None:
        num_samples = nrs
    hf = resolve_hf_args(
        OP,
        model,
        input_ids,
        dict(
            max_new_tokens=max_new_tokens,
            num_samples=num_samples,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        ),
        do_sample,
        generation_config,
        generate_kwargs,
    )
    max_new_tokens, num_samples, temperature = hf["max_new_tokens"], hf["num_samples"], hf["temperature"]
    top_k, top_p, min_p = hf["top_k"], hf["top_p"], hf["min_p"]
    eos_token_id, pad_token_id = hf["eos_token_id"], hf["pad_token_id"]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"{OP}: input_ids must be a 2-D (B, P) tensor")
    R = check_int(OP, "max_new_tokens", max_new_tokens, lo=1)
    n = check_int(OP, "num_samples", num_samples, lo=1)
    sync_every = check_int(OP, "sync_every", sync_every, lo=1)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    vocab_hi = int(vocab) - 1 if isinstance(vocab, int) and vocab > 0 else 2**63 - 1
    if pad_token_id is not None:
        # a pad id outside the embedding would fail later, as an IndexError inside the model
        check_int(OP, "pad_token_id", pad_token_id, lo=0, hi=vocab_hi)
    device = input_ids.device
    B, P = input_ids.shape
    if P == 0:
        raise ValueError(
            f"{OP}: input_ids has no prompt tokens (shape {tuple(input_ids.shape)}); the first response "
            "token is sampled from the model's prediction after the prompt, so P must be >= 1"
        )
    N = B * n
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"{OP}: attention_mask must have shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    warn_right_padding(OP, attention_mask)
    check_sliding_window(OP, model, P + R)
    temp, tk, tp, mp, filtered = row_params(
        N,
        device,
        _expand(temperature, B, n),
        _expand(top_k, B, n),
        _expand(top_p, B, n),
        _expand(min_p, B, n),
        getattr(model, "dtype", torch.float32),
    )
    eos = _eos_ids(model, eos_token_id)
    pad = int(pad_token_id) if pad_token_id is not None else (eos[0] if eos else 0)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    if B > 0:
        check_prompt_rows(OP, model, attention_mask, R)
    if B == 0:  # no prompts: an empty rollout, without calling the model
        return GenerateOutput(
            sequences=input_ids.new_empty((0, P), dtype=torch.long),
            response_mask=torch.zeros((0, 0), dtype=torch.bool, device=device),
            logprobs=torch.zeros((0, 0), dtype=torch.float32, device=device),
            lengths=torch.zeros((0,), dtype=torch.long, device=device),
            prompt_length=P,
            processed_logprobs=torch.zeros((0, 0), dtype=torch.float32, device=device),
        )

    # ---- prefill: B prompts once, positions as HF (cumsum of the mask - 1)
    positions = attention_mask.cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 0)
    dyn = prefill_cache(model)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{cache_kwarg(model): dyn},
    )
    logits = out.logits[:, -1, :].repeat_interleave(n, dim=0)
    cache = static_cache_from_prefill(model, dyn, n, P + R)
    del dyn, out

    # ---- buffers, all preallocated: the loop only writes into them
    full_mask = torch.ones((N, P + R), dtype=torch.long, device=device)
    full_mask[:, :P] = attention_mask.repeat_interleave(n, dim=0)
    next_pos = positions[:, -1].repeat_interleave(n) + 1  # HF: last prompt position + 1
    sequences = torch.full((N, P + R), pad, dtype=torch.long, device=device)
    sequences[:, :P] = input_ids.repeat_interleave(n, dim=0)
    logprobs = torch.zeros((N, R), dtype=torch.float32, device=device)
    processed = torch.zeros((N, R), dtype=torch.float32, device=device)
    response_mask = torch.zeros((N, R), dtype=torch.bool, device=device)
    done = torch.zeros((N,), dtype=torch.bool, device=device)
    seeds = draw_seeds(N, device, generator)
    step_fn = _DecodeStep(model, cache, full_mask)
    if compile:
        step_fn = torch.compile(step_fn, mode="reduce-overhead" if device.type == "cuda" else None)

    for t in range(R):
        if t > 0:
            logits = step_fn(sequences[:, P + t - 1], next_pos + (t - 1))
        step_seeds = seeds ^ _step_salt(t)  # a fresh stream per step, on device
        s = sample_with_seeds(logits, step_seeds, temp, tk, tp, mp, filtered)
        alive = ~done
        sequences[:, P + t] = torch.where(alive, s.tokens, pad)
        logprobs[:, t] = torch.where(alive, s.logprobs, 0.0)
        processed[:, t] = torch.where(alive, s.processed_logprobs, 0.0)
        response_mask[:, t] = alive
        if eos:
            done |= alive & torch.isin(s.tokens, eos_t)
            if (t + 1) % sync_every == 0 and t + 1 < R and _all_done(done, sync_group):  # the one periodic host sync
                break

    lengths = response_mask.sum(-1)
    r_used = int(lengths.max()) if N > 0 else 0  # one sync: trim to the longest response
    return GenerateOutput(
        sequences=sequences[:, : P + r_used],
        response_mask=response_mask[:, :r_used],
        logprobs=logprobs[:, :r_used],
        lengths=lengths,
        prompt_length=P,
        processed_logprobs=processed[:, :r_used],
    )
