"""rlhf_fast.linear_ppo_loss against the float64 composite reference
(reference.linear_logprobs then reference.ppo_loss): loss, stats, the
detached log-probs / entropy and the hidden / weight / bias gradients."""

import pytest
import torch
from _compare import assert_close, assert_equal, assert_no_worse_than_eager

import rlhf_fast
from benchmarks.harness import peak_memory
from rlhf_fast import RolloutCorrection, reference

RC = RolloutCorrection
TOKENS = ("hidden", "labels", "old", "adv", "mask")
OPTIONS = {
    "grpo": {},
    "clip_higher": {"clip_low": 0.2, "clip_high": 0.28},
    "dual_clip": {"dual_clip": 3.0, "clip_low": 0.05},
    "entropy": {"entropy_coef": 0.3},
    "seq_sum": {"agg": "seq-mean-token-sum"},
    "seq_mean": {"agg": "seq-mean-token-mean", "entropy_coef": 0.1},
    "sum_norm": {"agg": "seq-mean-token-sum-norm"},
    "sum_norm_given": {"agg": "seq-mean-token-sum-norm", "agg_norm": 3.5},
    "k1": {"kl_coef": 0.5, "kl_kind": "k1"},
    "k2": {"kl_coef": 0.5, "kl_kind": "k2"},
    "k3": {"kl_coef": 0.5, "kl_kind": "k3", "entropy_coef": 0.01},
    "abs": {"kl_coef": 0.5, "kl_kind": "abs"},
    "temperature": {"temperature": 0.7, "entropy_coef": 0.05},
    "rollout_metrics": {"rollout": None},
    "tis_token": {"rollout": RC(rollout_is="token", rollout_is_threshold=1.05)},
    "is_sequence": {"rollout": RC(rollout_is="sequence", rollout_is_threshold=3.0), "agg": "seq-mean-token-sum"},
    "icepop_geometric": {"rollout": RC(rollout_is="geometric", rollout_is_threshold="0.95_1.05")},
    "rs_token_k1": {"rollout": RC(rollout_rs="token_k1", rollout_rs_threshold=1.1), "entropy_coef": 0.2},
    "rs_seq_mean_k3": {
        "rollout": RC(rollout_rs="seq_mean_k3", rollout_rs_threshold=0.005),
        "agg": "seq-mean-token-mean",
    },
    "is_and_rs": {
        "rollout": RC(rollout_is="token", rollout_rs="seq_max_k2", rollout_rs_threshold=0.02),
        "kl_coef": 0.1,
        "dual_clip": 2.0,
    },
}


def make_inputs(B, T, H, V, dtype=torch.float32, *, bias=True, mask_frac=0.2, ignore_frac=0.1):
    """Logits of std ~3; old log-probs near the current ones (ratios in and
    out of the clip range), advantages of both signs, holes in the mask."""
    hidden = torch.randn(B, T, H).to(dtype)
    weight = (torch.randn(V, H) * 3 / max(H, 1) ** 0.5).to(dtype)
    b = torch.randn(V).to(dtype) if bias else None
    labels = torch.randint(0, V, (B, T))
    labels[torch.rand(B, T) < ignore_frac] = -100
    with torch.no_grad():
        lp = reference.linear_logprobs(hidden.double(), weight.double(), labels, bias=b.double() if bias else None)
    old = (lp + 0.3 * torch.randn(B, T, dtype=torch.float64)).float()
    adv = torch.randn(B, T)
    mask = torch.rand(B, T) > mask_frac
    ref = (lp + 0.5 * torch.randn(B, T, dtype=torch.float64)).float()
    roll = old + 0.05 * torch.randn(B, T)
    return dict(hidden=hidden, weight=weight, bias=b, labels=labels, old=old, adv=adv, mask=mask, ref=ref, roll=roll)


