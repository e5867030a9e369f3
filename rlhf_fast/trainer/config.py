"""Trainer configs: plain dataclasses, loadable from YAML.

One dataclass per trainer; the fields every trainer shares live in
TrainConfig. `from_yaml` rejects unknown keys by name, so a typo in a config
file fails loudly instead of silently training with a default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


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

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; known: {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str) -> "TrainConfig":
        import yaml

        with open(path) as f:
            data = yaml.safe_load(f) or {}
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
