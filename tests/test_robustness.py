"""Robustness of the ops: double backward, torch.compile with
dynamic shapes on every public function, extreme parameters, rows with no
valid token, argument checks, stride-0 inputs, threads and memory growth.

Each section names the failure it guards against. torch.compile runs the cpp backend
with backend="aot_eager": it traces what inductor would (dynamo, fake tensors,
AOTAutograd) without a C++ compile per graph; the Triton interpreter cannot be
traced at all (the ops refuse it under torch.compile).
"""

from __future__ import annotations

import threading

import pytest
import torch
from _compare import assert_close

import rlhf_fast
from rlhf_fast.ops._common import min_temperature

INF = float("inf")


# ---------------------------------------------------------------- double backward


def _diff_cases():
    """(name, loss(), differentiable inputs): every public op with a fused backward."""
    B, T, V, H = 3, 4, 7, 5
    x = torch.randn(B, T, V, requires_grad=True)
    y = torch.randint(0, V, (B, T))
    h = torch.randn(B, T, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    b = torch.randn(V, requires_grad=True)
    lp = (torch.randn(B, T) - 1).requires_grad_()
    ent = torch.rand(B, T).requires_grad_()
    old, adv, ref = lp.detach() + 0.05 * torch.randn(B, T), torch.randn(B, T), lp.detach() - 0.1
    m = torch.rand(B, T) > 0.2

    def lp_ent():
        a, e = rlhf_fast.logprobs_from_logits(x, y, temperature=0.8, return_entropy=True)
        return a.sum() + 0.3 * e.sum()

    def lin():
        a, e = rlhf_fast.linear_logprobs(h, w, y, bias=b, return_entropy=True)
        return a.sum() + 0.3 * e.sum()

    return [
        ("logprobs_from_logits", lp_ent, [x]),
        ("linear_logprobs", lin, [h, w, b]),
        (
            "ppo_loss",
            lambda: rlhf_fast.ppo_loss(lp, old, adv, m, entropy=ent, ref_logprobs=ref, entropy_coef=0.01, kl_coef=0.1)[
                0
            ],
            [lp, ent],
        ),
        ("ppo_policy_loss", lambda: rlhf_fast.ppo_policy_loss(lp, old, adv, m)[0], [lp]),
        ("ppo_value_loss", lambda: rlhf_fast.ppo_value_loss(lp, old, adv, m)[0], [lp]),
        ("kl_penalty", lambda: rlhf_fast.kl_penalty(lp, ref).sum(), [lp]),
    ]


DIFF_OPS = [name for name, _, _ in _diff_cases()]


@pytest.mark.parametrize("op", DIFF_OPS)
def test_double_backward_raises_a_clear_error(backend, op):
    """On CPU the second derivative through logprobs_from_logits was
    silently zero; for the other ops the error did not say why."""
    _, loss, inputs = next(c for c in _diff_cases() if c[0] == op)
    plain = torch.autograd.grad(loss(), inputs)
    graph = torch.autograd.grad(loss(), inputs, create_graph=True)
    for g, g0 in zip(graph, plain):  # first order unchanged, and usable under create_graph
        assert torch.equal(g, g0)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(sum((g * g).sum() for g in graph), inputs)
    graph = torch.autograd.grad(loss(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        sum((g * g).sum() for g in graph).backward()


def test_double_backward_create_graph_first_order_in_a_loss():
    """A create_graph=True gradient may feed a loss that is differentiated
    only through *other* tensors (a gradient penalty on a parameter that
    does not reach the op): no error there."""
    x = torch.randn(4, 9, requires_grad=True)
    y = torch.randint(0, 9, (4,))
    (g,) = torch.autograd.grad(rlhf_fast.logprobs_from_logits(x, y).sum(), x, create_graph=True)
    scale = torch.tensor(2.0, requires_grad=True)
    (gs,) = torch.autograd.grad((scale * g.detach()).sum(), scale)
    assert_close(gs, g.sum(), "agree")


def test_double_backward_reference_is_supported():
    """The pure-PyTorch reference differentiates twice, and is what the error
    message points to."""
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 6, (3,))
    with rlhf_fast.use_backend("reference"):
        (g,) = torch.autograd.grad(rlhf_fast.logprobs_from_logits(x, y).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad((g * g).sum(), x)
    xs = x.detach().requires_grad_()
    (g2,) = torch.autograd.grad(torch.log_softmax(xs, -1).gather(1, y[:, None]).sum(), xs, create_graph=True)
    (h2,) = torch.autograd.grad((g2 * g2).sum(), xs)
    assert_close(h, h2, "agree") and h.abs().sum() > 0


# ---------------------------------------------------------------- torch.compile(dynamic=True)


def _inputs(B, T, V=11, H=6):
    return dict(
        x=torch.randn(B, T, V),
        y=torch.randint(0, V, (B, T)),
        h=torch.randn(B, T, H),
        w=torch.randn(V, H),
        lp=torch.randn(B, T) - 1,
        old=torch.randn(B, T) - 1,
        adv=torch.randn(B, T),
        m=torch.rand(B, T) > 0.2,
        logits=torch.randn(B, V),
        scores=torch.randn(B * 4),
        ids=torch.randint(0, 3, (B * 4,)),
    )


# every public function, each taking a float argument (a SymFloat under dynamic=True)
PUBLIC = {
    "logprobs_from_logits": lambda d, t: rlhf_fast.logprobs_from_logits(
        d["x"], d["y"], temperature=t, ignore_index=3, return_entropy=True
    ),
    "linear_logprobs": lambda d, t: rlhf_fast.linear_logprobs(d["h"], d["w"], d["y"], temperature=t),
    "ppo_loss": lambda d, t: rlhf_fast.ppo_loss(
        d["lp"], d["old"], d["adv"], d["m"], ref_logprobs=d["old"], kl_coef=t * 0.1, clip_low=t * 0.2
    ),
    "ppo_policy_loss": lambda d, t: rlhf_fast.ppo_policy_loss(d["lp"], d["old"], d["adv"], d["m"], clip_low=t * 0.2),
    "ppo_value_loss": lambda d, t: rlhf_fast.ppo_value_loss(d["lp"], d["old"], d["adv"], d["m"], clip=t * 0.2),
    "kl_penalty": lambda d, t: rlhf_fast.kl_penalty(d["lp"], d["old"], kind="k3"),
    "sample_greedy": lambda d, t: rlhf_fast.sample(d["logits"], temperature=0.0, top_k=3),
    "gae": lambda d, t: rlhf_fast.gae(d["lp"], d["old"], d["m"], gamma=t * 0.9, lam=0.95),
    "discounted_returns": lambda d, t: rlhf_fast.discounted_returns(d["lp"], d["m"], gamma=t * 0.9),
    "whiten": lambda d, t: rlhf_fast.whiten(d["lp"], d["m"], eps=1e-8),
    "group_advantages": lambda d, t: rlhf_fast.group_advantages(d["scores"], d["ids"], eps=1e-6),
}


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return list(out.values())
    return [t for o in out for t in _flat(o)]


@pytest.mark.parametrize("name", list(PUBLIC))
def test_compile_dynamic_fullgraph_public_functions(name):
    """math.isfinite on a SymFloat in the argument checks broke
    dynamic=True, fullgraph=True for logprobs_from_logits, linear_logprobs,
    ppo_loss and sample. Two shapes and two float values, one graph."""
    torch._dynamo.reset()
    fn = PUBLIC[name]
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    with rlhf_fast.use_backend("cpp"):
        for (B, T), t in (((2, 3), 1.0), ((5, 4), 0.7)):
            d = _inputs(B, T)
            for got, want in zip(_flat(compiled(d, t)), _flat(fn(d, t))):
                assert got.shape == want.shape
                assert_close(got, want, "agree", name)


def test_compile_sample_batch_size_changes():
    """torch.compile(lambda t: sample(t).tokens)
    crashed when B changed (torch.randint(..., (B,)) with a symbolic B)."""
    torch._dynamo.reset()
    f = torch.compile(
        lambda t, temp: rlhf_fast.sample(t, temperature=temp, top_p=0.9),
        backend="aot_eager",
        dynamic=True,
        fullgraph=True,
    )
    for B, temp in ((3, 1.0), (6, 0.5), (2, 0.8)):
        x = torch.randn(B, 13)
        out = f(x, temp)
        assert out.tokens.shape == (B,) and bool(((out.tokens >= 0) & (out.tokens < 13)).all())
        want = rlhf_fast.logprobs_from_logits(x, out.tokens, temperature=temp)
        assert_close(out.logprobs, want, "agree", "sample logprobs")


def test_compile_dynamic_backward():
    """The fused backward under compile, with a changing batch."""
    torch._dynamo.reset()
    f = torch.compile(
        lambda x, y, t: rlhf_fast.logprobs_from_logits(x, y, temperature=t).sum(),
        backend="aot_eager",
        dynamic=True,
        fullgraph=True,
    )
    for B, t in ((3, 1.0), (7, 0.6)):
        x = torch.randn(B, 9, requires_grad=True)
        y = torch.randint(0, 9, (B,))
        (g,) = torch.autograd.grad(f(x, y, t), x)
        (g0,) = torch.autograd.grad(rlhf_fast.logprobs_from_logits(x, y, temperature=t).sum(), x)
        assert_close(g, g0, "agree")


# ---------------------------------------------------------------- tiny temperatures


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_temperature_below_dtype_range_is_refused(backend, dtype):
    """temperature=1e-39 passed the checks and gave NaN everywhere
    (1 / T overflows fp32 below 2.9e-39; fp64 below 5.6e-309)."""
    tiny = 1e-320 if dtype == torch.float64 else 1e-39
    x = torch.randn(4, 6, dtype=dtype)
    y = torch.randint(0, 6, (4,))
    with pytest.raises(ValueError, match="temperature.*too small"):
        rlhf_fast.logprobs_from_logits(x, y, temperature=tiny)
    with pytest.raises(ValueError, match="temperature.*too small"):
        rlhf_fast.linear_logprobs(torch.randn(4, 3, dtype=dtype), torch.randn(6, 3, dtype=dtype), y, temperature=tiny)
    if dtype != torch.float64 or backend == "cpp":
        with pytest.raises(ValueError, match="temperature.*too small"):
            rlhf_fast.sample(x, temperature=tiny)
        with pytest.raises(ValueError, match=r"temperature\[1\].*too small"):
            rlhf_fast.sample(x, temperature=torch.tensor([1.0, tiny, 0.0, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_temperature_at_dtype_limit_is_correct(dtype):
    """The smallest temperature allowed gives finite, correct results for
    logits small enough that logits / T fits the dtype (here |x| <= 1)."""
    t = min_temperature(dtype) * 4
    x = (torch.rand(3, 5, dtype=torch.float64) * 2 - 1).to(dtype)
    x[:, 2] = 1.0  # a unique max: the tempered distribution is one-hot on it
    x[:, 0] = 0.5
    y = torch.tensor([2, 0, 2])
    lp = rlhf_fast.logprobs_from_logits(x, y, temperature=t)
    assert lp[0] == 0 and lp[2] == 0 and lp[1] < -1e30 and torch.isfinite(lp).all()
    out = rlhf_fast.sample(x.float(), temperature=min_temperature(torch.float32) * 4)
    assert torch.equal(out.tokens, torch.full((3,), 2))


def test_cpp_sampler_names_tiny_temperature():
    """The raw cpp op (what runs under torch.compile, where the
    Python per-row checks are skipped) said 'logits contain NaN'."""
    from rlhf_fast.ops._sampling import draw_seeds

    x = torch.randn(3, 5)
    temp = torch.tensor([1.0, 1e-39, 1.0], dtype=torch.float64)
    k = torch.zeros(3, dtype=torch.int64)
    p, mp = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="temperature .* at row 1 is too small"):
        torch.ops.rlhf_fast.sample_fwd(x, draw_seeds(3, x.device, None), temp, k, p, mp, False)


# ---------------------------------------------------------------- eps = 0


def test_whiten_eps0_degenerate_cases(backend):
    """whiten(eps=0) gave NaN for one valid element or constant
    input, against its docs ('never NaN for finite x')."""
    x = torch.tensor([[0.1, 0.1, 0.1, 7.0], [3.0, -2.0, 5.0, 1.0]])
    const = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    one = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]])
    z = torch.zeros(2, 4)
    assert torch.equal(rlhf_fast.whiten(x, one, eps=0.0), z)
    assert torch.equal(rlhf_fast.whiten(x, one, eps=0.0, shift_mean=False), torch.where(one.bool(), x, z))
    c = torch.tensor([[2.5, 2.5, 2.5, 9.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(rlhf_fast.whiten(c, const, eps=0.0), z)
    assert torch.equal(rlhf_fast.whiten(c, const, eps=0.0, shift_mean=False), torch.where(const.bool(), c, z))
    full = torch.ones(2, 4)
    out = rlhf_fast.whiten(x, full, eps=0.0)
    want = rlhf_fast.reference.whiten(x.double(), full, eps=0.0)
    assert_close(out, want, "value", "whiten eps=0")
    for m in (const, full):  # never NaN for finite x
        assert torch.isfinite(rlhf_fast.whiten(x, m, eps=0.0)).all()


def test_group_advantages_grpo_eps0_tied_scores(backend):
    """group_advantages('grpo', eps=0) on tied scores was 0/0 = NaN;
    NaN scores still poison their own group only."""
    s = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 2.0, 0.3, 0.3, 5.0, float("nan")])
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    out = rlhf_fast.group_advantages(s, ids, estimator="grpo", eps=0.0)
    assert torch.equal(out[[0, 1, 2, 6, 7]], torch.zeros(5))
    assert_close(out[3:6], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64), "value", "grpo eps=0")
    assert out[8:].isnan().all()
    out = rlhf_fast.group_advantages(torch.full((6,), 0.1), 3, estimator="grpo", eps=0.0)
    assert torch.equal(out, torch.zeros(6))


def test_reference_eps0_degenerate_cases():
    x = torch.full((2, 3), 0.7, dtype=torch.float64)
    assert torch.equal(rlhf_fast.reference.whiten(x, torch.ones(2, 3), eps=0.0), torch.zeros(2, 3, dtype=torch.float64))
    s = torch.full((4,), 0.1, dtype=torch.float64)
    assert torch.equal(rlhf_fast.reference.group_advantages(s, 2, eps=0.0), torch.zeros(4, dtype=torch.float64))


# ---------------------------------------------------------------- rows with no valid token

BAD_ROWS = {
    "no valid token": [-INF] * 6,
    r"\+inf": [0.0, INF, 1.0, -INF, 2.0, 3.0],
    "NaN": [0.0, float("nan"), 1.0, 2.0, 3.0, 4.0],
}


@pytest.mark.parametrize("why", list(BAD_ROWS))
@pytest.mark.parametrize("be", ["cpp", "reference", "triton"])
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_sample_bad_row_names_the_problem(be, why, temperature):
    """A row of only -inf, or containing +inf, was reported as
    'logits contain NaN' (cpp); no token may come from such a row silently."""
    x = torch.randn(4, 6)
    x[2] = torch.tensor(BAD_ROWS[why])
    with rlhf_fast.use_backend(be), pytest.raises(ValueError, match=f"row 2 of logits .*{why}"):
        rlhf_fast.sample(x, temperature=temperature, top_k=3)


def test_sample_overflowing_row_is_named():
    x = torch.randn(3, 6)
    x[1, 0] = 1e30
    for be in ("cpp", "reference"):
        with rlhf_fast.use_backend(be), pytest.raises(ValueError, match="row 1 of logits overflows"):
            rlhf_fast.sample(x, temperature=1e-10)


def test_sample_graph_path_bad_row_gives_nan_logprobs():
    """The sync-free path (Triton kernel, as on GPU) cannot raise: as documented,
    the bad row's log-probs are NaN, the other rows are untouched."""
    from rlhf_fast.ops._sampling import draw_seeds, row_params

    if not rlhf_fast._backend.HAVE_TRITON:
        pytest.skip("triton not importable")
    for row in BAD_ROWS.values():
        x = torch.randn(3, 6)
        x[1] = torch.tensor(row)
        temp, tk, tp, mp, f = row_params(3, x.device, 1.0, 0, 1.0, 0.0)
        tokens, lp, plp = torch.ops.rlhf_fast.sample_fwd_triton(x, draw_seeds(3, x.device, None), temp, tk, tp, mp, f)
        assert lp[1].isnan() and plp[1].isnan()
        assert torch.isfinite(lp[[0, 2]]).all()


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize("bad, exc", [(1.5, TypeError), (2**70, ValueError), (True, TypeError)])
def test_ignore_index_must_be_an_int64(bad, exc):
    x, y = torch.randn(3, 5), torch.zeros(3, dtype=torch.long)
    with pytest.raises(exc, match="ignore_index"):
        rlhf_fast.logprobs_from_logits(x, y, ignore_index=bad)
    with pytest.raises(exc, match="ignore_index"):
        rlhf_fast.linear_logprobs(torch.randn(3, 4), torch.randn(5, 4), y, ignore_index=bad)


def test_linear_logprobs_h0_is_the_bias(backend):
    """H = 0: logits = bias (0 without one); a reshape error before."""
    y = torch.randint(0, 5, (2, 3))
    bias = torch.randn(5, requires_grad=True)
    h = torch.randn(2, 3, 0, requires_grad=True)
    w = torch.randn(5, 0, requires_grad=True)
    lp, ent = rlhf_fast.linear_logprobs(h, w, y, bias=bias, return_entropy=True)
    b2 = bias.detach().clone().requires_grad_()
    lp2, ent2 = rlhf_fast.reference.logprobs_from_logits(b2.expand(2, 3, 5), y, return_entropy=True)
    assert_close(lp, lp2, "agree", "H=0 logprobs")
    assert_close(ent, ent2, "agree", "H=0 entropy")
    (lp.sum() + ent.sum()).backward()
    (lp2.sum() + ent2.sum()).backward()
    assert_close(bias.grad, b2.grad, "agree", "H=0 bias grad")
    assert h.grad.shape == h.shape and w.grad.shape == w.shape
    lp0 = rlhf_fast.linear_logprobs(h.detach(), w.detach(), y)
    assert_close(lp0, torch.full((2, 3), -torch.log(torch.tensor(5.0)).item()), "agree", "H=0 no bias")


@pytest.fixture(scope="module")
def tiny_lm():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(7)
    cfg = transformers.LlamaConfig(
        vocab_size=31,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(max_new_tokens=2.7), TypeError, "max_new_tokens must be an int"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
        (dict(max_new_tokens=3, num_samples=1.5), TypeError, "num_samples must be an int"),
        (dict(max_new_tokens=3, pad_token_id=-7), ValueError, r"pad_token_id must be in \[0, 30\]"),
        (dict(max_new_tokens=3, pad_token_id=31), ValueError, "pad_token_id"),
        (dict(max_new_tokens=3, temperature=1e-39), ValueError, "temperature.*too small"),
    ],
)
def test_generate_argument_errors(tiny_lm, kwargs, exc, match):
    ids = torch.randint(3, 31, (2, 4))
    with pytest.raises(exc, match=match):
        rlhf_fast.generate(tiny_lm, ids, **kwargs)


def test_generate_empty_batch_and_empty_prompt(tiny_lm):
    out = rlhf_fast.generate(tiny_lm, torch.zeros((0, 4), dtype=torch.long), max_new_tokens=3, num_samples=2)
    assert out.sequences.shape == (0, 4) and out.response_mask.shape == (0, 0)
    assert out.logprobs.shape == (0, 0) and out.lengths.shape == (0,) and out.prompt_length == 4
    with pytest.raises(ValueError, match="no prompt tokens"):
        rlhf_fast.generate(tiny_lm, torch.zeros((2, 0), dtype=torch.long), max_new_tokens=3)


# ---------------------------------------------------------------- stride-0 (expanded) inputs


def test_stride0_expanded_inputs(backend):
    """Expanded (stride-0) inputs read in place give what their copies give."""
    row = torch.randn(1, 1, 9)
    x = row.expand(4, 5, 9)  # strides (0, 0, 1)
    y = torch.randint(0, 9, (1, 5)).expand(4, 5)
    lp, lp_copy = rlhf_fast.logprobs_from_logits(x, y), rlhf_fast.logprobs_from_logits(x.contiguous(), y.contiguous())
    assert_close(lp, lp_copy, "agree", "expanded logits")
    xg = torch.randn(1, 9).requires_grad_()
    lp = rlhf_fast.logprobs_from_logits(xg.expand(6, 9), torch.randint(0, 9, (6,)))
    (g,) = torch.autograd.grad(lp.sum(), xg)
    assert g.shape == (1, 9) and torch.isfinite(g).all()

    lp = torch.randn(3, 6)
    old = torch.randn(1, 6).expand(3, 6)
    adv = torch.randn(3, 1).expand(3, 6)
    m = torch.ones(1, 1, dtype=torch.bool).expand(3, 6)
    got, _ = rlhf_fast.ppo_loss(lp, old, adv, m)
    want, _ = rlhf_fast.ppo_loss(lp, old.contiguous(), adv.contiguous(), m.contiguous())
    assert_close(got, want, "agree", "expanded ppo_loss")
    v = torch.randn(1, 6).expand(3, 6)
    assert_close(rlhf_fast.whiten(v, m), rlhf_fast.whiten(v.contiguous(), m.contiguous()), "agree", "expanded whiten")
    h = torch.randn(1, 4).expand(5, 4)
    w = torch.randn(9, 4)
    yy = torch.randint(0, 9, (5,))
    lp, lp_copy = rlhf_fast.linear_logprobs(h, w, yy), rlhf_fast.linear_logprobs(h.contiguous(), w, yy)
    assert_close(lp, lp_copy, "agree", "expanded hidden")


def test_stride0_sample():
    x = torch.randn(1, 17).expand(5, 17)
    a = rlhf_fast.sample(x, temperature=0.0)
    assert torch.equal(a.tokens, x[0].argmax().expand(5))


# ---------------------------------------------------------------- threads and memory


def test_thread_safety_concurrent_calls():
    """Eight threads, each its own inputs and backend choice, give what a
    single thread gives (use_backend is thread-local)."""
    inputs = [(torch.randn(16, 101), torch.randint(0, 101, (16,))) for _ in range(8)]
    want = [rlhf_fast.logprobs_from_logits(x, y) for x, y in inputs]
    got, errors = [None] * 8, []

    def work(i):
        try:
            with rlhf_fast.use_backend("cpp" if i % 2 else "reference"):
                for _ in range(20):
                    x, y = inputs[i]
                    xg = x.clone().requires_grad_()
                    lp = rlhf_fast.logprobs_from_logits(xg, y)
                    lp.sum().backward()
                    got[i] = lp.detach()
        except Exception as exc:  # surfaced below, with the thread's index
            errors.append((i, exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(8):
        assert_close(got[i], want[i], "agree", f"thread {i}")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_rss_does_not_grow_over_many_calls():
    """Forward + backward of the fused ops 300 times: resident memory stays
    flat after warm-up (a leak of one (64, 1000) fp32 logits per call would
    add 77 MB)."""
    x = torch.randn(64, 1000, requires_grad=True)
    y = torch.randint(0, 1000, (64,))
    lp = torch.randn(8, 64, requires_grad=True)
    m = torch.ones(8, 64, dtype=torch.bool)

    def step():
        a = rlhf_fast.logprobs_from_logits(x, y).sum()
        b, _ = rlhf_fast.ppo_loss(lp, lp.detach(), torch.ones(8, 64), m)
        (a + b).backward()
        rlhf_fast.sample(x.detach(), temperature=0.7, top_p=0.9)
        x.grad = lp.grad = None

    for _ in range(30):
        step()
    before = _rss_bytes()
    for _ in range(300):
        step()
    grown = _rss_bytes() - before
    assert grown < 16 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 300 calls"
