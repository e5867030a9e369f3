"""Model glue: value / reward heads on a causal LM's trunk, and the sequence
log-prob forwards the trainers share.

Layout used everywhere: `sequences (B, P+R)` = prompt (left-padded, P tokens)
then response (right-padded, R tokens); `attention_mask (B, P+R)`;
`response_mask (B, R)`. The logit at position P-1+t predicts response token t,
so only the last R+1 positions go through the lm_head (`logits_to_keep`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..ops import linear_logprobs, logprobs_from_logits
from .lora import unwrap_peft
from .parallel import is_sharded

FUSED_SEQUENCE_LOGPROBS = "rlhf_fast_sequence_logprobs"  # attribute name of the registered method
FUSED_HEAD_LOSS = "rlhf_fast_head_loss"  # likewise, for head_loss


def _left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """HF's positions for left padding: cumsum(mask) - 1, 0 on padding."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0)


def trunk_of(lm: nn.Module) -> nn.Module:
    """The decoder trunk of an HF causal LM (LlamaModel inside LlamaForCausalLM),
    looking through a PEFT wrapper (whose own base_model is the LoRA model)."""
    lm = unwrap_peft(lm)
    return lm.base_model if hasattr(lm, "base_model") else lm


class ScalarHeadModel(nn.Module):
    """A causal-LM trunk plus a linear head: per-token scalars (a critic) or one
    score per sequence at its last valid token (a reward model).

    Built from a causal LM by copying its trunk, so the critic / reward model
    starts from the SFT features (InstructGPT initialises both that way)."""

    def __init__(self, trunk: nn.Module, hidden_size: int, init_std: float = 0.0):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.head.weight, std=init_std) if init_std > 0 else nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_causal_lm(cls, lm: nn.Module, init_std: float = 0.0) -> ScalarHeadModel:
        return cls(copy.deepcopy(trunk_of(lm)), lm.config.hidden_size, init_std)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, last_only: bool = False, position_ids=None
    ) -> torch.Tensor:
        """input_ids, attention_mask: (B, T) -> (B, T) fp32 scalars, or (B,)
        at each row's last attended token when last_only (through forward, so DDP sees it).
        Packed rows (trainer/packing.py): attention_mask None, position_ids restarting per sample."""
        if attention_mask is not None:
            position_ids = _left_padded_positions(attention_mask)
        # no KV cache: transformers reads packed rows from position_ids only without one
        h = self.trunk(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        out = self.head(h).squeeze(-1).float()
        if not last_only:
            return out
        assert attention_mask is not None, "last_only needs the attention mask"
        T = attention_mask.shape[1]
        last = (attention_mask.long() * torch.arange(T, device=attention_mask.device)).argmax(-1)
        return out.gather(1, last[:, None]).squeeze(1)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B,): the scalar at each row's last attended token."""
        return self(input_ids, attention_mask, last_only=True)


def response_logprobs(
    model,
    sequences,
    attention_mask,
    response_mask,
    prompt_length: int,
    *,
    temperature=1.0,
    return_entropy=False,
    **filters,
):
    """Log-probs (and entropy) of the response tokens under `model`.

    sequences, attention_mask: (B, P+R); response_mask: (B, R) bool.
    Returns logprobs (B, R) fp32 (0 where masked) and entropy (B, R) or None,
    through rlhf_fast.logprobs_from_logits on the (B, R, V) logit slice read in place;
    filters (top_k / top_p / min_p) score under the sampler's truncation."""
    R = sequences.shape[1] - prompt_length
    out = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=_left_padded_positions(attention_mask),
        logits_to_keep=R + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1]  # (B, R, V): position P-1+t predicts token t
    labels = sequences[:, prompt_length:].masked_fill(~response_mask, -100)
    res = logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=return_entropy, **filters)
    return res if return_entropy else (res, None)


def response_values(critic: ScalarHeadModel, sequences, attention_mask, prompt_length: int) -> torch.Tensor:
    """V(state before response token t): the critic's scalar at P-1+t. (B, R) fp32."""
    return critic(sequences, attention_mask)[:, prompt_length - 1 : -1]


