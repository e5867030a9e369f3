"""LoRA adapters through PEFT (optional: pip install peft).

`apply_lora(model, r=8, ...)` injects LoRA layers into a Hugging Face causal
LM and freezes everything else; the trainers then optimise only the adapters
(make_optimizer keeps parameters with requires_grad). Build the frozen
reference and the critic from the model *before* applying LoRA: they are
separate copies here (TRL can instead reuse the policy with its adapters
disabled as the reference; not done here).
"""

from __future__ import annotations

from torch import nn


def apply_lora(
    model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, target_modules="all-linear", **kwargs
) -> nn.Module:
    """PEFT's get_peft_model with a causal-LM LoraConfig. target_modules
    "all-linear" adapts every linear layer except the output head."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ImportError("LoRA needs the peft package: pip install peft") from exc
    if int(r) < 1:
        raise ValueError(f"apply_lora: r must be >= 1, got {r}")
    _check_lora_keys(kwargs, LoraConfig)
    cfg = LoraConfig(
        r=int(r), lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM", **kwargs
    )
    return get_peft_model(model, cfg)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PeftModel (its LoRA layers stay in
    place), or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


_SET_HERE = ("lora_alpha", "lora_dropout", "task_type")  # LoraConfig fields apply_lora fills from its own arguments


def _check_lora_keys(kwargs: dict, lora_config_cls) -> None:
    """A `lora:` key that is neither apply_lora's nor a LoraConfig field fails
    by name, with the closest accepted one (config.check_keys)."""
    import dataclasses

    from .config import check_keys

    given = sorted(set(kwargs) & set(_SET_HERE))
    if given:
        raise ValueError(f"lora: {', '.join(given)} is set from apply_lora's alpha / dropout (task_type: CAUSAL_LM)")
    fields = {f.name for f in dataclasses.fields(lora_config_cls)} - set(_SET_HERE)
    check_keys(kwargs, None, extra=sorted(fields | {"r", "alpha", "dropout", "target_modules"}), name="lora")
