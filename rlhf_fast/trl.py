"""TRL's GRPO entry points on rlhf_fast's trainer: change the import, keep the script.

    from rlhf_fast.trl import GRPOConfig, GRPOTrainer   # was: from trl import ...
    trainer = GRPOTrainer(model=model, reward_funcs=[fn, reward_model], args=GRPOConfig(...),
                          train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

These are adapters, not copies of TRL: GRPOConfig takes TRL 1.16's argument
names (and defaults) and maps them onto rlhf_fast.trainer.GRPOConfig;
GRPOTrainer is rlhf_fast.trainer.GRPOTrainer with TRL's constructor. The
rewards go through trainer.rewards.TextRewards, the prompts through
trainer.data. An argument that would change what is trained and is not
mapped raises, naming it; arguments that only steer TRL's own machinery
(logging back-ends, dataloader workers, gradient checkpointing) are accepted
and ignored. docs/trl.md has the table.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import types

import torch

from .trainer import config as _cfg
from .trainer.data import load_prompt_rows, tokenize_prompts
from .trainer.grpo import GRPOTrainer as _GRPOTrainer
from .trainer.rewards import TextRewards

# TRL name -> TRL 1.16 default. Each is mapped in GRPOConfig.to_rlhf_fast.
MAPPED = {
    "output_dir": None,
    "seed": 42,
    "learning_rate": 1e-6,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "warmup_ratio": 0.0,
    "max_steps": -1,
    "num_train_epochs": 3.0,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "steps_per_generation": None,
    "generation_batch_size": None,
    "num_generations": 8,
    "num_iterations": 1,
    "max_completion_length": 512,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "beta": 0.0,
    "epsilon": 0.2,
    "epsilon_high": None,
    "loss_type": "dapo",
    "scale_rewards": "group",
    "reward_weights": None,
    "logging_steps": 10,
    "save_steps": 500,
    "save_strategy": "steps",
    "bf16": None,
    "use_cpu": False,
    "disable_tqdm": False,
    "chat_template_kwargs": None,
    "model_init_kwargs": None,
}
# Accepted at TRL's default only: any other value changes the algorithm in a way not implemented here.
DEFAULT_ONLY = {
    "min_p": (None, 0.0),
    "repetition_penalty": (1.0,),
    "use_vllm": (False,),
    "fp16": (False,),
    "importance_sampling_level": ("token",),
    "multi_objective_aggregation": ("sum_then_normalize",),
    "delta": (None,),
    "mask_truncated_completions": (False,),
    "top_entropy_quantile": (1.0,),
    "shuffle_dataset": (True,),
    "disable_dropout": (False,),
    "sync_ref_model": (False,),
    "num_generations_eval": (None,),
    "use_liger_kernel": (False,),
}
# Only TRL's own machinery (logging, hub, data loading, memory): no effect on what is trained here.
IGNORED = {
    "report_to",
    "logging_dir",
    "run_name",
    "logging_strategy",
    "logging_first_step",
    "log_completions",
    "num_completions_to_print",
    "log_level",
    "gradient_checkpointing",
    "gradient_checkpointing_kwargs",
    "activation_checkpointing",
    "dataloader_num_workers",
    "dataloader_pin_memory",
    "dataloader_drop_last",
    "save_total_limit",
    "save_only_model",
    "push_to_hub",
    "hub_model_id",
    "overwrite_output_dir",
    "remove_unused_columns",
    "ddp_find_unused_parameters",
    "torch_empty_cache_steps",
    "max_prompt_length",
    "eval_strategy",
    "eval_steps",
    "per_device_eval_batch_size",
    "wandb_log_unique_prompts",
}
_LOSS_AGG = {
    "dapo": "token-mean",
    "bnpo": "token-mean",
    "grpo": "seq-mean-token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}
_ESTIMATOR = {"group": "grpo", True: "grpo", "none": "dr_grpo", False: "dr_grpo"}
_SCHEDULE = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}


def _value(v):
    return getattr(v, "value", v)  # TRL passes enums (SchedulerType.LINEAR, SaveStrategy.STEPS)


class GRPOConfig:
    """TRL's GRPOConfig arguments (names and defaults of TRL 1.16) for rlhf_fast.

    Raises TypeError for a name TRL's GRPOConfig does not have here (with
    the closest names), and ValueError for a TRL argument set to a value
    rlhf_fast does not implement (naming it and what is supported)."""

    def __init__(self, output_dir: str | None = None, **kwargs):
        kwargs["output_dir"] = output_dir
        unknown = sorted(set(kwargs) - set(MAPPED) - set(DEFAULT_ONLY) - IGNORED)
        if unknown:
            known = sorted(set(MAPPED) | set(DEFAULT_ONLY) | IGNORED)
            near = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
            hints = "; ".join(f"{k} (did you mean {v[0]}?)" if v else k for k, v in near.items())
            raise TypeError(
                f"rlhf_fast.trl.GRPOConfig: unsupported arguments: {hints}. Supported (TRL names): "
                f"{', '.join(sorted(MAPPED))}; at TRL's default only: {', '.join(sorted(DEFAULT_ONLY))}; "
                "see docs/trl.md"
            )
        for k, allowed in DEFAULT_ONLY.items():
            if k in kwargs and _value(kwargs[k]) not in allowed:
                raise ValueError(
                    f"rlhf_fast.trl.GRPOConfig: {k}={kwargs[k]!r} is not supported; rlhf_fast runs "
                    f"TRL's default ({allowed[0]!r}) only (docs/trl.md)"
                )
        for k, default in {**MAPPED, **{k: v[0] for k, v in DEFAULT_ONLY.items()}}.items():
            setattr(self, k, _value(kwargs.get(k, default)))
        self.ignored = sorted(set(kwargs) & IGNORED)
        if self.scale_rewards not in _ESTIMATOR:
            raise ValueError(
                f"rlhf_fast.trl.GRPOConfig: scale_rewards={self.scale_rewards!r} is not supported; "
                "use 'group' (GRPO) or 'none' (Dr. GRPO)"
            )
        if self.loss_type not in _LOSS_AGG:
            raise ValueError(
                f"rlhf_fast.trl.GRPOConfig: loss_type={self.loss_type!r} is not supported; use one of "
                f"{', '.join(_LOSS_AGG)}"
            )
        if self.lr_scheduler_type not in _SCHEDULE:
            raise ValueError(
                f"rlhf_fast.trl.GRPOConfig: lr_scheduler_type={self.lr_scheduler_type!r} is not "
                f"supported; use one of {', '.join(_SCHEDULE)}"
            )
        if self.save_strategy not in ("steps", "no"):
            raise ValueError(
                f"rlhf_fast.trl.GRPOConfig: save_strategy={self.save_strategy!r} is not supported; use 'steps' or 'no'"
            )
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError(
                "rlhf_fast.trl.GRPOConfig: generation_batch_size and steps_per_generation cannot both "
                "be set (as in TRL)"
            )
        ga, pd = self.gradient_accumulation_steps, self.per_device_train_batch_size
        world = int(os.environ.get("WORLD_SIZE", "1"))  # as TRL: the generation batch is global, per_device per rank
        if self.generation_batch_size is None:
            spg = self.steps_per_generation if self.steps_per_generation is not None else ga
            self.generation_batch_size = pd * world * spg
        if self.generation_batch_size % (pd * world):
            raise ValueError(
                f"rlhf_fast.trl.GRPOConfig: generation_batch_size ({self.generation_batch_size}) must "
                f"be divisible by per_device_train_batch_size x processes ({pd} x {world})"
            )
        self.steps_per_generation = self.generation_batch_size // (pd * world)
        if self.generation_batch_size % self.num_generations:
            raise ValueError(
                f"rlhf_fast.trl.GRPOConfig: generation_batch_size ({self.generation_batch_size}) must "
                f"be divisible by num_generations ({self.num_generations})"
            )

    def to_rlhf_fast(self, num_prompts: int) -> _cfg.GRPOConfig:
        """The rlhf_fast.trainer.GRPOConfig this run means (docs/trl.md).
        One rlhf_fast step is one generation batch: generation_batch_size
        completions = batch_size prompts x num_generations, then
        num_iterations epochs of optimizer steps over it, each of
        per_device_train_batch_size x gradient_accumulation_steps completions."""
        ga, n = self.gradient_accumulation_steps, self.num_generations
        prompts_per_rollout = self.generation_batch_size // n
        opt_steps_per_rollout = self.num_iterations * max(1, math.ceil(self.steps_per_generation / ga))
        if self.max_steps is not None and self.max_steps > 0:
            rollouts = math.ceil(self.max_steps / opt_steps_per_rollout)
        else:  # an epoch: as many prompts drawn as the dataset holds (drawn at random per rollout, not swept)
            rollouts = math.ceil(self.num_train_epochs * num_prompts / prompts_per_rollout)
        warm = self.warmup_steps
        if isinstance(warm, float) and 0 < warm < 1:  # transformers 5: a float below 1 is a ratio of the run
            warm = warm * rollouts * opt_steps_per_rollout
        warm = warm or self.warmup_ratio * rollouts * opt_steps_per_rollout
        bf16 = self.bf16 if self.bf16 is not None else (torch.cuda.is_available() and not self.use_cpu)
        return _cfg.GRPOConfig(
            seed=int(self.seed),
            steps=int(rollouts),
            lr=float(self.learning_rate),
            weight_decay=self.weight_decay,
            lr_schedule=_SCHEDULE[self.lr_scheduler_type],
            warmup_steps=math.ceil(warm / opt_steps_per_rollout),
            max_grad_norm=self.max_grad_norm,
            grad_accum=ga,
            log_every=max(1, int(self.logging_steps)),
            out_dir=self.output_dir,
            progress=not self.disable_tqdm,
            autocast="bf16" if bf16 else None,
            checkpoint_every=int(self.save_steps) if self.save_strategy == "steps" and self.output_dir else 0,
            batch_size=prompts_per_rollout,
            num_samples=n,
            max_new_tokens=int(self.max_completion_length),
            temperature=float(self.temperature),
            top_k=int(self.top_k or 0),
            top_p=float(self.top_p),
            ppo_epochs=int(self.num_iterations),
            minibatch_size=self.per_device_train_batch_size * ga,
            clip_low=float(self.epsilon),
            clip_high=None if self.epsilon_high is None else float(self.epsilon_high),
            loss_agg=_LOSS_AGG[self.loss_type],
            estimator=_ESTIMATOR[self.scale_rewards],
            kl_coef=float(self.beta),
            kl_kind="k3",
        )


class GRPOTrainer(_GRPOTrainer):
    """rlhf_fast's GRPO trainer behind TRL's constructor.

    model: a transformers causal LM (trained in place, as TRL does) or a path
        loaded with AutoModelForCausalLM (args.model_init_kwargs passed on).
    reward_funcs: one or a list of TRL reward functions, sequence-
        classification models, or paths to them (trainer.rewards.TextRewards).
    train_dataset: a datasets.Dataset with a "prompt" column, a list of dicts,
        or a JSONL path (trainer.data).
    processing_class: the policy's tokenizer (default: loaded from the model's path).
    peft_config: a peft LoraConfig; the reference model is taken before it.
    Not supported (raise when given): eval_dataset, callbacks, optimizers,
    quantization_config, rollout_func, environment_factory, tools.
    Under torchrun each rank generates its share of the global generation
    batch (per_device_train_batch_size x processes x steps_per_generation)."""

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: GRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        **unsupported,
    ):
        given = {k: v for k, v in unsupported.items() if v is not None}
        given.update({k: v for k, v in (("eval_dataset", eval_dataset), ("callbacks", callbacks)) if v})
        if optimizers not in ((None, None), None):
            given["optimizers"] = optimizers
        if given:
            raise TypeError(
                f"rlhf_fast.trl.GRPOTrainer: not supported: {', '.join(sorted(given))} (supported: model, "
                "reward_funcs, args, train_dataset, processing_class, reward_processing_classes, "
                "peft_config; docs/trl.md)"
            )
        if train_dataset is None:
            raise ValueError('rlhf_fast.trl.GRPOTrainer: train_dataset is required (a "prompt" column)')
        if reward_funcs is None:
            raise ValueError("rlhf_fast.trl.GRPOTrainer: reward_funcs is required")
        args = args if args is not None else GRPOConfig()
        if not isinstance(args, GRPOConfig):
            raise TypeError(
                f"rlhf_fast.trl.GRPOTrainer: args must be rlhf_fast.trl.GRPOConfig, got "
                f"{type(args).__module__}.{type(args).__name__} (change the import too)"
            )
        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM

            path = str(model)
            model = AutoModelForCausalLM.from_pretrained(path, **(args.model_init_kwargs or {}))
        else:
            path = getattr(getattr(model, "config", None), "_name_or_path", "") or None
        if processing_class is None:
            if not path:
                raise ValueError(
                    "rlhf_fast.trl.GRPOTrainer: processing_class (the tokenizer) is required for a "
                    "model that was not loaded from a path"
                )
            from transformers import AutoTokenizer

            processing_class = AutoTokenizer.from_pretrained(path, padding_side="left")
        tok = processing_class
        rows = load_prompt_rows(train_dataset)
        # checked before anything is built or generated: signatures, model types, weights
        reward = TextRewards(
            reward_funcs,
            tok,
            rows,
            args.num_generations,
            reward_weights=args.reward_weights,
            reward_processing_classes=reward_processing_classes,
            chat_template_kwargs=args.chat_template_kwargs,
        )
        config = args.to_rlhf_fast(len(rows))
        ids, mask = tokenize_prompts(rows, tok, chat_template_kwargs=args.chat_template_kwargs)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: join the process group (NCCL / gloo)
            from .trainer.run import _init_distributed

            _init_distributed()
        device = _device(args)  # as TRL (accelerate) does: the GPU of this rank unless use_cpu
        model.to(device)
        for f in reward.funcs:
            if isinstance(f, torch.nn.Module):
                f.to(device)
        ref = copy.deepcopy(model) if config.kl_coef > 0 else None
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        eos = _eos_ids(model, tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
        super().__init__(
            config,
            model,
            ref,
            reward,
            ids.to(device),
            mask.to(device),
            eos_token_id=eos,
            pad_token_id=pad,
            device=device,
        )
        self.model, self.processing_class, self.args, self.rows = model, tok, args, rows
        self.state = types.SimpleNamespace(global_step=0, max_steps=config.steps, log_history=[])
        reward.trainer_state = self.state

    def train(self, resume_from_checkpoint: str | bool | None = None, **unsupported) -> list[dict]:
        """Run args' steps. resume_from_checkpoint: a checkpoint.pt path, or
        True for output_dir/checkpoint.pt (as written every save_steps)."""
        if unsupported:
            raise TypeError(f"rlhf_fast.trl.GRPOTrainer.train: not supported: {', '.join(sorted(unsupported))}")
        if resume_from_checkpoint:
            path = resume_from_checkpoint
            if path is True:
                path = os.path.join(self.args.output_dir or "", "checkpoint.pt")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"rlhf_fast.trl.GRPOTrainer.train: no checkpoint at {path!r}")
            self.load(path)
            self.state.global_step = self.step_count
        return super().train()

    def step(self) -> dict:
        metrics = super().step()
        self.state.global_step = self.step_count + 1
        self.state.log_history.append(metrics)
        return metrics

    def save_model(self, output_dir: str | None = None) -> str:
        """model.save_pretrained + the tokenizer's, into output_dir (default
        args.output_dir), as TRL's trainer.save_model does. Returns the folder."""
        out = output_dir or self.args.output_dir
        if not out:
            raise ValueError("rlhf_fast.trl.GRPOTrainer.save_model: give output_dir (args.output_dir is None)")
        if self.rank == 0:
            self.model.save_pretrained(out)
            self.processing_class.save_pretrained(out)
        return out


def _device(args) -> torch.device:
    if args.use_cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def _eos_ids(model, tok) -> list[int]:
    """Every EOS the model's generation config declares, plus the tokenizer's (TRL does the same)."""
    gc = getattr(model, "generation_config", None)
    ids = getattr(gc, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids = [tok.eos_token_id, *ids]
    if not ids:
        raise ValueError(
            "rlhf_fast.trl.GRPOTrainer: neither the tokenizer nor the model's generation_config has an "
            "EOS token; set tokenizer.eos_token"
        )
    return ids
