"""The thin trainer: fused ops vs the reference backend step for step, reward
model and DPO learning on separable toy data, exact resume, the NaN guard,
configs, and the quick end-to-end demo."""

import copy
import json
import math

import pytest
import torch
from _compare import assert_close
from _tiny_models import (  # noqa: F401 - one_thread: the autouse fixture
    TOK,
    dpo_trainer,
    flat_params,
    grpo_trainer,
    max_param_diff,
    one_thread,
    ppo_trainer,
    prompt_batch,
    rm_trainer,
    rule_reward,
    run_torchrun,
    separable_pairs,
    tiny_llama,
)

import rlhf_fast
from rlhf_fast.trainer import (
    DPOConfig,
    DPOTrainer,
    KLController,
    PPOConfig,
    PPOTrainer,
    RewardConfig,
    RewardTrainer,
    ScalarHeadModel,
)

# ---------------------------------------------------------------- fused == reference


def test_extension_is_used():
    # Otherwise the fused-vs-reference tests below compare the reference with itself.
    assert rlhf_fast.info()["extension_loaded"], "build rlhf_fast._C first (python setup.py build_ext --inplace)"


def _fused_and_reference(make, steps=2):
    """Two runs of make(): the compiled ops, then the pure-PyTorch reference. (trainer, rows) each."""
    fused = make()
    rows_f = fused.train(steps)
    with rlhf_fast.use_backend("reference"):
        ref = make()
        rows_r = ref.train(steps)
    return fused, rows_f, ref, rows_r


def test_ppo_steps_fused_match_reference():
    fused, rows_f, ref, rows_r = _fused_and_reference(ppo_trainer)
    start = tiny_llama(0)
    moved = max_param_diff(fused.policy, start)
    assert moved > 1e-4, "the policy did not move: the comparison would be vacuous"
    # same sampled tokens (shared counter-based noise), so the only difference is fp32 rounding
    assert max_param_diff(fused.policy, ref.policy) < 1e-3 * moved
    assert max_param_diff(fused.critic, ref.critic) < 1e-3 * max(
        max_param_diff(fused.critic, ScalarHeadModel.from_causal_lm(start)), 1e-6
    )
    for a, b in zip(rows_f, rows_r):
        for k in ("reward", "kl", "pg_loss", "value_loss", "clipfrac", "entropy", "response_length"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k


def test_bf16_autocast_steps_train_and_stay_fp32():
    trainer = ppo_trainer(autocast="bf16")
    start = flat_params(trainer.policy).clone()
    rows = trainer.train(2)
    assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())  # master weights stay fp32
    assert float((flat_params(trainer.policy) - start).abs().max()) > 1e-4
    for row in rows:
        for k in ("reward", "kl", "pg_loss", "value_loss", "entropy"):
            assert math.isfinite(row[k]), (k, row[k])
    with pytest.raises(ValueError, match="autocast = 'fp8' is invalid; allowed: one of 'bf16', None"):
        ppo_trainer(autocast="fp8")  # refused by the config, before a model is built


def test_bf16_autocast_grpo_rm_dpo_train():
    (ci, cm), (ri, rm) = separable_pairs(16)
    cl, rl = cm.clone(), rm.clone()
    cl[:, :4] = 0  # <bos> det noun verb: the prompt
    rl[:, :4] = 0
    policy = tiny_llama(2)
    dpo = DPOTrainer(
        DPOConfig(steps=2, batch_size=8, lr=3e-3, progress=False, autocast="bf16"),
        policy,
        copy.deepcopy(policy),
        ci,
        cm,
        cl,
        ri,
        rm,
        rl,
    )
    rm_tr = RewardTrainer(
        RewardConfig(steps=2, batch_size=8, progress=False, autocast="bf16"),
        ScalarHeadModel.from_causal_lm(tiny_llama()),
        ci,
        cm,
        ri,
        rm,
    )
    for rows in (dpo.train(), rm_tr.train(), grpo_trainer(autocast="bf16").train(1)):
        for row in rows:
            assert row["skipped"] == 0 and all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row