def run(fn, x, opts, *, cast=None, **kw):
    """(loss, stats, logprobs, entropy, dH, dW, db) of fn on copies of x."""
    opts = dict(opts)
    d = (lambda t: t.to(cast) if t is not None else None) if cast else (lambda t: t)
    h = d(x["hidden"]).detach().clone().requires_grad_()
    w = d(x["weight"]).detach().clone().requires_grad_()
    b = d(x["bias"]).detach().clone().requires_grad_() if x["bias"] is not None else None
    if "rollout" in opts:
        opts["rollout_correction"] = opts.pop("rollout")
        opts["rollout_logprobs"] = x["roll"]
    if "kl_coef" in opts:
        opts["ref_logprobs"] = x["ref"]
    loss, stats, lp, ent = fn(h, w, x["labels"], x["old"], x["adv"], x["mask"], bias=b, **opts, **kw)
    loss.backward()
    return loss, stats, lp, ent, h.grad, w.grad, b.grad if b is not None else None


def check(x, opts, ref_x=None, **kw):
    """ours on x against the float64 reference on ref_x (default x)."""
    ours = run(rlhf_fast.linear_ppo_loss, x, opts, **kw)
    x = x if ref_x is None else ref_x
    ref_kw = {k: v for k, v in kw.items() if k == "cu_seqlens"}
    ref = run(reference.linear_ppo_loss, x, opts, cast=torch.float64, **ref_kw)
    low = x["hidden"].dtype in (torch.bfloat16, torch.float16)
    eager = run(reference.linear_ppo_loss, x, opts, **ref_kw) if low else None
    assert set(ours[1]) == set(ref[1])
    if eager is None:
        assert_close(ours[0], ref[0], "loss", name="loss", dtype=torch.float32)
        for k in ref[1]:
            assert_close(ours[1][k], ref[1][k], "stat", name=k, dtype=torch.float32)
    else:  # bf16 / fp16 logits: held to torch eager's own error in that dtype
        assert_no_worse_than_eager(ours[0], eager[0], ref[0], "loss", name="loss")
        for k in ref[1]:
            assert_no_worse_than_eager(ours[1][k], eager[1][k], ref[1][k], "stat", name=k)
    names = ("logprobs", "entropy", "grad_hidden", "grad_weight", "grad_bias")
    for i, name in enumerate(names, start=2):
        o, r = ours[i], ref[i]
        if r is None:
            assert o is None, name
            continue
        q = {"logprobs": "logprob", "entropy": "entropy"}.get(name, "grad")
        if name.startswith("grad"):
            assert o.dtype == x["hidden"].dtype, f"{name}: dtype {o.dtype}"
        else:
            assert o.dtype == torch.float32 and not o.requires_grad, name
        if eager is None:
            assert_close(o, r, q, name=name, scale=10.0)
        else:
            assert_no_worse_than_eager(o, eager[i], r, q, name=name, scale=10.0)
    return ours


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(name, dtype):
    x = make_inputs(4, 9, 24, 67, dtype)
    check(x, OPTIONS[name], chunk_size=16)


@pytest.mark.parametrize("name", ["grpo", "k3", "is_and_rs"])
def test_matches_reference_fp16(name):
    x = make_inputs(3, 7, 16, 41, torch.float16)
    check(x, OPTIONS[name], chunk_size=16)


