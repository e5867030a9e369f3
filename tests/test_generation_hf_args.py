"""rlhf_fast.generate with model.generate's arguments: do_sample,
generation_config, num_return_sequences, max_length; refused arguments named;
the right-padding warning; sliding-window models (Mistral, Gemma 2) exact
within the window and refused beyond it, before the prefill."""

import warnings

import pytest
import torch
from _tiny_models import decoder_config
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

import rlhf_fast

V = 61
SMALL = decoder_config(V)


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL)).eval()


def _left_padded(B=3, P=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, P), generator=g)
    mask = torch.ones_like(ids)
    for i, n in enumerate([P, P - 2, 2][:B]):
        mask[i, : P - n] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _gen(model, ids, mask, seed=7, **kw):
    return rlhf_fast.generate(model, ids, mask, generator=torch.Generator().manual_seed(seed), **kw)


def test_do_sample_false_is_greedy_and_matches_hf():
    model, (ids, mask) = _llama(), _left_padded()
    got = _gen(model, ids, mask, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = model.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=None
    )
    assert torch.equal(got.sequences, want)
    same = _gen(model, ids, mask, max_new_tokens=6, temperature=0.0, eos_token_id=None, pad_token_id=0)
    assert torch.equal(got.sequences, same.sequences)


def test_generation_config_fills_what_is_not_given_and_explicit_wins():
    model, (ids, mask) = _llama(), _left_padded()
    gc = GenerationConfig(
        max_new_tokens=5,
        do_sample=True,
        temperature=0.7,
        top_k=10,
        top_p=0.9,
        min_p=0.05,
        num_return_sequences=2,
        eos_token_id=2,
        pad_token_id=0,
    )
    a = _gen(model, ids, mask, generation_config=gc)
    b = _gen(
        model,
        ids,
        mask,
        max_new_tokens=5,
        num_samples=2,
        temperature=0.7,
        top_k=10,
        top_p=0.9,
        min_p=0.05,
        eos_token_id=2,
        pad_token_id=0,
    )
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logprobs, b.logprobs)
    assert a.sequences.shape[0] == 6
    c = _gen(model, ids, mask, generation_config=gc, temperature=1.3, max_new_tokens=3)  # explicit beats the config
    d = _gen(
        model,
        ids,
        mask,
        max_new_tokens=3,
        num_samples=2,
        temperature=1.3,
        top_k=10,
        top_p=0.9,
        min_p=0.05,
        eos_token_id=2,
        pad_token_id=0,
    )
    assert torch.equal(c.sequences, d.sequences)
    greedy = _gen(model, ids, mask, generation_config=GenerationConfig(max_new_tokens=4, do_sample=False))
    assert torch.equal(greedy.sequences, _gen(model, ids, mask, max_new_tokens=4, temperature=0.0).sequences)


def test_num_return_sequences_and_max_length_aliases():
    model, (ids, mask) = _llama(), _left_padded()
    a = _gen(model, ids, mask, max_length=ids.shape[1] + 4, num_return_sequences=3, eos_token_id=None)
    b = _gen(model, ids, mask, max_new_tokens=4, num_samples=3, eos_token_id=None)
    assert a.sequences.shape == (9, ids.shape[1] + 4) and torch.equal(a.sequences, b.sequences)


def test_unsupported_arguments_are_refused_by_name():
    model, (ids, mask) = _llama(), _left_padded()
    with pytest.raises(ValueError, match="repetition_penalty=1.2 is not supported.*Use model.generate"):
        _gen(model, ids, mask, max_new_tokens=2, repetition_penalty=1.2)
    with pytest.raises(ValueError, match="num_beams=4 is not supported"):
        _gen(model, ids, mask, max_new_tokens=2, num_beams=4)
    with pytest.raises(ValueError, match="generation_config.no_repeat_ngram_size=2 is not supported"):
        _gen(model, ids, mask, generation_config=GenerationConfig(max_new_tokens=2, no_repeat_ngram_size=2))
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        _gen(model, ids, mask, max_new_tokens=2, temprature=0.5)
    with pytest.raises(ValueError, match="max_new_tokens is required"):
        _gen(model, ids, mask)
    with pytest.raises(ValueError, match="do_sample=True needs temperature > 0"):
        _gen(model, ids, mask, max_new_tokens=2, do_sample=True, temperature=0.0)
    # neutral values, as scripts pass them, are accepted and change nothing
    a = _gen(model, ids, mask, max_new_tokens=3, repetition_penalty=1.0, num_beams=1, use_cache=True)
    assert torch.equal(a.sequences, _gen(model, ids, mask, max_new_tokens=3).sequences)


def test_right_padding_warns_left_padding_does_not():
    model, (ids, mask) = _llama(), _left_padded()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # ours; transformers adds FutureWarnings of its own
        _gen(model, ids, mask, max_new_tokens=2)
    right = torch.stack([m.roll(-int((m == 0).sum())) for m in mask])  # same rows, padding moved to the right
    with pytest.warns(UserWarning, match="right-padded.*padding_side = 'left'"):
        _gen(model, ids, right, max_new_tokens=2)


def _sliding(kind, window):
    torch.manual_seed(0)
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**SMALL, sliding_window=window)).eval()
    cfg = Gemma2Config(**SMALL, head_dim=8, sliding_window=window, query_pre_attn_scalar=8)  # layers: sliding, full
    return Gemma2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", ["mistral", "gemma2"])
def test_sliding_window_models_exact_within_the_window(kind):
    model, (ids, mask) = _sliding(kind, window=16), _left_padded()
    R = 16 - ids.shape[1]  # P + R == window: the window hides nothing
    got = _gen(model, ids, mask, max_new_tokens=R, temperature=0.0, eos_token_id=None, pad_token_id=0)
    want = model.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=R, pad_token_id=0, eos_token_id=None
    )
    assert torch.equal(got.sequences, want)


@pytest.mark.parametrize("kind", ["mistral", "gemma2"])
def test_sliding_window_beyond_the_window_raises_before_prefill(kind, monkeypatch):
    model, (ids, mask) = _sliding(kind, window=8), _left_padded()
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("the model ran before the check"))
    with pytest.raises(ValueError, match=r"sliding-window attention \(config.sliding_window=8\).*exceed the window"):
        _gen(model, ids, mask, max_new_tokens=4)
