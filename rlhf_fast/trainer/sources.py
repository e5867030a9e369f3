"""Where `rlhf-fast train` gets its model, tokenizer and default data: the
YAML's `model:` key names a *source*.

The trainer knows one kind, a local Hugging Face checkpoint folder
(`CheckpointSource`: AutoTokenizer + AutoModelForCausalLM, nothing
downloaded). Other kinds are registered by whoever calls run_from_yaml, by
name (`sources={"tiny-demo": factory}`): the demo's tiny Llama world is one
(rlhf_fast/demo/train_source.py), so the trainer never imports the demo.

A source answers what run_from_yaml asks; the base class raises, naming the
YAML key that must then be given, for the data it does not have.
"""

from __future__ import annotations

import os

OP = "train"


class ModelSource:
    """name: what the YAML's model key said. tokenizer: handed to text rewards
    and written beside exported models (when it has save_pretrained); eos, pad:
    token ids."""

    name: str
    tokenizer = None
    eos: int | None = None
    pad: int | None = None

    def batch(self, texts: list[str], *, eos: bool = False, pad_left: bool = False):
        """texts -> (ids (B, T), attention_mask (B, T)), left- or right-padded."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def encode_rows(self, rows: list[dict]):
        """Left-padded (ids, mask) of prompt rows ({"prompt": text or messages})."""
        raise NotImplementedError

    def load_lm(self, seed: int):
        """The causal LM (policy, and the trunk of the critic / reward model)."""
        raise NotImplementedError

    def prompts(self) -> list[str]:
        raise ValueError(f"{OP}: prompts_file is required with model {self.name!r} (it has no built-in prompts)")

    def pairs(self, seed: int) -> tuple[list[str], list[str], list[str]]:
        """(prompts, chosen, rejected) texts."""
        raise ValueError(f"{OP}: pairs_file is required with model {self.name!r} (it has no built-in pairs)")

    def rule_reward(self):
        """reward(sequences, response_mask, prompt_length) -> (N,), for `reward: rule`."""
        raise ValueError(
            f"{OP}: model {self.name!r} has no reward 'rule'; give a reward model path or a reward function"
        )


class CheckpointSource(ModelSource):
    """A local folder holding a Hugging Face causal LM and its tokenizer."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.name = path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos

    def batch(self, texts, *, eos=False, pad_left=False):
        tok = self.tokenizer
        tok.padding_side = "left" if pad_left else "right"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok([t + (tok.eos_token if eos else "") for t in texts], return_tensors="pt", padding=True)
        return enc["input_ids"], enc["attention_mask"]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def encode_rows(self, rows):
        from .data import tokenize_prompts

        return tokenize_prompts(rows, self.tokenizer)

    def load_lm(self, seed: int):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.name)


def open_source(spec, sources: dict | None) -> ModelSource:
    """The source the YAML's model key names: a registered name, else a local checkpoint folder."""
    if spec in (sources or {}):
        return sources[spec]()
    return CheckpointSource(str(spec))


def check_model_spec(spec, sources: dict | None) -> None:
    """Refuse a model that is neither registered nor an existing folder before
    anything is built: transformers would otherwise take a missing folder for
    a Hub repo id and fail ~75 lines later with a download error."""
    if spec is None:
        names = ", ".join(sorted(sources or {})) or "none registered"
        raise ValueError(
            f"{OP}: the config has no model key; give a local checkpoint folder (or a registered source: {names})"
        )
    if spec in (sources or {}) or os.path.isdir(str(spec)):
        return
    names = " or ".join(repr(n) for n in sorted(sources or {}))
    raise FileNotFoundError(
        f"model: {spec!r} is neither {names + ' nor ' if names else ''}an existing local "
        "checkpoint folder (nothing is downloaded: give the folder holding config.json)"
    )
