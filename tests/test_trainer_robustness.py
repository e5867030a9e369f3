"""The trainer under attack: non-finite rewards, bad configs, kill -9 during a
write, truncated and corrupted checkpoints, and `rlhf-fast train` resumed
after a crash equal to an uninterrupted run."""

import json
import math
import os
import signal
import time

import pytest
import torch
import yaml
from _tiny_models import flat_params, grpo_trainer, one_thread, ppo_trainer, rm_trainer, rule_reward  # noqa: F401

from rlhf_fast.trainer import DPOConfig, GRPOConfig, PPOConfig, RewardConfig, RunningMoments

# ---------------------------------------------------------------- non-finite rewards


def _poisoned(bad_value, bad_steps=(1,), rows=(0,)):
    """The rule reward with `bad_value` in `rows` on the steps in `bad_steps` (1-based)."""
    calls = [0]

    def fn(seqs, mask, P):
        calls[0] += 1
        s = rule_reward(seqs, mask, P).float().clone()
        if calls[0] in bad_steps:
            s[list(rows)] = bad_value
        return s

    return fn


@pytest.mark.parametrize("make", [ppo_trainer, grpo_trainer], ids=["ppo", "grpo"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_reward_with_reward_norm_never_poisons_moments(make, bad):
    tr = make(steps=3, reward_norm=True)
    tr.reward = _poisoned(bad)
    rows = tr.train()
    m = tr.moments
    assert math.isfinite(m.mean) and math.isfinite(m.var), (m.mean, m.var)
    assert m.count == sum(r["samples"] for r in rows) - 1  # the bad sample never reached the moments
    assert rows[0]["nonfinite_rewards"] == 1 and rows[1]["nonfinite_rewards"] == 0
    assert all(r["skipped"] == 0 for r in rows), [r["skipped"] for r in rows]
    assert all(math.isfinite(r["reward"]) for r in rows)


@pytest.mark.parametrize("make", [ppo_trainer, grpo_trainer], ids=["ppo", "grpo"])
def test_nan_reward_with_reward_clip_is_zero_weighted(make):
    tr = make(steps=1, reward_clip=0.5)
    tr.reward = _poisoned(float("nan"))
    before = flat_params(tr.policy).clone()
    row = tr.train()[0]
    assert row["nonfinite_rewards"] == 1 and row["skipped"] == 0
    assert not torch.equal(before, flat_params(tr.policy))  # the other samples still trained
    assert torch.isfinite(flat_params(tr.policy)).all()


def test_bad_sample_carries_no_gradient():
    """A NaN reward zero-weights its sample: the update equals one in which the
    sample's score was anything else."""
    a, b = ppo_trainer(steps=1, reward_norm=True), ppo_trainer(steps=1, reward_norm=True)
    a.reward = _poisoned(float("nan"))
    b.reward = _poisoned(123.0)
    a.train(), b.train()
    pa, pb = flat_params(a.policy), flat_params(b.policy)
    assert torch.isfinite(pa).all()
    assert not torch.equal(pa, pb)  # b's outlier counts, a's NaN does not


def test_consecutive_skipped_steps_stop_the_run(tmp_path):
    tr = ppo_trainer(str(tmp_path), steps=20, checkpoint_every=1, max_skipped_steps=3)
    tr.reward = lambda s, m, p: torch.full((s.shape[0],), float("nan"))
    with pytest.raises(RuntimeError, match=r"3 consecutive steps .*non-finite rewards"):
        tr.train()
    assert tr.step_count == 3


def test_consecutive_nonfinite_losses_stop_reward_model_training():
    tr = rm_trainer(steps=20, max_skipped_steps=2)
    with torch.no_grad():
        next(tr.model.parameters()).fill_(float("nan"))  # every loss NaN from here on
    with pytest.raises(RuntimeError, match=r"2 consecutive steps .*loss or the gradient norm was NaN/inf"):
        tr.train()
    assert tr.step_count == 2


def test_running_moments_ignore_nonfinite():
    m = RunningMoments()
    m.update(torch.tensor([1.0, float("nan"), 3.0, float("inf")]))
    assert (m.mean, m.var, m.count) == (2.0, 1.0, 2)


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "cls, field, value, allowed",
    [
        (PPOConfig, "batch_size", -3, ">= 1"),
        (PPOConfig, "reward_clip", -1, "> 0"),
        (PPOConfig, "ppo_epochs", 0, ">= 1"),
        (RewardConfig, "eval_fraction", -0.5, "[0, 1)"),
        (PPOConfig, "kl_target", 0, "> 0"),
        (PPOConfig, "minibatch_size", 0, ">= 1"),
        (PPOConfig, "gamma", 2.0, "[0, 1]"),
        (PPOConfig, "lam", -0.1, "[0, 1]"),
        (PPOConfig, "temperature", 0.0, "> 0"),
        (PPOConfig, "top_p", 1.5, "(0, 1]"),
        (PPOConfig, "lr", float("nan"), "> 0"),
        (PPOConfig, "lr", "1e-3x", "float"),
        (PPOConfig, "max_new_tokens", 2.7, "int"),
        (PPOConfig, "reward_norm", "yes", "bool"),
        (PPOConfig, "kl_kind", "k9", "k1"),
        (PPOConfig, "loss_agg", "mean", "token-mean"),
        (GRPOConfig, "estimator", "ppo", "grpo"),
        (GRPOConfig, "num_samples", 1, ">= 2 (every estimator subtracts the group's own mean"),
        (GRPOConfig, "num_samples", 0, ">= 2"),
        (PPOConfig, "seed", 2**64, "[0, 9223372036854775807]"),
        (RewardConfig, "seed", 2**63, "[0, 9223372036854775807]"),
        (DPOConfig, "seed", -1, "[0, 9223372036854775807]"),
        (DPOConfig, "beta", 0.0, "> 0"),
        (DPOConfig, "label_smoothing", 0.5, "[0, 0.5)"),
        (DPOConfig, "loss_type", "hinge", "sigmoid"),
        (RewardConfig, "lr_schedule", "step", "cosine"),
        (RewardConfig, "grad_accum", 0, ">= 1"),
        (RewardConfig, "steps", -1, ">= 0"),
        (RewardConfig, "max_grad_norm", -1.0, ">= 0"),
    ],
)
def test_config_rejects_bad_values_naming_field_value_range(cls, field, value, allowed):
    with pytest.raises(ValueError) as e:
        cls(**{field: value})
    msg = str(e.value)
    assert field in msg and repr(value) in msg and allowed in msg, msg


def test_the_largest_seed_trains():
    """2**63 - 1 passes validation and every generator built from it (PPO's
    sampling stream adds an offset per rank)."""
    tr = ppo_trainer(steps=1, seed=2**63 - 1, batch_size=2, max_new_tokens=2, minibatch_size=2)
    assert tr.train()[0]["applied"] == 2  # two epochs of one minibatch


def test_yaml_scientific_notation_is_a_number(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1e-3\ncritic_lr: 5E-4\nkl_coef: 2e+0\nout_dir: 1e3dir\n")
    cfg = PPOConfig.from_yaml(str(p))
    assert cfg.lr == 1e-3 and cfg.critic_lr == 5e-4 and cfg.kl_coef == 2.0 and cfg.out_dir == "1e3dir"
    from rlhf_fast.trainer.config import load_yaml

    assert load_yaml(str(p))["lr"] == 1e-3


def test_cli_config_errors_name_the_field(tmp_path):
    from rlhf_fast.demo.train_source import train_from_yaml

    (tmp_path / "c.yaml").write_text("model: tiny-demo\nsteps: 1\ngamma: 2.0\n")
    with pytest.raises(ValueError, match="gamma"):
        train_from_yaml("ppo", str(tmp_path / "c.yaml"))


# ---------------------------------------------------------------- checkpoints: checksum, truncation


def test_corrupted_checkpoint_is_refused(tmp_path):
    tr = ppo_trainer(steps=1)
    tr.train()
    path = str(tmp_path / "ck.pt")
    tr.save(path)
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    for i in range(mid, mid + 4096):  # 4 KB XOR'd in the middle: past any header check
        data[i] ^= 0x5A
    open(path, "wb").write(bytes(data))
    fresh = ppo_trainer(steps=1)
    with pytest.raises(RuntimeError, match=r"ck\.pt.*(checksum|unreadable)"):
        fresh.load(path)


def test_bit_flip_in_a_tensor_names_it(tmp_path):
    """Silent damage to Adam's state (the file still unpickles): the per-tensor checksum says which tensor."""
    tr = ppo_trainer(steps=1)
    tr.train()
    path = str(tmp_path / "ck.pt")
    tr.save(path)
    blob = torch.load(path, weights_only=False)
    blob["opt"]["state"][0]["exp_avg_sq"].view(-1)[3] += 1e-3  # silent corruption of the payload
    torch.save(blob, path)
    with pytest.raises(RuntimeError, match=r"ck\.pt failed its checksum: opt\.state\.0\.exp_avg_sq") as e:
        ppo_trainer(steps=1).load(path)
    assert type(e.value).__name__ == "CheckpointError"


@pytest.mark.parametrize("keep", [0, 100, 0.5])
def test_truncated_checkpoint_is_refused(tmp_path, keep):
    tr = ppo_trainer(steps=1)
    tr.train()
    path = str(tmp_path / "ck.pt")
    tr.save(path)
    data = open(path, "rb").read()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    open(path, "wb").write(data[:n])
    with pytest.raises(RuntimeError, match=r"ck\.pt is unreadable \(truncated") as e:
        ppo_trainer(steps=1).load(path)
    assert type(e.value).__name__ == "CheckpointError"


# ---------------------------------------------------------------- the CLI: resume, atomic writes, kill -9

_CLI_CFG = {
    "ppo": dict(
        steps=4,
        batch_size=4,
        max_new_tokens=4,
        ppo_epochs=1,
        minibatch_size=4,
        lr=1e-3,
        reward_norm=True,
        kl_target=1.0,
    ),
    "grpo": dict(
        steps=4, batch_size=2, num_samples=2, max_new_tokens=4, ppo_epochs=1, minibatch_size=4, lr=1e-3, kl_coef=0.02
    ),
    "rm": dict(steps=4, batch_size=8, lr=1e-3, eval_fraction=0.2),
    "dpo": dict(steps=4, batch_size=4, lr=1e-3),
}


def _write_cfg(tmp_path, algo, out, **kw):
    cfg = {
        "model": "tiny-demo",
        "progress": False,
        "out_dir": str(out),
        "checkpoint_every": 2,
        "seed": 3,
        **_CLI_CFG[algo],
        **kw,
    }
    p = tmp_path / f"{algo}_{os.path.basename(str(out))}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def _rows(out):
    return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]


def _same_model(a, b):
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("algo", ["ppo", "grpo", "rm", "dpo"])
def test_cli_resume_equals_uninterrupted(tmp_path, algo, monkeypatch):
    from rlhf_fast.cli import main
    from rlhf_fast.trainer import base

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert main(["train", algo, "--config", _write_cfg(tmp_path, algo, straight)]) == 0

    cfg = _write_cfg(tmp_path, algo, crashed)
    real_step = None

    class Crash(Exception):
        pass

    def crash_at_4(self):
        if self.step_count == 3:  # steps 1-3 ran and were logged; the checkpoint holds step 2
            raise Crash
        return real_step(self)

    cls = {"ppo": "PPOTrainer", "grpo": "GRPOTrainer", "rm": "RewardTrainer", "dpo": "DPOTrainer"}[algo]
    import rlhf_fast.trainer as T

    real_step = getattr(T, cls).step
    with monkeypatch.context() as mp:
        mp.setattr(getattr(T, cls), "step", crash_at_4)
        with pytest.raises(Crash):
            main(["train", algo, "--config", cfg])
    assert [r["step"] for r in _rows(crashed)] == [1, 2, 3]
    open(os.path.join(crashed, "checkpoint.pt.tmp"), "wb").write(b"stale")  # a write killed earlier
    assert main(["train", algo, "--config", cfg]) == 0  # resumes at step 2
    assert not os.path.exists(os.path.join(crashed, "checkpoint.pt.tmp"))
    _same_model(straight / "model.pt", crashed / "model.pt")
    a, b = _rows(straight), _rows(crashed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # step 3 logged once, by the resumed run
    for ra, rb in zip(a, b):
        for k in ra:
            if not k.startswith(("time/", "tokens_per_s/")):
                assert ra[k] == rb[k] or (ra[k] != ra[k] and rb[k] != rb[k]), (ra["step"], k)
    assert isinstance(base.Trainer, type)

    # --fresh starts over: step 1 again, the old metrics gone
    assert main(["train", algo, "--config", cfg, "--fresh"]) == 0
    assert [r["step"] for r in _rows(crashed)] == [1, 2, 3, 4]
    _same_model(straight / "model.pt", crashed / "model.pt")


def _slow_writes(target: str, report_fd: int):
    """torch.save through a slow disk (8 KB, then 10 ms) for files named
    target*, reporting on report_fd when such a write starts: a kill -9 then
    lands mid-write. Handles a path or an open file (the old and the new way
    of writing model.pt)."""
    import io

    real = torch.save

    def slow_save(obj, f, *a, **k):
        buf = io.BytesIO()
        real(obj, buf, *a, **k)
        data = buf.getvalue()
        is_path = isinstance(f, (str, os.PathLike))
        name = os.path.basename(f if is_path else f.name)
        fh = open(f, "wb") if is_path else f
        slow = name.startswith(target)
        if slow:
            os.write(report_fd, b"W")
        for i in range(0, len(data), 8192):
            fh.write(data[i : i + 8192])
            if slow:
                fh.flush()
                time.sleep(0.01)
        if is_path:
            fh.close()

    torch.save = slow_save


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("target", ["model.pt", "checkpoint.pt"])
def test_kill_9_during_a_write_leaves_the_previous_file_whole(tmp_path, target):
    """A finished 2-step run, then a 4-step one resumed from it, killed with
    SIGKILL halfway through writing `target`: the file must still be the first
    run's, whole, and the next run must clean up and finish. The child is a
    fork of this process (already imported: a fresh interpreter would spend
    ~20 s importing transformers on a loaded 2-core machine)."""
    from rlhf_fast.cli import main

    out = tmp_path / "out"
    assert main(["train", "rm", "--config", _write_cfg(tmp_path, "rm", out, steps=2)]) == 0
    before = {n: open(out / n, "rb").read() for n in ("model.pt", "checkpoint.pt")}
    cfg4 = _write_cfg(tmp_path, "rm", out, steps=4)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(r)
            _slow_writes(target, w)
            code = main(["train", "rm", "--config", cfg4])
        finally:
            os._exit(code)
    os.close(w)
    try:
        got = os.read(r, 1)  # blocks until the slow write starts (or the child exits: b"")
        assert got == b"W", "the child never reached the slow write"
        time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, status = os.waitpid(pid, 0)
        os.close(r)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    after = open(out / target, "rb").read()
    assert after == before[target], f"{target} torn by kill -9 ({len(after)} of {len(before[target])} bytes)"
    # the next run removes the temp file, resumes from the step-2 checkpoint and finishes
    assert os.path.exists(out / (target + ".tmp"))
    assert main(["train", "rm", "--config", cfg4]) == 0
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]
    torch.load(out / "model.pt", weights_only=True)


# ---------------------------------------------------------------- resume equivalence, field by field


@pytest.mark.parametrize("algo", ["ppo", "grpo", "rm", "dpo"])
def test_killed_and_resumed_equals_uninterrupted_field_by_field(tmp_path, algo):
    """Killed after step 2 and inside a run of dead steps (after step 5): the
    resumed trainer stops at the same step with the same message, logs the
    same metrics and ends in the same state, checkpoint leaf by leaf (every
    counter, RNG stream, controller and the data split) as the uninterrupted
    one."""
    from _resume_cases import STOP, compare

    diffs, stop = compare(algo, str(tmp_path))
    assert stop is not None and stop[0] == STOP, stop  # the guard tripped where the scenario says
    assert diffs == [], "\n".join(diffs[:20])


@pytest.mark.parametrize("how", ["killed", "first_checkpoint_disk_full"])
def test_rerun_after_a_kill_before_the_first_checkpoint_logs_each_step_once(tmp_path, monkeypatch, how):
    """No checkpoint.pt yet (checkpoint_every: 0, as in the shipped examples,
    or a first checkpoint whose write failed): the rerun starts at step 0 and
    metrics.jsonl ends with one row per step, the uninterrupted run's."""
    import errno

    from rlhf_fast.cli import main
    from rlhf_fast.trainer import RewardTrainer, checkpoint

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    every = 0 if how == "killed" else 2
    assert main(["train", "rm", "--config", _write_cfg(tmp_path, "rm", straight, checkpoint_every=every)]) == 0
    cfg = _write_cfg(tmp_path, "rm", broken, checkpoint_every=every)
    with monkeypatch.context() as mp:
        if how == "killed":
            real_step = RewardTrainer.step

            def crash_at_4(self):
                if self.step_count == 3:
                    raise KeyboardInterrupt  # steps 1-3 logged, nothing checkpointed
                return real_step(self)

            mp.setattr(RewardTrainer, "step", crash_at_4)
            expected = KeyboardInterrupt
        else:

            def disk_full(obj, path):
                open(path + ".tmp", "wb").write(b"torn")
                raise OSError(errno.ENOSPC, "No space left on device")

            mp.setattr(checkpoint, "atomic_save", disk_full)  # the name save_checkpoint calls
            expected = OSError
        with pytest.raises(expected):
            main(["train", "rm", "--config", cfg])
    assert [r["step"] for r in _rows(broken)] == ([1, 2, 3] if how == "killed" else [1, 2])
    assert not os.path.exists(broken / "checkpoint.pt")
    assert main(["train", "rm", "--config", cfg]) == 0
    a, b = _rows(straight), _rows(broken)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if not k.startswith("time/")} == {
            k: v for k, v in rb.items() if not k.startswith("time/")
        }
    _same_model(straight / "model.pt", broken / "model.pt")


