"""The closing summary `rlhf-fast train` prints: where the run was saved, the
final step's metrics, and a few completions of the trained policy with their
rewards, so a run ends with something to look at rather than a bare prompt."""

from __future__ import annotations

import os

import torch

# Metrics that describe the learning, not the machine (time/*, tokens_per_s/*
# are in metrics.jsonl); at most this many are shown, in the trainer's order.
MAX_METRICS = 12


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _saved(out_dir: str | None) -> list[str]:
    if not out_dir:
        return ["  nothing saved: the config has no out_dir (add out_dir: DIR, or --set out_dir=DIR)"]
    names = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    return [f"  saved in {os.path.abspath(out_dir)}: {', '.join(names) or '(empty)'}"]


@torch.no_grad()
def sample_completions(trainer, n: int = 3) -> list[tuple[str, str, float | None]]:
    """(prompt, completion, reward) for the first n prompts, sampled with the
    run's own generation settings and a generator seeded from the config (the
    training streams are left untouched). Empty for RM/DPO runs, and under
    torchrun where generation would be a collective across ranks."""
    if getattr(trainer, "world_size", 1) > 1 or not hasattr(trainer, "prompt_ids"):
        return []
    decode = getattr(trainer, "decode", None)
    if decode is None:
        return []
    from .rollout import rollout, score

    ids, mask = trainer.prompt_ids[:n], trainer.prompt_mask[:n]
    gen = torch.Generator(device=ids.device).manual_seed(trainer.config.seed + 7)
    ro = rollout(trainer.policy, ids, mask, trainer.config, gen, eos_token_id=trainer.eos, pad_token_id=trainer.pad)
    try:
        rewards = score(trainer.reward, ro).tolist()
    except Exception:  # a reward that needs more than the rollout (e.g. extra columns): show text only
        rewards = [None] * len(ro.sequences)
    out = []
    for i in range(len(ro.sequences)):
        prompt = decode(ids[i][mask[i].bool()].tolist())
        resp = ro.sequences[i, ro.prompt_length :][ro.response_mask[i]]
        out.append((prompt, decode(resp.tolist()), rewards[i]))
    return out


def train_summary(trainer, algo: str, n_samples: int = 3) -> str:
    lines = [f"train {algo}: done, {trainer.step_count} steps"]
    lines += _saved(trainer.config.out_dir)
    final = {
        k: v
        for k, v in (getattr(trainer, "final_metrics", None) or {}).items()
        if not k.startswith(("time/", "tokens_per_s/"))
    }
    if final:
        shown = list(final.items())[:MAX_METRICS]
        lines.append("  final step: " + ", ".join(f"{k} {_fmt(v)}" for k, v in shown))
    samples = sample_completions(trainer, n_samples)
    if samples:
        lines.append("  sample completions of the trained policy:")
        for prompt, completion, reward in samples:
            r = "" if reward is None else f"  [reward {reward:.3g}]"
            lines.append(f"    {prompt!r} -> {completion!r}{r}")
    return "\n".join(lines)
