"""The rlhf-fast command line: one-line errors, --set overrides, --threads,
the closing summary, a --help that imports nothing heavy, and the demo's
samples.md / plot.png helpers."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from rlhf_fast import cli
from rlhf_fast.trainer.config import ConfigError, PPOConfig, apply_overrides
from rlhf_fast.trainer.run import _EXTRA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("transformers", "torch._dynamo", "torch._inductor")


def _modules_after(code: str) -> list[str]:
    """Which heavy modules a fresh interpreter holds after running `code`."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_and_help_import_nothing_heavy():
    assert _modules_after("import rlhf_fast") == []
    help_code = "from rlhf_fast import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass"
    assert _modules_after(help_code) == []
    for sub in ("train", "demo", "info", "bench"):
        assert _modules_after(help_code.replace("'--help'", f"'{sub}', '--help'")) == [], sub


def test_lazy_names_resolve():
    import rlhf_fast

    assert callable(rlhf_fast.gae) and callable(rlhf_fast.generate)
    assert rlhf_fast.reference.gae is not None
    ns: dict = {}
    exec("from rlhf_fast import *", ns)
    assert set(rlhf_fast.__all__) <= set(ns)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = rlhf_fast.nope


def test_info_reports_no_cuda_backend_without_a_gpu():
    import rlhf_fast

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the CUDA column may say available")
    for name, per_dev in rlhf_fast.info()["backends"].items():
        assert per_dev["cuda"] != "available", name


# ---------------------------------------------------------------- errors as one line


def _err(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("rlhf-fast train: error: ")
    return err


def _cfg(tmp_path, **kv) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in kv.items()))
    return str(path)


def test_missing_config_file(tmp_path, capsys):
    err = _err(capsys, ["train", "ppo", "--config", str(tmp_path / "nope.yaml")])
    assert "nope.yaml" in err and "not found" in err


def test_missing_model_folder_is_caught_before_loading(tmp_path, capsys):
    missing = str(tmp_path / "no-such-model")
    err = _err(capsys, ["train", "ppo", "--config", _cfg(tmp_path, model=missing, steps=1)])
    assert missing in err and "nothing is downloaded" in err


@pytest.mark.parametrize("key", ["prompts_file", "pairs_file", "init_checkpoint"])
def test_missing_data_files(tmp_path, capsys, key):
    err = _err(capsys, ["train", "ppo", "--config", _cfg(tmp_path, **{key: str(tmp_path / "gone"), "steps": 1})])
    assert key in err and "gone" in err


def test_misspelled_key_suggests_and_lists_every_accepted_key(tmp_path, capsys):
    err = _err(capsys, ["train", "ppo", "--config", _cfg(tmp_path, lrr=1e-4)])
    assert "'lrr' (did you mean 'lr'?)" in err
    accepted = err.split("accepted keys: ", 1)[1].split(", ")
    fields = {f.name for f in dataclasses.fields(PPOConfig)}
    assert set(accepted) == fields | set(_EXTRA)
    for extra in ("model", "reward", "prompts_file", "pairs_file", "init_checkpoint", "lora"):
        assert extra in accepted


def test_bad_value_and_bad_yaml(tmp_path, capsys):
    err = _err(capsys, ["train", "ppo", "--config", _cfg(tmp_path, gamma=2.0)])
    assert "gamma = 2.0" in err and "[0, 1]" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    err = _err(capsys, ["train", "ppo", "--config", str(bad)])
    assert "not valid YAML" in err


def test_traceback_flag_reraises(tmp_path):
    with pytest.raises(ValueError, match="lrr"):
        cli.main(["train", "ppo", "--config", _cfg(tmp_path, lrr=1), "--traceback"])


# ---------------------------------------------------------------- errors met during a run, as one line


_SMALL_RM = dict(steps=2, batch_size=8, eval_fraction=0.2, progress=False)


def test_empty_data_files_are_named(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "empty.jsonl").write_text("")
    err = _err(capsys, ["train", "ppo", "--config", _cfg(tmp_path, prompts_file=str(tmp_path / "empty.txt"))])
    assert f"prompts_file {tmp_path / 'empty.txt'} holds no prompts" in err, err
    err = _err(capsys, ["train", "rm", "--config", _cfg(tmp_path, pairs_file=str(tmp_path / "empty.jsonl"))])
    assert f"pairs_file {tmp_path / 'empty.jsonl'} holds no pairs" in err, err


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"prompt": "the movie was", "chosen": "great ."}', "pairs.jsonl:2 has no 'rejected'"),
        ('{"prompt": "the movie was", "chosen": "great ."', "pairs.jsonl:2 is not JSON"),
        ('["the movie was", "great .", "bad ."]', "pairs.jsonl:2 has no 'prompt', 'chosen', 'rejected'"),
        ('{"prompt": "the movie was", "chosen": "great .", "rejected": 3}', "'rejected' must be strings, got int"),
    ],
    ids=["no_rejected", "not_json", "not_an_object", "not_a_string"],
)
def test_bad_pairs_row_names_the_line_and_the_key(tmp_path, capsys, line, expected):
    good = '{"prompt": "the movie was", "chosen": "great .", "rejected": "bad ."}'
    (tmp_path / "pairs.jsonl").write_text(f"{good}\n{line}\n")
    err = _err(capsys, ["train", "dpo", "--config", _cfg(tmp_path, pairs_file=str(tmp_path / "pairs.jsonl"))])
    assert expected in err, err


