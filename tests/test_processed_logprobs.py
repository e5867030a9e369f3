"""logprobs_from_logits(top_k=, top_p=, min_p=, temperature=tensor): given
labels scored under the sampler's truncated distribution.

Oracle: reference.logprobs_from_logits on float64 logits (the sort-based
thresholds of reference/_sampling.py). The kernels must also reproduce
sample()'s processed log-prob of its own token bit for bit, on every dtype and
backend, since both run the sampler's own threshold and kept-mass code.
"""

import pytest
import torch
from _compare import assert_close, logit_scale
from conftest import CPU_BACKENDS
from test_logprobs import INTERPRETER_SAFE

import rlhf_fast
from rlhf_fast import reference

IGNORE = -100
CONFIGS = [
    dict(top_k=5),
    dict(top_p=0.7),
    dict(min_p=0.1),
    dict(top_k=8, top_p=0.8, min_p=0.05),
    dict(top_k=50, top_p=0.95, temperature=0.7),
]


def _ref(logits, labels, **kw):
    kw = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    return reference.logprobs_from_logits(logits.double(), labels, return_entropy=True, **kw)


def _check(logits, labels, name, **kw):
    lp, ent = rlhf_fast.logprobs_from_logits(logits, labels, return_entropy=True, **kw)
    ref_lp, ref_ent = _ref(logits, labels, **kw)
    t = kw.get("temperature", 1.0)
    scale = logit_scale(logits.float(), t if not isinstance(t, torch.Tensor) else float(t.min()))
    # -inf (outside the kept set) in the same places: rel_err fails on any mismatch
    assert_close(lp, ref_lp.float(), "logprob", f"{name} logprobs", scale=scale)
    assert_close(ent, ref_ent.float(), "entropy", f"{name} entropy")
    return lp, ent