def test_checkpoint_of_another_trainer_is_refused_by_name(tmp_path):
    from rlhf_fast.trainer.checkpoint import CheckpointError

    path = str(tmp_path / "grpo.pt")
    grpo_trainer(steps=1).save(path)
    with pytest.raises(CheckpointError, match=r"grpo\.pt has no 'critic', 'critic_opt', 'critic_sched' state"):
        ppo_trainer(steps=1).load(path)


def test_checkpoint_from_before_the_counters_and_split_still_loads(tmp_path):
    """An older checkpoint has no consecutive-skip counter and no RM split:
    they stay as built (what that run resumed with), everything else loads."""
    from rlhf_fast.trainer.checkpoint import checksums

    tr = rm_trainer(steps=2)
    tr.train()
    path = str(tmp_path / "old.pt")
    tr.save(path)
    blob = torch.load(path, weights_only=False)
    del blob["checksums"], blob["split"]
    blob["skipped"] = {"v": 1}
    blob["checksums"] = checksums(blob)
    torch.save(blob, path)
    fresh = rm_trainer(steps=2)
    fresh.dead_steps = 0
    fresh.load(path)
    assert (fresh.step_count, fresh.skipped_steps, fresh.dead_steps) == (2, 1, 0)
    assert torch.equal(fresh.train_idx, tr.train_idx)  # the same seed: the split as built is the run's
    assert torch.equal(flat_params(fresh.model), flat_params(tr.model))
