"""rlhf_fast.logprobs_from_logits against the float64 reference, on every CPU
backend (C++ kernels, Triton kernels under the interpreter)."""

import pytest
import torch
from _compare import assert_close, assert_no_worse_than_eager, logit_scale, tol

import rlhf_fast
from rlhf_fast import _backend
from rlhf_fast import reference as ref
from rlhf_fast.ops._common import as_rows

IGNORE = -100


def make_inputs(shape, V, dtype, *, scale=4.0, ignore_frac=0.1):
    logits = (torch.randn(*shape, V) * scale).to(dtype)
    labels = torch.randint(0, V, shape)
    labels[torch.rand(shape) < ignore_frac] = IGNORE
    return logits, labels


def eager_same_dtype(logits, labels, temperature):
    """What TRL does for bf16: log_softmax in the logits' own dtype."""
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    safe = labels.clamp(min=0)
    lp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1).float()
    ent = -(logp_all.exp() * logp_all).sum(-1).float()
    valid = labels != IGNORE
    return torch.where(valid, lp, 0), torch.where(valid, ent, 0)


# The interpreter runs a Triton program in Python: keep its row counts small.
# Its kernels take one row per program whatever N, so 128 rows reach every
# path that 1024 did (at 1024 the eight cases took ~30 s each).
SHAPES = {
    "cpp": [(n, v) for n in (1, 17, 1024) for v in (1, 7, 1000, 32003)],
    "triton": [(n, v) for n in (1, 17) for v in (1, 7, 1000, 32003)] + [(128, 7), (128, 1000)],
}


@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend_name, N, V", [(b, n, v) for b, shapes in SHAPES.items() for n, v in shapes])
def test_values_match_float64_reference(backend_name, N, V, dtype, temperature):
    with rlhf_fast.use_backend(backend_name):
        _check_values(N, V, dtype, temperature)


def _check_values(N, V, dtype, temperature):
    logits, labels = make_inputs((N,), V, dtype)
    lp, ent = rlhf_fast.logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=True)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    want_lp, want_ent = ref.logprobs_from_logits(logits.double(), labels, temperature=temperature, return_entropy=True)
    eager_lp, eager_ent = eager_same_dtype(logits, labels, temperature)
    if dtype == torch.float32:
        assert_close(lp, want_lp, "logprob", "logprobs", scale=logit_scale(logits, temperature))
        # Entropy near 0 (peaked rows) carries fp32's absolute error of log s:
        # hold it to eager fp32's own error, to 1e-5 when eager is better, or
        # to the absolute fp32 floor.
        assert_no_worse_than_eager(ent, eager_ent, want_ent, "entropy", "entropy", floor=tol(dtype, "entropy")[0])
    else:
        assert_no_worse_than_eager(lp, eager_lp, want_lp, "logprob", "logprobs")
        assert_no_worse_than_eager(ent, eager_ent, want_ent, "entropy", "entropy")


def test_large_vocab_151936(backend):
    logits, labels = make_inputs((2,), 151936, torch.bfloat16, ignore_frac=0)
    lp, ent = rlhf_fast.logprobs_from_logits(logits, labels, return_entropy=True)
    want_lp, want_ent = ref.logprobs_from_logits(logits.double(), labels, return_entropy=True)
    assert_close(lp, want_lp, "logprob", "logprobs")
    assert_close(ent, want_ent, "entropy", "entropy")


def test_fp16_and_fp64_logits(backend):
    logits, labels = make_inputs((9,), 333, torch.float16)
    lp = rlhf_fast.logprobs_from_logits(logits, labels, temperature=0.9)
    assert_close(lp, ref.logprobs_from_logits(logits.double(), labels, temperature=0.9), "logprob")
    logits64 = torch.randn(9, 333, dtype=torch.float64) * 3
    lp64, ent64 = rlhf_fast.logprobs_from_logits(logits64, labels, temperature=0.5, return_entropy=True)
    want = ref.logprobs_from_logits(logits64, labels, temperature=0.5, return_entropy=True)
    assert lp64.dtype == torch.float64
    assert_close(lp64, want[0], "logprob", "logprobs")
    assert_close(ent64, want[1], "entropy", "entropy")


