"""Killed-and-resumed against uninterrupted, field by field, for every trainer:
shared by tests/test_trainer_robustness.py (one process) and
tests/_ddp_worker.py (2 gloo ranks; each rank compares its own trainers).

The scenario: DEAD steps take no optimizer step (every reward NaN for PPO /
GRPO, a NaN loss for RM / DPO), max_skipped_steps=3, steps=8. Uninterrupted,
steps 3, 4, 5 are three dead steps in a row and the run stops at step 5.
The other run is killed after step 1 (step 2 then trains after the resume)
and after step 4 (inside the dead run: the resumed trainer must still stop
at step 5, not count afresh and train on to step 8). Each "process" is a new trainer with other RNG seeds
and perturbed weights; load() must overwrite all of it."""

import math

import torch
from _tiny_models import dpo_trainer, grpo_trainer, ppo_trainer, rm_trainer, rule_reward

from rlhf_fast.trainer.checkpoint import _leaves, read_checkpoint

DEAD = {3, 4, 5}  # 1-based steps without an optimizer step
KILLS = (1, 4)  # the killed run is checkpointed after these steps, then rebuilt and loaded
LIMIT, STEPS, STOP = 3, 8, 5

_SMALL = dict(steps=STEPS, max_skipped_steps=LIMIT)
MAKERS = {
    "ppo": lambda seed: ppo_trainer(
        seed=seed, batch_size=4, max_new_tokens=4, ppo_epochs=1, minibatch_size=2, grad_accum=1, **_SMALL
    ),
    # grpo_trainer's seed also builds the policy (and the reference, which no checkpoint holds): seed 0 always,
    # the generators are perturbed below instead
    "grpo": lambda seed: grpo_trainer(batch_size=2, num_samples=2, max_new_tokens=4, minibatch_size=2, **_SMALL),
    "rm": lambda seed: rm_trainer(batch_size=8, seed=seed, **_SMALL),
    "dpo": lambda seed: dpo_trainer(n_pairs=16, seed=seed, **_SMALL),
}


def _poison(tr) -> None:
    """Make the DEAD steps of tr skip their optimizer step, keyed on tr.step_count (restored by load)."""
    if hasattr(tr, "reward"):

        def reward(seqs, mask, p):
            s = rule_reward(seqs, mask, p).float()
            return torch.full_like(s, float("nan")) if tr.step_count + 1 in DEAD else s

        tr.reward = reward
    else:
        loss = tr.loss

        def poisoned(idx):
            value, stats = loss(idx)
            return (value * float("nan"), stats) if tr.step_count + 1 in DEAD else (value, stats)

        tr.loss = poisoned


def build(algo: str, seed: int = 0):
    tr = MAKERS[algo](seed)
    _poison(tr)
    return tr


def _run(tr, until=None):
    """tr.train(until); the step and message it stopped with (None when it did not)."""
    try:
        tr.train(until)
    except RuntimeError as e:
        return tr.step_count, str(e)
    return None


def _perturb(tr, seed: int) -> None:
    """A new process: other RNG states and weights, all of which load() must overwrite."""
    torch.manual_seed(seed)
    for i, g in enumerate(tr.generators.values()):
        g.manual_seed(seed + 1 + i)
    opts = [tr.opt] + ([tr.copt] if hasattr(tr, "copt") else [])
    with torch.no_grad():
        for p in (p for o in opts for g in o.param_groups for p in g["params"]):
            p.add_(0.01)


def straight(algo: str):
    tr = build(algo)
    return tr, _run(tr)


def killed_and_resumed(algo: str, ckpt: str):
    """Run, save after each of KILLS, rebuild + perturb + load, go on. Returns
    (last trainer, how it stopped, the metrics rows of all the pieces)."""
    tr, rows = build(algo), []
    for i, k in enumerate(KILLS):
        stop = _run(tr, k)
        assert stop is None, f"{algo}: stopped at {stop} before the kill at step {k}"
        rows += tr.logger.history
        tr.save(ckpt)
        tr = build(algo, seed=7 + i)
        _perturb(tr, 100 + i)
        tr.load(ckpt)
        assert tr.step_count == k
    stop = _run(tr)
    return tr, stop, rows + tr.logger.history


def state_leaves(tr, path: str) -> dict:
    """Every leaf of what tr.save writes (models, optimizers, schedulers,
    controllers, moments, counters, the data split, every RNG), by dotted path."""
    tr.save(path)
    return dict(_leaves(read_checkpoint(path)))


def scalar_attrs(tr) -> dict:
    """The trainer's own int / float / bool attributes: a counter kept outside
    the checkpoint shows up here."""
    return {k: v for k, v in vars(tr).items() if isinstance(v, (bool, int, float))}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _diff_dicts(what: str, a: dict, b: dict) -> list[str]:
    return [
        f"{what} {k}: {a.get(k)!r:.60} vs {b.get(k)!r:.60}"
        for k in sorted(set(a) | set(b), key=str)
        if not _same(a.get(k), b.get(k))
    ]


def compare(algo: str, tmp: str) -> tuple[list[str], tuple | None]:
    """(what differs, how the uninterrupted run stopped) for `algo`: the stop
    (step and message), each metrics row but its timings, the trainer's scalar
    attributes and every leaf of its checkpoint at the stop. [] when the
    killed-and-resumed run is the uninterrupted one. Files go under tmp."""
    a, a_stop = straight(algo)
    a_rows, a_attrs = list(a.logger.history), scalar_attrs(a)
    a_state = state_leaves(a, f"{tmp}/{algo}_a.pt")  # now: the run below moves the global RNG
    b, b_stop, b_rows = killed_and_resumed(algo, f"{tmp}/{algo}_kill.pt")
    out = [] if a_stop == b_stop else [f"stop: {a_stop} vs {b_stop}"]
    if [r["step"] for r in a_rows] != [r["step"] for r in b_rows]:
        out.append(f"metrics steps: {[r['step'] for r in a_rows]} vs {[r['step'] for r in b_rows]}")
    for ra, rb in zip(a_rows, b_rows):
        timing = ("time/", "tokens_per_s/")
        ra, rb = ({k: v for k, v in r.items() if not k.startswith(timing)} for r in (ra, rb))
        out += _diff_dicts(f"metrics step {ra['step']}:", ra, rb)
    out += _diff_dicts("trainer.", a_attrs, scalar_attrs(b))
    out += _diff_dicts("checkpoint", a_state, state_leaves(b, f"{tmp}/{algo}_b.pt"))
    return out, a_stop
