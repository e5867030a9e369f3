"""TRL users' inputs, piece by piece: TextRewards against HF's own reward-model
forward, prompt sources (JSONL, lists, duck-typed datasets), save_pretrained
exports, the CLI's TRL-style prompts_file / reward values, and the core
trainers' reward check. The whole-script tests are in test_trl_compat.py,
whose in-code tokenizer and tiny models these reuse."""

import json

import pytest
import torch
from _compare import assert_close, assert_equal
from _tiny_models import (  # noqa: F401 - one_thread: the autouse fixture, one torch thread
    PROMPTS,
    hf_tokenizer,
    one_thread,
    tiny_policy,
    tiny_reward_model,
)

transformers = pytest.importorskip("transformers")


def test_text_rewards_weighting_none_and_model_scores_match_hf():
    from rlhf_fast.trainer.rewards import TextRewards

    tok = hf_tokenizer()
    rm = tiny_reward_model(tok)
    rows = [{"prompt": "my movie was", "k": 1}, {"prompt": "the trip is", "k": 2}]
    f1 = lambda completions, **kw: [1.0, None, 3.0, None]  # noqa: E731
    f2 = lambda prompts, completions, k, **kw: [None, None, float(k[2]), 4.0]  # noqa: E731
    r = TextRewards(
        [f1, f2, rm],
        tok,
        rows,
        num_samples=2,
        reward_weights=[2.0, 1.0, 0.5],
        reward_processing_classes=[None, None, tok],
    )
    r.set_batch([0, 1])
    texts = ["great .", "dull and odd .", "fun .", "bad ."]
    prompt_ids = torch.tensor([tok("my movie was")["input_ids"], tok("the trip is")["input_ids"]])
    seqs, masks = [], []
    for i, t in enumerate(texts):
        resp = tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        resp += [tok.pad_token_id] * (6 - len(resp))
        seqs.append(prompt_ids[i // 2].tolist() + resp)
        masks.append([j < len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for j in range(6)])
    out = r(torch.tensor(seqs), torch.tensor(masks), prompt_ids.shape[1])
    # the model scores prompt + completion text, right-padded, with its own tokenizer (no special tokens)
    decoded = [tok.decode(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]  # as the trainer decodes
    full = [f"{['my movie was', 'the trip is'][i // 2]}{t}" for i, t in enumerate(decoded)]
    want_rm = torch.stack([rm(**tok(f, add_special_tokens=False, return_tensors="pt")).logits[0, 0] for f in full])
    w = torch.tensor([[2.0 * 1.0, 0.0], [0.0, 0.0], [2.0 * 3.0, 2.0], [0.0, 4.0]]).sum(-1)  # nansum over functions
    assert_close(out, w + 0.5 * want_rm, "model", "weighted rewards")
    assert rm.config.pad_token_id is None  # set for the call only
    r2 = TextRewards([f1], tok, rows, num_samples=2)
    r2.set_batch([0, 1])
    nan = r2(torch.tensor(seqs), torch.tensor(masks), prompt_ids.shape[1]).isnan()
    assert nan.tolist() == [False, True, False, True]  # every reward None: NaN, zero-weighted by the trainer


def test_prompt_sources_jsonl_list_and_errors(tmp_path):
    from rlhf_fast.trainer.data import load_prompt_rows, tokenize_prompts

    tok = hf_tokenizer()
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(PROMPTS[:3])) + "\n")
    rows = load_prompt_rows(str(path))
    assert rows == [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS[:3])]
    assert load_prompt_rows(PROMPTS[:3]) == [{"prompt": p} for p in PROMPTS[:3]]
    ids, mask = tokenize_prompts([{"prompt": "my movie was"}, {"prompt": "the trip"}], tok)
    assert ids.tolist() == [
        [1] + tok("my movie was", add_special_tokens=False)["input_ids"],
        [0, 1] + tok("the trip", add_special_tokens=False)["input_ids"],
    ]  # left-padded, BOS
    assert mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    chat, _ = tokenize_prompts([{"prompt": [{"role": "user", "content": "my movie was"}]}], tok)
    assert tok.decode(chat[0]) == "<user> my movie was <assistant>"

    class Columns:  # anything with column_names, len() and ds[i] passes for a datasets.Dataset
        column_names = ["query"]

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"query": "my movie was"}

    with pytest.raises(ValueError, match=r'no "prompt" column \(columns: \[\'query\'\]\)'):
        load_prompt_rows(Columns())
    with pytest.raises(ValueError, match="mixes plain-text and conversational"):
        load_prompt_rows([{"prompt": "a"}, {"prompt": [{"role": "user", "content": "b"}]}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 is not JSON"):
        load_prompt_rows(str(bad))


# ---- save_pretrained-style outputs


def test_reward_head_exports_as_sequence_classification(tmp_path):
    from rlhf_fast.trainer import ScalarHeadModel
    from rlhf_fast.trainer.export import load_scalar_head, save_scalar_head

    tok = hf_tokenizer()
    rm = ScalarHeadModel.from_causal_lm(tiny_policy(tok), init_std=0.02)
    with torch.no_grad():
        rm.head.bias.fill_(0.3)
    save_scalar_head(rm, str(tmp_path), tokenizer=tok)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path))
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    assert hf.config.rlhf_fast_score_bias == pytest.approx(0.3)
    enc = tok(["my movie was great .", "the trip is"], return_tensors="pt", padding=True, padding_side="right")
    want = rm.score(enc["input_ids"], enc["attention_mask"])
    got = hf(**enc).logits[:, 0] + hf.config.rlhf_fast_score_bias  # HF finds the last token by the pad id
    assert_close(got, want, "model", "exported head")
    back = load_scalar_head(str(tmp_path))
    assert_equal(back.score(enc["input_ids"], enc["attention_mask"]), want, "reloaded head")
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path)).pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("algo", ["ppo", "rm"])
def test_cli_train_writes_save_pretrained_folders_beside_model_pt(tmp_path, algo):
    import yaml

    from rlhf_fast.demo.train_source import train_from_yaml

    cfg = dict(steps=1, seed=0, progress=False, out_dir=str(tmp_path), batch_size=4)
    cfg.update(dict(max_new_tokens=4, minibatch_size=4, ppo_epochs=1) if algo == "ppo" else {})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    trainer = train_from_yaml(algo, str(tmp_path / "c.yaml"))
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    if algo == "rm":
        back = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "reward_model"))
        ids = torch.tensor([[1, 5, 9, 12, 2]])
        want = trainer.model.score(ids, torch.ones_like(ids))
        assert_close(
            back(input_ids=ids).logits[:, 0] + back.config.rlhf_fast_score_bias, want, "model", "exported reward model"
        )
        return
    policy = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "policy"))
    for k, v in policy.state_dict().items():
        assert torch.equal(v, state[k]), k
    value = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "value_model"))
    assert_equal(value.score.weight.detach(), trainer.critic.head.weight.detach(), "exported value head")


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_cli_train_with_jsonl_prompts_text_reward_and_hf_reward_model(tmp_path, algo):
    import yaml

    from rlhf_fast.demo.train_source import train_from_yaml

    rows = [{"prompt": p, "noun": p.split()[1]} for p in PROMPTS]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "my_rewards.py").write_text(
        "def names_the_noun(prompts, completions, noun, **kwargs):\n"
        "    assert all(n == p.split()[1] for p, n in zip(prompts, noun)), 'a row got another row\\'s column'\n"
        "    kwargs['log_metric']('calls', 1.0)\n"
        "    return [float(n in c.split()) for c, n in zip(completions, noun)]\n"
    )
    tok = hf_tokenizer()
    tiny_reward_model(tok).save_pretrained(str(tmp_path / "rm"))
    tok.save_pretrained(str(tmp_path / "rm"))
    cfg = dict(
        model="tiny-demo",
        steps=2,
        seed=0,
        progress=False,
        out_dir=str(tmp_path / "out"),
        batch_size=3,
        max_new_tokens=4,
        minibatch_size=6,
        ppo_epochs=1,
        **({"num_samples": 2} if algo == "grpo" else {}),
        prompts_file=str(tmp_path / "prompts.jsonl"),
        reward={"funcs": [f"{tmp_path}/my_rewards.py:names_the_noun", str(tmp_path / "rm")], "weights": [1.0, 0.5]},
    )
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    trainer = train_from_yaml(algo, str(tmp_path / "c.yaml"))
    lines = [json.loads(x) for x in open(tmp_path / "out" / "metrics.jsonl")]
    assert len(lines) == 2 and all("rewards/names_the_noun/mean" in r and r["calls"] == 1.0 for r in lines)
    assert trainer.reward.weights.tolist() == [1.0, 0.5]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**cfg, "reward": f"{tmp_path}/my_rewards.py:nope"}))
    with pytest.raises(ValueError, match="my_rewards.py has no 'nope'"):
        train_from_yaml(algo, str(tmp_path / "bad.yaml"))


def test_core_trainer_checks_its_reward_before_the_first_rollout():
    from rlhf_fast.trainer import GRPOConfig as CoreConfig
    from rlhf_fast.trainer import GRPOTrainer as CoreGRPO

    tok = hf_tokenizer()
    ids = torch.tensor([tok("my movie was")["input_ids"]])
    cfg = CoreConfig(steps=1, batch_size=1, num_samples=2, max_new_tokens=2, progress=False)

    def build(reward):
        return CoreGRPO(cfg, tiny_policy(tok), None, reward, ids, eos_token_id=2, pad_token_id=0)

    with pytest.raises(TypeError, match="LlamaForSequenceClassification; expected a ScalarHeadModel.*TextRewards"):
        build(tiny_reward_model(tok))
    with pytest.raises(
        TypeError,
        match="cannot be called as reward\\(sequences, response_mask, prompt_length\\).*TRL reward function on text",
    ):
        build(lambda prompts, completions, **kw: [0.0])
    with pytest.raises(TypeError, match="reward is a str"):
        build("rule")
    build(lambda sequences, response_mask, prompt_length: torch.zeros(sequences.shape[0]))  # the right shape passes