def test_extreme_and_minus_inf_logits(backend):
    N, V = 12, 1003
    logits = torch.randn(N, V) * 1e4  # +-1e4: exp overflows without the max shift
    logits[1, : V // 2] = float("-inf")  # half the row impossible
    logits[2, :] = float("-inf")
    logits[2, 17] = 3.0  # one possible token: logp 0 for it, entropy 0
    logits[3, 5] = float("-inf")
    labels = torch.randint(0, V, (N,))
    labels[1] = V - 1
    labels[2] = 17
    labels[3] = 5  # label on a -inf logit: log p = -inf, like the reference
    lp, ent = rlhf_fast.logprobs_from_logits(logits, labels, temperature=0.7, return_entropy=True)
    want_lp, want_ent = ref.logprobs_from_logits(logits.double(), labels, temperature=0.7, return_entropy=True)
    assert lp[3] == float("-inf")
    assert lp[2] == 0 and ent[2] == 0
    assert_close(lp, want_lp, "logprob", "logprobs")
    # At 1e4 / 0.7 the scaled logits z reach 5e4, where one fp32 rounding of
    # z = x * (1/T) moves z by up to |z| * 2^-23 ~ 6e-3. Entropy is not scale
    # free: to first order |dH| <= 2 max|dz| * sum_i p_i |z_i - E[z]|, so a row
    # whose top two tokens are close (H ~ 0.09 seen) is off by ~1e-4 in any fp32
    # kernel. Hold every row to that bound, computed from the float64 reference.
    z = logits.double() / 0.7
    p = torch.softmax(z, dim=-1)
    finite = torch.isfinite(z)
    zf = torch.where(finite, z, 0.0)
    mean_z = (p * zf).sum(-1, keepdim=True)
    spread = torch.where(finite, p * (zf - mean_z).abs(), 0.0).sum(-1)
    dz = 2 * torch.finfo(torch.float32).eps * zf.abs().amax(-1)  # 1/T and the product: two roundings
    bound = 2 * dz * spread + 1e-6
    err = (ent.double() - want_ent).abs()
    assert (err <= bound).all(), (
        f"entropy error {err.max():.3g} over the fp32 bound in rows {(err > bound).nonzero().flatten().tolist()}"
    )


def test_nan_stays_in_its_row(backend):
    logits, labels = make_inputs((6,), 100, torch.float32, ignore_frac=0)
    logits[2, 40] = float("nan")
    logits[4, :] = float("-inf")  # no distribution at all
    lp, ent = rlhf_fast.logprobs_from_logits(logits, labels, return_entropy=True)
    assert lp[2].isnan() and ent[2].isnan() and lp[4].isnan()
    ok = torch.tensor([0, 1, 3, 5])
    want_lp, want_ent = ref.logprobs_from_logits(logits[ok].double(), labels[ok], return_entropy=True)
    assert_close(lp[ok], want_lp, "logprob")
    assert_close(ent[ok], want_ent, "entropy")


def test_ignore_index_rows_give_zero_and_no_gradient(backend):
    logits, labels = make_inputs((8,), 50, torch.float32, ignore_frac=0)
    labels[[1, 5]] = -1
    logits[5] = float("nan")  # an ignored row is never read: its NaN must not leak
    x = logits.clone().requires_grad_()
    lp, ent = rlhf_fast.logprobs_from_logits(x, labels, ignore_index=-1, return_entropy=True)
    assert lp[[1, 5]].eq(0).all() and ent[[1, 5]].eq(0).all()
    assert torch.isfinite(lp).all()
    (lp.sum() + ent.sum()).backward()
    assert x.grad[[1, 5]].eq(0).all()
    assert x.grad[0].abs().sum() > 0

    all_ignored = torch.full((4,), IGNORE)
    y = torch.randn(4, 50, requires_grad=True)
    lp2 = rlhf_fast.logprobs_from_logits(y, all_ignored)
    assert lp2.eq(0).all()
    lp2.sum().backward()
    assert y.grad.eq(0).all()


@pytest.mark.parametrize("which", ["both", "logprobs", "entropy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_reference(backend, dtype, which):
    logits, labels = make_inputs((3, 11), 257, dtype)
    logits[0, 2, :100] = float("-inf")
    temperature = 0.7
    x = logits.clone().requires_grad_()
    lp, ent = rlhf_fast.logprobs_from_logits(x, labels, temperature=temperature, return_entropy=True)
    g_lp, g_ent = torch.randn_like(lp), torch.randn_like(ent)  # per-token upstream gradients
    loss = {
        "both": (lp * g_lp).sum() + (ent * g_ent).sum(),
        "logprobs": (lp * g_lp).sum(),
        "entropy": (ent * g_ent).sum(),
    }
    loss[which].backward()

    x64 = logits.double().requires_grad_()
    r_lp, r_ent = ref.logprobs_from_logits(x64, labels, temperature=temperature, return_entropy=True)
    r_loss = {
        "both": (r_lp * g_lp).sum() + (r_ent * g_ent).sum(),
        "logprobs": (r_lp * g_lp).sum(),
        "entropy": (r_ent * g_ent).sum(),
    }
    r_loss[which].backward()
    assert x.grad.dtype == dtype
    if dtype == torch.float32:
        assert_close(x.grad, x64.grad, "grad", "d logits")
    else:
        xe = logits.clone().requires_grad_()
        e_lp, e_ent = eager_same_dtype(xe, labels, temperature)
        e_loss = {
            "both": (e_lp * g_lp).sum() + (e_ent * g_ent).sum(),
            "logprobs": (e_lp * g_lp).sum(),
            "entropy": (e_ent * g_ent).sum(),
        }
        e_loss[which].backward()
        assert_no_worse_than_eager(x.grad, xe.grad, x64.grad, "grad", "d logits")


def test_gradcheck_float64(backend):
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3))
    labels[1, 1] = IGNORE

    def f(x):
        return rlhf_fast.logprobs_from_logits(x, labels, temperature=0.7, return_entropy=True)

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-7)


