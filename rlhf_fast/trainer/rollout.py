"""Rollouts and experience: generate -> score -> KL-shaped token rewards ->
GAE -> whitening. Pure wiring; every piece of math is an rlhf_fast op."""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple

import torch

from ..generation import generate
from ..ops import gae, kl_penalty, rollout_mismatch, whiten
from .models import ScalarHeadModel
from .packing import PackedRollout
from .rewards import TextRewards, reward_error


@dataclasses.dataclass
class Rollout:
    sequences: torch.Tensor  # (N, P+R) int64
    attention_mask: torch.Tensor  # (N, P+R) long
    response_mask: torch.Tensor  # (N, R) bool
    prompt_length: int
    timings: dict
    # (N, R) fp32: the sampler's log-probs of the response tokens (raw: softmax(logits / T)
    # before top-k / top-p), for the rollout correction and the mismatch metrics
    logprobs: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def truncated(self, eos_token_id) -> torch.Tensor:
        """(N,) bool: the response ran to max_new_tokens without an EOS."""
        if eos_token_id is None:
            return torch.zeros_like(self.lengths, dtype=torch.bool)
        eos = torch.as_tensor(eos_token_id, device=self.sequences.device).flatten()
        resp = self.sequences[:, self.prompt_length :]
        return ~(torch.isin(resp, eos) & self.response_mask).any(-1)

    def index(self, idx: torch.Tensor) -> Rollout:
        lp = self.logprobs[idx] if self.logprobs is not None else None
        return Rollout(
            self.sequences[idx], self.attention_mask[idx], self.response_mask[idx], self.prompt_length, {}, lp
        )


class ScoredRollout(NamedTuple):
    """Trainer.rollout_and_score's result, (N,) per sample unless said."""

    rollout: Rollout  # response_mask already cleared on the non-finite samples
    raw: torch.Tensor  # the reward's scores as returned, NaN/inf included
    scores: torch.Tensor  # processed (reward_scaling.process_scores): clipped, normalised, penalised
    valid: torch.Tensor  # bool: the raw score was finite
    metrics: dict  # Trainer.drop_nonfinite's reward metrics
    any_valid: bool  # False when no rank has a valid sample: the update is skipped
    t_score: float  # time.perf_counter() when scoring began


@dataclasses.dataclass
class Experience:
    """One rollout batch with everything the update reads, (N, R) per token.
    ref_logprobs is None without a reference (GRPO with kl_coef 0); values and
    returns are PPO's (the critic's), None in GRPO."""

    rollout: Rollout
    old_logprobs: torch.Tensor  # fp32: the policy's log-probs before the update
    advantages: torch.Tensor  # fp32, 0 where masked
    metrics: dict  # floats, logged with the step
    any_valid: bool  # False when every reward was NaN/inf: the update is skipped
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    # packed mode (config.packing): the rollout's tokens packed; the per-token
    # tensors above are then (n_resp,) on its response stream
    packed: PackedRollout | None = None

    def minibatch(self, idx: torch.Tensor) -> Experience:
        """The rows (samples) `idx` of every tensor (metrics are not copied)."""

        def pick(t):
            if t is None:
                return None
            return t[idx] if self.packed is None else self.packed.pick(t, idx)

        return Experience(
            self.rollout.index(idx),
            pick(self.old_logprobs),
            pick(self.advantages),
            {},
            self.any_valid,
            pick(self.ref_logprobs),
            pick(self.values),
            pick(self.returns),
            None if self.packed is None else self.packed.select(idx),
        )


def rollout(
    policy,
    prompt_ids,
    prompt_mask,
    config,
    generator,
    *,
    num_samples=1,
    eos_token_id=None,
    pad_token_id=None,
    sync_group=None,
):
    """Sample num_samples responses per prompt with rlhf_fast.generate (prompt-major rows).
    sync_group: the ranks of a sharded (FSDP2) policy, which must stop decoding together."""
    t0 = time.perf_counter()
    was_training = policy.training
    policy.eval()
    # Generation runs in the model's own dtype: the static KV cache is
    # allocated in it, so bf16 autocast (config.autocast) stops here.
    with torch.autocast(prompt_ids.device.type, enabled=False):
        out = generate(
            policy,
            prompt_ids,
            prompt_mask,
            max_new_tokens=config.max_new_tokens,
            num_samples=num_samples,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            min_p=config.min_p,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            generator=generator,
            sync_group=sync_group,
        )
    policy.train(was_training)
    attn = torch.cat([prompt_mask.long().repeat_interleave(num_samples, 0), out.response_mask.long()], dim=1)
    dt = time.perf_counter() - t0
    n_tok = int(out.lengths.sum())
    return Rollout(
        out.sequences,
        attn,
        out.response_mask,
        out.prompt_length,
        {"time/generate": dt, "tokens_per_s/generate": n_tok / max(dt, 1e-9)},
        out.processed_logprobs if config.logprobs_mode == "processed" else out.logprobs,
    )


def scoring(config) -> dict:
    """logprobs_from_logits keywords for the trainer's old, reference and
    current log-probs: the rollout's sampling parameters under
    logprobs_mode "processed" (only those that truncate, so an untruncated
    rollout takes the plain op), the temperature alone under "raw"."""
    kw = {"temperature": config.temperature}
    if config.logprobs_mode == "processed":
        filters = {"top_k": config.top_k or None, "top_p": config.top_p, "min_p": config.min_p or None}
        kw.update({k: v for k, v in filters.items() if v is not None and not (k == "top_p" and v == 1.0)})
    return kw


