"""`rlhf-fast train {ppo,grpo,rm,dpo} --config cfg.yaml`.

The YAML holds the trainer's dataclass fields at the top level plus:
  model: <local HF checkpoint dir> | a registered source  (policy / RM trunk; nothing downloaded;
         trainer/sources.py: the command line registers the demo's `tiny-demo`)
  prompts_file: one prompt per line              (ppo, grpo; optional when the source has prompts)
                or a .jsonl of {"prompt": text or chat messages, other columns}
  reward: rule | <path of a saved reward model state_dict from `train rm`>   (ppo, grpo; rule: the source's)
          or TRL-style: <file.py>:<fn> | <module>:<fn> | <AutoModelForSequenceClassification folder>
          | a list of those | {funcs: [...], weights: [...]}   (trainer/cli_inputs.py)
  pairs_file: JSONL {"prompt", "chosen", "rejected"}   (rm, dpo; optional when the source has pairs)
  init_checkpoint: a saved state_dict loaded into the model
  lora: {r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear}   (ppo, grpo, dpo; needs peft)
        LoRA on the policy only; the reference and the critic are copies taken before it
Every other key is refused by name (config.check_keys), before anything is built.
At the end the trained model's state_dict is written to out_dir/model.pt, and
save_pretrained folders beside it (trainer/export.py): out_dir/policy
(ppo, grpo, dpo), out_dir/value_model (ppo), out_dir/reward_model (rm, an
AutoModelForSequenceClassification folder).

Resume: when out_dir holds a checkpoint.pt (written every checkpoint_every
steps and at the end), the run continues from it: metrics.jsonl is cut back
to the checkpoint's step, so no step appears twice, and stale temp files of
a killed write are removed. Without a checkpoint (a run killed before its
first one, or whose first write failed) the run starts at step 0 and the
earlier rows are dropped. `fresh=True` (`--fresh`) deletes the checkpoint,
metrics and model.pt and starts at step 0. Every file is written atomically
(temp file, fsync, rename).

Under torchrun (WORLD_SIZE > 1) the process group is set up here (NCCL on
GPUs, one per local rank; gloo on CPU) and the config's `parallel` (ddp |
fsdp2) decides how the models are spread; model.pt then holds full weights.
"""

from __future__ import annotations

import copy
import json
import os

import torch

from . import cli_inputs
from .atomic_io import ARTEFACTS, atomic_save, check_writable, clean_stale_tmp
from .config import DPOConfig, GRPOConfig, PPOConfig, RewardConfig, apply_overrides, check_keys, load_yaml
from .dpo import DPOTrainer
from .grpo import GRPOTrainer
from .lora import apply_lora
from .metrics_logger import truncate_metrics
from .models import ScalarHeadModel
from .parallel import ModelState
from .ppo import PPOTrainer
from .reward_model import RewardTrainer
from .sources import ModelSource, check_model_spec, open_source

_CONFIGS = {"ppo": PPOConfig, "grpo": GRPOConfig, "rm": RewardConfig, "dpo": DPOConfig}
_EXTRA = ("model", "prompts_file", "reward", "pairs_file", "init_checkpoint", "lora")


def _reward(extra, source: ModelSource, lm):
    spec = extra.get("reward", "rule")
    if spec == "rule":
        return source.rule_reward()
    rm = ScalarHeadModel.from_causal_lm(lm)
    rm.load_state_dict(torch.load(spec, map_location="cpu"))
    return rm


def _prompt_texts(extra, source: ModelSource) -> list[str]:
    if extra.get("prompts_file"):
        path = extra["prompts_file"]
        with open(path) as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
        if not texts:
            raise ValueError(f"train: prompts_file {path} holds no prompts (one a line; it is empty)")
        return texts
    return source.prompts()


_PAIR_KEYS = ("prompt", "chosen", "rejected")