@pytest.mark.parametrize(
    "B,T,H,V,chunk",
    [(1, 1, 1, 1, None), (1, 7, 7, 7, 3), (3, 5, 1, 1003, 4), (2, 13, 7, 1003, 5), (0, 5, 4, 7, None), (2, 0, 4, 7, 2)],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_awkward_sizes(B, T, H, V, chunk, with_bias):
    x = make_inputs(B, T, H, V, bias=with_bias, mask_frac=0.0 if B * T == 1 else 0.2, ignore_frac=0.0)
    if B * T == 0:  # empty: loss 0, empty / zero gradients
        loss, stats, lp, _, dh, dw, _ = run(rlhf_fast.linear_ppo_loss, x, {"entropy_coef": 0.1}, chunk_size=chunk)
        assert float(loss.detach()) == 0.0 and lp.shape == (B, T) and dh.shape == (B, T, H)
        assert torch.count_nonzero(dw) == 0
        return
    check(x, {"entropy_coef": 0.1, "kl_coef": 0.1}, chunk_size=chunk)


def test_all_masked_rows_and_batch():
    x = make_inputs(4, 6, 8, 31)
    x["mask"][1] = False
    x["mask"][3] = False
    x["old"][1] = float("nan")  # masked: never read
    for agg in ("token-mean", "seq-mean-token-mean"):
        check(x, {"agg": agg, "entropy_coef": 0.1})
    x["mask"][:] = False
    loss, stats, lp, ent, dh, dw, db = run(rlhf_fast.linear_ppo_loss, x, {"entropy_coef": 0.1})
    assert float(loss.detach()) == 0.0 and all(float(v) == 0.0 for v in stats.values())
    for t in (lp, ent, dh, dw, db):
        assert torch.count_nonzero(t) == 0


def test_ignore_index_tokens_give_zero_and_no_gradient():
    x = make_inputs(3, 8, 8, 31, ignore_frac=0.0, mask_frac=0.0)
    x["labels"][0, 2] = -100
    x["labels"][2, 5] = -100
    _, _, lp, ent, dh, _, _ = check(x, {"entropy_coef": 0.1})
    for b, t in ((0, 2), (2, 5)):
        assert lp[b, t] == 0 and ent[b, t] == 0 and torch.count_nonzero(dh[b, t]) == 0


def test_nan_stays_in_its_row():
    x = make_inputs(3, 6, 8, 31, ignore_frac=0.0, mask_frac=0.0)
    x["mask"][1, 3] = False
    clean = {k: v.clone() if v is not None else None for k, v in x.items()}
    x["hidden"][1, 3] = float("nan")  # a masked token: no effect anywhere (the
    # materialised reference would spread 0 * NaN into its dH row and all of dW)
    check(x, {"entropy_coef": 0.1}, ref_x=clean)
    x["hidden"][0, 1, 2] = clean["hidden"][0, 1, 2] = float("nan")  # a kept token: NaN loss, dH NaN in its row only
    loss, _, lp, _, dh, _, _ = run(rlhf_fast.linear_ppo_loss, x, {})
    ref = run(reference.linear_ppo_loss, clean, {}, cast=torch.float64)
    assert loss.isnan() and lp[0, 1].isnan()
    assert dh[0, 1].isnan().all()
    others = torch.ones(3, 6, dtype=torch.bool)
    others[0, 1] = False
    assert torch.isfinite(dh[others]).all()
    assert_close(dh[others], ref[4][others], "grad", name="dH of the other tokens")


def _pack(x):
    """The padded inputs as packed segments (row b's first n_b tokens), with
    an empty segment between rows 0 and 1."""
    lengths = torch.tensor([5, 0, 9, 3, 7])
    rows = [0, None, 1, 2, 3]
    pieces = {k: [] for k in ("hidden", "labels", "old", "adv", "mask", "ref", "roll")}
    for n, r in zip(lengths.tolist(), rows):
        if r is None:
            continue
        for k in pieces:
            pieces[k].append(x[k][r, :n])
    packed = {k: torch.cat(v) for k, v in pieces.items()}
    packed.update(weight=x["weight"], bias=x["bias"])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return packed, cu


@pytest.mark.parametrize("name", ["grpo", "seq_mean", "sum_norm", "is_sequence", "rs_seq_mean_k3", "k3"])
def test_packed_matches_padded_and_reference(name):
    x = make_inputs(4, 9, 16, 53)
    p, cu = _pack(x)
    ours = check(p, OPTIONS[name], cu_seqlens=cu, chunk_size=8)
    # the padded call on the same sequences (right padded to the longest, 9)
    xp = dict(x)
    lengths = [5, 9, 3, 7]
    xp["mask"] = x["mask"] & (torch.arange(9)[None] < torch.tensor(lengths)[:, None])
    pad = run(rlhf_fast.linear_ppo_loss, xp, OPTIONS[name], chunk_size=8)
    assert_close(ours[0], pad[0], "agree", name="loss")
    for k in pad[1]:
        assert_close(ours[1][k], pad[1][k], "agree", name=k)
    pos = [(r, t) for r, n in enumerate(lengths) for t in range(n)]
    idx = (torch.tensor([r for r, _ in pos]), torch.tensor([t for _, t in pos]))
    assert_close(ours[2], pad[2][idx], "agree", name="logprobs")
    assert_close(ours[4], pad[4][idx], "agree", name="dH")
    assert_close(ours[5], pad[5], "agree", name="dW")


def test_gradcheck_float64():
    x = make_inputs(2, 4, 5, 11, torch.float64)
    x["old"], x["adv"], x["ref"] = x["old"].double(), x["adv"].double(), x["ref"].double()
    args = [x["hidden"].requires_grad_(), x["weight"].requires_grad_(), x["bias"].requires_grad_()]

    def f(h, w, b):
        loss, _, _, _ = rlhf_fast.linear_ppo_loss(
            h, w, x["labels"], x["old"], x["adv"], x["mask"], bias=b, entropy_coef=0.2,
            ref_logprobs=x["ref"], kl_coef=0.3, temperature=0.9, chunk_size=3,
        )  # fmt: skip
        return loss

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def _op_args(x, chunk=4, needs=(True, True, True), sampling=None):
    return (
        x["hidden"], x["weight"], x["bias"], x["labels"], x["old"], x["adv"],
        x["mask"], x["ref"], x["roll"], None, 0.9, sampling, sampling is not None, -100, 0.1, 0.2, "k3", 0.2, 0.28,
        3.0, "token-mean", 9.0, "token", 2.0, None, "token_k1", -0.1, 0.1, chunk, *needs,
    )  # fmt: skip


def test_opcheck():
    x = make_inputs(3, 9, 16, 37)
    for t in ("hidden", "weight", "bias"):
        x[t].requires_grad_()
    torch.library.opcheck(torch.ops.rlhf_fast.linear_ppo_loss_fwd.default, _op_args(x))
    torch.library.opcheck(torch.ops.rlhf_fast.linear_ppo_loss_fwd.default, _op_args(x, 64, (True, False, False)))
    p, cu = _pack(make_inputs(4, 9, 16, 37))
    args = list(_op_args(p))
    args[9], args[20] = cu, "seq-mean-token-mean"
    torch.library.opcheck(torch.ops.rlhf_fast.linear_ppo_loss_fwd.default, tuple(args))
    # per-token temperature and the sampler's truncation
    n = x["labels"].numel()
    sampling = torch.tensor([[0.8, 5.0, 0.9, 0.01]], dtype=torch.float64).expand(n, 4).contiguous()
    torch.library.opcheck(torch.ops.rlhf_fast.linear_ppo_loss_fwd.default, _op_args(x, sampling=sampling))


def test_torch_compile_fullgraph_dynamic():
    x = make_inputs(3, 11, 16, 37)

    def loss_fn(h, w, b, labels, old, adv, mask):
        loss, stats, _, _ = rlhf_fast.linear_ppo_loss(h, w, labels, old, adv, mask, bias=b, entropy_coef=0.1)
        return loss, stats["clipfrac"]

    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for T in (11, 6):  # a second shape: no recompile needed to be correct
        xs = {k: (v[:, :T] if k in TOKENS else v) for k, v in x.items()}
        outs = []
        for fn in (compiled, loss_fn):
            ps = [xs[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")]
            loss, cf = fn(*ps, xs["labels"], xs["old"], xs["adv"], xs["mask"])
            loss.backward()
            outs.append((loss, cf, *(p.grad for p in ps)))
        for a, b in zip(*outs):
            assert_close(a, b, "agree")


def test_batch_invariance():
    # seq-mean-token-sum-norm with a fixed norm: a row's loss terms and
    # gradients do not depend on the other rows, so its log-probs, entropy
    # and dH must have the same bits alone, in a batch and at any chunk size
    x = make_inputs(6, 10, 16, 1003, mask_frac=0.1)
    opts = {"agg": "seq-mean-token-sum-norm", "agg_norm": 10.0, "entropy_coef": 0.1}
    full = run(rlhf_fast.linear_ppo_loss, x, opts, chunk_size=16)
    for rows, chunk in (([2], 16), ([4, 1], 5), ([0, 5, 3], 48), ([1], 1)):
        xs = {k: (v[rows] if k not in ("weight", "bias") else v) for k, v in x.items()}
        part = run(rlhf_fast.linear_ppo_loss, xs, opts, chunk_size=chunk)
        for i, name in ((2, "logprobs"), (3, "entropy"), (4, "dH")):
            assert_equal(part[i], full[i][rows], name=f"{name} rows {rows} chunk {chunk}")


class _CountGemms:
    """aten matrix products run inside the block (the profiler sees inside
    the custom op, where a dispatch mode sees only the op itself)."""

    def __enter__(self):
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        self.n = sum(e.name in ("aten::mm", "aten::addmm", "aten::addmm_") for e in self.prof.events())


def test_three_gemms_per_chunk_and_no_grad_path():
    x = make_inputs(2, 16, 8, 64, mask_frac=0.0, ignore_frac=0.0)  # 32 tokens, 4 chunks of 8
    h, w = x["hidden"].requires_grad_(), x["weight"].requires_grad_()
    args = (h, w, x["labels"], x["old"], x["adv"], x["mask"])
    with _CountGemms() as c:
        loss, _, lp, _ = rlhf_fast.linear_ppo_loss(*args, chunk_size=8)
    assert c.n == 3 * 4
    with _CountGemms() as c:  # the two-op path: the backward recomputes the logits
        lp2 = rlhf_fast.linear_logprobs(h, w, x["labels"], chunk_size=8)
        rlhf_fast.ppo_loss(lp2, x["old"], x["adv"], x["mask"])[0].backward()
    assert c.n == 4 * 4
    with torch.no_grad(), _CountGemms() as c:
        loss_ng, _, lp_ng, _ = rlhf_fast.linear_ppo_loss(*args, chunk_size=8)
    assert c.n == 4  # no gradient asked for: GEMM 1 only
    assert_equal(loss_ng, loss.detach())
    assert_equal(lp_ng, lp)


def test_peak_memory_bounded_by_chunk():
    B, T, H, V, chunk = 4, 256, 32, 8000, 64
    x = make_inputs(B, T, H, V, bias=False, mask_frac=0.0, ignore_frac=0.0)
    h, w = x["hidden"].requires_grad_(), x["weight"].requires_grad_()
    N = B * T
    peak = peak_memory(
        lambda: rlhf_fast.linear_ppo_loss(h, w, x["labels"], x["old"], x["adv"], x["mask"], chunk_size=chunk)
    )
    outputs = N * H * 4 + V * H * 4  # dH, dW
    # two chunk tiles (logits, dz: 2 MiB each) + O(N) vectors, never (N, V) (31 MiB)
    assert peak <= outputs + 2 * chunk * V * 4 + 64 * N, f"peak {peak} bytes"


def test_inputs_unchanged():
    x = make_inputs(2, 5, 8, 17)
    before = {k: v.clone() for k, v in x.items() if v is not None}
    h = x["hidden"].requires_grad_()
    loss, stats, lp, ent = rlhf_fast.linear_ppo_loss(h, x["weight"], x["labels"], x["old"], x["adv"], x["mask"])
    loss.backward()
    assert not any(t.requires_grad for t in (*stats.values(), lp, ent))
    for k, v in before.items():
        assert_equal(x[k].detach(), v, name=k)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(old=a["old"][:, :-1]), ValueError, "old_logprobs must have the shape of labels"),
        (lambda a: a.update(adv=a["adv"].int()), TypeError, "advantages must have dtype"),
        (lambda a: a.update({k: a[k].reshape(-1, *a[k].shape[2:]) for k in TOKENS}), ValueError, "pass cu_seqlens"),
        (lambda a: a.update(weight=a["weight"].double()), TypeError, "weight dtype"),
        (lambda a: a["labels"].__setitem__((0, 0), 17), ValueError, "linear_ppo_loss: label 17"),
        (lambda a: a.update(kw={"kl_coef": 0.1}), ValueError, "needs ref_logprobs"),
        (lambda a: a.update(kw={"agg": "mean"}), ValueError, "agg must be one of"),
        (lambda a: a.update(kw={"dual_clip": 0.5}), ValueError, "dual_clip"),
        (lambda a: a.update(kw={"rollout_correction": RC(rollout_is="token")}), ValueError, "needs rollout_logprobs"),
        (lambda a: a.update(kw={"cu_seqlens": torch.tensor([0, 4])}), ValueError, "packed"),
        (lambda a: a.update(kw={"chunk_size": 0}), ValueError, "chunk_size"),
    ],
)
def test_bad_inputs_raise(mutate, exc, match):
    a = make_inputs(2, 5, 8, 17)
    a["kw"] = {}
    mutate(a)
    with pytest.raises(exc, match=match):
        rlhf_fast.linear_ppo_loss(a["hidden"], a["weight"], a["labels"], a["old"], a["adv"], a["mask"], **a["kw"])


