"""save_pretrained-style outputs, beside the bare state_dict (model.pt).

- A policy (a transformers causal LM, or a PEFT model: then its adapters)
  goes through its own save_pretrained, with the tokenizer when it is a
  Hugging Face one: `AutoModelForCausalLM.from_pretrained(dir)` reads it.
- A ScalarHeadModel (reward model or PPO critic) is written as the matching
  `<Arch>ForSequenceClassification` with num_labels=1, so that
  `AutoModelForSequenceClassification.from_pretrained(dir)` reads it, as TRL
  and OpenRLHF expect of a reward model. HF's score layer has no bias; ours
  has one, so the bias is stored in config.json as `rlhf_fast_score_bias`:
  the HF model's logits[:, 0] + that bias is our score, and
  `load_scalar_head(dir)` restores the exact model. (A constant shift does not
  change Bradley-Terry preferences or GRPO's group-normalised advantages; it
  does change PPO's raw rewards, hence the stored bias.)
"""

from __future__ import annotations

import torch

from .lora import unwrap_peft
from .models import ScalarHeadModel

OP = "rlhf_fast.trainer.export"


def save_policy(model, out_dir: str, tokenizer=None) -> str:
    """model.save_pretrained(out_dir) (+ tokenizer.save_pretrained when it has one)."""
    if not hasattr(model, "save_pretrained"):
        raise TypeError(
            f"{OP}.save_policy: {type(model).__name__} has no save_pretrained; expected a transformers "
            "model (or a PEFT model)"
        )
    model.save_pretrained(out_dir)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out_dir)
    return out_dir


def to_sequence_classification(head_model: ScalarHeadModel, pad_token_id: int | None = None):
    """The transformers <Arch>ForSequenceClassification (num_labels=1) holding
    the same trunk and head weight; config.rlhf_fast_score_bias holds the bias."""
    from transformers import AutoModelForSequenceClassification

    trunk = unwrap_peft(head_model.trunk)
    cfg = trunk.config.__class__.from_dict(trunk.config.to_dict())
    cfg.num_labels = 1
    cfg.architectures = None
    if pad_token_id is not None:
        cfg.pad_token_id = pad_token_id
    cfg.rlhf_fast_score_bias = float(head_model.head.bias.detach().float().item())
    try:
        seq = AutoModelForSequenceClassification.from_config(cfg)
    except ValueError as e:
        raise TypeError(
            f"{OP}: transformers has no sequence-classification class for {type(trunk).__name__} ({e})"
        ) from None
    score = getattr(seq, "score", None)
    if not isinstance(score, torch.nn.Linear) or score.weight.shape != head_model.head.weight.shape:
        raise TypeError(
            f"{OP}: {type(seq).__name__} has no `score` linear layer of shape "
            f"{tuple(head_model.head.weight.shape)} to hold the head"
        )
    missing, unexpected = seq.base_model.load_state_dict(trunk.state_dict(), strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise TypeError(
            f"{OP}: the trunk's weights do not fit {type(seq).__name__}.{seq.base_model_prefix} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        score.weight.copy_(head_model.head.weight)
    return seq.to(dtype=next(trunk.parameters()).dtype)


def save_scalar_head(head_model: ScalarHeadModel, out_dir: str, tokenizer=None, pad_token_id=None) -> str:
    """A reward model / critic as an AutoModelForSequenceClassification folder."""
    if pad_token_id is None and tokenizer is not None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
    to_sequence_classification(head_model, pad_token_id).save_pretrained(out_dir)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out_dir)
    return out_dir


def load_scalar_head(path: str) -> ScalarHeadModel:
    """The ScalarHeadModel saved by save_scalar_head (bias included)."""
    from transformers import AutoModelForSequenceClassification

    seq = AutoModelForSequenceClassification.from_pretrained(path)
    model = ScalarHeadModel(seq.base_model, seq.config.hidden_size)
    with torch.no_grad():
        model.head.weight.copy_(seq.score.weight)
        model.head.bias.fill_(getattr(seq.config, "rlhf_fast_score_bias", 0.0))
    return model


def export_run(algo: str, trainer, trained, out_dir: str, tokenizer=None, pad_token_id=None) -> list[str]:
    """What `rlhf-fast train` writes beside model.pt: out_dir/policy (ppo, grpo,
    dpo), out_dir/value_model (ppo's critic), out_dir/reward_model (rm).
    Returns the folders written. Call on every rank; rank 0 writes. A run
    sharded with FSDP2 writes none (model.pt holds its gathered weights)."""
    import os

    from .parallel import is_sharded

    if is_sharded(trained) or trainer.rank != 0:
        return []
    tok = tokenizer if hasattr(tokenizer, "save_pretrained") else None
    if algo == "rm":
        return [save_scalar_head(trained, os.path.join(out_dir, "reward_model"), tok, pad_token_id)]
    written = [save_policy(trained, os.path.join(out_dir, "policy"), tok)]
    if algo == "ppo":
        written.append(save_scalar_head(trainer.critic, os.path.join(out_dir, "value_model"), tok, pad_token_id))
    return written