# the interpreter runs Triton ~1000x slower: V = 1003 (not a multiple of any tile) on C++ only
# (the interpreter's V = 300 cases are the slow tier's: ~5 s each)
BACKEND_V = [
    pytest.param(b, V, marks=pytest.mark.slow) if (b, V) == ("triton", 300) else (b, V)
    for b in CPU_BACKENDS
    for V in ((7, 300) if b == "triton" else (1, 7, 300, 1003))
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend_name, V", BACKEND_V)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_matches_float64_reference(backend_name, dtype, V, cfg):
    logits = (torch.randn(5, 6, V) * 3).to(dtype)
    labels = torch.randint(0, V, (5, 6))
    labels[0, :2] = IGNORE
    with rlhf_fast.use_backend(backend_name):
        lp, ent = _check(logits, labels, f"{backend_name} {dtype} V={V}", **cfg)
    assert bool((lp[0, :2] == 0).all()) and bool((ent[0, :2] == 0).all())


def test_scores_every_token_as_a_distribution(backend):
    """Scoring every token of one row: the kept set is the reference's, the
    kept probabilities sum to 1, and ties at each threshold are all kept."""
    V = 257 if backend == "cpp" else 33  # every row is a launch: the interpreter runs V of them
    x = torch.randint(-4, 4, (1, V)).float()  # integer logits: large tie groups at every threshold
    rows = x.expand(V, V)
    labels = torch.arange(V)
    for cfg in (
        dict(top_k=3),
        dict(top_k=40),
        dict(top_p=0.3),
        dict(top_p=0.9),
        dict(min_p=0.2),
        dict(top_k=30, top_p=0.5),
    ):
        lp = rlhf_fast.logprobs_from_logits(rows, labels, **cfg)
        ref = _ref(rows, labels, **cfg)[0]
        kept = torch.isfinite(lp)
        assert torch.equal(kept, torch.isfinite(ref)), cfg
        # a threshold keeps whole tie groups: every token sharing a kept value is kept
        kept_vals = x[0][kept].unique()
        assert torch.equal(kept, torch.isin(x[0], kept_vals)), cfg
        assert abs(float(lp[kept].double().exp().sum()) - 1.0) < 1e-5, cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bit_identical_to_sample_processed_logprobs(backend, dtype):
    B, V = (16, 300) if backend == "triton" else (128, 1003)
    logits = (torch.randn(B, V) * 3).to(dtype)
    # the interpreter: the two single filters that search (top-k's radix select, top-p's mass search) and all three
    configs = CONFIGS + [dict(temperature=1.3)] if backend == "cpp" else [CONFIGS[0], CONFIGS[1], CONFIGS[3]]
    for cfg in configs:
        temp = cfg.get("temperature", 1.0)
        filt = {k: v for k, v in cfg.items() if k != "temperature"}
        out = rlhf_fast.sample(logits, temperature=temp, generator=torch.Generator().manual_seed(7), **filt)
        lp = rlhf_fast.logprobs_from_logits(logits, out.tokens, temperature=temp, **filt)
        assert torch.equal(lp, out.processed_logprobs), cfg
        # per-row tensors of the same values: the same bits
        per_row = {k: torch.full((B,), v) for k, v in cfg.items()}
        assert torch.equal(rlhf_fast.logprobs_from_logits(logits, out.tokens, **per_row), out.processed_logprobs)
    # a tensor temperature without filters is the plain log-prob, bit for bit
    lp_t = rlhf_fast.logprobs_from_logits(logits, out.tokens, temperature=torch.full((B,), 1.3))
    assert torch.equal(lp_t, rlhf_fast.logprobs_from_logits(logits, out.tokens, temperature=1.3))


def test_edge_parameters(backend):
    logits = torch.randn(4, 50) * 2
    labels = torch.randint(0, 50, (4,))
    raw, raw_ent = rlhf_fast.logprobs_from_logits(logits, labels, return_entropy=True)
    # filters that keep everything: the untruncated distribution
    for cfg in (dict(top_k=50), dict(top_k=10**6), dict(top_p=1.0), dict(min_p=0.0), dict(top_k=0)):
        lp, ent = rlhf_fast.logprobs_from_logits(logits, labels, return_entropy=True, **cfg)
        assert_close(lp, raw, "agree", str(cfg))
        assert_close(ent, raw_ent, "agree", str(cfg))
    # tiny top_p, min_p = 1, top_k = 1: only the max token, probability 1
    top = logits.argmax(-1)
    for cfg in (dict(top_p=1e-9), dict(min_p=1.0), dict(top_k=1)):
        lp, ent = rlhf_fast.logprobs_from_logits(logits, top, return_entropy=True, **cfg)
        assert torch.equal(lp, torch.zeros(4)) and torch.equal(ent, torch.zeros(4)), cfg
        other = (top + 1) % 50
        assert bool(rlhf_fast.logprobs_from_logits(logits, other, **cfg).isneginf().all()), cfg


def test_special_values(backend):
    x = torch.randn(6, 40)
    x[0] = 3.0  # constant row: one tie group, always kept whole
    x[1, ::2] = float("-inf")  # masked tokens
    x[2, :20] = 0.0
    x[2, 20:] = -0.0  # +-0 tie
    x[3, 5] = float("nan")  # NaN stays in its row
    labels = torch.tensor([4, 2, 30, 1, 7, 9])
    labels[1] = 3  # a finite token of the masked row
    lp, ent = rlhf_fast.logprobs_from_logits(x, labels, return_entropy=True, top_k=3, top_p=0.9)
    for r in (0, 2):  # a constant row and a +-0 row: uniform over all 40 ties, whatever top-k says
        assert abs(float(lp[r]) + torch.log(torch.tensor(40.0)).item()) < 1e-5, r
    assert bool(lp[3].isnan()) and bool(ent[3].isnan())
    assert not bool(lp[[0, 1, 2, 4, 5]].isnan().any()) and not bool(ent[[0, 1, 2, 4, 5]].isnan().any())
    ref_lp, ref_ent = _ref(x, labels, top_k=3, top_p=0.9)
    assert_close(lp, ref_lp.float(), "logprob", "special values", scale=4.0)
    assert_close(ent, ref_ent.float(), "entropy", "special values")
    # a label at a -inf logit is outside any kept set
    assert bool(rlhf_fast.logprobs_from_logits(x[1:2], torch.tensor([0]), top_p=0.99).isneginf().all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_reference(backend, dtype):
    """d(log-prob) and d(entropy) / d logits with the kept set held fixed,
    against autograd through the float64 reference; labels outside the kept
    set (log-prob -inf) contribute no gradient, ignored labels none at all."""
    V = 300
    logits = (torch.randn(3, 8, V) * 3).to(dtype)
    labels = torch.randint(0, V, (3, 8))
    labels[0, 0] = IGNORE
    labels[1] = logits[1].float().argsort(-1, descending=True)[:, 2]  # inside the top-k set below
    temp = torch.rand(3, 8) + 0.5  # per token
    w_lp, w_ent = torch.randn(3, 8), torch.randn(3, 8)
    for cfg in (dict(top_k=20), dict(top_p=0.8, min_p=0.01)):
        x = logits.clone().requires_grad_()
        lp, ent = rlhf_fast.logprobs_from_logits(x, labels, return_entropy=True, temperature=temp, **cfg)
        (torch.where(lp.isfinite(), lp, 0) * w_lp + ent * w_ent).sum().backward()
        xr = logits.double().requires_grad_()
        rl, re = reference.logprobs_from_logits(xr, labels, return_entropy=True, temperature=temp.double(), **cfg)
        (torch.where(rl.isfinite(), rl, 0) * w_lp.double() + re * w_ent.double()).sum().backward()
        assert_close(x.grad, xr.grad.to(dtype), "grad", f"{backend} {dtype} {cfg}")
        assert bool((x.grad[0, 0] == 0).all())


def test_gradcheck_reference_float64():
    """The float64 path (the reference, as for sample) against finite
    differences: the kept set does not move under a 1e-6 perturbation."""
    x = (torch.randn(3, 12, dtype=torch.float64) * 2).requires_grad_()
    labels = x.detach().argsort(-1, descending=True)[:, 1]

    def f(x):
        lp, ent = rlhf_fast.logprobs_from_logits(x, labels, return_entropy=True, top_k=5, top_p=0.9, temperature=0.8)
        return lp, ent

    assert torch.autograd.gradcheck(f, (x,))


def test_per_row_and_per_token_parameters(backend):
    B, T, V = 3, 4, 64
    logits = torch.randn(B, T, V) * 2
    labels = torch.randint(0, V, (B, T))
    per_row = dict(
        temperature=torch.tensor([0.5, 1.0, 1.5]), top_k=torch.tensor([0, 5, 20]), top_p=torch.tensor([0.9, 1.0, 0.5])
    )
    lp = rlhf_fast.logprobs_from_logits(logits, labels, **per_row)
    for b in range(B):
        row = {k: v[b].item() for k, v in per_row.items()}
        assert torch.equal(lp[b], rlhf_fast.logprobs_from_logits(logits[b], labels[b], **row))
    per_token = dict(temperature=torch.rand(B, T) + 0.5, min_p=torch.rand(B, T) * 0.2)
    _check(logits, labels, "per token", **per_token)


def test_bad_parameters_raise():
    logits, labels = torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3))
    bad = [
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(temperature=torch.tensor([1.0, 0.0])), "temperature"),
        (dict(temperature=torch.tensor([1.0, float("nan")])), "temperature"),
        (dict(temperature=torch.ones(3)), "temperature"),
        (dict(top_k=torch.ones(2, 2, dtype=torch.int64)), "top_k"),
    ]
    for kw, name in bad:
        with pytest.raises(ValueError, match=name):
            rlhf_fast.logprobs_from_logits(logits, labels, **kw)
    with pytest.raises(TypeError, match="top_k"):
        rlhf_fast.logprobs_from_logits(logits, labels, top_k=2.5)
    with pytest.raises((ValueError, IndexError), match="label"):
        rlhf_fast.logprobs_from_logits(logits, torch.full((2, 3), 10), top_k=3)