def test_sliced_leading_dims_are_read_in_place(backend):
    B, T, V = 3, 9, 130
    full = torch.randn(B, T, V)
    ids = torch.randint(0, V, (B, T))
    logits, labels = full[:, :-1], ids[:, 1:]  # the usual shift: a non-contiguous view
    rows = as_rows(logits)
    assert rows.data_ptr() == full.data_ptr() and rows.shape == (B, T - 1, V)  # a view, not a copy
    for x, y in [
        (logits, labels),
        (full.transpose(0, 1), ids.t()),
        (full.view(B, 1, T, V)[:, :, 1:], ids[:, None, 1:]),
    ]:
        lp, ent = rlhf_fast.logprobs_from_logits(x, y, return_entropy=True)
        want_lp, want_ent = ref.logprobs_from_logits(x.double(), y, return_entropy=True)
        assert lp.shape == y.shape
        assert_close(lp, want_lp, "logprob")
        assert_close(ent, want_ent, "entropy")
    strided_vocab = full[..., ::2]  # vocab stride 2: copied once, still right
    y = torch.randint(0, strided_vocab.shape[-1], (B, T))
    assert_close(
        rlhf_fast.logprobs_from_logits(strided_vocab, y), ref.logprobs_from_logits(strided_vocab.double(), y), "logprob"
    )
    x = logits.clone().requires_grad_()
    rlhf_fast.logprobs_from_logits(x, labels).sum().backward()
    assert x.grad.shape == logits.shape


