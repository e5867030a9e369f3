"""Thin RLHF trainers on rlhf_fast ops: PPO, GRPO, reward model, DPO."""

from .config import DPOConfig, GRPOConfig, PPOConfig, RewardConfig, TrainConfig
from .dpo import DPOTrainer
from .grpo import GRPOTrainer
from .kl_controller import KLController
from .lora import apply_lora
from .models import ScalarHeadModel, response_logprobs, sequence_logprobs_linear
from .ppo import PPOTrainer
from .reward_model import RewardTrainer
from .reward_scaling import RunningMoments

__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "GRPOConfig",
    "GRPOTrainer",
    "KLController",
    "PPOConfig",
    "PPOTrainer",
    "RewardConfig",
    "RewardTrainer",
    "RunningMoments",
    "ScalarHeadModel",
    "TrainConfig",
    "apply_lora",
    "response_logprobs",
    "sequence_logprobs_linear",
]