def fill_outside_kept(old_logprobs, ref_logprobs, mask):
    """Under truncation (logprobs_mode "processed") a sampled token can lie
    outside the reference's kept set (ref log-prob -inf, an infinite KL):
    such a token takes the old policy's log-prob as the reference's, so its
    KL term is 0, and is counted. -> (ref_logprobs, {"ref_outside_kept_frac":
    float}); ref_logprobs None passes through."""
    if ref_logprobs is None:
        return None, {}
    out = ref_logprobs == float("-inf")
    m = mask.bool()
    frac = float((out & m).sum() / m.sum().clamp(min=1))
    return torch.where(out, old_logprobs, ref_logprobs), {"ref_outside_kept_frac": frac}


def mask_outside_kept(mask, *logprobs):
    """mask without the tokens whose log-prob is -inf in any of `logprobs`
    (None skipped): under truncation, a token outside the current, old or
    reference policy's kept set, whose ratio and KL are undefined. -> (mask,
    the fraction of mask's tokens dropped, a 0-d tensor: no host sync)."""
    keep = mask.bool()
    for lp in logprobs:
        if lp is not None:
            keep = keep & (lp > float("-inf"))
    n = mask.bool().sum().clamp(min=1)
    return keep, (mask.bool() & ~keep).sum() / n


# what a corrected update logs per minibatch (besides the mismatch metrics of the experience)
CORRECTION_STATS = ("rollout_corr/rollout_is_mean", "rollout_corr/rollout_rs_masked_fraction")


def correction_args(spec, ro: Rollout) -> dict:
    """ppo_loss keywords that apply the rollout correction `spec` (None: off) to minibatch ro."""
    if spec is None or ro.logprobs is None:
        return {}
    return {"rollout_logprobs": ro.logprobs, "rollout_correction": spec}


def mismatch_metrics(old_logprobs, ro: Rollout) -> dict:
    """verl's rollout_corr/* metrics of the trainer's recomputed old log-probs
    against the sampler's (floats; {} when the rollout has none)."""
    if ro.logprobs is None:
        return {}
    # a token outside the trainer's kept set (-inf, logprobs_mode "processed") has no ratio
    mask, _ = mask_outside_kept(ro.response_mask, old_logprobs, ro.logprobs)
    stats = rollout_mismatch(old_logprobs, ro.logprobs, mask)
    # rollout_is_* / rollout_rs_* describe a correction; the update logs those when one is on
    own = ("rollout_corr/rollout_is", "rollout_corr/rollout_rs")
    return {k: float(v) for k, v in stats.items() if not k.startswith(own)}


@torch.no_grad()
def score(reward, ro: Rollout) -> torch.Tensor:
    """(N,) fp32 scores from a ScalarHeadModel (learned RM) or a callable
    reward_fn(sequences, response_mask, prompt_length) -> (N,). What a
    function raises comes back as a RewardError naming it (one line)."""
    if isinstance(reward, ScalarHeadModel):
        was = reward.training
        reward.eval()
        s = reward.score(ro.sequences, ro.attention_mask)
        reward.train(was)
        return s.float()
    if isinstance(reward, TextRewards):  # names the failing function itself, and checks what each returns
        return torch.as_tensor(reward(ro.sequences, ro.response_mask, ro.prompt_length), dtype=torch.float32)
    try:
        out = reward(ro.sequences, ro.response_mask, ro.prompt_length)
    except Exception as e:
        raise reward_error(reward, e) from e
    return torch.as_tensor(out, dtype=torch.float32)


def shaped_rewards(scores, logprobs, ref_logprobs, response_mask, kl_coef: float, kl_kind: str = "k1"):
    """Per-token rewards: -kl_coef * KL(logp || ref) on every response token,
    plus the sequence score on its last token (InstructGPT / TRL PPO).
    scores (N,); logprobs, ref_logprobs, response_mask (N, R). Returns
    (rewards (N, R) fp32, kl (N, R) fp32), zero where masked."""
    m = response_mask.float()
    kl = kl_penalty(logprobs, ref_logprobs, kind=kl_kind) * m
    rewards = -kl_coef * kl
    last = (response_mask.sum(-1) - 1).clamp_min(0)
    rows = torch.arange(scores.shape[0], device=scores.device)
    has = response_mask.any(-1)
    rewards[rows, last] += torch.where(has, scores, torch.zeros_like(scores))
    return rewards, kl


def advantages(rewards, values, response_mask, *, gamma=1.0, lam=0.95, whiten_advantages=True):
    """GAE (rlhf_fast.gae, one pass per row) then masked whitening. (N, R) each."""
    adv, ret = gae(rewards, values, response_mask, gamma=gamma, lam=lam)
    if whiten_advantages:
        adv = whiten(adv, response_mask)
    return adv, ret


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.float()
    return float((x * m).sum() / m.sum().clamp_min(1))


def sample_prompts(prompt_ids, prompt_mask, batch_size: int, generator: torch.Generator):
    """batch_size prompt rows drawn without replacement (with, if the pool is
    smaller). Returns (ids, mask, rows): rows (batch_size,) int64 on the CPU,
    the pool row of each drawn prompt (a row-aware reward reads its dataset
    columns by it)."""
    n = prompt_ids.shape[0]
    if batch_size <= n:
        rows = torch.randperm(n, generator=generator)[:batch_size]
    else:
        rows = torch.randint(n, (batch_size,), generator=generator)
    idx = rows.to(prompt_ids.device)
    return prompt_ids[idx], prompt_mask[idx], rows