def test_packed_bad_offsets_raise():
    p, cu = _pack(make_inputs(4, 9, 8, 17))
    cu = cu.clone()
    cu[-1] += 1
    with pytest.raises(ValueError, match="cu_seqlens"):
        rlhf_fast.linear_ppo_loss(p["hidden"], p["weight"], p["labels"], p["old"], p["adv"], p["mask"], cu_seqlens=cu)


def test_forced_reference_backend_runs_the_two_op_path():
    x = make_inputs(3, 7, 8, 23)
    fused = run(rlhf_fast.linear_ppo_loss, x, OPTIONS["is_and_rs"])
    with rlhf_fast.use_backend("reference"):
        two = run(rlhf_fast.linear_ppo_loss, x, OPTIONS["is_and_rs"])
    for a, b in zip(fused, two):
        if isinstance(a, dict):
            for k in a:
                assert_close(a[k], b[k], "agree", name=k)
        elif a is not None:
            assert_close(a, b, "agree")


def test_backward_scales_by_upstream_and_retained_graph_accumulates():
    x = make_inputs(2, 6, 8, 19)
    one = run(rlhf_fast.linear_ppo_loss, x, {"entropy_coef": 0.1})
    h, w, b = (x[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    args = (h, w, x["labels"], x["old"], x["adv"], x["mask"])
    loss = rlhf_fast.linear_ppo_loss(*args, bias=b, entropy_coef=0.1)[0]
    loss.backward(retain_graph=True)  # the stored gradients handed over...
    loss.backward(retain_graph=True)  # ...must not be the ones a second backward adds to
    (-3.0 * loss).backward()
    for g, ref in zip((h.grad, w.grad, b.grad), one[4:]):
        assert_close(g, -ref, "agree")


def test_forced_triton_runs_the_two_op_path_on_its_kernels():
    x = make_inputs(2, 5, 16, 37)
    fused = run(rlhf_fast.linear_ppo_loss, x, OPTIONS["k3"])
    with rlhf_fast.use_backend("triton"):  # the interpreter on CPU tensors
        two = run(rlhf_fast.linear_ppo_loss, x, OPTIONS["k3"])
    assert_close(fused[0], two[0], "agree", name="loss")
    for i in (2, 4, 5, 6):
        assert_close(fused[i], two[i], "agree")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_temperature_and_truncation_match_reference(dtype):
    """temperature per token and the sampler's truncation (top-k / min-p):
    the fused op against the float64 composite reference, values, stats and
    gradients; labels outside the kept set score -inf on both sides and
    pass no gradient."""
    x = make_inputs(4, 9, 24, 67, dtype)
    temp = torch.rand(4, 9) + 0.5
    ours = check(x, dict(OPTIONS["grpo"], temperature=temp, top_k=40, min_p=0.001), chunk_size=16)
    lp = ours[2]
    assert bool(lp.isneginf().any()) and bool(lp.isfinite().any())  # both kinds of token were exercised
    # a (B,) temperature is per row
    row_t = torch.tensor([0.6, 0.8, 1.0, 1.3])
    check(x, dict(OPTIONS["grpo"], temperature=row_t), chunk_size=16)