def test_unknown_word_in_a_tiny_demo_prompt_is_named(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("the movie was\nthe film was splendid\n")
    err = _err(capsys, ["train", "ppo", "--config", _cfg(tmp_path, prompts_file=str(tmp_path / "p.txt"))])
    assert "word(s) outside its vocabulary: 'film', 'splendid'" in err and "movie" in err, err


def test_max_new_tokens_past_the_context_is_one_line(tmp_path, capsys):
    err = _err(capsys, ["train", "ppo", "--config", _cfg(tmp_path, steps=1, max_new_tokens=200)])
    assert "max_new_tokens (200)" in err and "config.max_position_embeddings = 32" in err, err


def test_read_only_out_dir_fails_before_any_model_is_built(tmp_path, capsys, monkeypatch):
    from rlhf_fast.demo.train_source import TinyDemoSource

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root writes anywhere it may chmod: /sys is read-only to root as well
        ro = "/sys"

    def load_lm(self, seed):
        raise AssertionError("the model was built before out_dir was checked")

    monkeypatch.setattr(TinyDemoSource, "load_lm", load_lm)
    err = _err(capsys, ["train", "rm", "--config", _cfg(tmp_path, out_dir=str(ro), **_SMALL_RM)])
    assert f"out_dir {ro} is not writable" in err and "(EACCES)" in err, err
    from _tiny_models import rm_trainer  # the API too: when the trainer is built, not at its first log

    from rlhf_fast.trainer.atomic_io import WriteError

    with pytest.raises(WriteError, match="is not writable"):
        rm_trainer(out_dir=str(ro))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to fill a disk")
def test_disk_full_names_the_file_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    """The second checkpoint goes to /dev/full (every write: ENOSPC): one line
    naming the file and ENOSPC, no temp file left, the first checkpoint whole."""
    from rlhf_fast.trainer import atomic_io, checkpoint

    writes, real_enter = [], atomic_io._atomic_open.__enter__

    def enter(self):
        if self.path.endswith("checkpoint.pt"):
            writes.append(self.path)
            if len(writes) == 2:
                os.symlink("/dev/full", self.tmp)
        return real_enter(self)

    monkeypatch.setattr(atomic_io._atomic_open, "__enter__", enter)
    out = tmp_path / "out"
    err = _err(capsys, ["train", "rm", "--config", _cfg(tmp_path, out_dir=str(out), checkpoint_every=1, **_SMALL_RM)])
    assert f"cannot write {out / 'checkpoint.pt'}: No space left on device (ENOSPC)" in err, err
    assert "inline_container" not in err and len(writes) == 2
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "metrics.jsonl"]  # no checkpoint.pt.tmp left
    assert checkpoint.read_checkpoint(str(out / "checkpoint.pt"))["step"] == 1


def test_corrupted_checkpoint_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    from rlhf_fast.trainer.checkpoint import CheckpointError

    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    cfg = _cfg(tmp_path, out_dir=str(out), **_SMALL_RM)
    err = _err(capsys, ["train", "rm", "--config", cfg])
    assert f"checkpoint {out / 'checkpoint.pt'} is unreadable" in err and "--debug shows the traceback" in err, err
    with pytest.raises(CheckpointError):
        cli.main(["train", "rm", "--config", cfg, "--debug"])


def test_raising_reward_function_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "my_rewards.py").write_text(
        "def accuracy(prompts, completions, **kw):\n    return [1 / 0 for _ in completions]\n"
    )
    cfg = _cfg(
        tmp_path,
        reward=f"{tmp_path / 'my_rewards.py'}:accuracy",
        steps=1,
        batch_size=2,
        num_samples=2,
        max_new_tokens=2,
        minibatch_size=4,
    )
    err = _err(capsys, ["train", "grpo", "--config", cfg])
    assert "reward function 'accuracy' raised ZeroDivisionError: division by zero" in err, err
    # a token-level reward function given to a trainer: the same error, naming it, the original chained
    from _tiny_models import ppo_trainer

    from rlhf_fast.trainer.rewards import RewardError

    def my_reward(sequences, response_mask, prompt_length):
        raise KeyError("answer")

    tr = ppo_trainer(steps=1, batch_size=2, max_new_tokens=2, minibatch_size=2)
    tr.reward = my_reward
    with pytest.raises(RewardError, match=r"reward function 'my_reward' raised KeyError: 'answer'") as e:
        tr.train()
    assert isinstance(e.value.__cause__, KeyError)