def _pairs(extra, source: ModelSource, seed: int):
    if not extra.get("pairs_file"):
        return source.pairs(seed)
    path, rows = extra["pairs_file"], []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"train: pairs_file {path}:{i} is not JSON ({e.msg})") from None
            missing = [k for k in _PAIR_KEYS if not isinstance(row, dict) or k not in row]
            if missing:
                raise ValueError(
                    f"train: pairs_file {path}:{i} has no {', '.join(map(repr, missing))}; each line must be a "
                    f'JSON object {{"prompt": ..., "chosen": ..., "rejected": ...}} of strings'
                )
            bad = [k for k in _PAIR_KEYS if not isinstance(row[k], str)]
            if bad:
                raise ValueError(
                    f"train: pairs_file {path}:{i}: {', '.join(map(repr, bad))} must be strings, got "
                    + ", ".join(f"{type(row[k]).__name__}" for k in bad)
                )
            rows.append(row)
    if not rows:
        raise ValueError(f'train: pairs_file {path} holds no pairs (one {{"prompt", "chosen", "rejected"}} a line)')
    return tuple([r[k] for r in rows] for k in _PAIR_KEYS)


def _init_distributed() -> torch.device:
    """Join torchrun's process group when launched by it; the device to use."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def _prepare_out_dir(trainer, out_dir: str, fresh: bool) -> None:
    """--fresh: remove the previous run's artefacts; otherwise resume from its
    checkpoint, or start at step 0 without the metrics of a run killed before
    its first one. Either way metrics.jsonl keeps one row per step. Every rank
    loads; rank 0 edits the files."""
    import sys

    import torch.distributed as dist

    ckpt = os.path.join(out_dir, "checkpoint.pt")
    if trainer.rank == 0:
        for name in clean_stale_tmp(out_dir):
            print(f"train: removed {os.path.join(out_dir, name)} (left by a killed write)", file=sys.stderr)
        if fresh:
            for name in ARTEFACTS:
                if os.path.exists(os.path.join(out_dir, name)):
                    os.remove(os.path.join(out_dir, name))
        if not fresh and not os.path.exists(ckpt):
            # killed (or out of disk) before its first checkpoint: the run starts at step 0 again, and the
            # rows it logged would otherwise stay in front of the new ones (steps 1..k, then 1..N)
            dropped = truncate_metrics(os.path.join(out_dir, "metrics.jsonl"), 0)
            if dropped:
                print(
                    f"train: no checkpoint in {out_dir}: starting at step 0 ({dropped} metrics rows of the "
                    "interrupted run dropped)",
                    file=sys.stderr,
                )
    if trainer.world_size > 1:
        dist.barrier()  # no rank looks for the checkpoint while rank 0 may be deleting it
    if fresh or not os.path.exists(ckpt):
        return
    trainer.load(ckpt)
    if trainer.rank == 0:
        dropped = truncate_metrics(os.path.join(out_dir, "metrics.jsonl"), trainer.step_count)
        print(
            f"train: resuming from {ckpt} at step {trainer.step_count} ({dropped} later metrics rows dropped; "
            "--fresh starts over)",
            file=sys.stderr,
        )


def check_paths(extra: dict, sources: dict | None = None) -> None:
    """Refuse a model that is neither a registered source nor an existing
    folder, and a data file that does not exist, before any model is built."""
    for key in ("init_checkpoint", "prompts_file", "pairs_file"):
        if extra.get(key) and not os.path.exists(str(extra[key])):
            raise FileNotFoundError(f"{key}: {extra[key]!r} does not exist")
    check_model_spec(extra.get("model"), sources)


def run_from_yaml(
    algo: str,
    path: str,
    fresh: bool = False,
    overrides=None,
    *,
    sources: dict | None = None,
    default_model: str | None = None,
):
    """overrides: "key=value" strings applied on top of the file (config.apply_overrides).
    sources: model-source name -> factory (trainer/sources.py), for `model:`
    values that are not checkpoint folders; default_model: the model when the
    YAML names none."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ValueError(f"train: {path} must hold a mapping, got {type(data).__name__}")
    data = apply_overrides(data, overrides)
    check_keys(data, _CONFIGS[algo], _EXTRA)
    extra = {k: data.pop(k) for k in _EXTRA if k in data}
    extra.setdefault("model", default_model)
    check_paths(extra, sources)
    cfg = _CONFIGS[algo].from_dict(data)
    if cfg.out_dir:
        check_writable(cfg.out_dir)  # before any model is built
    device = _init_distributed()
    source = open_source(extra["model"], sources)
    lm = source.load_lm(cfg.seed)
    if extra.get("init_checkpoint"):
        lm.load_state_dict(torch.load(extra["init_checkpoint"], map_location="cpu"))
    lm = lm.to(device)
    lora = extra.get("lora")
    if lora is not None and algo == "rm":
        raise ValueError("train rm: lora applies to a policy (ppo, grpo, dpo), not to the reward model")
    if lora is not None and not isinstance(lora, dict):
        raise ValueError(f"lora must be a mapping such as {{r: 8, alpha: 16}}, got {lora!r}")
    policy_of = (lambda m: apply_lora(m, **lora)) if lora is not None else (lambda m: m)
    if algo in ("ppo", "grpo"):
        # TRL-style inputs (cli_inputs): a JSONL of prompts, text reward functions, HF reward models
        rows = cli_inputs.prompt_rows(extra.get("prompts_file"))
        if rows is None:
            texts = _prompt_texts(extra, source)
            rows, (ids, mask) = [{"prompt": t} for t in texts], source.batch(texts, pad_left=True)
        else:
            ids, mask = source.encode_rows(rows)
        ids, mask = ids.to(device), mask.to(device)
        if cli_inputs.is_text_reward(extra.get("reward")):
            n = cfg.num_samples if algo == "grpo" else 1
            reward = cli_inputs.text_rewards(extra["reward"], source.tokenizer, rows, n, device)
        else:
            reward = _reward(extra, source, lm)
        kw = dict(eos_token_id=source.eos, pad_token_id=source.pad)
        ref = copy.deepcopy(lm) if algo == "ppo" or cfg.kl_coef > 0 else None
        if algo == "ppo":
            critic = ScalarHeadModel.from_causal_lm(lm)
            trained = policy_of(lm)
            trainer = PPOTrainer(cfg, trained, ref, critic, reward, ids, mask, **kw)
        else:
            trained = policy_of(lm)
            trainer = GRPOTrainer(cfg, trained, ref, reward, ids, mask, **kw)
    else:
        prompts, chosen, rejected = _pairs(extra, source, cfg.seed)
        ci, cm = (t.to(device) for t in source.batch([f"{p} {c}" for p, c in zip(prompts, chosen)], eos=True))
        ri, rm = (t.to(device) for t in source.batch([f"{p} {r}" for p, r in zip(prompts, rejected)], eos=True))
        if algo == "rm":
            trained = ScalarHeadModel.from_causal_lm(lm, init_std=0.02)
            trainer = RewardTrainer(cfg, trained, ci, cm, ri, rm)
        else:
            # DPO's log-probs cover the response only: drop the prompt's tokens from the loss masks
            n_prompt = source.batch(prompts)[1].sum(-1, keepdim=True).to(device)
            cl = cm * (torch.arange(cm.shape[1], device=device)[None, :] >= n_prompt)
            rl = rm * (torch.arange(rm.shape[1], device=device)[None, :] >= n_prompt)
            ref = copy.deepcopy(lm)
            trained = policy_of(lm)
            trainer = DPOTrainer(cfg, trained, ref, ci, cm, cl, ri, rm, rl)
    if cfg.out_dir:
        _prepare_out_dir(trainer, cfg.out_dir, fresh)
    rows = trainer.train()
    trainer.final_metrics = rows[-1] if rows else {}  # for the CLI's closing summary
    every = cfg.checkpoint_every
    trainer.decode = source.decode  # for the CLI's closing summary (sample completions)
    if cfg.out_dir and not (every and trainer.step_count % every == 0):  # else train() just wrote this step's
        trainer.save(os.path.join(cfg.out_dir, "checkpoint.pt"))  # a rerun resumes here (every rank: a collective)
    if algo == "rm":
        result = trainer.evaluate()  # every rank: a sharded model's forward is a collective
        if trainer.rank == 0:
            print(json.dumps(result))
    if cfg.out_dir:
        state = ModelState(trained).state_dict()  # full weights; a collective under FSDP2
        if trainer.rank == 0:
            atomic_save(state, os.path.join(cfg.out_dir, "model.pt"))
        from .export import export_run  # save_pretrained folders beside model.pt

        export_run(algo, trainer, trained, cfg.out_dir, source.tokenizer, source.pad)
    return trainer