def test_inputs_not_modified_and_empty(backend):
    logits, labels = torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3))
    before = logits.clone(), labels.clone()
    rlhf_fast.logprobs_from_logits(logits, labels, top_p=0.5, return_entropy=True)
    assert torch.equal(logits, before[0]) and torch.equal(labels, before[1])
    lp, ent = rlhf_fast.logprobs_from_logits(
        torch.randn(0, 10), torch.zeros(0, dtype=torch.long), top_k=3, return_entropy=True
    )
    assert lp.shape == (0,) and ent.shape == (0,)


def _op_args():
    torch.manual_seed(0)
    N, V = 5, 37
    x, y = torch.randn(N, V) * 2, torch.randint(0, V, (N,))
    y[1] = IGNORE
    params = (
        torch.full((N,), 0.8, dtype=torch.float64),
        torch.full((N,), 6),
        torch.full((N,), 0.9, dtype=torch.float64),
    )
    return x, y, (*params, torch.full((N,), 0.02, dtype=torch.float64))


@pytest.mark.parametrize("suffix", ["", "_triton"])
def test_opcheck(suffix):
    x, y, params = _op_args()
    kwargs = {"test_utils": INTERPRETER_SAFE} if suffix else {}
    for filtered, ent in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(
            getattr(torch.ops.rlhf_fast, "processed_logprobs_fwd" + suffix),
            (x, y, *params, IGNORE, filtered, ent),
            **kwargs,
        )
    lp, ent, stats = torch.ops.rlhf_fast.processed_logprobs_fwd(x, y, *params, IGNORE, True, True)
    bwd = getattr(torch.ops.rlhf_fast, "processed_logprobs_bwd" + suffix)
    for g_lp, g_ent in ((torch.randn(5), torch.randn(5)), (torch.randn(5), None), (None, torch.randn(5))):
        torch.library.opcheck(bwd, (g_lp, g_ent, x, y, params[0], stats, ent, IGNORE), **kwargs)


