"""`model: tiny-demo` for `rlhf-fast train`: the demo's world as a model
source (trainer/sources.py), registered by the command line, so that the
trainer itself never imports the demo.

  model: tiny-demo    the demo's word tokenizer and tiny Llama (random init
                      unless init_checkpoint names a saved state_dict)
  prompts_file        optional: the demo's training prompts
  pairs_file          optional: pairs of the world's completions ranked by the hidden rule
  reward: rule        the hidden rule (share of positive adjectives)
"""

from __future__ import annotations

import random

from ..trainer.sources import ModelSource
from . import world

NAME = "tiny-demo"


class TinyDemoSource(ModelSource):
    def __init__(self):
        self.name = NAME
        self.tokenizer = world.make_tokenizer()
        self.eos, self.pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id

    def batch(self, texts, *, eos=False, pad_left=False):
        return world.encode_batch(self.tokenizer, texts, eos=eos, pad_left=pad_left)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def encode_rows(self, rows):
        if not all(isinstance(r["prompt"], str) for r in rows):
            raise ValueError(f"train: model {NAME} has no chat template; its prompts_file must hold text prompts")
        return self.batch([r["prompt"] for r in rows], pad_left=True)

    def load_lm(self, seed: int):
        return world.tiny_llama(len(self.tokenizer), seed)

    def prompts(self) -> list[str]:
        return world.split_prompts(0)[0]

    def pairs(self, seed: int):
        """4 passes over the training prompts, each with two sampled
        completions; a pair whose completions the rule scores alike is dropped."""
        rng = random.Random(seed)
        prompts, chosen, rejected = [], [], []
        for p in self.prompts() * 4:
            a, b = world.sample_completion(rng), world.sample_completion(rng)
            sa, sb = world.hidden_score_text(a), world.hidden_score_text(b)
            if sa != sb:
                prompts.append(p)
                chosen.append(a if sa > sb else b)
                rejected.append(b if sa > sb else a)
        return prompts, chosen, rejected

    def rule_reward(self):
        tok = self.tokenizer

        def rule(sequences, response_mask, prompt_length):
            return world.hidden_score(tok, sequences, prompt_length)

        return rule


SOURCES = {NAME: TinyDemoSource}


def train_from_yaml(algo: str, path: str, **kw):
    """trainer.run.run_from_yaml with tiny-demo registered and the default
    model (what `rlhf-fast train` runs)."""
    from ..trainer.run import run_from_yaml

    return run_from_yaml(algo, path, sources=SOURCES, default_model=NAME, **kw)
