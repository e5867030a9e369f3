"""Trainer configs: plain dataclasses, loadable from YAML.

One dataclass per trainer; the fields every trainer shares live in
TrainConfig. `from_yaml` rejects unknown keys by name, so a typo in a config
file fails loudly instead of silently training with a default. Every field's
type and range is checked at construction, in one table (RULES below), with an
error naming the field, the value and what is allowed: `batch_size: -3` or
`gamma: 2.0` fail before a model is built, not after the first rollout.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass

from ..specs import AGG_MODES, ESTIMATORS, KL_KINDS, RolloutCorrection


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 100  # optimizer-level outer steps (PPO/GRPO: rollouts; RM/DPO: batches)
    lr: float = 1e-5
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # constant | linear | cosine (after warmup)
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    grad_accum: int = 1
    log_every: int = 1
    out_dir: str | None = None  # metrics.jsonl and checkpoints go here
    checkpoint_every: int = 0  # 0: only when save() is called
    progress: bool = True  # one console line per log step
    tensorboard: bool = False  # also write out_dir/tensorboard (needs the tensorboard package)
    # Mixed precision for every forward in a step: "bf16" runs matmuls under
    # torch.autocast(device, bfloat16); master weights, optimizer state, the
    # log-probs and the losses stay fp32 (the ops return fp32 from bf16 logits).
    autocast: str | None = None  # None | "bf16"
    # Under torchrun: "ddp" replicates the models, "fsdp2" shards them across
    # ranks (trainer/parallel.py). Ignored in a single process.
    parallel: str = "ddp"  # ddp | fsdp2
    # Stop with an error after this many consecutive steps in which no
    # optimizer step was taken (every update skipped as non-finite, or every
    # reward non-finite). 0: never stop.
    max_skipped_steps: int = 10

    def __post_init__(self):
        validate(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        check_keys(data, cls)
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str) -> TrainConfig:
        data = load_yaml(path)
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}.from_yaml: {path} must hold a mapping, got {type(data).__name__}")
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RolloutConfig(TrainConfig):
    batch_size: int = 16  # prompts per rollout
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    # Which distribution the old, reference and current log-probs are taken under
    # (docs/sampling.md): "processed", the one the rollout samples from (temperature, then
    # top_k / top_p / min_p, renormalised; the plain tempered softmax when nothing truncates),
    # so the importance ratio compares like with like; "raw", the tempered softmax only
    # (TRL / verl's default, biased under truncation). Tokens outside the kept set score -inf
    # and are masked out of the loss (metric outside_kept_frac).
    logprobs_mode: str = "processed"
    # The update's policy loss: "fused", rlhf_fast.linear_ppo_loss on the trunk's hidden states
    # and the lm_head weight (no (B, R, V) logits, 3 GEMMs a chunk); "logits", the lm_head's
    # logits then logprobs_from_logits and ppo_loss (the same loss and metrics to rounding).
    policy_loss: str = "fused"
    ppo_epochs: int = 2
    minibatch_size: int = 8  # sequences per minibatch (each split into grad_accum micro-batches)
    clip_low: float = 0.2
    clip_high: float | None = None  # DAPO clip-higher; None = clip_low
    dual_clip: float | None = None  # verl clip_ratio_c (e.g. 3.0)
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"
    kl_coef: float = 0.05
    kl_kind: str = "k1"  # k1 | k2 | k3 | abs
    kl_target: float | None = None  # adaptive controller (Ziegler et al.) when set
    kl_horizon: int = 10000
    reward_clip: float | None = None  # clamp scores to [-c, c]
    reward_norm: bool = False  # running mean/std normalisation of scores
    missing_eos_penalty: float | None = None  # subtracted from the score of a response cut off before EOS (TRL)
    # Rollout correction inside ppo_loss (docs/rollout_correction.md), verl's keys:
    # {rollout_is: token | sequence | geometric, rollout_is_threshold: 2.0 or "0.5_2.0",
    #  rollout_rs: e.g. seq_mean_k1, rollout_rs_threshold: "0.999_1.001"}. None: off.
    # The rollout/trainer mismatch metrics (rollout_corr/*) are logged either way.
    rollout_correction: dict | None = None
    # Packed sequences (docs/packing.md): the training forwards run on one packed row of the
    # samples' tokens (position_ids restarting per sample) and the experience, advantages and
    # losses stay packed; the same metrics as padded, to rounding, without the padding's work.
    packing: bool = False


@dataclass
class PPOConfig(RolloutConfig):
    critic_lr: float | None = None  # None: lr
    vf_coef: float = 0.5
    value_clip: float | None = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    kl_in_reward: bool = True  # False: KL as a loss term (ppo_loss kl_coef) instead of in the token rewards


@dataclass
class GRPOConfig(RolloutConfig):
    num_samples: int = 4  # n responses per prompt
    estimator: str = "grpo"  # grpo | dr_grpo | rloo | reinforce_baseline
    kl_kind: str = "k3"
    kl_coef: float = 0.0  # KL as a loss (0: no reference forward)


@dataclass
class RewardConfig(TrainConfig):
    batch_size: int = 32  # pairs per step
    epochs: int = 1
    margin: bool = False  # subtract the pair's margin inside the sigmoid (Llama-2 style)
    eval_fraction: float = 0.1
    center_rewards_coef: float = 0.0  # TRL's center_rewards_coefficient


@dataclass
class DPOConfig(TrainConfig):
    batch_size: int = 16
    epochs: int = 1
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo
    label_smoothing: float = 0.0


# ---------------------------------------------------------------- validation

# field -> (type, rule[, why]). type: "int" | "float" | "bool" | "str" | a
# tuple of allowed strings; a trailing "?" allows None. rule: a range in
# interval notation ("[0, 1)", "> 0", ">= 1") or None. why: said in the error
# when the reason is not obvious. Fields of every config class.
RULES: dict[str, tuple] = {
    # TrainConfig
    # torch generators take seeds in [0, 2**64); each rank's sampling stream adds 1 + 1000003 * rank
    "seed": ("int", "[0, 9223372036854775807]", "0 to 2**63 - 1"),
    "steps": ("int", ">= 0"),
    "lr": ("float", "> 0"),
    "weight_decay": ("float", ">= 0"),
    "lr_schedule": (("constant", "linear", "cosine"), None),
    "warmup_steps": ("int", ">= 0"),
    "max_grad_norm": ("float?", ">= 0"),
    "grad_accum": ("int", ">= 1"),
    "log_every": ("int", ">= 1"),
    "out_dir": ("str?", None),
    "checkpoint_every": ("int", ">= 0"),
    "progress": ("bool", None),
    "tensorboard": ("bool", None),
    "autocast": (("bf16",) + (None,), None),
    "parallel": (("ddp", "fsdp2"), None),
    "max_skipped_steps": ("int", ">= 0"),
    # RolloutConfig
    "batch_size": ("int", ">= 1"),
    "max_new_tokens": ("int", ">= 1"),
    "temperature": ("float", "> 0"),
    "top_k": ("int", ">= 0"),
    "top_p": ("float", "(0, 1]"),
    "min_p": ("float", "[0, 1]"),
    "logprobs_mode": (("processed", "raw"), None),
    "policy_loss": (("fused", "logits"), None),
    "ppo_epochs": ("int", ">= 1"),
    "minibatch_size": ("int", ">= 1"),
    "clip_low": ("float", ">= 0"),
    "clip_high": ("float?", ">= 0"),
    "dual_clip": ("float?", "> 1"),
    "entropy_coef": ("float", None),
    "loss_agg": (AGG_MODES, None),
    "kl_coef": ("float", ">= 0"),
    "kl_kind": (KL_KINDS, None),
    "kl_target": ("float?", "> 0"),
    "kl_horizon": ("int", ">= 1"),
    "reward_clip": ("float?", "> 0"),
    "reward_norm": ("bool", None),
    "missing_eos_penalty": ("float?", None),
    "rollout_correction": ("rollout_correction?", None),
    "packing": ("bool", None),
    # PPOConfig
    "critic_lr": ("float?", "> 0"),
    "vf_coef": ("float", ">= 0"),
    "value_clip": ("float?", "> 0"),
    "gamma": ("float", "[0, 1]"),
    "lam": ("float", "[0, 1]"),
    "whiten_advantages": ("bool", None),
    "kl_in_reward": ("bool", None),
    # GRPOConfig
    "num_samples": (
        "int",
        ">= 2",
        "every estimator subtracts the group's own mean, so one sample per prompt makes every advantage 0 "
        "and trains nothing; for one sample per prompt use PPO, whose critic is the baseline",
    ),
    "estimator": (ESTIMATORS, None),
    # RewardConfig, DPOConfig
    "epochs": ("int", ">= 1"),
    "margin": ("bool", None),
    "eval_fraction": ("float", "[0, 1)"),
    "center_rewards_coef": ("float", ">= 0"),
    "beta": ("float", "> 0"),
    "loss_type": (("sigmoid", "ipo"), None),
    "label_smoothing": ("float", "[0, 0.5)"),
}


def _bound(text: str) -> int | float:
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else float(text)  # ints exactly: 2**63 - 1 has no float


def _in_range(x: float, rule: str) -> bool:
    if rule.startswith((">", "<")):
        op, bound = rule.split()
        b = _bound(bound)
        return {">": x > b, ">=": x >= b, "<": x < b, "<=": x <= b}[op]
    lo, hi = (_bound(v) for v in rule[1:-1].split(","))
    return (x >= lo if rule[0] == "[" else x > lo) and (x <= hi if rule[-1] == "]" else x < hi)


def validate(config) -> None:
    """Check every field of `config` against RULES; ints given for float
    fields become floats. Raises ValueError naming the field, the value and
    what is allowed."""
    name = type(config).__name__
    for f in dataclasses.fields(config):
        if f.name not in RULES:
            raise TypeError(f"{name}.{f.name}: no validation rule (add it to config.RULES)")
        kind, rule, *why = RULES[f.name]
        v = getattr(config, f.name)

        def bad(allowed):
            because = f" ({why[0]})" if why else ""
            return ValueError(f"{name}: {f.name} = {v!r} is invalid; allowed: {allowed}{because}")

        if isinstance(kind, tuple):
            if v not in kind:
                raise bad("one of " + ", ".join(map(repr, kind)))
            continue
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        if v is None:
            if not optional:
                raise bad(f"{kind} {rule or ''}".strip())
            continue
        what = f"{kind} {rule}" if rule else kind
        what += " or None" if optional else ""
        if kind == "bool":
            if not isinstance(v, bool):
                raise bad("bool (true / false)")
        elif kind == "str":
            if not isinstance(v, str):
                raise bad("str" + (" or None" if optional else ""))
        elif kind == "rollout_correction":
            if not isinstance(v, dict):
                raise bad("a mapping of verl's rollout_is / rollout_rs keys, or None")
            try:
                RolloutCorrection.from_dict(v)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{name}: rollout_correction = {v!r} is invalid: {e}") from None
        elif kind == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(what)
        else:  # float: ints are accepted and stored as floats
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise bad(what)
            v = float(v)
            if not math.isfinite(v):
                raise bad(f"a finite {what}")
            object.__setattr__(config, f.name, v)
        if rule and not _in_range(v, rule):
            raise bad(what)


# YAML 1.1 (PyYAML) reads `1e-3` as a string: its float pattern wants a dot
# ("1.0e-3"). YAML 1.2 and everyone writing a learning rate do not; this
# resolver accepts both, so `lr: 1e-3` is the number 0.001.
_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


def _loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789"))
    return Loader


def load_yaml(path: str):
    """yaml.safe_load with YAML 1.2 floats ("1e-3", "5E-4")."""
    import yaml

    with open(path) as f:
        return yaml.load(f, Loader=_loader()) or {}


class ConfigError(ValueError):
    """A config the CLI reports as one line (unknown key, bad override)."""


def check_keys(data: dict, cls, extra=(), name: str | None = None) -> None:
    """Refuse keys that are neither `cls`'s fields (cls: a dataclass, or None)
    nor `extra` (the YAML-only keys such as model or reward), suggesting the
    closest accepted key and listing every accepted one. name: what the error
    starts with (default: the class's name)."""
    fields = {f.name for f in dataclasses.fields(cls)} if cls is not None else set()
    accepted = sorted(fields | set(extra))
    unknown = sorted(set(data) - set(accepted), key=str)
    if not unknown:
        return
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), accepted, n=1, cutoff=0.6)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ConfigError(
        f"{name or cls.__name__}: unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(parts)}; "
        f"accepted keys: {', '.join(accepted)}"
    )


def apply_overrides(data: dict, overrides) -> dict:
    """A copy of `data` with each "key=value" applied; the value is read as
    YAML (so `lr=1e-5` is a float, `lora={r: 8}` a mapping) and a dotted key
    (`lora.r=16`) sets a nested one. `data` itself is not modified."""
    import copy

    import yaml

    out = copy.deepcopy(data)
    for item in overrides or ():
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. lr=1e-5")
        value = yaml.load(text, Loader=_loader()) if text.strip() else None
        *parents, leaf = key.strip().split(".")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {name} is not a mapping")
        node[leaf] = value
    return out
