"""rlhf_fast.generate against Hugging Face generate, on tiny Llama / Qwen2 /
GPT-2 models built from configs (no downloads), fp32 on CPU."""

import inspect
import warnings

import pytest
import torch
from _compare import assert_close
from _tiny_models import decoder_config
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import rlhf_fast

V = 97


def _tiny(kind: str):
    torch.manual_seed(1234)  # fixed weights: the test's randomness is in the prompts
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**decoder_config(V))).eval()
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**decoder_config(V))).eval()
    cfg = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


MODELS = {kind: _tiny(kind) for kind in ("llama", "qwen2", "gpt2")}


def _prompts(padding: str, B=4, P=9):
    ids = torch.randint(3, V, (B, P))
    mask = torch.ones_like(ids)
    lengths = [P, P - 3, P - 5, 1][:B]
    for i, n in enumerate(lengths):
        if padding == "left":
            mask[i, : P - n] = 0
        elif padding == "right":
            mask[i, n:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _hf_greedy(model, ids, mask, R, eos):
    return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=R, eos_token_id=eos, pad_token_id=0)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_greedy_matches_hf_generate(kind, padding):
    model = MODELS[kind]
    ids, mask = _prompts(padding)
    R = 14
    free = _hf_greedy(model, ids, mask, R, eos=None)
    # EOS mid-batch: the token row 0 emits at step 4, so row 0 stops there
    eos = int(free[0, ids.shape[1] + 4])
    want = _hf_greedy(model, ids, mask, R, eos=eos)
    got = rlhf_fast.generate(model, ids, mask, max_new_tokens=R, temperature=0.0, eos_token_id=eos, pad_token_id=0)
    assert got.sequences.shape == want.shape, (got.sequences, want)
    assert torch.equal(got.sequences, want)
    P = ids.shape[1]
    assert int(got.lengths[0]) <= 5 and int(got.sequences[0, P + got.lengths[0] - 1]) == eos
    # response mask: a prefix per row, up to and including EOS; pads after it
    resp = got.sequences[:, P:]
    assert torch.equal(got.response_mask.sum(-1), got.lengths)
    assert bool((resp[~got.response_mask] == 0).all())
    assert bool((got.logprobs[~got.response_mask] == 0).all())


def _teacher_forced_logprobs(model, out, prompt_mask, temperature, **filters):
    P = out.prompt_length
    n = out.sequences.shape[0] // prompt_mask.shape[0]
    mask = torch.cat([prompt_mask.repeat_interleave(n, 0), out.response_mask.long()], dim=1)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    logits = model(input_ids=out.sequences, attention_mask=mask, position_ids=pos).logits
    lp = rlhf_fast.logprobs_from_logits(logits[:, P - 1 : -1], out.sequences[:, P:], temperature=temperature, **filters)
    return torch.where(out.response_mask, lp, torch.zeros_like(lp))


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize(
    "cfg", [dict(temperature=0.8), dict(temperature=1.2, top_k=20, top_p=0.9, min_p=0.02)], ids=["plain", "truncated"]
)
def test_sampled_logprobs_equal_teacher_forced(kind, cfg):
    model = MODELS[kind]
    ids, mask = _prompts("left")
    out = rlhf_fast.generate(model, ids, mask, max_new_tokens=12, num_samples=3, eos_token_id=2, **cfg)
    assert out.sequences.shape[0] == 12 and out.logprobs.dtype == torch.float32
    want = _teacher_forced_logprobs(model, out, mask, cfg["temperature"])
    assert_close(out.logprobs, want, "model", "sampled vs teacher-forced")
    assert bool((out.logprobs[out.response_mask] < 0).all())
    # processed: under the truncated distribution drawn from, as the scorer computes it teacher-forced
    filters = {k: v for k, v in cfg.items() if k != "temperature"}
    if not filters:
        assert torch.equal(out.processed_logprobs, out.logprobs)
    want_p = _teacher_forced_logprobs(model, out, mask, cfg["temperature"], **filters)
    assert bool(torch.isfinite(out.processed_logprobs).all())
    assert_close(out.processed_logprobs, want_p, "model", "processed: sampled vs teacher-forced")
    assert bool((out.processed_logprobs[~out.response_mask] == 0).all())
    if filters:  # truncation renormalises onto fewer tokens: never below the raw log-prob
        assert bool((out.processed_logprobs >= out.logprobs - 1e-6).all())


def test_triton_backend_sampled_logprobs():
    model = MODELS["llama"]
    ids, mask = _prompts("left", B=2, P=5)
    with rlhf_fast.use_backend("triton"):
        out = rlhf_fast.generate(model, ids, mask, max_new_tokens=5, num_samples=2, temperature=0.9)
    assert_close(out.logprobs, _teacher_forced_logprobs(model, out, mask, 0.9), "model", "triton sampled")