def test_empty_and_length_one_inputs(backend):
    for shape in [(0,), (2, 0), (0, 3)]:
        out, ent = rlhf_fast.logprobs_from_logits(
            torch.randn(*shape, 11), torch.zeros(shape, dtype=torch.long), return_entropy=True
        )
        assert out.shape == shape and ent.shape == shape
    x = torch.randn(5, 1, requires_grad=True)  # V = 1: log p = 0, entropy 0
    lp, ent = rlhf_fast.logprobs_from_logits(x, torch.zeros(5, dtype=torch.long), return_entropy=True)
    assert lp.abs().max() == 0 and ent.abs().max() == 0
    lp.sum().backward()
    assert x.grad.abs().max() == 0
    one = rlhf_fast.logprobs_from_logits(torch.randn(7), torch.tensor(3))  # no leading dims
    assert one.shape == ()


def test_int32_labels_and_inputs_left_untouched(backend):
    logits, labels = make_inputs((4, 6), 77, torch.bfloat16)
    labels32 = labels.to(torch.int32)
    before_x, before_y = logits.clone(), labels32.clone()
    lp = rlhf_fast.logprobs_from_logits(logits, labels32, temperature=0.8)
    assert torch.equal(logits, before_x) and torch.equal(labels32, before_y)
    assert_close(lp, ref.logprobs_from_logits(logits.double(), labels, temperature=0.8), "logprob")


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_cpu_vector_path(isa):
    best = _backend.BUILD_INFO["cpu_isa_best"]
    order = ["baseline", "avx2", "avx512"]
    if order.index(isa) > order.index(best):
        pytest.skip(f"this CPU supports up to {best}")
    prev = _backend._C.set_cpu_isa(isa)
    try:
        with rlhf_fast.use_backend("cpp"):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                logits, labels = make_inputs((5, 3), 1037, dtype)  # 1037 = 64 * 16 + 13: a vector tail
                x = logits.clone().requires_grad_()
                lp, ent = rlhf_fast.logprobs_from_logits(x, labels, temperature=1.3, return_entropy=True)
                (lp.sum() + 0.5 * ent.sum()).backward()
                x64 = logits.double().requires_grad_()
                r_lp, r_ent = ref.logprobs_from_logits(x64, labels, temperature=1.3, return_entropy=True)
                (r_lp.sum() + 0.5 * r_ent.sum()).backward()
                assert_close(lp, r_lp, "logprob", f"{isa} {dtype} logprobs")
                assert_close(ent, r_ent, "entropy", f"{isa} {dtype} entropy")
                assert_close(x.grad, x64.grad, "grad", f"{isa} {dtype} d logits")
    finally:
        _backend._C.set_cpu_isa(prev)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, logits, labels, match",
    [
        ({}, torch.randn(3, 10), torch.tensor([0, 10, 1]), r"label 10 .* outside \[0, V=10\)"),
        ({}, torch.randn(3, 10), torch.tensor([0, -5, 1]), r"label -5 .* not ignore_index"),
        ({"temperature": 0.0}, torch.randn(3, 10), torch.tensor([0, 1, 2]), r"temperature must be a finite number > 0"),
        ({"temperature": -1.0}, torch.randn(3, 10), torch.tensor([0, 1, 2]), r"temperature"),
        ({"temperature": float("nan")}, torch.randn(3, 10), torch.tensor([0, 1, 2]), r"temperature"),
        ({"temperature": float("inf")}, torch.randn(3, 10), torch.tensor([0, 1, 2]), r"temperature"),
        ({}, torch.randn(3, 10), torch.tensor([0, 1]), r"labels must have shape .*\(3,\)"),
        ({}, torch.randint(0, 5, (3, 10)), torch.tensor([0, 1, 2]), r"logits must have dtype"),
        ({}, torch.randn(3, 10), torch.tensor([0.0, 1.0, 2.0]), r"labels must have dtype"),
        ({}, torch.randn(3, 10), torch.zeros(3, dtype=torch.long, device="meta"), r"labels is on meta"),
        ({}, torch.randn(3, 0), torch.tensor([0, 1, 2]), r"empty vocabulary"),
    ],
)
def test_bad_input_raises_clearly(backend, kwargs, logits, labels, match):
    with pytest.raises((ValueError, TypeError), match=match):
        rlhf_fast.logprobs_from_logits(logits, labels, **kwargs)


