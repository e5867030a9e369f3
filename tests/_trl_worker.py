"""torchrun worker for tests/test_trl_compat.py: the TRL-style script on 2
ranks (gloo); each rank saves its policy's state_dict and its config."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _tiny_models import PROMPTS, hf_tokenizer, tiny_policy

from rlhf_fast.trl import GRPOConfig, GRPOTrainer


def main(out: str) -> None:
    torch.set_num_threads(1)
    tok = hf_tokenizer()
    args = GRPOConfig(
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=4,
        max_steps=2,
        learning_rate=1e-3,
        bf16=False,
        use_cpu=True,
        disable_tqdm=True,
    )
    rows = [{"prompt": p, "noun": p.split()[1]} for p in PROMPTS]

    def names_the_noun(prompts, completions, noun, **kwargs):
        assert all(n == p.split()[1] for p, n in zip(prompts, noun))
        return [float(n in c.split()) + 0.1 * len(c) for c, n in zip(completions, noun)]

    t = GRPOTrainer(
        model=tiny_policy(tok), reward_funcs=names_the_noun, args=args, train_dataset=rows, processing_class=tok
    )
    t.train()
    rank = int(os.environ["RANK"])
    torch.save(
        {"state": t.model.state_dict(), "batch_size": t.config.batch_size, "steps": t.step_count}, f"{out}.{rank}"
    )


if __name__ == "__main__":
    main(sys.argv[1])