def test_num_samples_differ_and_generator_reproducible():
    model = MODELS["qwen2"]
    ids, mask = _prompts("left")
    kw = dict(max_new_tokens=10, num_samples=4, temperature=1.0, eos_token_id=None)
    a = rlhf_fast.generate(model, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    b = rlhf_fast.generate(model, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logprobs, b.logprobs)
    P = ids.shape[1]
    for i in range(ids.shape[0]):
        group = a.sequences[4 * i : 4 * i + 4, P:]
        assert group.unique(dim=0).shape[0] > 1, f"prompt {i}: all 4 samples identical"
        assert torch.equal(a.sequences[4 * i : 4 * i + 4, :P], ids[i].expand(4, -1))


def test_early_exit_when_all_rows_done():
    model = MODELS["llama"]
    ids, mask = _prompts("none", B=2)
    free = _hf_greedy(model, ids, mask, 3, eos=None)
    P = ids.shape[1]
    # every row emits its EOS within 3 steps; max_new_tokens=40 must not be used up
    eos = [int(free[0, P + 1]), int(free[1, P + 2])]
    out = rlhf_fast.generate(
        model, ids, mask, max_new_tokens=40, temperature=0.0, eos_token_id=eos, pad_token_id=0, sync_every=4
    )
    assert out.sequences.shape[1] <= P + 3
    assert torch.equal(out.sequences, _hf_greedy(model, ids, mask, 40, eos=eos))


def test_per_prompt_parameters():
    model = MODELS["gpt2"]
    ids, mask = _prompts("left", B=2)
    out = rlhf_fast.generate(model, ids, mask, max_new_tokens=6, num_samples=2, temperature=torch.tensor([0.0, 1.0]))
    greedy = _hf_greedy(model, ids[:1], mask[:1], 6, eos=None)
    assert torch.equal(out.sequences[0, : greedy.shape[1]], greedy[0])
    assert torch.equal(out.sequences[1, : greedy.shape[1]], greedy[0])


def test_bad_arguments_raise():
    model = MODELS["llama"]
    ids = torch.randint(3, V, (2, 4))
    with pytest.raises(ValueError, match="max_new_tokens"):
        rlhf_fast.generate(model, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="num_samples"):
        rlhf_fast.generate(model, ids, max_new_tokens=2, num_samples=0)
    with pytest.raises(ValueError, match="attention_mask"):
        rlhf_fast.generate(model, ids, torch.ones(2, 5), max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        rlhf_fast.generate(model, ids, max_new_tokens=2, top_p=0.0)


@pytest.mark.parametrize("kind", list(MODELS))
def test_no_cache_deprecation_warning(kind):
    """transformers >= 5.24 renamed the forward's `past_key_values` to `cache`
    (FutureWarning, removal announced for 5.40): generate passes the name
    the installed version reads, so no warning reaches the user."""
    ids, mask = _prompts("left", B=2, P=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.filterwarnings("error", message=".*past_key_values.*")
        out = rlhf_fast.generate(MODELS[kind], ids, mask, max_new_tokens=4, num_samples=2, temperature=0.0)
    assert out.sequences.shape == (4, 5 + int(out.lengths.max()))


class _OldSpelling(torch.nn.Module):
    """A causal LM as transformers < 5.24 shaped it: the cache arrives as
    past_key_values, and any other keyword is an error."""

    def __init__(self, lm):
        super().__init__()
        self.lm, self.config, self.dtype = lm, lm.config, lm.dtype
        self.calls = 0

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None, logits_to_keep=0
    ):
        assert past_key_values is not None
        self.calls += 1
        return self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **{_native(self.lm): past_key_values},
        )


def _native(lm) -> str:
    """The installed transformers' name for the cache argument (5.24: cache; 5.17: past_key_values)."""
    return "cache" if "cache" in inspect.signature(type(lm).forward).parameters else "past_key_values"


class _Wrapper(torch.nn.Module):  # a PEFT-like wrapper: forward(**kwargs), the model behind get_base_model()
    def __init__(self, lm):
        super().__init__()
        self.inner = lm

    def get_base_model(self):
        return self.inner

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def test_cache_keyword_follows_the_model_signature():
    from rlhf_fast.generation.static_cache import cache_kwarg

    llama = MODELS["llama"]
    old = _OldSpelling(llama)
    assert cache_kwarg(llama) == _native(llama) and cache_kwarg(old) == "past_key_values"
    assert cache_kwarg(_Wrapper(old)) == "past_key_values" and cache_kwarg(_Wrapper(llama)) == _native(llama)
    ids, mask = _prompts("left")
    want = rlhf_fast.generate(llama, ids, mask, max_new_tokens=6, temperature=0.0, eos_token_id=None)
    got = rlhf_fast.generate(old, ids, mask, max_new_tokens=6, temperature=0.0, eos_token_id=None)
    assert torch.equal(got.sequences, want.sequences) and old.calls == 6  # prefill + 5 decode steps