def test_grpo_steps_fused_match_reference():
    fused, rows_f, ref, rows_r = _fused_and_reference(grpo_trainer)
    moved = max_param_diff(fused.policy, tiny_llama(0))
    assert moved > 1e-4
    assert max_param_diff(fused.policy, ref.policy) < 1e-3 * moved
    for a, b in zip(rows_f, rows_r):
        for k in ("reward", "kl", "pg_loss", "entropy"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k


# ---------------------------------------------------------------- reward model, DPO


def test_reward_model_accuracy_rises():
    rt = rm_trainer()
    before = rt.evaluate()
    rt.train()
    after = rt.evaluate()
    assert after["eval_accuracy"] >= 0.95, after
    assert after["eval_accuracy"] > before["eval_accuracy"]
    assert after["eval_loss"] < before["eval_loss"] - 0.3


def test_reward_model_margin_needs_tensor():
    (ci, cm), (ri, rm) = separable_pairs(8)
    with pytest.raises(ValueError, match="margin"):
        RewardTrainer(
            RewardConfig(margin=True, progress=False), ScalarHeadModel.from_causal_lm(tiny_llama()), ci, cm, ri, rm
        )


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_decreases(loss_type):
    tr = dpo_trainer(loss_type)
    all_idx = torch.arange(tr.data[0].shape[0])
    first = float(tr.loss(all_idx)[0])
    tr.train()
    last, stats = tr.loss(all_idx)
    assert float(last) < 0.7 * first, (first, float(last))
    assert stats["reward_accuracy"] > 0.9


def test_dpo_logps_match_materialised_logits():
    (ci, cm), _ = separable_pairs(4)
    lm = tiny_llama(3)
    from rlhf_fast.trainer import sequence_logprobs_linear

    lp, n = sequence_logprobs_linear(lm, ci, cm, cm)
    logits = lm(input_ids=ci, attention_mask=cm).logits[:, :-1].double()
    want = (logits.log_softmax(-1).gather(-1, ci[:, 1:, None]).squeeze(-1) * cm[:, 1:]).sum(-1)
    assert_close(lp, want, "model", "sequence log-probs")
    assert torch.equal(n, cm[:, 1:].sum(-1))


# ---------------------------------------------------------------- resume, guard, config


def test_resume_equals_uninterrupted(tmp_path):
    straight = ppo_trainer(str(tmp_path / "a"), kl_target=0.5, kl_horizon=50)
    straight.train(4)
    first = ppo_trainer(str(tmp_path / "b"), kl_target=0.5, kl_horizon=50)
    first.train(2)
    first.save(str(tmp_path / "ck.pt"))
    torch.manual_seed(12345)  # the global RNG must come back from the checkpoint too
    # other RNG seeds and a perturbed policy / critic: load must overwrite them all.
    # The frozen reference is not in the checkpoint: it is rebuilt from its source, as here.
    resumed = ppo_trainer(str(tmp_path / "c"), seed=7, kl_target=0.5, kl_horizon=50)
    with torch.no_grad():
        for p in list(resumed.policy.parameters()) + list(resumed.critic.parameters()):
            p.add_(0.01)
    resumed.load(str(tmp_path / "ck.pt"))
    assert resumed.step_count == 2
    resumed.train(4)
    assert torch.equal(flat_params(straight.policy), flat_params(resumed.policy))
    assert torch.equal(flat_params(straight.critic), flat_params(resumed.critic))
    assert straight.kl_ctl.value == resumed.kl_ctl.value != 0.1


def test_nan_reward_skips_step_and_says_so(tmp_path, capsys):
    tr = ppo_trainer(str(tmp_path), progress=True)
    tr.reward = lambda s, m, p: torch.full((s.shape[0],), float("nan"))
    before = flat_params(tr.policy).clone()
    rows = tr.train(1)
    assert rows[0]["skipped"] > 0
    assert torch.equal(before, flat_params(tr.policy))
    assert "SKIPPED" in capsys.readouterr().err
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert logged[-1]["skipped"] > 0


def test_config_from_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 0.002\nbatch_size: 5\nkl_target: 0.1\n")
    cfg = PPOConfig.from_yaml(str(p))
    assert cfg.lr == 0.002 and cfg.batch_size == 5 and cfg.kl_target == 0.1
    p.write_text("lr: 0.002\nbatchsize: 5\n")
    with pytest.raises(ValueError, match="batchsize"):
        PPOConfig.from_yaml(str(p))


def test_adaptive_kl_controller():
    ctl = KLController(0.1, target=1.0, horizon=100)
    ctl.update(10.0, 10)  # error clipped at +0.2: beta *= 1 + 0.2 * 10/100
    assert ctl.value == pytest.approx(0.1 * 1.02)
    fixed = KLController(0.1)
    fixed.update(10.0, 10)
    assert fixed.value == 0.1


# ---------------------------------------------------------------- the demo


@pytest.mark.slow
def test_quick_demo_true_score_rises(tmp_path):
    from rlhf_fast.demo.pipeline import run_demo

    s = run_demo(str(tmp_path), quick=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == s
    assert summary["true_score_after"] >= summary["true_score_before"] + 0.2, summary
    assert summary["rm_accuracy"] >= 0.8
    assert 0 < summary["kl_final"] < 10
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    phases = {json.loads(line)["phase"] for line in open(tmp_path / "metrics.jsonl")}
    assert phases == {"sft", "rm", "ppo"}


# ---------------------------------------------------------------- torchrun, 2 processes, gloo


def _torchrun(mode, out):
    import os

    run_torchrun(os.path.join(os.path.dirname(__file__), "_ddp_worker.py"), mode, str(out))
    return torch.load(out)


@pytest.mark.slow
def test_cli_train_grpo_under_torchrun_fsdp2(tmp_path):
    import yaml

    from rlhf_fast.demo.train_source import TinyDemoSource

    cfg = dict(
        model="tiny-demo",
        reward="rule",
        steps=2,
        batch_size=4,
        num_samples=2,
        max_new_tokens=6,
        minibatch_size=8,
        lr=1e-3,
        kl_coef=0.02,
        seed=3,
        parallel="fsdp2",
        out_dir=str(tmp_path / "out"),
    )
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(cfg))
    run_torchrun("-m", "rlhf_fast.cli", "train", "grpo", "--config", str(tmp_path / "g.yaml"))
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # rank 0 alone writes
    state = torch.load(tmp_path / "out" / "model.pt")
    assert all(type(v) is torch.Tensor for v in state.values()), "model.pt must hold full tensors, not shards"
    lm = TinyDemoSource().load_lm(3)
    start = flat_params(lm).clone()
    lm.load_state_dict(state)  # strict: every key, every full shape
    assert float((flat_params(lm) - start).abs().max()) > 1e-4


def _moved_and_gap(got_full, single, start):
    moved = float((single - start).abs().max())
    return moved, float((got_full - single).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_distributed_reward_model_matches_one_process_doubled_batch(tmp_path, parallel):
    got = _torchrun(f"rm:{parallel}", tmp_path / "rm.pt")
    assert got["world"] == 2 and got["sharded"] == (parallel == "fsdp2")
    if parallel == "ddp":
        assert torch.equal(got["ranks"][0], got["ranks"][1]), "DDP ranks diverged"
    single = rm_trainer()  # one process, the same global batch of 16 (8 per rank above)
    start = flat_params(single.model).clone()
    single.train()
    want = flat_params(single.model)
    # The head bias cancels in r_chosen - r_rejected: its gradient is pure rounding noise, which
    # Adam scales up to lr-sized steps, so it is left out (it is the last parameter).
    n_bias = single.model.head.bias.numel()
    moved, gap = _moved_and_gap(got["full"][:-n_bias], want[:-n_bias], start[:-n_bias])
    assert moved > 1e-3
    assert gap < 1e-3 * moved


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_distributed_dpo_matches_one_process_doubled_batch(tmp_path, parallel):
    # DDP: gradients all-reduced by hand (the fused path bypasses forward);
    # FSDP2: the fused path runs as a registered forward method of the sharded model.
    got = _torchrun(f"dpo:{parallel}", tmp_path / "dpo.pt")
    single = dpo_trainer(steps=6)
    start = flat_params(single.policy).clone()
    rows = single.train()
    moved, gap = _moved_and_gap(got["full"], flat_params(single.policy), start)
    assert moved > 1e-2
    assert gap < 1e-3 * moved
    for a, b in zip(rows, got["rows"]):  # rank 0 logs its half-batch metrics; the loss is a mean of means
        assert math.isfinite(b["loss"]) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)


@pytest.mark.slow
def test_ddp_ppo_ranks_stay_in_sync(tmp_path):
    got = _torchrun("ppo", tmp_path / "ppo.pt")
    assert torch.equal(got["ranks"][0], got["ranks"][1]), "DDP ranks diverged"
    assert float((got["ranks"][0] - flat_params(tiny_llama(0))).abs().max()) > 1e-4


@pytest.mark.slow
def test_fsdp2_ppo_matches_ddp(tmp_path):
    # Same ranks, same per-rank sampling streams: sharding changes where the
    # weights live, not the update. (A gradient norm taken over a module's
    # parameters instead of the optimizer's once missed FSDP2's root weights.)
    ddp = _torchrun("ppo:ddp", tmp_path / "ddp.pt")
    fsdp = _torchrun("ppo:fsdp2", tmp_path / "fsdp2.pt")
    assert fsdp["sharded"] and not ddp["sharded"]
    start = flat_params(tiny_llama(0))
    moved, gap = _moved_and_gap(fsdp["full"], ddp["full"], start)
    assert moved > 1e-3
    assert gap < 1e-3 * moved
    for a, b in zip(ddp["rows"], fsdp["rows"]):
        for k in ("reward", "kl", "pg_loss", "value_loss", "grad_norm", "entropy", "response_length"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k


@pytest.mark.slow
def test_fsdp2_resume_equals_uninterrupted_and_checkpoint_is_whole(tmp_path):
    got = _torchrun("resume:fsdp2", tmp_path / "resume.pt")
    assert got["sharded"]
    assert torch.equal(got["full"], got["straight"])
    blob = torch.load(got["checkpoint"], weights_only=False)
    assert blob["world_size"] == 2 and len(blob["rng_ranks"]) == 2
    s0, s1 = (r["generators"]["sample"] for r in blob["rng_ranks"])
    assert not torch.equal(s0, s1), "each rank's sampling stream must be kept"
    # the sharded run wrote full tensors: a single process loads them as they are
    policy = tiny_llama(0)
    policy.load_state_dict(blob["policy"])
    ScalarHeadModel.from_causal_lm(tiny_llama(0)).load_state_dict(blob["critic"])
    assert float((flat_params(policy) - flat_params(tiny_llama(0))).abs().max()) > 1e-4


def test_tensorboard_scalars_match_jsonl(tmp_path):
    pytest.importorskip("tensorboard", reason="optional: pip install tensorboard (in the test extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tr = rm_trainer(steps=3, out_dir=str(tmp_path), tensorboard=True)
    tr.train()
    tr.logger.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("rm/loss")]
    assert [s for s, _ in got] == [1, 2, 3]
    assert [v for _, v in got] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    with pytest.raises(ValueError, match="needs out_dir"):
        rm_trainer(steps=1, tensorboard=True)


# ---------------------------------------------------------------- LoRA through PEFT


def test_lora_ppo_trains_only_the_adapters():
    pytest.importorskip("peft", reason="optional: pip install peft (in the test extra)")
    from rlhf_fast.trainer import apply_lora

    policy = tiny_llama(0)
    ref, critic = copy.deepcopy(policy), ScalarHeadModel.from_causal_lm(policy)  # taken before LoRA
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    lora = apply_lora(policy, r=4, alpha=8)
    ids, mask = prompt_batch()
    cfg = PPOConfig(steps=2, batch_size=6, max_new_tokens=6, lr=1e-2, ppo_epochs=2, minibatch_size=3, progress=False)
    tr = PPOTrainer(
        cfg, lora, ref, critic, rule_reward, ids, mask, eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id
    )
    rows = tr.train()
    assert all(math.isfinite(r["pg_loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    n_trainable = sum(p.numel() for g in tr.opt.param_groups for p in g["params"])
    assert n_trainable == sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    base = lora.get_base_model().state_dict()
    for k, v in base.items():
        if "lora_" not in k:
            assert torch.equal(v, start[k.replace("base_layer.", "")]), f"frozen weight {k} moved"
    assert max(float(p.abs().max()) for n, p in lora.named_parameters() if "lora_B" in n) > 0  # B starts at 0


def test_lora_dpo_fused_logps_match_peft_forward_and_loss_falls():
    pytest.importorskip("peft", reason="optional: pip install peft (in the test extra)")
    from rlhf_fast.trainer import apply_lora, sequence_logprobs_linear

    def lora_with_nonzero_adapter(model):
        model = apply_lora(model, r=8, alpha=32)
        with torch.no_grad():  # B starts at 0; non-zero, so the check below sees LoRA in both paths
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.05)
        return model

    tr = dpo_trainer(steps=25, policy_fn=lora_with_nonzero_adapter)
    ci, cm = tr.data[0][:4], tr.data[1][:4]
    lp, _ = sequence_logprobs_linear(tr.policy, ci, cm, cm)
    logits = tr.policy(input_ids=ci, attention_mask=cm).logits[:, :-1].double()
    want = (logits.log_softmax(-1).gather(-1, ci[:, 1:, None]).squeeze(-1) * cm[:, 1:]).sum(-1)
    assert_close(lp, want, "model", "sequence log-probs")
    all_idx = torch.arange(tr.data[0].shape[0])
    first = float(tr.loss(all_idx)[0])
    tr.train()
    assert float(tr.loss(all_idx)[0]) < 0.85 * first


def test_train_cli_lora_key(tmp_path):
    pytest.importorskip("peft", reason="optional: pip install peft (in the test extra)")
    import yaml

    from rlhf_fast.demo.train_source import train_from_yaml

    cfg = dict(
        model="tiny-demo",
        steps=2,
        batch_size=8,
        lora={"r": 4, "alpha": 8},
        progress=False,
        out_dir=str(tmp_path / "out"),
    )
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(cfg))
    tr = train_from_yaml("dpo", str(tmp_path / "d.yaml"))
    assert type(tr.policy).__name__ == "PeftModelForCausalLM"
    assert any("lora_A" in k for k in torch.load(tmp_path / "out" / "model.pt"))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**cfg, "out_dir": None}))
    with pytest.raises(ValueError, match="lora applies to a policy"):
        train_from_yaml("rm", str(tmp_path / "r.yaml"))
    (tmp_path / "k.yaml").write_text(yaml.safe_dump({**cfg, "lora": {"r": 4, "alpah": 8}, "out_dir": None}))
    with pytest.raises(ValueError, match="lora: unknown config key 'alpah' \\(did you mean 'alpha'\\?\\)"):
        train_from_yaml("dpo", str(tmp_path / "k.yaml"))


