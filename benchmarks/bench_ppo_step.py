"""Where the time goes in one PPO step, and what the kernels buy.

A tiny Llama policy (+ a frozen reference copy), a critic and a reward model
of the same shape (LlamaModel + a linear head). One step, split into phases:

  generate          rlhf_fast.generate: B prompts -> B responses of R tokens
  logprobs_policy   policy hidden states -> rlhf_fast.linear_logprobs (no (B, R, V) logits)
  logprobs_ref      the same for the reference model
  values            critic forward
  rewards           reward-model score at the last token + per-token k1 KL penalty
  advantages        rlhf_fast.gae + rlhf_fast.whiten
  loss_backward     policy + critic forward, linear_logprobs (+ entropy), ppo_loss, ppo_value_loss, backward
  optimizer         AdamW step + zero_grad

The same loop runs twice, alternating step by step: with the automatic
backend (rlhf_fast's kernels) and inside rlhf_fast.use_backend("reference")
(pure PyTorch: materialised logits, Python loops over time), i.e. what
RLHF_FAST_BACKEND=reference does. Model forwards are identical in both, so the
ratio per phase is what the kernels buy there. Median per phase over the steps.
`values`, `rewards` and `optimizer` run no rlhf_fast op worth timing (model
forwards, one elementwise k1 KL, AdamW): their ratio should be ~1.0, so how far
it strays is the noise of the run (on a shared 2-core machine with 2 threads,
up to 10x; with --threads 1 about 0.8-1.2x).

    python -m benchmarks.bench_ppo_step [--full] [--json PATH]
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from transformers import LlamaModel

import rlhf_fast

from . import harness
from .harness import Record, bench_main
from .llama import causal_lm, llama_config

PHASES = (
    "generate",
    "logprobs_policy",
    "logprobs_ref",
    "values",
    "rewards",
    "advantages",
    "loss_backward",
    "optimizer",
)
CONTROLS = ("values", "rewards", "optimizer")  # same code in both loops: ratio ~1.0 unless the run is noisy
BACKENDS = {"rlhf_fast": None, "RLHF_FAST_BACKEND=reference": "reference"}


class Scalar(torch.nn.Module):
    """LlamaModel + Linear(h, 1): a critic (per token) or a reward model (last token)."""

    def __init__(self, cfg):
        super().__init__()
        self.model = LlamaModel(cfg)
        self.head = torch.nn.Linear(cfg.hidden_size, 1)

    def forward(self, ids, mask):
        return self.head(self.model(input_ids=ids, attention_mask=mask).last_hidden_state).squeeze(-1)


class Models:
    def __init__(self, vocab, hidden, layers, device):
        torch.manual_seed(0)
        cfg = llama_config(vocab, hidden, layers)
        self.policy = causal_lm(cfg, device)
        self.ref = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.critic = Scalar(cfg).to(device)
        self.reward = Scalar(cfg).to(device).eval().requires_grad_(False)
        params = list(self.policy.parameters()) + list(self.critic.parameters())
        self.opt = torch.optim.AdamW(params, lr=1e-6)


def _logprobs(lm, seqs, mask, labels, P, entropy=False):
    """(B, R) log-probs of the response tokens from the hidden states."""
    h = lm.model(input_ids=seqs, attention_mask=mask).last_hidden_state[:, P - 1 : -1]
    return rlhf_fast.linear_logprobs(h, lm.lm_head.weight, labels, return_entropy=entropy)


def ppo_step(m: Models, prompts, prompt_mask, R: int, sync) -> dict[str, float]:
    """One PPO step (one minibatch, one epoch); returns seconds per phase."""
    times, t0 = {}, [time.perf_counter()]

    def mark(name):
        sync()
        now = time.perf_counter()
        times[name] = now - t0[0]
        t0[0] = now

    P = prompts.shape[1]
    with torch.no_grad():
        out = rlhf_fast.generate(m.policy, prompts, prompt_mask, max_new_tokens=R, top_p=0.9, eos_token_id=None)
        seqs, resp = out.sequences, out.response_mask
        mask = torch.cat([prompt_mask, resp.long()], 1)
        labels = seqs[:, P:].masked_fill(~resp, -100)
        mark("generate")
        old_lp = _logprobs(m.policy, seqs, mask, labels, P)
        mark("logprobs_policy")
        ref_lp = _logprobs(m.ref, seqs, mask, labels, P)
        mark("logprobs_ref")
        old_values = m.critic(seqs, mask)[:, P - 1 : -1]
        mark("values")
        score = m.reward(seqs, mask)[:, -1]
        rewards = -0.05 * rlhf_fast.kl_penalty(old_lp, ref_lp, kind="k1") * resp
        last = resp.sum(-1) - 1
        rewards[torch.arange(len(last)), last] += score
        mark("rewards")
        adv, returns = rlhf_fast.gae(rewards, old_values, resp, gamma=1.0, lam=0.95)
        adv = rlhf_fast.whiten(adv, resp)
        mark("advantages")
    lp, ent = _logprobs(m.policy, seqs, mask, labels, P, entropy=True)
    loss, _ = rlhf_fast.ppo_loss(lp, old_lp, adv, resp, entropy=ent, entropy_coef=0.01, clip_low=0.2)
    values = m.critic(seqs, mask)[:, P - 1 : -1]
    vloss, _ = rlhf_fast.ppo_value_loss(values, old_values, returns, resp, clip=0.2)
    (loss + 0.5 * vloss).backward()
    mark("loss_backward")
    m.opt.step()
    m.opt.zero_grad(set_to_none=True)
    mark("optimizer")
    return times


def _cases(quick: bool, device: str, tiny: bool):
    """(vocab, hidden, layers, B, P, R): V = 32000 (Llama-2's vocabulary)
    so the log-prob phases carry a real-model vocabulary on a tiny body."""
    if tiny:
        return [(1000, 64, 1, 2, 8, 8)]
    if device == "cuda":
        return [(32000, 1024, 8, 64, 128, 256)] if not quick else [(32000, 512, 4, 32, 64, 128)]
    return [(32000, 128, 2, 8, 32, 32)] if quick else [(32000, 256, 4, 16, 64, 128)]


def run(quick: bool = True, device: str | None = None, tiny: bool = False, steps: int | None = None) -> list[Record]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    steps = steps or (3 if tiny else 5)
    records: list[Record] = []
    for vocab, hidden, layers, B, P, R in _cases(quick, device, tiny):
        m = Models(vocab, hidden, layers, device)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, vocab, (B, P), generator=g).to(device)
        prompt_mask = torch.ones_like(prompts)
        prompt_mask[: B // 2, : P // 4] = 0  # half the prompts left-padded
        shape = f"B={B} P={P} R={R} V={vocab} h={hidden} L={layers}"

        def step(backend):
            with rlhf_fast.use_backend(backend):
                return ppo_step(m, prompts, prompt_mask, R, sync)

        if harness._collector is not None:  # pytest-benchmark: one whole step per backend
            for impl, backend in BACKENDS.items():
                case = harness.Case(f"ppo_step-{shape}-{impl}", lambda b=backend: step(b), device, f"ppo_step-{shape}")
                harness._collector.append(case)
            return []
        for backend in BACKENDS.values():  # warm-up: first-call allocations, lazy inits
            step(backend)
        per = {impl: {p: [] for p in PHASES} for impl in BACKENDS}
        for _ in range(steps):  # alternate, so load on a shared machine hits both alike
            for impl, backend in BACKENDS.items():
                for phase, t in step(backend).items():
                    per[impl][phase].append(t)
        ours, ref = per["rlhf_fast"], per["RLHF_FAST_BACKEND=reference"]
        totals = {impl: statistics.median(map(sum, zip(*per[impl].values()))) for impl in BACKENDS}
        for phase in PHASES + ("total",):
            o = totals["rlhf_fast"] if phase == "total" else statistics.median(ours[phase])
            r = totals["RLHF_FAST_BACKEND=reference"] if phase == "total" else statistics.median(ref[phase])
            records.append(
                Record(
                    "ppo_step",
                    "rlhf_fast",
                    "RLHF_FAST_BACKEND=reference",
                    shape,
                    "float32",
                    device,
                    phase,
                    median_s=o,
                    baseline_median_s=r,
                    speedup=r / o,
                    threads=torch.get_num_threads() if device == "cpu" else None,
                )
            )
    return records


def phase_table(records: list[Record]) -> str:
    """Share of the step per phase, ours vs the reference backend."""
    tot = {r.shape: r for r in records if r.mode == "total"}
    lines = [f"{'phase':16s} {'ours ms':>9s} {'share':>6s} {'ref ms':>9s} {'share':>6s} {'speedup':>8s}"]
    for r in records:
        t = tot[r.shape]
        lines.append(
            f"{r.mode:16s} {r.median_s * 1e3:9.1f} {100 * r.median_s / t.median_s:5.0f}% "
            f"{r.baseline_median_s * 1e3:9.1f} {100 * r.baseline_median_s / t.baseline_median_s:5.0f}% "
            f"{r.speedup:7.2f}x"
        )
    ctl = [f"{r.mode} {r.speedup:.2f}x" for r in records if r.mode in CONTROLS]
    lines.append(f"noise control (same code in both loops, ideal 1.00x): {', '.join(ctl)}")
    return "\n".join(lines)


if __name__ == "__main__":
    bench_main(run, quick_by_default=True, summary=phase_table)
