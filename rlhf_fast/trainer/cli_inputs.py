"""TRL-style inputs for `rlhf-fast train ppo|grpo`, through the existing keys.

  prompts_file: prompts.txt     one prompt per line (as before)
              | prompts.jsonl   {"prompt": text or [{"role", "content"}, ...], other columns...}
                                (messages go through the tokenizer's chat template)
  reward: rule | <reward-model state_dict from `train rm`>        (as before)
        | my_rewards.py:accuracy  or  my_pkg.rewards:accuracy       a TRL reward function
        | <folder of an AutoModelForSequenceClassification>         a Hugging Face reward model
        | [my_rewards.py:accuracy, path/to/rm]                      several, summed
        | {funcs: [...], weights: [1.0, 0.5]}                       several, weighted
The text rewards are called as TRL calls them (trainer/rewards.py); the
JSONL's other columns reach them as keyword arguments.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

from .data import load_prompt_rows
from .rewards import TextRewards

OP = "train"


def prompt_rows(prompts_file) -> list[dict] | None:
    """The rows of a .jsonl prompts_file; None for any other file (one prompt a line)."""
    if prompts_file and str(prompts_file).endswith(".jsonl"):
        return load_prompt_rows(prompts_file)
    return None


def is_text_reward(spec) -> bool:
    if isinstance(spec, (list, tuple, dict)):
        return True
    if not isinstance(spec, str) or spec == "rule":
        return False
    if os.path.isdir(spec):
        return True
    return ":" in spec and not os.path.exists(spec)


def load_function(spec: str):
    """ "file.py:name" or "package.module:name" -> the callable."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ValueError(f"{OP}: reward {spec!r} must be <file.py>:<function> or <module>:<function>")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise ValueError(f"{OP}: reward {spec!r}: no file {where}")
        mod_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(where))[0], where)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"{OP}: reward {spec!r}: cannot import {where} ({e})") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"{OP}: reward {spec!r}: {where} has no {name!r}")
    return fn


def text_rewards(spec, tokenizer, rows: list[dict], num_samples: int, device=None) -> TextRewards:
    weights = None
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"funcs", "weights"})
        if unknown or "funcs" not in spec:
            raise ValueError(f"{OP}: reward as a mapping takes funcs (a list) and weights; got keys {sorted(spec)}")
        spec, weights = spec["funcs"], spec.get("weights")
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    funcs = []
    for s in specs:
        if not isinstance(s, str):
            raise ValueError(
                f"{OP}: each reward must be a string (<file.py>:<fn>, <module>:<fn> or a model folder), got {s!r}"
            )
        funcs.append(s if os.path.isdir(s) else load_function(s))  # folders: loaded by TextRewards
    reward = TextRewards(funcs, tokenizer, rows, num_samples, reward_weights=weights)
    for f in reward.funcs:
        if device is not None and hasattr(f, "to"):
            f.to(device)
    return reward
