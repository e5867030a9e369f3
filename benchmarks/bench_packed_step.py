"""A PPO step, packed vs padded: rlhf_fast's PPOTrainer with `packing: true`
against the same trainer padded, on one batch with a realistic length spread.

What is timed: PPOTrainer.step() after the rollout — the policy, reference and
critic forwards of the experience, the KL-shaped rewards, GAE and whitening,
then ppo_epochs x minibatches of policy + value loss forward and backward and
the optimizer steps. Generation is left out (it is padded in both modes, the
static KV cache wants rectangles): each step gets the same prepared rollout.
Responses: lengths drawn from a log-normal (median 160, sigma 0.6) clipped to
[32, 1024], mean ~200; prompts of 16 tokens. Padded, a row is as long as the
longest response: most of its tokens are padding.

Peak memory: the harness's profiler high-water mark of one step (every c10
allocation above what was live before it).

    python -m benchmarks.bench_packed_step [--full] [--json PATH]
"""

from __future__ import annotations

import copy

import torch

from rlhf_fast.trainer import PPOConfig, PPOTrainer, ScalarHeadModel
from rlhf_fast.trainer.rollout import Rollout, ScoredRollout

from . import harness
from .harness import Record, bench_main
from .llama import causal_lm, llama_config


def response_lengths(n: int, seed: int = 0, lo: int = 32, hi: int = 1024) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 0.6 + torch.log(torch.tensor(160.0))
    return x.exp().round().clamp(lo, hi).long()


def fixed_rollout(lengths: torch.Tensor, P: int, vocab: int, seed: int = 1) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    N, R = lengths.shape[0], int(lengths.max())
    seqs = torch.randint(3, vocab, (N, P + R), generator=g)
    resp = torch.arange(R)[None] < lengths[:, None]
    attn = torch.cat([torch.ones(N, P, dtype=torch.long), resp.long()], 1)
    return Rollout(seqs, attn, resp, P, {}, None)


def trainer(packing: bool, models, ro: Rollout, tmp: str | None) -> PPOTrainer:
    policy, critic = copy.deepcopy(models[0]), copy.deepcopy(models[1])
    cfg = PPOConfig(
        steps=10**6,
        batch_size=ro.sequences.shape[0],
        max_new_tokens=ro.response_mask.shape[1],
        ppo_epochs=1,
        minibatch_size=ro.sequences.shape[0] // 2,
        lr=1e-6,
        progress=False,
        out_dir=tmp,
        packing=packing,
    )
    prompts = ro.sequences[:, : ro.prompt_length]
    tr = PPOTrainer(cfg, policy, copy.deepcopy(policy), critic, lambda *a: torch.zeros(len(prompts)), prompts)
    scores = torch.randn(ro.sequences.shape[0], generator=torch.Generator().manual_seed(2))
    valid = torch.ones_like(scores, dtype=torch.bool)
    scored = ScoredRollout(ro, scores, scores, valid, {}, True, 0.0)
    tr.rollout_and_score = lambda *a, **k: scored
    return tr


def _cases(quick: bool, tiny: bool):
    """(vocab, hidden, layers, samples, prompt)"""
    if tiny:
        return [(500, 32, 1, 4, 8)]
    return [(8000, 64, 2, 8, 16)] if quick else [(8000, 128, 2, 16, 16)]


def run(quick: bool = True, device: str | None = None, tiny: bool = False) -> list[Record]:
    records = []
    for vocab, hidden, layers, n, P in _cases(quick, tiny):
        torch.manual_seed(0)
        policy = causal_lm(llama_config(vocab, hidden, layers), "cpu")
        models = (policy, ScalarHeadModel.from_causal_lm(policy))
        lengths = response_lengths(n)
        ro = fixed_rollout(lengths, P, vocab)
        packed, padded = trainer(True, models, ro, None), trainer(False, models, ro, None)
        t_packed, t_padded = harness.time_interleaved([packed.step, padded.step], warmup=2, repeat=5)
        mem_packed, mem_padded = harness.peak_memory(packed.step), harness.peak_memory(padded.step)
        shape = f"N={n} P={P} R<={int(lengths.max())} mean={float(lengths.float().mean()):.0f} V={vocab} H={hidden}"
        records.append(
            Record(
                op="ppo_step (after rollout)",
                impl="packing: true",
                baseline="padded",
                shape=shape,
                dtype="float32",
                device="cpu",
                mode="fwd+bwd",
                median_s=t_packed,
                baseline_median_s=t_padded,
                speedup=t_padded / t_packed,
                peak_mem_bytes=mem_packed,
                baseline_peak_mem_bytes=mem_padded,
                threads=torch.get_num_threads(),
            )
        )
        tokens = int(lengths.sum())
        print(
            f"{shape}: {tokens} response tokens; packed {tokens / t_packed:.0f} tok/s, "
            f"padded {tokens / t_padded:.0f} tok/s"
        )
    return records


if __name__ == "__main__":
    bench_main(run, quick_by_default=True)
