"""A TRL-style GRPO script on rlhf_fast's trainer with only the imports
changed (rlhf_fast.trl), the same script under TRL itself with the rewards
compared, GRPOConfig's mapping of TRL's arguments, the errors raised before
the first rollout, resume, torchrun and PEFT. Everything is built in code: a
word-level HF tokenizer, a tiny Llama policy and a tiny
LlamaForSequenceClassification reward model (reused by test_trl_inputs.py)."""

import pytest
import torch
from _compare import assert_close
from _tiny_models import (  # noqa: F401 - one_thread: the autouse fixture
    PROMPTS,
    hf_tokenizer,
    one_thread,
    run_torchrun,
    tiny_policy,
    tiny_reward_model,
)

from rlhf_fast.demo import world

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def prompt_dataset(conversational=False, source="datasets"):
    """A datasets.Dataset (TRL's input; `datasets` is not a dependency of rlhf_fast) or a list of dicts."""
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS] if conversational else PROMPTS
    nouns = [p.split()[1] for p in PROMPTS]
    if source == "list":
        return [{"prompt": p, "noun": n} for p, n in zip(prompts, nouns)]
    datasets = pytest.importorskip("datasets", reason="TRL's Dataset input needs the datasets package (TRL has it)")
    return datasets.Dataset.from_dict({"prompt": prompts, "noun": nouns})


def _text(c):
    return c if isinstance(c, str) else c[0]["content"]


# ---- the TRL-style script: only its import line differs between TRL and rlhf_fast


