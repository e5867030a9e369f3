"""The trainers' packed mode (`packing: true`): the policy, reference and
critic forwards run on one packed row of every sample's tokens, and the
experience, advantages and losses stay packed (docs/packing.md's layout).

A rollout is generated padded (the static KV cache wants rectangles): prompt
left-padded to P, response right-padded to R. Packing keeps each sample's
attended tokens back to back, `position_ids` restarting at 0 per sample, so
transformers builds the block-diagonal causal mask from them (for sdpa and
eager only when the forward builds no KV cache: use_cache=False below; flash
attention's varlen path on a GPU). With lengths from 32 to 1,024 (mean ~200)
padded to the longest, about 80% of a padded batch is padding.

Per sample b with n_b generated response tokens (the response region's
attended tokens, whatever the reward did to response_mask):
- the token stream: cu_tokens offsets, the response as the last n_b tokens;
- the response stream: cu_seqlens offsets, n_b tokens each, carrying the
  per-token experience (log-probs, values, rewards, advantages, mask).
The logit that predicts response token j of b sits at stream position
cu_tokens[b + 1] - n_b + j - 1 (logit_index): only those rows go through the
lm_head (HF's `logits_to_keep` as an index tensor), as the padded path keeps
only the last R + 1 positions.
"""

from __future__ import annotations

import dataclasses

import torch

from ..ops import expand_to_tokens, gae, kl_penalty, logprobs_from_logits, pack, rollout_mismatch, whiten


def _lengths(cu: torch.Tensor) -> torch.Tensor:
    return cu[1:] - cu[:-1]


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0))


def _within(cu: torch.Tensor, total: int) -> torch.Tensor:
    """Each token's index inside its segment."""
    return torch.arange(total, device=cu.device) - expand_to_tokens(cu[:-1], cu, total)


def gather_segments(x: torch.Tensor, cu: torch.Tensor, idx: torch.Tensor):
    """The segments `idx` of packed x (total,), in idx's order, and their
    offsets: (x', cu'). No host sync but the new total."""
    lens = _lengths(cu)[idx]
    new_cu = _offsets(lens)
    total = int(new_cu[-1])
    starts = expand_to_tokens(cu[idx], new_cu, total)
    return x[starts + _within(new_cu, total)], new_cu