# ---------------------------------------------------------------- layering


def test_trainer_imports_nothing_from_the_demo():
    """The trainer (and its YAML runner) stands alone: `model: tiny-demo` is a
    source the command line registers (rlhf_fast/demo/train_source.py)."""
    import subprocess
    import sys

    code = (
        "import sys, rlhf_fast.trainer, rlhf_fast.trainer.run, rlhf_fast.trainer.parallel\n"
        "print(sorted(m for m in sys.modules if m.startswith('rlhf_fast.demo')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_parallel_imports_no_model_code():
    import ast
    import inspect

    from rlhf_fast.trainer import parallel

    tree = ast.parse(inspect.getsource(parallel))
    relative = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
    assert relative == [], relative


def test_run_from_yaml_knows_only_checkpoint_folders_unless_given_sources(tmp_path):
    import yaml

    from rlhf_fast.trainer.run import run_from_yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"model": "tiny-demo", "steps": 1}))
    with pytest.raises(FileNotFoundError, match="'tiny-demo' is neither an existing local checkpoint folder"):
        run_from_yaml("rm", str(tmp_path / "c.yaml"))
    (tmp_path / "n.yaml").write_text(yaml.safe_dump({"steps": 1}))
    with pytest.raises(ValueError, match="no model key"):
        run_from_yaml("rm", str(tmp_path / "n.yaml"))
    (tmp_path / "u.yaml").write_text(yaml.safe_dump({"model": "tiny-demo", "stepz": 1}))
    with pytest.raises(ValueError, match="'stepz' \\(did you mean 'steps'\\?\\)"):
        run_from_yaml("rm", str(tmp_path / "u.yaml"))


