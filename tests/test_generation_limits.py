"""rlhf_fast.generate's limits, checked before the first forward: the
longest prompt + max_new_tokens against the model's positions (GPT-2's
learned table would fail with an IndexError, a RoPE Llama extrapolates
silently) and attention-mask rows with no prompt token; the trainers and
`rlhf-fast train` refuse the same when they are built."""

import pytest
import torch
from _tiny_models import one_thread, ppo_trainer, tiny_llama  # noqa: F401 - one_thread: the autouse fixture

import rlhf_fast


def _gpt2(n_positions=16):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=20, n_embd=16, n_layer=1, n_head=2, n_positions=n_positions, bos_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def _counting(model):
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


@pytest.mark.parametrize(
    "make, attr, ctx", [(_gpt2, "n_positions", 16), (tiny_llama, "max_position_embeddings", 32)], ids=["gpt2", "llama"]
)
def test_prompt_plus_max_new_tokens_past_the_context_is_refused_before_the_forward(make, attr, ctx):
    model = make()
    calls = _counting(model)
    ids = torch.full((2, 6), 3)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])  # the longest prompt: 5 real tokens
    with pytest.raises(ValueError) as e:
        rlhf_fast.generate(model, ids, mask, max_new_tokens=ctx - 4, eos_token_id=2)
    msg = str(e.value)
    assert f"longest prompt (5 tokens) + max_new_tokens ({ctx - 4}) = {ctx + 1}" in msg, msg
    assert f"config.{attr} = {ctx}" in msg, msg
    assert calls == []  # refused before the prefill
    out = rlhf_fast.generate(model, ids, mask, max_new_tokens=ctx - 5, eos_token_id=None)  # exactly full: fine
    assert out.sequences.shape == (2, 6 + ctx - 5) and calls


def test_an_all_zero_attention_mask_row_is_refused():
    model = tiny_llama()
    calls = _counting(model)
    ids = torch.full((3, 4), 3)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"attention_mask row\(s\) 1 are all zeros"):
        rlhf_fast.generate(model, ids, mask, max_new_tokens=2)
    assert calls == []
    out = rlhf_fast.generate(model, torch.full((0, 4), 3), torch.zeros(0, 4, dtype=torch.long), max_new_tokens=2)
    assert out.sequences.shape == (0, 4)  # no rows at all is still an empty rollout


def test_trainer_refuses_max_new_tokens_past_the_policy_context_when_built():
    with pytest.raises(
        ValueError,
        match=r"ppo: the longest prompt \(4 tokens\) \+ max_new_tokens \(200\).*"
        r"config\.max_position_embeddings = 32",
    ):
        ppo_trainer(max_new_tokens=200)