@dataclasses.dataclass
class PackedRollout:
    """A rollout's tokens packed: (1, total) model inputs plus the response stream."""

    input_ids: torch.Tensor  # (1, total) int64
    position_ids: torch.Tensor  # (1, total) int64, 0 at each sample's first token
    cu_tokens: torch.Tensor  # (N + 1,) int64 offsets of the token stream
    cu_seqlens: torch.Tensor  # (N + 1,) int64 offsets of the response stream
    logit_index: torch.Tensor  # (n_resp,) stream position whose logit predicts each response token
    labels: torch.Tensor  # (n_resp,) the response tokens
    mask: torch.Tensor  # (n_resp,) bool: response_mask packed (0 on samples dropped for their reward)
    sampler_logprobs: torch.Tensor | None = None  # (n_resp,) the rollout's own log-probs, if it has them

    @classmethod
    def from_rollout(cls, ro) -> PackedRollout:
        P = ro.prompt_length
        attn = ro.attention_mask.bool()
        ids, cu_tok = pack(ro.sequences, attn)
        generated = attn[:, P:]
        labels, cu = pack(ro.sequences[:, P:], generated)
        mask, _ = pack(ro.response_mask, generated)
        sampler = pack(ro.logprobs, generated)[0] if ro.logprobs is not None else None
        cu_tok, cu = cu_tok.long(), cu.long()
        total, n_resp = ids.shape[0], labels.shape[0]
        pos = _within(cu_tok, total)
        first_response = expand_to_tokens(cu_tok[1:] - _lengths(cu), cu, n_resp)
        logit_index = first_response + _within(cu, n_resp) - 1
        return cls(ids[None], pos[None], cu_tok, cu, logit_index, labels, mask.bool(), sampler)

    def pack_response(self, x: torch.Tensor, ro) -> torch.Tensor:
        """A padded (N, R) response tensor of `ro` (this rollout) -> (n_resp,)."""
        return pack(x, ro.attention_mask[:, ro.prompt_length :].bool())[0]

    def select(self, idx: torch.Tensor) -> PackedRollout:
        """The samples idx (a minibatch), repacked."""
        ids, cu_tok = gather_segments(self.input_ids[0], self.cu_tokens, idx)
        pos, _ = gather_segments(self.position_ids[0], self.cu_tokens, idx)
        labels, cu = gather_segments(self.labels, self.cu_seqlens, idx)
        mask, _ = gather_segments(self.mask, self.cu_seqlens, idx)
        sampler = self.pick(self.sampler_logprobs, idx)
        n_resp = labels.shape[0]
        first_response = expand_to_tokens(cu_tok[1:] - _lengths(cu), cu, n_resp)
        logit_index = first_response + _within(cu, n_resp) - 1
        return PackedRollout(ids[None], pos[None], cu_tok, cu, logit_index, labels, mask, sampler)

    def pick(self, x: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
        """The samples idx of a packed response tensor (None stays None)."""
        return None if x is None else gather_segments(x, self.cu_seqlens, idx)[0]

    def segment_sum(self, x: torch.Tensor) -> torch.Tensor:
        """(n_resp,) -> (N,): the sum over each sample's response tokens."""
        out = x.new_zeros(self.cu_seqlens.shape[0] - 1)
        seg = expand_to_tokens(torch.arange(out.shape[0], device=x.device), self.cu_seqlens, x.shape[0])
        return out.index_add_(0, seg, x)


def packed_logprobs(model, pk: PackedRollout, *, temperature=1.0, return_entropy=False, **filters):
    """response_logprobs on the packed stream: (n_resp,) fp32 log-probs (0
    where pk.mask is off) and entropy or None. The lm_head runs on the
    n_resp rows of logit_index only."""
    out = model(
        input_ids=pk.input_ids,
        position_ids=pk.position_ids,
        logits_to_keep=pk.logit_index,
        use_cache=False,
    )
    labels = pk.labels.masked_fill(~pk.mask, -100)
    res = logprobs_from_logits(out.logits[0], labels, temperature=temperature, return_entropy=return_entropy, **filters)
    return res if return_entropy else (res, None)


def packed_values(critic, pk: PackedRollout) -> torch.Tensor:
    """response_values on the packed stream: (n_resp,) fp32, V of the state
    before each response token."""
    return critic(pk.input_ids, None, position_ids=pk.position_ids)[0][pk.logit_index]


# ---------------------------------------------------------------- experience math on the response stream


def shaped_rewards(pk: PackedRollout, scores, logprobs, ref_logprobs, kl_coef: float, kl_kind: str):
    """rollout.shaped_rewards on the packed stream: -kl_coef * KL on every
    response token plus each sample's score on its last one (n_resp,) each."""
    m = pk.mask.float()
    kl = kl_penalty(logprobs, ref_logprobs, kind=kl_kind) * m
    rewards = -kl_coef * kl
    has = pk.segment_sum(m) > 0  # a sample dropped for its reward has no response token left
    last = (pk.cu_seqlens[1:] - 1).clamp_min(0)
    rewards.index_add_(0, last, torch.where(has, scores, torch.zeros_like(scores)))
    return rewards, kl


def advantages(pk: PackedRollout, rewards, values, *, gamma, lam, whiten_advantages):
    """GAE reset at every sample boundary, then whitening over the whole stream."""
    adv, ret = gae(rewards, values, pk.mask, gamma=gamma, lam=lam, cu_seqlens=pk.cu_seqlens)
    if whiten_advantages:
        adv = whiten(adv, pk.mask, cu_seqlens=pk.cu_seqlens)
    return adv, ret


def mismatch_metrics(pk: PackedRollout, old_logprobs) -> dict:
    """rollout.mismatch_metrics on the packed stream."""
    if pk.sampler_logprobs is None:
        return {}
    mask = (
        pk.mask & (old_logprobs > float("-inf")) & (pk.sampler_logprobs > float("-inf"))
    )  # as rollout.mismatch_metrics
    stats = rollout_mismatch(old_logprobs, pk.sampler_logprobs, mask, cu_seqlens=pk.cu_seqlens)
    own = ("rollout_corr/rollout_is", "rollout_corr/rollout_rs")
    return {k: float(v) for k, v in stats.items() if not k.startswith(own)}


def packed_loss_args(pk: PackedRollout, agg: str, width: int) -> dict:
    """The loss ops' packed keywords. seq-mean-token-sum-norm divides by a
    constant that defaults to the padded width T; the packed run passes the
    rollout's response width so both modes optimise the same objective."""
    args = {"cu_seqlens": pk.cu_seqlens}
    if agg == "seq-mean-token-sum-norm":
        args["agg_norm"] = float(width)
    return args