def test_demo_overrides_are_checked_by_name(tmp_path):
    from rlhf_fast.demo.pipeline import run_demo

    with pytest.raises(ValueError, match="'kl_coeff' \\(did you mean 'kl_coef'\\?\\)"):
        run_demo(str(tmp_path), quick=True, kl_coeff=0.1)


@pytest.mark.parametrize("make", [rm_trainer, dpo_trainer], ids=["rm", "dpo"])
def test_micro_batches_accumulate_on_device(make, monkeypatch):
    """Trainer.accumulate reads nothing back per micro-batch: .item() and
    float() on a tensor fail inside it; the step reads its metrics once."""
    tr = make(steps=1, grad_accum=4)
    pick = torch.arange(13)  # chunks of 4, 4, 4, 1: row weights, not chunk weights, for the stats

    def refuse(self, *a):
        raise AssertionError("host sync inside accumulate")

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", refuse)
        m.setattr(torch.Tensor, "__float__", refuse)
        loss, stats = tr.accumulate(pick, tr.loss)
    key = "accuracy" if make is rm_trainer else "reward_accuracy"
    with torch.no_grad():
        whole = tr.loss(pick)[1][key]
    assert loss.dim() == 0 and float(stats[key]) == pytest.approx(float(whole), abs=1e-6)
    row = tr.optimizer_step(loss, stats)
    assert row["loss"] == pytest.approx(float(loss)) and row["applied"] == 1