def sequence_logprobs_linear(lm, input_ids, attention_mask, loss_mask):
    """Summed log-prob of the tokens where loss_mask is set, and their count.

    input_ids, attention_mask, loss_mask: (B, T). The trunk's final hidden
    states go straight into rlhf_fast.linear_logprobs with the lm_head weight,
    so the (B, T, V) logits are never materialised (DPO's memory peak).
    Returns (logp_sum (B,), n_tokens (B,)). Under FSDP2 this runs as the
    model's registered forward method (register_fused_logprobs), so its
    weights are gathered around it."""
    fused = getattr(lm, FUSED_SEQUENCE_LOGPROBS, None)
    if fused is not None:
        return fused(input_ids, attention_mask, loss_mask)
    return _sequence_logprobs_linear(lm, input_ids, attention_mask, loss_mask)


def register_fused_logprobs(lm) -> None:
    """For an FSDP2-sharded causal LM: make sequence_logprobs_linear an FSDP
    forward method of `lm`. It reads the trunk and the lm_head weight outside
    `forward`, so without this the root's weights (embeddings, final norm,
    lm_head) would not be all-gathered around it, nor its gradients
    reduce-scattered. A no-op on an unsharded model."""
    if not is_sharded(lm) or getattr(lm, FUSED_SEQUENCE_LOGPROBS, None) is not None:
        return
    from torch.distributed.fsdp import register_fsdp_forward_method

    def fused(input_ids, attention_mask, loss_mask):
        return _sequence_logprobs_linear(lm, input_ids, attention_mask, loss_mask)

    setattr(lm, FUSED_SEQUENCE_LOGPROBS, fused)
    register_fsdp_forward_method(lm, FUSED_SEQUENCE_LOGPROBS)


def _sequence_logprobs_linear(lm, input_ids, attention_mask, loss_mask):
    h = trunk_of(lm)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=_left_padded_positions(attention_mask)
    ).last_hidden_state
    head = lm.get_output_embeddings()
    labels = input_ids[:, 1:].masked_fill(~loss_mask[:, 1:].bool(), -100)
    logp = linear_logprobs(h[:, :-1], head.weight, labels, bias=head.bias)
    return logp.sum(-1), loss_mask[:, 1:].sum(-1)


def head_loss(lm, loss_fn, **trunk_inputs):
    """loss_fn(h, weight, bias) on the trunk's final hidden states h and the
    lm_head's weight and bias: the policy step from hidden states
    (rlhf_fast.linear_ppo_loss), with no (B, R, V) logits. trunk_inputs go
    to the trunk (input_ids, attention_mask / position_ids); no KV cache.
    Under FSDP2 this runs as the model's registered forward method
    (register_head_loss), so the root's weights are gathered around it."""
    fused = getattr(lm, FUSED_HEAD_LOSS, None)
    if fused is not None:
        return fused(loss_fn, **trunk_inputs)
    return _head_loss(lm, loss_fn, **trunk_inputs)


def register_head_loss(lm) -> None:
    """head_loss as an FSDP2 forward method of a sharded `lm` (as
    register_fused_logprobs); a no-op on an unsharded model."""
    if not is_sharded(lm) or getattr(lm, FUSED_HEAD_LOSS, None) is not None:
        return
    from torch.distributed.fsdp import register_fsdp_forward_method

    def fused(loss_fn, **trunk_inputs):
        return _head_loss(lm, loss_fn, **trunk_inputs)

    setattr(lm, FUSED_HEAD_LOSS, fused)
    register_fsdp_forward_method(lm, FUSED_HEAD_LOSS)


def _head_loss(lm, loss_fn, **trunk_inputs):
    h = trunk_of(lm)(use_cache=False, **trunk_inputs).last_hidden_state
    head = lm.get_output_embeddings()
    return loss_fn(h, head.weight, head.bias)
