"""Prompt datasets as TRL users have them, turned into the trainer's tensors.

Accepted (`load_prompt_rows`):
  - a `datasets.Dataset` (or anything with `column_names`, `len` and
    `ds[i] -> dict`) with a "prompt" column;
  - a list of dicts with a "prompt" key;
  - a path to a JSONL file, one {"prompt": ...} object a line.
A prompt is plain text or conversational: a list of {"role", "content"}
messages, rendered with the tokenizer's chat template and
add_generation_prompt=True, as TRL's GRPOTrainer does. Every other column
(e.g. "answer") is kept and handed to reward functions as a keyword argument.
`datasets` is not imported here: it is duck-typed, so it stays optional.
"""

from __future__ import annotations

import json
import os

import torch

OP = "rlhf_fast.trainer.data"


def is_conversational(prompt) -> bool:
    """TRL's test: a list of dicts with "role" and "content" (a chat)."""
    return (
        isinstance(prompt, list)
        and len(prompt) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)
    )


def load_prompt_rows(data) -> list[dict]:
    """The rows of a prompt dataset as dicts, each with a "prompt" key.
    Raises ValueError naming what is missing or malformed."""
    if isinstance(data, (str, os.PathLike)):
        rows = []
        with open(data) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{OP}: {data}:{i} is not JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f'{OP}: {data}:{i} must be a JSON object with a "prompt" key, got {row!r:.80}')
                rows.append(row)
        where = str(data)
    elif hasattr(data, "column_names") and hasattr(data, "__len__"):  # datasets.Dataset, duck-typed
        if "prompt" not in data.column_names:
            raise ValueError(f'{OP}: the dataset has no "prompt" column (columns: {list(data.column_names)})')
        rows = [dict(data[i]) for i in range(len(data))]
        where = "the dataset"
    elif isinstance(data, (list, tuple)):
        rows = [r if isinstance(r, dict) else {"prompt": r} for r in data]  # a bare list of prompts is fine too
        where = "the list"
    else:
        raise TypeError(
            f'{OP}: expected a datasets.Dataset with a "prompt" column, a list of dicts, or a JSONL '
            f"path; got {type(data).__name__}"
        )
    if not rows:
        raise ValueError(f"{OP}: {where} holds no prompts")
    for i, r in enumerate(rows):
        p = r.get("prompt")
        if not (isinstance(p, str) and p) and not is_conversational(p):
            raise ValueError(
                f'{OP}: row {i} of {where}: "prompt" must be a non-empty string or a list of '
                f'{{"role", "content"}} messages, got {p!r:.80}'
            )
    kinds = {is_conversational(r["prompt"]) for r in rows}
    if len(kinds) > 1:
        raise ValueError(f"{OP}: {where} mixes plain-text and conversational prompts; use one kind")
    return rows


def tokenize_prompts(rows: list[dict], tokenizer, *, chat_template_kwargs: dict | None = None):
    """(ids (N, P), attention_mask (N, P)) left-padded with the tokenizer's pad
    token (its EOS when it has none). Plain text: tokenizer(text) with its
    special tokens (a BOS where the tokenizer adds one), as TRL does;
    conversational: apply_chat_template(add_generation_prompt=True)."""
    prompts = [r["prompt"] for r in rows]
    if is_conversational(prompts[0]):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"{OP}: the prompts are conversational (lists of messages) but the tokenizer has no "
                "chat_template; set tokenizer.chat_template or give plain-text prompts"
            )
        kw = dict(chat_template_kwargs or {})
        seqs = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, **kw) for p in prompts]
        seqs = [s["input_ids"] if isinstance(s, dict) or hasattr(s, "keys") else s for s in seqs]
    else:
        seqs = tokenizer(prompts)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(f"{OP}: the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    empty = [i for i, s in enumerate(seqs) if len(s) == 0]
    if empty:
        raise ValueError(f"{OP}: prompts {empty[:5]} tokenize to nothing")
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), int(pad), dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, P - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, P - len(s) :] = 1
    return ids, mask


def cat_right_padded(*tensors: torch.Tensor) -> torch.Tensor:
    """(M_i, T_i) tensors -> (sum M_i, max T_i), each right-padded with 0
    (the pad value of ids, attention masks and loss masks alike: masked out).
    How the reward-model and DPO trainers put chosen and rejected rows into one
    forward (half the launches)."""
    T = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, T - t.shape[1])) for t in tensors])
