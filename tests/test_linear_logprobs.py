"""rlhf_fast.linear_logprobs against the float64 materialised reference.

Every test with the `backend` fixture runs the C++ (token-chunked) path and
the Triton kernels under the interpreter; Triton shapes stay tiny
(N <= 37, H <= 96, V <= 1003), the larger awkward sizes run on cpp only.
"""

import pytest
import torch
from _compare import assert_close, assert_no_worse_than_eager

import rlhf_fast
from benchmarks.harness import peak_memory
from rlhf_fast import reference

NEG_INF = float("-inf")
# what each output of run() is, for the tolerance table
QUANTITY = {
    "logprobs": "logprob",
    "entropy": "entropy",
    "grad_hidden": "grad",
    "grad_weight": "grad",
    "grad_bias": "grad",
}


def make_inputs(N, H, V, dtype, *, bias=True, ignore_frac=0.2, ignore_index=-100, scale=3.0):
    """Logits of std ~scale (peaked but not one-hot softmax rows)."""
    hidden = torch.randn(N, H).to(dtype)
    weight = (torch.randn(V, H) * scale / H**0.5).to(dtype)
    b = torch.randn(V).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,))
    labels[torch.rand(N) < ignore_frac] = ignore_index
    return hidden, weight, b, labels


def run(fn, hidden, weight, bias, labels, g_lp, g_h, **kw):
    """Values and the three gradients of sum(g_lp * logprobs + g_h * entropy)
    with per-token upstream weights g_lp, g_h (g_h None: no entropy)."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    out = fn(h, w, labels, bias=b, return_entropy=g_h is not None, **kw)
    lp, ent = out if g_h is not None else (out, None)
    loss = (lp * g_lp.to(lp.device, lp.dtype)).sum()
    if ent is not None:
        loss = loss + (ent * g_h.to(ent.device, ent.dtype)).sum()
    loss.backward()
    return {
        "logprobs": lp,
        "entropy": ent,
        "grad_hidden": h.grad,
        "grad_weight": w.grad,
        "grad_bias": b.grad if b is not None else None,
    }


def check_against_reference(hidden, weight, bias, labels, *, entropy=True, chunk_size=None, **kw):
    N = labels.numel()
    g_lp = torch.randn(labels.shape)  # per-token upstream grads, both signs
    g_h = torch.randn(labels.shape) if entropy else None
    ours = run(rlhf_fast.linear_logprobs, hidden, weight, bias, labels, g_lp, g_h, chunk_size=chunk_size, **kw)
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    ref = run(reference.linear_logprobs, d(hidden), d(weight), d(bias), labels, g_lp, g_h, **kw)
    eager = None
    if hidden.dtype in (torch.bfloat16, torch.float16):
        eager = run(reference.linear_logprobs, hidden, weight, bias, labels, g_lp, g_h, **kw)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    for name, r in ref.items():
        if r is None:
            assert ours[name] is None, name
            continue
        o = ours[name]
        want_dtype = acc if name in ("logprobs", "entropy") else hidden.dtype
        assert o.dtype == want_dtype, f"{name}: dtype {o.dtype}, want {want_dtype}"
        if eager is None:
            assert_close(o, r, QUANTITY[name], name=f"{name} (N={N})")
        else:
            assert_no_worse_than_eager(o, eager[name], r, QUANTITY[name], name=name)
    return ours


# ---------------------------------------------------------------- values and gradients


# (5, 16, 17): tiles wider than every dim. fp32 only: with 80 gradient
# entries the bf16 error ratio to eager is too noisy for a 2x bound.
CASES = [(N, 96, 1003, dt) for N in (1, 37) for dt in (torch.float32, torch.bfloat16)] + [(5, 16, 17, torch.float32)]


@pytest.mark.parametrize("N,H,V,dtype", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_reference(backend, N, H, V, dtype, with_bias):
    hidden, weight, bias, labels = make_inputs(N, H, V, dtype, bias=with_bias)
    check_against_reference(hidden, weight, bias, labels, chunk_size=8)


def test_triton_splits_groups_and_vocab_chunks():
    # Interpreter tiles are 32 x 64: N=100 gives 4 token tiles (2 program
    # groups of 2), V=300 two vocab splits in the forward, and chunk_size=10
    # a 64-wide d-logits scratch, so the backward walks 5 vocab chunks (the
    # last one 44 wide).
    hidden, weight, bias, labels = make_inputs(100, 40, 300, torch.float32)
    with rlhf_fast.use_backend("triton"):
        check_against_reference(hidden, weight, bias, labels, chunk_size=10, temperature=1.3)


@pytest.mark.parametrize("temperature", [0.6, 1.7])
@pytest.mark.parametrize("entropy", [True, False])
def test_temperature_and_entropy_flag(backend, temperature, entropy):
    hidden, weight, bias, labels = make_inputs(29, 48, 211, torch.float32)
    check_against_reference(hidden, weight, bias, labels, entropy=entropy, temperature=temperature)


# ignore_frac 0: every row labelled, chunks are slices (views); 0.2: chunks
# gather the labelled rows.
@pytest.mark.parametrize(
    "N,H,V,chunk,ignore_frac",
    [
        (2049, 96, 1003, 512, 0.2),
        (37, 96, 32003, 16, 0.2),
        (2049, 64, 1003, None, 0.0),
        (300, 96, 1003, 1, 0.2),
        (300, 96, 1003, 64, 0.0),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_awkward_sizes_cpp(N, H, V, chunk, ignore_frac, dtype):
    hidden, weight, bias, labels = make_inputs(N, H, V, dtype, ignore_frac=ignore_frac)
    with rlhf_fast.use_backend("cpp"):
        check_against_reference(hidden, weight, bias, labels, chunk_size=chunk, temperature=0.9)


def test_chunk_size_does_not_change_results():
    hidden, weight, bias, labels = make_inputs(70, 32, 257, torch.float32)
    outs = []
    with rlhf_fast.use_backend("cpp"):
        for chunk in (1, 7, 64, 70, 1000):
            outs.append(
                run(
                    rlhf_fast.linear_logprobs,
                    hidden,
                    weight,
                    bias,
                    labels,
                    torch.ones(70),
                    torch.ones(70),
                    chunk_size=chunk,
                )
            )
    for o in outs[1:]:
        # MKL's GEMM rounds differently per row count, and dW / db are sums
        # over chunks: equal to fp32 rounding, not bit-identical.
        for name, t in o.items():
            assert_close(t, outs[0][name], "agree", name=name)


def test_leading_dims_and_strided_hidden(backend):
    B, T, H, V = 3, 7, 32, 101
    full = torch.randn(B, T + 1, H)
    hidden = full[:, :-1]  # the usual (B, T) slice: not contiguous
    weight = torch.randn(V, H) / H**0.5
    labels = torch.randint(0, V, (B, T), dtype=torch.int32)  # int32 labels too
    labels[1, 4:] = -100
    ours = check_against_reference(hidden, weight, None, labels)
    assert ours["logprobs"].shape == (B, T) and ours["grad_hidden"].shape == (B, T, H)


# ---------------------------------------------------------------- ignore_index, extremes, empty


def test_ignore_index_rows_are_zero_with_no_gradient(backend):
    hidden, weight, bias, labels = make_inputs(20, 32, 67, torch.float32, ignore_frac=0.0, ignore_index=-1)
    labels[::3] = -1
    out = check_against_reference(hidden, weight, bias, labels, ignore_index=-1)
    ignored = labels == -1
    assert torch.all(out["logprobs"][ignored] == 0) and torch.all(out["entropy"][ignored] == 0)
    assert torch.all(out["grad_hidden"][ignored] == 0)
    assert torch.all(out["logprobs"][~ignored] < 0)


def test_all_rows_ignored(backend):
    hidden, weight, bias, labels = make_inputs(9, 32, 67, torch.float32)
    labels[:] = -100
    g = torch.randn(9)
    out = run(rlhf_fast.linear_logprobs, hidden, weight, bias, labels, g, g)
    for name, t in out.items():
        assert torch.all(t == 0), name


def test_masked_vocab_bias_and_large_logits(backend):
    # -inf bias entries (a banned-token mask) and logits of ~1e2 magnitude
    # (larger offsets: tests/test_magnitude.py).
    hidden, weight, bias, labels = make_inputs(17, 32, 131, torch.float32, scale=30.0)
    bias[:40] = NEG_INF
    labels[labels < 40] = 77
    g_lp, g_h = torch.randn(17), torch.randn(17)
    ours = run(rlhf_fast.linear_logprobs, hidden, weight, bias, labels, g_lp, g_h)
    ref = run(reference.linear_logprobs, hidden.double(), weight.double(), bias.double(), labels, g_lp, g_h)
    eager = run(reference.linear_logprobs, hidden, weight, bias, labels, g_lp, g_h)
    for name in ("logprobs", "grad_hidden", "grad_weight", "grad_bias"):
        assert_close(ours[name], ref[name], QUANTITY[name], name=name)
    # near-one-hot rows: entropies of ~1e-5 are differences of rounded fp32
    # logits, inexact in torch eager too: held to eager's own error.
    assert_no_worse_than_eager(ours["entropy"], eager["entropy"], ref["entropy"], "entropy", name="entropy")
    assert torch.all(ours["grad_bias"][:40] == 0) and torch.isfinite(ours["grad_weight"]).all()


def test_empty_input(backend):
    hidden, weight, bias, _ = make_inputs(1, 16, 33, torch.float32)
    h = hidden[:0].requires_grad_()
    lp, ent = rlhf_fast.linear_logprobs(
        h, weight.requires_grad_(), torch.zeros(0, dtype=torch.long), bias=bias, return_entropy=True
    )
    assert lp.shape == (0,) and ent.shape == (0,) and lp.dtype == torch.float32
    (lp.sum() + ent.sum()).backward()
    assert h.grad.shape == (0, 16) and torch.all(weight.grad == 0)


# ---------------------------------------------------------------- autograd machinery


@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_float64(backend, with_bias):
    hidden, weight, bias, labels = make_inputs(5, 16, 23, torch.float64, bias=with_bias)
    labels[2] = -100
    args = [hidden.requires_grad_(), weight.requires_grad_()] + ([bias.requires_grad_()] if with_bias else [])

    def f(h, w, b=None):
        lp, ent = rlhf_fast.linear_logprobs(h, w, labels, bias=b, temperature=0.8, return_entropy=True, chunk_size=2)
        return lp, ent

    # fast_mode: checks random projections of the Jacobian (2 evaluations
    # per input, not one per input element: 470 elements here)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_bf16_weight_grad_accumulates_in_fp32():
    # 4096 tokens whose d-logits all push one weight row the same way: a
    # bf16 running sum over chunks would stall once it dwarfs each addend.
    N, H, V = 4096, 16, 32
    hidden = torch.ones(N, H, dtype=torch.bfloat16)
    weight = torch.zeros(V, H, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.zeros(N, dtype=torch.long)
    with rlhf_fast.use_backend("cpp"):
        rlhf_fast.linear_logprobs(hidden, weight, labels, chunk_size=16).sum().backward()
    # d logp / d W[0] = sum_n (1 - 1/V) * h_n = N * 31/32 = 3968 exactly in bf16
    assert torch.all(weight.grad[0].float() == N * (1 - 1 / V))


def test_opcheck_cpp():
    hidden, weight, bias, labels = make_inputs(11, 32, 67, torch.float32)
    args = (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), labels, 0.9, -100, 4)
    torch.library.opcheck(torch.ops.rlhf_fast.linear_logprobs_fwd.default, args)
    torch.library.opcheck(
        torch.ops.rlhf_fast.linear_logprobs_fwd.default, (hidden, weight, None, labels, 1.0, -100, 64)
    )
    lp, ent, m, log_s = torch.ops.rlhf_fast.linear_logprobs_fwd(hidden, weight, bias, labels, 0.9, -100, 4)
    bwd_args = (
        torch.randn(11),
        torch.randn(11),
        hidden.detach(),
        weight.detach(),
        bias.detach(),
        labels,
        m.detach(),
        log_s.detach(),
        ent.detach(),
        0.9,
        -100,
        4,
    )
    torch.library.opcheck(torch.ops.rlhf_fast.linear_logprobs_bwd.default, bwd_args)


def test_opcheck_triton():
    hidden, weight, bias, labels = make_inputs(11, 32, 67, torch.float32)
    args = (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), labels, 0.9, -100, 4)
    torch.library.opcheck(
        torch.ops.rlhf_fast.linear_logprobs_fwd_triton.default,
        args,
        # test_faketensor / aot_dispatch would run the interpreter on fake
        # tensors (no data); they belong to the GPU run.
        test_utils=("test_schema", "test_autograd_registration"),
    )


def test_torch_compile_fullgraph():
    hidden, weight, bias, labels = make_inputs(19, 32, 67, torch.float32)

    def loss_fn(h, w, b):
        lp, ent = rlhf_fast.linear_logprobs(h, w, labels, bias=b, temperature=0.7, return_entropy=True)
        return (lp * 2.0 + 0.1 * ent).sum()

    with rlhf_fast.use_backend("cpp"):
        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        args_c = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
        args_e = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
        lc, le = compiled(*args_c), loss_fn(*args_e)
        lc.backward()
        le.backward()
    assert_close(lc, le, "agree", name="loss")
    for a, b in zip(args_c, args_e):
        assert_close(a.grad, b.grad, "agree", name="grad")


# ---------------------------------------------------------------- memory


def test_peak_memory_bounded_by_chunk():
    N, H, V, chunk = 1024, 64, 8000, 64
    hidden, weight, bias, labels = make_inputs(N, H, V, torch.float32)
    logits_bytes = N * V * 4  # 31 MiB materialised
    with rlhf_fast.use_backend("cpp"):
        peak = peak_memory(lambda: rlhf_fast.linear_logprobs(hidden, weight, labels, bias=bias, chunk_size=chunk))
    # one chunk of logits (2 MiB) + O(N) outputs, never (N, V)
    assert peak <= 2 * chunk * V * 4 + 64 * N, f"peak {peak} bytes, chunk {chunk * V * 4}, logits {logits_bytes}"
    assert peak < logits_bytes / 8


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(weight=a["weight"][:, :-1]), ValueError, "H=31 columns"),
        (lambda a: a.update(bias=a["bias"][:-1]), ValueError, "bias must have shape"),
        (lambda a: a.update(weight=a["weight"].double()), TypeError, "weight dtype"),
        (lambda a: a.update(bias=a["bias"].double()), TypeError, "bias dtype"),
        (lambda a: a.update(labels=a["labels"].float()), TypeError, "labels must have dtype"),
        (lambda a: a.update(labels=a["labels"][:-1]), ValueError, "labels must have shape"),
        (lambda a: a["labels"].__setitem__(0, 67), ValueError, "linear_logprobs: label 67 at position"),
        (lambda a: a["labels"].__setitem__(1, -5), ValueError, "outside"),
        (lambda a: a.update(weight=a["weight"][0]), ValueError, "weight must be 2-D"),
        (lambda a: a.update(hidden=a["hidden"].to("meta")), ValueError, "is on"),
        (lambda a: a.update(temperature=0.0), ValueError, "temperature"),
        (lambda a: a.update(chunk_size=0), ValueError, "chunk_size"),
        (lambda a: a.update(hidden=a["hidden"].int()), TypeError, "hidden must have dtype"),
    ],
)
def test_bad_inputs_raise(mutate, exc, match):
    hidden, weight, bias, labels = make_inputs(6, 32, 67, torch.float32, ignore_frac=0.0)
    a = dict(hidden=hidden, weight=weight, labels=labels, bias=bias, temperature=1.0, chunk_size=None)
    mutate(a)
    with pytest.raises(exc, match=match):
        rlhf_fast.linear_logprobs(a.pop("hidden"), a.pop("weight"), a.pop("labels"), **a)


# ---------------------------------------------------------------- GPU (skipped without CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_gpu(dtype):
    # Real tl.dot tiles (128 x 128 x 64), several vocab splits and program
    # groups, and a backward with 4 vocab chunks (chunk_size=256 of 1031).
    N, H, V = 1031, 256, 32003
    hidden, weight, bias, labels = (t.cuda() if t is not None else None for t in make_inputs(N, H, V, dtype))
    with rlhf_fast.use_backend("triton"):
        check_against_reference(hidden, weight, bias, labels, chunk_size=256, temperature=0.8)


def test_forced_reference_backend_runs():
    # regression: ops/linear_logprobs imported reference/__init__'s *function* under the name of the
    # module, so RLHF_FAST_BACKEND=reference raised AttributeError (found by benchmarks/bench_ppo_step.py)
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 3, 8, generator=g), torch.randn(11, 8, generator=g)
    y = torch.randint(0, 11, (2, 3), generator=g)
    with rlhf_fast.use_backend("reference"):
        lp, ent = rlhf_fast.linear_logprobs(h, w, y, return_entropy=True)
    want = torch.log_softmax(h @ w.T, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    assert_close(lp, want, "agree", name="reference-backend logprobs")
    assert ent.shape == y.shape and bool((ent > 0).all())


def test_autocast_runs_in_the_autocast_dtype():
    # Under torch.autocast the op is a matmul: fp32 hidden and weight go in as
    # bf16, exactly as if the caller had cast them (values and gradients).
    hidden = torch.randn(9, 32, requires_grad=True)
    weight = torch.randn(50, 32, requires_grad=True)
    labels = torch.randint(0, 50, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = rlhf_fast.linear_logprobs(hidden, weight, labels)
    lp.sum().backward()
    h16, w16 = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    want = rlhf_fast.linear_logprobs(h16, w16, labels)
    want.sum().backward()
    assert lp.dtype == torch.float32 and torch.equal(lp, want)
    assert hidden.grad.dtype == torch.float32 and torch.equal(hidden.grad, h16.grad.float())
    assert torch.equal(weight.grad, w16.grad.float())