def test_cpp_kernel_checks_labels_itself():
    # Called directly (as torch.compile does, past the Python checks), the
    # C++ op still refuses an out-of-range label instead of reading garbage.
    with pytest.raises(RuntimeError, match=r"label 99 .* outside \[0, V=10\)"):
        torch.ops.rlhf_fast.logprobs_fwd(torch.randn(1, 2, 10), torch.tensor([[1, 99]]), 1.0, IGNORE, True)


# ---------------------------------------------------------------- registration


def _op_args(dtype=torch.float32):
    logits = torch.randn(2, 3, 17, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 17, (2, 3))
    labels[0, 1] = IGNORE
    return logits, labels


# Under the CPU interpreter a Triton launch cannot be traced, so the Triton
# ops get opcheck's eager checks here and the full set on a GPU (gpu marker).
INTERPRETER_SAFE = ("test_schema", "test_autograd_registration", "test_faketensor")


def _opcheck(op_name, args):
    on_interpreter = op_name.endswith("_triton") and args[0].device.type == "cpu"
    kwargs = {"test_utils": INTERPRETER_SAFE} if on_interpreter else {}
    torch.library.opcheck(getattr(torch.ops.rlhf_fast, op_name), args, **kwargs)


def _fwd_cases(device="cpu"):
    logits, labels = _op_args()
    logits, labels = logits.detach().to(device), labels.to(device)
    # the second a strided view; both ops take one signature, compute_entropy included
    return [(logits, labels, 0.7, IGNORE, True), (logits[:, :2], labels[:, :2], 1.0, IGNORE, False)]


def _bwd_cases(device="cpu"):
    logits, labels, *_ = _fwd_cases(device)[0]
    lp, ent, m, log_s = (
        t.to(device) for t in torch.ops.rlhf_fast.logprobs_fwd(logits.cpu(), labels.cpu(), 0.7, IGNORE, True)
    )
    return [
        (torch.randn_like(lp), torch.randn_like(ent), logits, labels, m, log_s, ent, 0.7, IGNORE),
        (torch.randn_like(lp), None, logits, labels, m, log_s, ent, 0.7, IGNORE),
    ]


@pytest.mark.parametrize("op_name", ["logprobs_fwd", "logprobs_fwd_triton"])
def test_opcheck_forward(op_name):
    for args in _fwd_cases():
        _opcheck(op_name, args)


@pytest.mark.parametrize("op_name", ["logprobs_bwd", "logprobs_bwd_triton"])
def test_opcheck_backward(op_name):
    for args in _bwd_cases():
        _opcheck(op_name, args)


@pytest.mark.gpu
@pytest.mark.parametrize("op_name", ["logprobs_fwd", "logprobs_fwd_triton", "logprobs_bwd", "logprobs_bwd_triton"])
def test_opcheck_cuda(op_name):
    cases = _fwd_cases("cuda") if "fwd" in op_name else _bwd_cases("cuda")
    for args in cases:
        _opcheck(op_name, args)


def _loss_fn(x, y):
    lp, ent = rlhf_fast.logprobs_from_logits(x[:, :-1], y[:, 1:], temperature=0.7, return_entropy=True)
    return (lp * 2).sum() + ent.mean(), lp