def test_torch_compile_fullgraph_dynamic():
    torch._dynamo.reset()

    def loss(x, y, t):
        lp, ent = rlhf_fast.logprobs_from_logits(x, y, temperature=t, top_k=8, top_p=0.9, return_entropy=True)
        return torch.where(lp.isfinite(), lp, 0).sum() + ent.mean(), lp

    compiled = torch.compile(loss, fullgraph=True, dynamic=True)
    for B, T, V in ((2, 5, 64), (3, 7, 129)):
        x, y, t = torch.randn(B, T, V) * 2, torch.randint(0, V, (B, T)), torch.rand(B) + 0.5
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        lc, lpc = compiled(xc, y, t)
        le, lpe = loss(xe, y, t)
        assert torch.equal(lpc, lpe)
        lc.backward()
        le.backward()
        assert_close(xc.grad, xe.grad, "agree", "compiled d logits")


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_logprobs_truncated_matches_logits_path(backend, with_bias):
    """linear_logprobs(top_k=, top_p=, min_p=) chunk by chunk equals the
    materialised logits through logprobs_from_logits: values, -inf pattern,
    and d hidden / d weight / d bias with the kept set held fixed."""
    N, H, V = 37, 16, 300
    h, w = torch.randn(N, H), torch.randn(V, H) / 2
    b = torch.randn(V) if with_bias else None
    y = torch.randint(0, V, (N,))
    y[3] = IGNORE
    kw = dict(temperature=torch.rand(N) + 0.5, top_k=20, top_p=0.9, min_p=0.01)
    outs = []
    for linear in (True, False):
        leaves = [t.clone().requires_grad_() for t in (h, w) + ((b,) if with_bias else ())]
        hh, ww, bb = leaves[0], leaves[1], leaves[2] if with_bias else None
        if linear:
            lp, ent = rlhf_fast.linear_logprobs(hh, ww, y, bias=bb, return_entropy=True, chunk_size=16, **kw)
        else:
            lp, ent = rlhf_fast.logprobs_from_logits(
                torch.nn.functional.linear(hh, ww, bb), y, return_entropy=True, **kw
            )
        (torch.where(lp.isfinite(), lp, 0).sum() + ent.sum()).backward()
        outs.append((lp, ent, [t.grad for t in leaves]))
    (lp, ent, grads), (lp0, ent0, grads0) = outs
    assert_close(lp, lp0, "agree", "linear truncated logprobs")
    assert_close(ent, ent0, "agree", "linear truncated entropy")
    for g, g0, name in zip(grads, grads0, ("d hidden", "d weight", "d bias")):
        assert_close(g, g0, "agree", name)
    # float64: the reference on the materialised logits
    lp64 = rlhf_fast.linear_logprobs(h.double(), w.double(), y, top_k=20, top_p=0.9)
    ref = reference.logprobs_from_logits(torch.nn.functional.linear(h.double(), w.double()), y, top_k=20, top_p=0.9)
    assert torch.equal(lp64, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_sweeps_equal_the_samplers(monkeypatch, dtype):
    """The scorer reads the logits as often as the sampler does for the same
    filters (its kept-mass sweep replaces the race), plus the label's logit
    once per row; counted under the interpreter."""
    from test_sampling import _call, _logit_reads

    from rlhf_fast.ops._sampling import draw_seeds

    B, V = 4, 5000
    logits = (torch.randn(B, V) * 40).to(dtype)
    labels = torch.randint(0, V, (B,))
    seeds = draw_seeds(B, logits.device, None)
    cfgs = {"top_k": dict(top_k=50), "top_p": dict(top_p=0.999), "all": dict(top_k=4000, top_p=0.999, min_p=1e-30)}
    with rlhf_fast.use_backend("triton"):
        for name, cfg in cfgs.items():
            sampler = _logit_reads(monkeypatch, logits, lambda cfg=cfg: _call(logits, seeds, **cfg))
            scorer = _logit_reads(
                monkeypatch, logits, lambda cfg=cfg: rlhf_fast.logprobs_from_logits(logits, labels, **cfg)
            )
            assert scorer <= sampler + 1 / V, (name, scorer, sampler)
            assert scorer > sampler - 1, (name, scorer, sampler)


def test_strided_slice_read_in_place(backend):
    """logits[:, :-1] (a slice whose leading dims do not collapse) gives the
    contiguous copy's values and gradients bit for bit, one (B, V) block at a
    time."""
    x = torch.randn(3, 9, 300) * 2
    y = torch.randint(0, 300, (3, 8))
    y[1, 2] = IGNORE
    outs = []
    for contiguous in (False, True):
        leaf = x.clone().requires_grad_()
        z = leaf[:, :-1].contiguous() if contiguous else leaf[:, :-1]
        lp, ent = rlhf_fast.logprobs_from_logits(z, y, return_entropy=True, top_k=20, top_p=0.9)
        (torch.where(lp.isfinite(), lp, 0).sum() + ent.sum()).backward()
        outs.append((lp, ent, leaf.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