@pytest.mark.slow
def test_ddp_killed_and_resumed_equals_uninterrupted_field_by_field(tmp_path):
    """tests/_resume_cases.py on 2 gloo ranks, for PPO, GRPO, RM and DPO: every
    rank's stop, metrics, attributes and checkpoint (which holds both ranks'
    RNG streams) equal the uninterrupted run's."""
    from _resume_cases import STOP

    got = _torchrun("fields", tmp_path / "fields.pt")
    assert got["world"] == 2
    for algo, diffs in got["diffs"].items():
        assert got["stops"][algo] is not None and got["stops"][algo][0] == STOP, (algo, got["stops"][algo])
        assert diffs == [], f"{algo}:\n" + "\n".join(diffs[:20])
    assert set(got["diffs"]) == {"ppo", "grpo", "rm", "dpo"}


@pytest.mark.parametrize("make", [ppo_trainer, grpo_trainer])
@pytest.mark.parametrize("packing", [False, True])
def test_fused_policy_loss_matches_logits_path(make, packing):
    """policy_loss: fused (linear_ppo_loss on the trunk's hidden states, the
    default) and logits (lm_head logits, logprobs_from_logits, ppo_loss) log
    the same metrics and end at the same weights, to rounding."""
    runs = {}
    for path in ("fused", "logits"):
        t = make(policy_loss=path, packing=packing)
        runs[path] = (t.train(2), flat_params(t.policy))
    (rows_f, w_f), (rows_l, w_l) = runs["fused"], runs["logits"]
    moved = (w_l - flat_params(tiny_llama(0))).abs().max().item()
    assert moved > 1e-4
    assert (w_f - w_l).abs().max().item() < 1e-4 * moved
    for a, b in zip(rows_f, rows_l):
        for k in ("pg_loss", "entropy", "clipfrac", "approx_kl", "outside_kept_frac", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