def _check_compiled_matches_eager(device):
    logits, labels = make_inputs((4, 5), 301, torch.float32)
    logits, labels = logits.to(device), labels.to(device)
    compiled = torch.compile(_loss_fn, fullgraph=True)
    xc, xe = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss_c, lp_c = compiled(xc, labels)
    loss_e, lp_e = _loss_fn(xe, labels)
    assert lp_c.dtype == torch.float32  # temperature stays fp32 inside the graph
    assert_close(lp_c, lp_e.detach(), "agree", "compiled logprobs")
    loss_c.backward()
    loss_e.backward()
    assert_close(xc.grad, xe.grad, "agree", "compiled d logits")


@pytest.mark.parametrize("backend_name", ["cpp", "reference"])
def test_torch_compile_fullgraph(backend_name):
    torch._dynamo.reset()
    with rlhf_fast.use_backend(backend_name):
        _check_compiled_matches_eager("cpu")


def test_interpreter_refuses_torch_compile():
    with rlhf_fast.use_backend("triton"):
        with pytest.raises(Exception, match="BackendUnavailable: .*cannot be traced by torch.compile"):
            torch.compile(_loss_fn, fullgraph=True)(*make_inputs((2, 3), 11, torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
def test_torch_compile_fullgraph_cuda(backend_name):
    torch._dynamo.reset()
    with rlhf_fast.use_backend(backend_name):
        _check_compiled_matches_eager("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, V", [(1, 7), (37, 1003), (257, 32003), (64, 151936)])
def test_gpu_backends_match_reference(backend_name, dtype, N, V):
    logits, labels = make_inputs((N,), V, dtype)
    logits[0, : V // 2] = float("-inf")
    labels[0] = V - 1
    x = logits.cuda().requires_grad_()
    with rlhf_fast.use_backend(backend_name):
        lp, ent = rlhf_fast.logprobs_from_logits(x, labels.cuda(), temperature=0.7, return_entropy=True)
    g_lp, g_ent = torch.randn(N), torch.randn(N)
    (lp * g_lp.cuda()).sum().add((ent * g_ent.cuda()).sum()).backward()
    x64 = logits.double().requires_grad_()
    r_lp, r_ent = ref.logprobs_from_logits(x64, labels, temperature=0.7, return_entropy=True)
    ((r_lp * g_lp).sum() + (r_ent * g_ent).sum()).backward()
    e_lp, e_ent = eager_same_dtype(logits, labels, 0.7)
    assert_no_worse_than_eager(lp.cpu(), e_lp, r_lp, "logprob", "logprobs", floor=tol(torch.float32, "logprob")[0])
    assert_no_worse_than_eager(ent.cpu(), e_ent, r_ent, "entropy", "entropy", floor=tol(torch.float32, "entropy")[0])
    assert_close(x.grad.cpu(), x64.grad, "grad", "d logits")


@pytest.mark.parametrize("op_name", ["logprobs_fwd", "logprobs_fwd_triton"])
def test_log_prob_only_sweep_matches_and_backpropagates(op_name):
    """compute_entropy=False (return_entropy=False): the same log-probs and
    row statistics bit for bit, the entropy output 0, the gradient of the
    log-prob-only backward; opcheck on the flag. Both ops, one signature."""
    logits, labels = make_inputs((3, 7), 1003, torch.bfloat16)
    op = getattr(torch.ops.rlhf_fast, op_name)
    full = op(logits, labels, 0.7, IGNORE, True)
    lp, ent, m, log_s = op(logits, labels, 0.7, IGNORE, False)
    assert all(torch.equal(a, b) for a, b in zip((lp, m, log_s), (full[0], full[2], full[3])))
    assert (ent == 0).all()
    x = logits.float().requires_grad_()
    with rlhf_fast.use_backend("triton" if op_name.endswith("_triton") else "cpp"):
        rlhf_fast.logprobs_from_logits(x, labels, temperature=0.7).sum().backward()
    x_ref = logits.double().requires_grad_()
    ref.logprobs_from_logits(x_ref, labels, temperature=0.7).sum().backward()
    assert_close(x.grad, x_ref.grad, "grad", "grad")
    _opcheck(op_name, (logits, labels, 0.7, IGNORE, False))