def trl_style_script(GRPOConfig, GRPOTrainer, tok, dataset, out_dir, calls):
    def positive_share(completions, **kwargs):  # TRL's simplest form
        calls.append(("positive_share", kwargs))
        out = []
        for c in completions:
            adj = [w for w in _text(c).split() if w in world.ADJECTIVES]
            out.append(sum(w in world.POSITIVE for w in adj) / len(adj) if adj else None)  # None: not applicable
        return out

    def names_the_noun(prompts, completions, completion_ids, noun, **kwargs):  # a dataset column as a kwarg
        calls.append(
            (
                "names_the_noun",
                dict(prompts=prompts, completions=completions, completion_ids=completion_ids, noun=noun, **kwargs),
            )
        )
        return [float(n in _text(c).split()) for c, n in zip(completions, noun)]

    reward_model = tiny_reward_model(tok)
    model_dir = f"{out_dir}/init"  # a path, as most scripts give it (TRL also rebuilds its reference from it)
    tiny_policy(tok).save_pretrained(model_dir)
    args = GRPOConfig(
        output_dir=out_dir,
        learning_rate=1e-3,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=3,
        beta=0.04,
        reward_weights=[1.0, 0.5, 0.1],
        logging_steps=1,
        seed=0,
        bf16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
    )
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=[positive_share, names_the_noun, reward_model],
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        reward_processing_classes=[None, None, tok],
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("source,conversational", [("datasets", False), ("datasets", True), ("list", True)])
def test_trl_style_grpo_script_runs_with_rlhf_fast_imports(tmp_path, source, conversational):
    from rlhf_fast.trl import GRPOConfig, GRPOTrainer

    tok = hf_tokenizer()
    calls = []
    data = prompt_dataset(conversational, source)
    trainer = trl_style_script(GRPOConfig, GRPOTrainer, tok, data, str(tmp_path), calls)
    assert trainer.step_count == 3 and trainer.state.global_step == 3
    c = trainer.config  # TRL's names mapped: 8 completions per step = 2 prompts x 4
    assert (c.batch_size, c.num_samples, c.minibatch_size, c.max_new_tokens, c.kl_coef) == (2, 4, 8, 6, 0.04)
    rows = trainer.state.log_history
    assert len(rows) == 3 and all(
        "rewards/positive_share/mean" in r and "rewards/names_the_noun/mean" in r for r in rows
    )
    assert all(r["applied"] >= 1 for r in rows)
    fn_calls = [kw for name, kw in calls if name == "names_the_noun"]
    assert len(fn_calls) == 3
    for kw in fn_calls:  # TRL's convention: prompts repeated per sample, the other columns alongside
        assert len(kw["prompts"]) == len(kw["completions"]) == len(kw["completion_ids"]) == len(kw["noun"]) == 8
        assert {"trainer_state", "log_extra", "log_metric"} <= set(kw)
        for p, noun, comp, ids in zip(kw["prompts"], kw["noun"], kw["completions"], kw["completion_ids"]):
            assert noun == _text(p).split()[1]  # the row's own column, not another prompt's
            assert _text(comp) == tok.decode(ids, skip_special_tokens=True)
            assert isinstance(comp, list) == conversational
        assert kw["prompts"][0:4] == [kw["prompts"][0]] * 4  # the n samples of a prompt are adjacent
    saved = trainer.save_model(str(tmp_path / "policy"))
    back = transformers.AutoModelForCausalLM.from_pretrained(saved)
    for (k, a), b in zip(trainer.model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    back_tok = transformers.AutoTokenizer.from_pretrained(saved)
    assert back_tok("my movie was")["input_ids"] == tok("my movie was")["input_ids"]


def test_same_script_runs_under_trl_and_rewards_agree(tmp_path):
    """The script above is TRL's own API: it runs unchanged with `from trl import ...`, and
    TextRewards scores a batch exactly as TRL's GRPOTrainer._calculate_rewards does."""
    trl = pytest.importorskip("trl", reason="TRL is optional (scripts/install_integrations.sh installs it)")
    from rlhf_fast.trainer.rewards import TextRewards

    tok = hf_tokenizer()
    tok.padding_side = "left"
    calls = []
    trainer = trl_style_script(trl.GRPOConfig, trl.GRPOTrainer, tok, prompt_dataset(), str(tmp_path), calls)
    assert trainer.state.global_step == 3
    assert {n for n, _ in calls} == {"positive_share", "names_the_noun"}
    # one generation batch scored both ways, 2 prompts x 2 samples, text and chat (the reward model then
    # reads the chat template)
    texts = ["great and bad .", "my movie", "odd .", "trip is nice ."]
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    decoded = tok.batch_decode(ids, skip_special_tokens=True)
    for conversational in (False, True):
        rows = [dict(prompt_dataset(conversational)[i]) for i in (0, 5)]
        inputs = [rows[i // 2] for i in range(4)]
        prompts = [r["prompt"] for r in inputs]
        completions = [[{"role": "assistant", "content": d}] for d in decoded] if conversational else decoded
        want = trainer._calculate_rewards(inputs, prompts, completions, ids)  # (4, 3) per function
        want = (want * trainer.reward_weights).nansum(-1)
        ours = TextRewards(
            trainer.reward_funcs,
            tok,
            rows,
            2,
            reward_weights=[1.0, 0.5, 0.1],
            reward_processing_classes=trainer.reward_processing_classes,
        )
        ours.set_batch([0, 1])
        P = 8  # any prompt width: the rows name their prompts, the tokens only carry the completions
        seqs = torch.zeros((4, P + 6), dtype=torch.long)
        mask = torch.zeros((4, 6), dtype=torch.bool)
        for i, x in enumerate(ids):
            seqs[i, P : P + len(x)] = torch.tensor(x)
            mask[i, : len(x)] = True
        assert_close(ours(seqs, mask, P), want.float().cpu(), "peer", "rewards")


# ---- errors before the first rollout, naming what was expected


def _trainer(reward_funcs, tmp_path=None, **cfg):
    from rlhf_fast.trl import GRPOConfig, GRPOTrainer

    tok = hf_tokenizer()
    args = GRPOConfig(
        output_dir=None,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=4,
        max_steps=1,
        bf16=False,
        **cfg,
    )
    return GRPOTrainer(
        model=tiny_policy(tok),
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=prompt_dataset(source="list"),
        processing_class=tok,
    )


def test_wrong_reward_signature_is_reported_before_rollout(monkeypatch):
    import rlhf_fast.trainer.rollout as rollout_mod

    monkeypatch.setattr(rollout_mod, "generate", lambda *a, **k: pytest.fail("generated before the check"))
    want = (
        r"requires texts, which are never passed; it does not accept prompts, completions.*\(add \*\*kwargs\). "
        r"Expected fn\(prompts, completions, \*\*kwargs\)"
    )
    with pytest.raises(TypeError, match=want):
        _trainer([lambda texts: [0.0] * len(texts)])
    with pytest.raises(TypeError, match="rlhf_fast's token-level reward"):
        _trainer([lambda sequences, response_mask, prompt_length: None])
    with pytest.raises(TypeError, match=r"it does not accept noun \(add \*\*kwargs\)"):
        _trainer([lambda prompts, completions, completion_ids, trainer_state, log_extra, log_metric: None])
    with pytest.raises(TypeError, match="AutoModelForSequenceClassification.*causal LM"):
        _trainer([tiny_policy(hf_tokenizer())])
    with pytest.raises(TypeError, match="expected fn"):
        _trainer([42])
    with pytest.raises(ValueError, match="2 reward_weights for 1 reward functions"):
        _trainer([lambda completions, **kw: [0.0] * len(completions)], reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="could not be loaded as a transformers AutoModelForSequenceClassification"):
        _trainer(["/nonexistent/reward-model"])


def test_reward_returning_wrong_length_or_type_says_so():
    t = _trainer([lambda completions, **kw: [0.0]])
    with pytest.raises(ValueError, match="returned 1 rewards for 4 completions"):
        t.train()
    t = _trainer([lambda completions, **kw: ["good"] * len(completions)])
    with pytest.raises(TypeError, match="returned 'good' for completion 0; expected a float or None"):
        t.train()


def test_config_rejects_unsupported_trl_arguments_by_name():
    from rlhf_fast.trl import GRPOConfig

    with pytest.raises(TypeError, match=r"num_generation \(did you mean num_generations\?\)"):
        GRPOConfig(num_generation=4)
    with pytest.raises(ValueError, match="repetition_penalty=1.1 is not supported"):
        GRPOConfig(repetition_penalty=1.1)
    with pytest.raises(ValueError, match="use_vllm=True is not supported"):
        GRPOConfig(use_vllm=True)
    with pytest.raises(ValueError, match="loss_type='cispo' is not supported"):
        GRPOConfig(loss_type="cispo")
    with pytest.raises(ValueError, match="must be divisible by num_generations"):
        GRPOConfig(per_device_train_batch_size=6, num_generations=4)
    cfg = GRPOConfig(report_to="none", gradient_checkpointing=True)  # TRL machinery only: accepted, ignored
    assert cfg.ignored == ["gradient_checkpointing", "report_to"]
    with pytest.raises(TypeError, match="not supported: eval_dataset"):
        from rlhf_fast.trl import GRPOTrainer

        GRPOTrainer(model=None, reward_funcs=[], args=cfg, train_dataset=[], eval_dataset=[{"prompt": "x"}])


def test_trl_config_mapping():
    from rlhf_fast.trl import GRPOConfig

    c = GRPOConfig(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_generations=4,
        max_steps=10,
        num_iterations=2,
        loss_type="dr_grpo",
        scale_rewards="none",
        epsilon_high=0.28,
        warmup_steps=4,
        bf16=False,
    ).to_rlhf_fast(num_prompts=100)
    # generation batch = 4 x 2 = 8 completions = 2 prompts x 4; 2 iterations x 1 optimizer step each per rollout
    assert (c.batch_size, c.num_samples, c.minibatch_size, c.grad_accum, c.ppo_epochs) == (2, 4, 8, 2, 2)
    assert (c.steps, c.warmup_steps, c.loss_agg, c.estimator, c.clip_high) == (
        5,
        2,
        "seq-mean-token-sum-norm",
        "dr_grpo",
        0.28,
    )
    d = GRPOConfig(bf16=False).to_rlhf_fast(num_prompts=10)  # TRL's defaults: 3 epochs over 10 prompts, 1 per step
    assert (d.steps, d.batch_size, d.lr, d.seed, d.max_new_tokens, d.loss_agg, d.kl_coef) == (
        30,
        1,
        1e-6,
        42,
        512,
        "token-mean",
        0.0,
    )


def test_resume_from_checkpoint_continues_the_run(tmp_path):
    from rlhf_fast.trl import GRPOConfig, GRPOTrainer

    tok = hf_tokenizer()

    def run(max_steps, resume=None, seed_model=0):
        args = GRPOConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=4,
            max_steps=max_steps,
            save_steps=1,
            learning_rate=1e-3,
            lr_scheduler_type="constant",
            bf16=False,
            disable_tqdm=True,
        )
        t = GRPOTrainer(
            model=tiny_policy(tok, seed_model),
            reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
            args=args,
            train_dataset=PROMPTS,
            processing_class=tok,
        )
        t.train(resume_from_checkpoint=resume)
        return t

    straight = {k: v.clone() for k, v in run(3).model.state_dict().items()}
    run(2)
    resumed = run(3, resume=True, seed_model=5)  # other initial weights: the checkpoint's must win
    assert resumed.state.global_step == 3 and len(resumed.state.log_history) == 1
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, straight[k]), k
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        run(1, resume=str(tmp_path / "nope.pt"))


@pytest.mark.slow
def test_trl_style_script_under_torchrun_keeps_ranks_in_sync(tmp_path):
    import os

    out = str(tmp_path / "r")
    run_torchrun(os.path.join(os.path.dirname(__file__), "_trl_worker.py"), out)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert r0["batch_size"] == 2 and r0["steps"] == r1["steps"] == 2  # 4 per rank x 2 ranks / 4 samples = 2 prompts
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k


def test_peft_config_trains_only_the_adapters_and_async_rewards_run():
    peft = pytest.importorskip("peft", reason="optional: pip install peft (in the test extra)")
    from rlhf_fast.trl import GRPOConfig, GRPOTrainer

    tok = hf_tokenizer()

    async def length_reward(completions, **kwargs):  # TRL also accepts async reward functions
        return [float(len(c)) for c in completions]

    args = GRPOConfig(
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=4,
        max_steps=1,
        learning_rate=1e-2,
        beta=0.1,
        bf16=False,
        disable_tqdm=True,
    )
    model = tiny_policy(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    t = GRPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=args,
        train_dataset=PROMPTS,
        processing_class=tok,
        peft_config=lora,
    )
    t.train()
    assert t.state.log_history[0]["applied"] == 1 and "kl" in t.state.log_history[0]  # beta > 0: a reference ran
    named = dict(t.model.named_parameters())
    assert all(p.requires_grad == ("lora_" in n) for n, p in named.items())
    assert any(float(p.detach().abs().max()) > 0 for n, p in named.items() if "lora_B" in n)  # the adapters moved
    for k, v in t.ref.state_dict().items():  # the reference is the model before the adapters, untouched
        assert torch.equal(v, before[k]), k