def test_use_backend_error_names_use_backend_not_the_variable(monkeypatch):
    import rlhf_fast
    from rlhf_fast._backend import BackendUnavailable

    x, y = torch.randn(2, 5), torch.tensor([1, 3])
    monkeypatch.delenv("RLHF_FAST_BACKEND", raising=False)
    with pytest.raises(BackendUnavailable) as e, rlhf_fast.use_backend("cuda"):
        rlhf_fast.logprobs_from_logits(x, y)
    assert "forced by rlhf_fast.use_backend('cuda')" in str(e.value) and "RLHF_FAST_BACKEND" not in str(e.value)
    monkeypatch.setenv("RLHF_FAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="forced by RLHF_FAST_BACKEND=cuda"):
        rlhf_fast.logprobs_from_logits(x, y)


# ---------------------------------------------------------------- overrides


def test_apply_overrides_types_nesting_and_no_mutation():
    data = {"lr": 0.1, "lora": {"r": 8}}
    out = apply_overrides(data, ["lr=1e-5", "steps=3", "lora.r=16", "progress=false", "out_dir=a/b", "top_k="])
    assert out == {"lr": 1e-5, "steps": 3, "lora": {"r": 16}, "progress": False, "out_dir": "a/b", "top_k": None}
    assert isinstance(out["lr"], float)
    assert data == {"lr": 0.1, "lora": {"r": 8}}  # input untouched
    for bad in ("lr", "=3"):
        with pytest.raises(ConfigError, match="key=value"):
            apply_overrides({}, [bad])
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_overrides({"lr": 1.0}, ["lr.x=1"])


def test_overrides_reach_validation_through_the_cli(tmp_path, capsys):
    cfg = _cfg(tmp_path, steps=1)
    assert "did you mean 'steps'" in _err(capsys, ["train", "ppo", "--config", cfg, "--set", "stepz=2"])
    assert "batch_size = -1" in _err(capsys, ["train", "ppo", "--config", cfg, "--set", "batch_size=-1"])
    assert "key=value" in _err(capsys, ["train", "ppo", "--config", cfg, "--set", "steps"])


# ---------------------------------------------------------------- threads


def test_thread_default(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cli.train_threads(None, None) == 1
    assert cli.train_threads(None, "tiny-demo") == 1
    assert cli.train_threads(None, "/models/qwen") is None  # torch's default: one per core
    assert cli.train_threads(3, "tiny-demo") == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cli.train_threads(None, "tiny-demo") is None  # the environment decides
    with pytest.raises(SystemExit):
        cli.main(["train", "ppo", "--config", "x.yaml", "--threads", "0"])
    with pytest.raises(SystemExit):
        cli.main(["demo", "--threads", "0"])


def test_train_end_to_end_prints_a_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    out = tmp_path / "run"
    cfg = _cfg(
        tmp_path,
        model="tiny-demo",
        reward="rule",
        steps=5,
        batch_size=4,
        minibatch_size=4,
        max_new_tokens=4,
        progress=False,
    )
    argv = ["train", "ppo", "--config", cfg, "--set", f"out_dir={out}", "--set", "steps=1", "--threads", "1"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "(torch threads: 1)" in text
    assert "train ppo: done, 1 steps" in text  # the override won over the file's steps: 5
    assert f"saved in {out}" in text and "model.pt" in text and "metrics.jsonl" in text
    assert "final step: " in text and "reward " in text
    samples = text.split("sample completions of the trained policy:\n", 1)[1].strip().splitlines()
    assert len(samples) == 3 and all(" -> " in s and "[reward " in s for s in samples)
    assert torch.get_num_threads() == before  # restored for the caller
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(rows) == 1


# ---------------------------------------------------------------- the demo's outputs


def test_samples_md_shows_each_score(tmp_path):
    from rlhf_fast.demo.pipeline import write_samples

    def ev(texts, true, rm):
        return {
            "texts": texts,
            "true_scores": true,
            "rm_scores": rm,
            "true_score": sum(true) / len(true),
            "rm_score": sum(rm) / len(rm),
        }

    before = ev(["a", "b", "c", "d"], [0.0, 0.5, 1.0, 0.25], [-1.0, 0.0, 1.5, 2.0])
    after = ev(["w", "x", "y", "z"], [1.0, 1.0, 0.5, 0.75], [2.0, 3.0, 1.0, 0.5])
    path = tmp_path / "samples.md"
    write_samples(str(path), ["p1", "p2"], before, after, n=2)
    rows = [line for line in path.read_text().splitlines() if line.startswith(("| p1", "| p2"))]
    assert rows == ["| p1 | a | 0.00 | -1.00 | w | 1.00 | 2.00 |", "| p2 | c | 1.00 | 1.50 | y | 0.50 | 1.00 |"]
    assert "**0.438**" in path.read_text() and "**0.812**" in path.read_text()  # means over all samples


def test_plot_has_marks_and_axes(tmp_path):
    from rlhf_fast.demo.plot import line_chart

    path = tmp_path / "p.png"
    line_chart(
        str(path),
        [1, 2, 3],
        {"score (0-1)": [0.2, 0.5, 0.9], "kl: nats": [0.0, None, 1.0]},
        title="t",
        subtitle="held-out 0.35 -> 0.96",
        x_label="PPO step",
        marks={"score (0-1)": [("before 0.35", 0.35), ("after 0.96", 0.96)]},
    )
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import struct

    w, h = struct.unpack(">II", png[16:24])
    assert w == 720 and h > 2 * 170
