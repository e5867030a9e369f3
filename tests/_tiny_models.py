"""The tiny models and trainers the trainer tests share, built in code
(nothing downloaded): the demo's word tokenizer and a 1-layer, 32-wide Llama,
the hidden-rule reward, PPO / GRPO / reward-model / DPO trainers on them, a
word-level Hugging Face tokenizer with a chat template and a tiny sequence-
classification reward model (the TRL-style tests), the config of a tiny
Llama-family decoder (the generation tests), and a 2-process torchrun.

Import the `one_thread` fixture into a test module to make it autouse there:
tiny models gain nothing from a second OpenMP thread but sync (and runs that
depend on the thread count)."""

import copy
import os
import random
import subprocess
import sys

import pytest
import torch

from rlhf_fast.demo import world
from rlhf_fast.trainer import (
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    PPOConfig,
    PPOTrainer,
    RewardConfig,
    RewardTrainer,
    ScalarHeadModel,
)

TOK = world.make_tokenizer()
PROMPTS = [f"{d} {n} was" for d in world.DETS for n in world.NOUNS[:4]]  # 12 prompts, for the TRL-style tests
CHAT = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- the demo's world, smaller


def tiny_llama(seed=0, vocab_size=None):
    """1 layer, 32 wide; vocab_size None: the demo's words."""
    return world.tiny_llama(len(TOK) if vocab_size is None else vocab_size, seed, hidden=32, layers=1)


def rule_reward(sequences, response_mask, prompt_length):
    return world.hidden_score(TOK, sequences, prompt_length)


def prompt_batch(n=12):
    train, _ = world.split_prompts(0)
    return world.encode_batch(TOK, train[:n], pad_left=True)


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def max_param_diff(a, b) -> float:
    return float((flat_params(a) - flat_params(b)).abs().max())


# ---------------------------------------------------------------- trainers


def ppo_trainer(tmp=None, seed=0, model_seed=0, **kw):
    cfg = dict(
        steps=4,
        batch_size=6,
        max_new_tokens=6,
        lr=1e-3,
        ppo_epochs=2,
        minibatch_size=3,
        grad_accum=2,
        kl_coef=0.1,
        seed=seed,
        progress=False,
        out_dir=tmp,
        entropy_coef=0.01,
        dual_clip=3.0,
    )
    cfg.update(kw)
    policy = tiny_llama(model_seed)
    ref = copy.deepcopy(policy)
    critic = ScalarHeadModel.from_causal_lm(policy)
    return _on_demo_prompts(PPOTrainer, PPOConfig(**cfg), policy, ref, critic)


def grpo_trainer(seed=0, **kw):
    cfg = dict(
        steps=2,
        batch_size=3,
        num_samples=4,
        max_new_tokens=6,
        lr=1e-3,
        ppo_epochs=2,
        minibatch_size=6,
        kl_coef=0.05,
        seed=seed,
        progress=False,
    )
    cfg.update(kw)
    policy = tiny_llama(seed)
    return _on_demo_prompts(GRPOTrainer, GRPOConfig(**cfg), policy, copy.deepcopy(policy))


def _on_demo_prompts(trainer_cls, config, *models):
    """A PPO / GRPO trainer over `models` on 12 of the demo's prompts, scored by its hidden rule."""
    ids, mask = prompt_batch()
    return trainer_cls(
        config, *models, rule_reward, ids, mask, eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id
    )


def separable_pairs(n=96, seed=0):
    """chosen: a completion with positive adjectives only; rejected: negative only."""
    rng = random.Random(seed)
    prompts = world.all_prompts()
    ch, rj = [], []
    for _ in range(n):
        p = rng.choice(prompts)
        ch.append(f"{p} very {rng.choice(world.POSITIVE)} .")
        rj.append(f"{p} very {rng.choice(world.NEGATIVE)} .")
    return world.encode_batch(TOK, ch, eos=True), world.encode_batch(TOK, rj, eos=True)


def rm_trainer(steps=40, batch_size=16, **kw):
    (ci, cm), (ri, rm) = separable_pairs()
    model = ScalarHeadModel.from_causal_lm(tiny_llama(1), init_std=0.02)
    cfg = RewardConfig(steps=steps, batch_size=batch_size, lr=3e-3, eval_fraction=0.25, progress=False, **kw)
    return RewardTrainer(cfg, model, ci, cm, ri, rm)


def dpo_trainer(loss_type="sigmoid", steps=25, n_pairs=48, policy_fn=None, **kw):
    """policy_fn(model) -> the trained policy (e.g. LoRA-wrapped); the reference is copied before it."""
    (ci, cm), (ri, rm) = separable_pairs(n_pairs)
    P = 4  # <bos> det noun verb
    cl, rl = cm.clone(), rm.clone()
    cl[:, :P] = 0
    rl[:, :P] = 0
    policy = tiny_llama(2)
    ref = copy.deepcopy(policy)
    if policy_fn is not None:
        policy = policy_fn(policy)
    cfg = DPOConfig(steps=steps, batch_size=16, lr=3e-3, beta=0.1, loss_type=loss_type, progress=False, **kw)
    return DPOTrainer(cfg, policy, ref, ci, cm, cl, ri, rm, rl)


# ---------------------------------------------------------------- Hugging Face pieces (generation and TRL-style tests)


def decoder_config(vocab_size: int, **overrides) -> dict:
    """Keyword arguments for a tiny Llama-family config (LlamaConfig,
    Qwen2Config, MistralConfig, Gemma2Config take the same names): 2 layers,
    32 wide, 4 query heads over 2 KV heads (grouped-query attention), 128
    positions, <pad> 0 / <bos> 1 / <eos> 2; `overrides` replace any of them."""
    return (
        dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        | overrides
    )


def hf_tokenizer():
    """A PreTrainedTokenizerFast over the demo's words (<pad> 0, <bos> 1, <eos> 2), with a chat template."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    words = world.DETS + world.NOUNS + world.VERBS + world.ADJECTIVES + world.GLUE + ["<user>", "<assistant>", "<unk>"]
    vocab = {w: i for i, w in enumerate(world.SPECIALS + words)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    t.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.chat_template = CHAT
    return tok


def tiny_policy(tok, seed=0):
    return tiny_llama(seed, vocab_size=len(tok))


def tiny_reward_model(tok, seed=1):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        num_labels=1,
        pad_token_id=None,
    )
    return LlamaForSequenceClassification(cfg)


# ---------------------------------------------------------------- torchrun, 2 processes, gloo


def run_torchrun(*args):
    """`torchrun --standalone --nproc_per_node 2 *args` with this checkout first on the path; its stderr."""
    here = os.path.dirname(__file__)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(here))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired as exc:
        os.killpg(proc.pid, 9)  # torchrun and both workers: no orphan left holding a rank
        _, err = proc.communicate()
        raise AssertionError("torchrun timed out:\n" + err[-3000:]) from exc
    assert proc.returncode == 0, err[-3000:]
    return err
