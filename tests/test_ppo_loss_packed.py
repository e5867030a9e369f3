"""ppo_loss / ppo_policy_loss / ppo_value_loss / rollout_mismatch on the
packed layout (cu_seqlens, docs/packing.md): equal to the padded op on the
same sequences (packed with rlhf_fast.pack) for every aggregation mode and
sequence-level rollout correction, forward and gradients, and to the float64
reference, on every CPU backend (C++, Triton under the interpreter)."""

import pytest
import torch
from _compare import assert_close
from test_ppo_loss import make_policy, make_value

import rlhf_fast

R = rlhf_fast.reference
AGGS = R.AGG_MODES
RC = {
    "none": None,
    "token_tis": dict(rollout_is="token", rollout_is_threshold=2.0),
    "sequence_is": dict(rollout_is="sequence", rollout_is_threshold=4.0),
    "geometric_is": dict(rollout_is="geometric", rollout_is_threshold="0.5_1.5"),
    "seq_sum_rs": dict(rollout_rs="seq_sum_k1", rollout_rs_threshold=1.6),
    "seq_mean_rs": dict(rollout_rs="seq_mean_k3", rollout_rs_threshold=0.02),
    "seq_max_rs": dict(rollout_rs="seq_max_k2", rollout_rs_threshold=0.05),
}
# name -> segment lengths (B = len, T = max + 3): awkward on purpose
LENGTHS = {
    "many": [5, 0, 1, 37, 12, 0, 3, 30, 1],
    "one": [23],
    "all_empty": [0, 0],
    # the 100-token segment spans several Triton blocks (mean 28 -> 32-token blocks)
    "long_tail": [3, 3, 3, 100],
}


def _packed_case(B_lengths, make, dtype, fully_masked=(), **kw):
    """Padded data of rows len(lengths) x (max + 3) whose row b counts only
    its first lengths[b] tokens, and the same data packed."""
    lengths = torch.tensor(B_lengths)
    B, T = len(B_lengths), int(lengths.max()) + 3
    tensors = make(B, T, dtype, **kw)
    *data, mask = tensors
    inside = torch.arange(T)[None, :] < lengths[:, None]
    for b in fully_masked:
        if b < B:
            mask[b] = False
    pad_mask = mask & inside
    packed = [rlhf_fast.pack(t, inside)[0] for t in data]
    pmask, cu = rlhf_fast.pack(mask, inside)
    return data, pad_mask, packed, pmask, cu, inside


def _run(fn, tensors, grad_idx, **kw):
    leaves = [t.detach().clone().requires_grad_(i in grad_idx) for i, t in enumerate(tensors)]
    loss, stats = fn(*leaves, **kw)
    loss.backward()
    return loss.detach(), {k: v.detach() for k, v in stats.items()}, [leaves[i].grad for i in grad_idx]


def _check(packed_out, padded_out, inside, dtype, what, quantity="agree"):
    loss, stats, grads = packed_out
    rloss, rstats, rgrads = padded_out
    assert loss.dtype == dtype, what
    assert_close(loss, rloss.to(dtype), quantity if quantity == "agree" else "loss", what)
    assert set(stats) == set(rstats), what
    keys = sorted(stats)
    assert_close(
        torch.stack([stats[k] for k in keys]),
        torch.stack([rstats[k].to(dtype) for k in keys]),
        quantity if quantity == "agree" else "stat",
        f"{what}: stats",
        dtype=dtype,
    )
    for g, rg in zip(grads, rgrads):
        assert g.shape == (int(inside.sum()),), what
        want = rg[inside] if rg.dim() == 2 else rg
        assert_close(g, want.to(g.dtype), quantity if quantity == "agree" else "grad", f"{what}: grad")


def _agg_kw(agg, inside=None):
    """agg_norm: packed, seq-mean-token-sum-norm defaults to the longest
    segment; the padded call gets that number explicitly (its T is 3 more)."""
    if agg != "seq-mean-token-sum-norm" or inside is None:
        return dict(agg=agg)
    return dict(agg=agg, agg_norm=float(max(int(inside.sum(1).max()), 1)))


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("case", list(LENGTHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_policy_loss_packed_equals_padded(backend, agg, case, dtype):
    data, pm, packed, pmask, cu, inside = _packed_case(
        LENGTHS[case], make_policy, dtype, fully_masked=(3,), clip=(0.2, 0.28, 3.0), empty_rows=()
    )
    ent = torch.rand(inside.shape, dtype=dtype)
    ref_lp = data[0] + 0.1 * torch.randn(inside.shape, dtype=dtype)
    kw = dict(clip_high=0.28, dual_clip=3.0, entropy_coef=0.01, kl_coef=0.1, agg=agg)
    pad_kw = dict(kw, **_agg_kw(agg, inside))
    fn = rlhf_fast.ppo_loss
    pk = [*packed, rlhf_fast.pack(ent, inside)[0], rlhf_fast.pack(ref_lp, inside)[0]]

    def call(lp, old, adv, mask, e, r, **k):
        return fn(lp, old, adv, mask, entropy=e, ref_logprobs=r, **k)

    out = _run(lambda lp, old, adv, e, r: call(lp, old, adv, pmask, e, r, cu_seqlens=cu, **kw), pk, [0, 3])
    pad = _run(lambda lp, old, adv, e, r: call(lp, old, adv, pm, e, r, **pad_kw), [*data, ent, ref_lp], [0, 3])
    _check(out, pad, inside, dtype, f"{backend} {case} {agg} {dtype}")
    # and against the float64 reference on the packed inputs
    ref = _run(
        lambda lp, old, adv, e, r: R.ppo_loss(lp, old, adv, pmask, entropy=e, ref_logprobs=r, cu_seqlens=cu, **kw),
        [t.double() for t in pk],
        [0, 3],
    )
    ref = (ref[0], ref[1], [g.to(dtype) for g in ref[2]])
    _check(out, ref, inside, dtype, f"{backend} {case} {agg} {dtype} vs reference", quantity="ref")


@pytest.mark.parametrize("rc", list(RC))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_rollout_correction_packed_equals_padded(backend, rc, agg):
    dtype = torch.float32
    data, pm, packed, pmask, cu, inside = _packed_case(LENGTHS["many"], make_policy, dtype, fully_masked=(3,))
    roll = data[1] + 0.05 * torch.randn(inside.shape, dtype=dtype)
    corr = rlhf_fast.RolloutCorrection(**RC[rc]) if RC[rc] else None
    kw = dict(agg=agg, rollout_correction=corr)
    proll = rlhf_fast.pack(roll, inside)[0]
    out = _run(
        lambda lp, old, adv, r: rlhf_fast.ppo_policy_loss(lp, old, adv, pmask, rollout_logprobs=r, cu_seqlens=cu, **kw),
        [*packed, proll],
        [0],
    )
    pad = _run(lambda lp, old, adv, r: rlhf_fast.ppo_policy_loss(lp, old, adv, pm, rollout_logprobs=r, **kw),
               [*data, roll], [0])  # fmt: skip
    _check(out, pad, inside, dtype, f"{backend} {rc} {agg}")
    ref = _run(
        lambda lp, old, adv, r: R.ppo_policy_loss(lp, old, adv, pmask, rollout_logprobs=r, cu_seqlens=cu, **kw),
        [t.double() for t in (*packed, proll)],
        [0],
    )
    _check(out, (ref[0], ref[1], [g.float() for g in ref[2]]), inside, dtype, f"{backend} {rc} ref", "ref")
    mm = rlhf_fast.ops.rollout_mismatch(packed[1], proll, pmask, cu_seqlens=cu)
    mm_pad = rlhf_fast.ops.rollout_mismatch(data[1], roll, pm)
    assert set(mm) == set(mm_pad) and len(mm) == len(R.RC_STATS)
    for k in mm:
        assert_close(mm[k], mm_pad[k], "agree", f"{backend} rollout_mismatch {k}")


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("case", list(LENGTHS))
@pytest.mark.parametrize("clip", [0.2, None])
def test_value_loss_packed_equals_padded(backend, agg, case, clip):
    dtype = torch.float32
    data, pm, packed, pmask, cu, inside = _packed_case(LENGTHS[case], make_value, dtype, clip=0.2)
    kw = dict(clip=clip, agg=agg)
    out = _run(lambda v, vo, r: rlhf_fast.ppo_value_loss(v, vo, r, pmask, cu_seqlens=cu, **kw), packed, [0])
    pad_kw = dict(kw, **_agg_kw(agg, inside))
    pad = _run(lambda v, vo, r: rlhf_fast.ppo_value_loss(v, vo, r, pm, **pad_kw), data, [0])
    _check(out, pad, inside, dtype, f"{backend} value {case} {agg} {clip}")
    ref = _run(
        lambda v, vo, r: R.ppo_value_loss(v, vo, r, pmask, cu_seqlens=cu, **kw), [t.double() for t in packed], [0]
    )
    _check(out, (ref[0], ref[1], [g.float() for g in ref[2]]), inside, dtype, f"{backend} value ref", "ref")


def test_many_segments_and_long_segment(backend):
    """10,000 short segments (lengths 0-3; 500 under the interpreter, which
    runs programs one by one) and one long one that spans many blocks, in
    one stream: the same as padded (the 2,100-token segment of test
    test_long_segment_spans_blocks takes the C++ 256-token blocks' path)."""
    g = torch.Generator().manual_seed(5)
    n = 10_000 if backend == "cpp" else 500
    # the long one: 300 tokens are ten of the interpreter's 32-token blocks
    lengths = torch.randint(0, 4, (n,), generator=g).tolist() + [300]
    data, pm, packed, pmask, cu, inside = _packed_case(lengths, make_policy, torch.float32, empty_rows=())
    out = _run(lambda *t: rlhf_fast.ppo_policy_loss(*t, pmask, agg="seq-mean-token-mean", cu_seqlens=cu), packed, [0])
    pad = _run(lambda *t: rlhf_fast.ppo_policy_loss(*t, pm, agg="seq-mean-token-mean"), data, [0])
    _check(out, pad, inside, torch.float32, f"{backend} {n + 1} segments")


def test_long_segment_spans_blocks(backend):
    """A 2,100-token segment beside short ones: several C++ 256-token blocks
    and, with a mean of ~700, several passes of a Triton program's loop."""
    data, pm, packed, pmask, cu, inside = _packed_case([2100, 7, 1], make_policy, torch.float32, empty_rows=())
    out = _run(lambda *t: rlhf_fast.ppo_policy_loss(*t, pmask, agg="seq-mean-token-sum", cu_seqlens=cu), packed, [0])
    pad = _run(lambda *t: rlhf_fast.ppo_policy_loss(*t, pm, agg="seq-mean-token-sum"), data, [0])
    _check(out, pad, inside, torch.float32, f"{backend} 2100-token segment")


def test_sum_norm_default_is_longest_segment(backend):
    lp = torch.randn(6)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    m = torch.ones(6, dtype=torch.bool)
    adv = torch.ones(6)
    for fn in (rlhf_fast.ppo_policy_loss, R.ppo_policy_loss):
        # every ratio 1: loss = sum(-A) / norm, norm 4 (the longest segment) unless given
        loss, _ = fn(lp, lp, adv, m, agg="seq-mean-token-sum-norm", cu_seqlens=cu)
        assert_close(loss, torch.tensor(-6.0 / 4.0), "loss", f"{backend} {fn.__module__} default")
        loss, _ = fn(lp, lp, adv, m, agg="seq-mean-token-sum-norm", agg_norm=3.0, cu_seqlens=cu)
        assert_close(loss, torch.tensor(-6.0 / 3.0), "loss", f"{backend} {fn.__module__} explicit")
    v, ret = torch.zeros(6), torch.ones(6)
    loss, _ = rlhf_fast.ppo_value_loss(v, v, ret, m, clip=None, agg="seq-mean-token-sum-norm", cu_seqlens=cu)
    assert_close(loss, torch.tensor(0.5 * 6.0 / 4.0), "loss", f"{backend} value default")
    # all segments empty: the norm is 1, the loss 0
    e = torch.zeros(0)
    loss, _ = rlhf_fast.ppo_policy_loss(
        e, e, e, e.bool(), agg="seq-mean-token-sum-norm", cu_seqlens=torch.zeros(3, dtype=torch.int64)
    )
    assert loss == 0


def test_bad_packed_inputs_raise(backend):
    lp = torch.randn(6)
    m = torch.ones(6, dtype=torch.bool)
    for cu, msg in [
        (torch.tensor([0, 2, 5]), "must equal the number of packed tokens"),
        (torch.tensor([1, 2, 6]), r"cu_seqlens\[0\] must be 0"),
        (torch.tensor([0, 4, 2, 6]), "non-decreasing"),
        (torch.tensor([0.0, 6.0]), "cu_seqlens"),
    ]:
        with pytest.raises((ValueError, TypeError), match=msg):
            rlhf_fast.ppo_loss(lp, lp, lp, m, cu_seqlens=cu)
    with pytest.raises(ValueError, match="1-D"):
        rlhf_fast.ppo_loss(lp.view(2, 3), lp.view(2, 3), lp.view(2, 3), m.view(2, 3), cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="shape"):
        rlhf_fast.ppo_loss(lp, lp[:5], lp, m, cu_seqlens=torch.tensor([0, 6]))


@pytest.mark.parametrize("name", ["ppo_loss_fwd", "ppo_value_loss_fwd"])
def test_cpp_kernel_checks_offsets(name):
    """The C++ kernels check cu_seqlens themselves (the Python checks do not
    run under torch.compile)."""
    lp = torch.randn(6)
    m = torch.ones(6, dtype=torch.bool)
    bad = torch.tensor([0, 4, 2, 6])
    op = getattr(torch.ops.rlhf_fast, name)
    if name == "ppo_loss_fwd":
        args = (lp, lp, lp, m, None, None, 0.0, 0.0, "k1", 0.2, 0.2, None, "token-mean", 1.0, None,
                "none", 2.0, None, "none", 0.0, 0.0, bad)  # fmt: skip
    else:
        args = (lp, lp, lp, m, 0.2, "token-mean", 1.0, bad)
    with pytest.raises(ValueError, match="non-decreasing"):
        op(*args)


def test_gradcheck_packed(backend):
    lp, old, adv, mask = (t[0] for t in make_policy(1, 9, torch.float64, clip=(0.2, 0.28, 2.5), empty_rows=()))
    cu = torch.tensor([0, 1, 1, 5, 9])
    ent = torch.rand(9, dtype=torch.float64)
    ref = lp + 0.1 * torch.randn(9, dtype=torch.float64)
    roll = old + 0.05 * torch.randn(9, dtype=torch.float64)
    corr = rlhf_fast.RolloutCorrection(rollout_is="sequence", rollout_is_threshold=4.0)

    def f(lp_, ent_):
        return rlhf_fast.ppo_loss(lp_, old, adv, mask, entropy=ent_, ref_logprobs=ref, entropy_coef=0.1,
                                  kl_coef=0.2, clip_high=0.28, dual_clip=2.5, agg="seq-mean-token-mean",
                                  rollout_logprobs=roll, rollout_correction=corr, cu_seqlens=cu)[0]  # fmt: skip

    assert torch.autograd.gradcheck(f, (lp.clone().requires_grad_(), ent.requires_grad_()), eps=1e-7)
    v, vo, ret, m = (t[0] for t in make_value(1, 9, torch.float64))
    assert torch.autograd.gradcheck(
        lambda x: rlhf_fast.ppo_value_loss(x, vo, ret, m, agg="seq-mean-token-sum", cu_seqlens=cu)[0],
        (v.requires_grad_(),),
    )


def test_opcheck_packed(backend):
    sfx = "_triton" if backend == "triton" else ""
    ops = torch.ops.rlhf_fast
    utils = ("test_schema", "test_autograd_registration") if backend == "triton" else None
    kw = {} if utils is None else dict(test_utils=utils)
    lp, old, adv, mask = (t[0] for t in make_policy(1, 10, clip=(0.2, None, 3.0), empty_rows=()))
    cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
    ent, ref = torch.rand(10), lp + 0.1
    lp.requires_grad_()
    args = (lp, old, adv, mask, ent, ref, 0.01, 0.1, "k3", 0.2, 0.28, 3.0, "seq-mean-token-mean", 8.0, old + 0.01,
            "sequence", 2.0, None, "seq_mean_k3", 0.0, 0.5, cu)  # fmt: skip
    fwd = getattr(ops, f"ppo_loss_fwd{sfx}")
    torch.library.opcheck(fwd, args, **kw)
    _, _, dtok, rs, _ = fwd(*args)
    assert dtok.shape == (10,) and rs.shape == (3,)
    bwd = getattr(ops, f"ppo_loss_bwd{sfx}")
    torch.library.opcheck(bwd, (torch.tensor(1.5), dtok, rs, mask, 0.01, True, torch.float32, torch.float32, cu), **kw)
    v, vo, ret, vm = (t[0] for t in make_value(1, 10))
    vfwd = getattr(ops, f"ppo_value_loss_fwd{sfx}")
    torch.library.opcheck(vfwd, (v.requires_grad_(), vo, ret, vm, 0.2, "token-mean", 8.0, cu), **kw)


def test_torch_compile_packed_two_totals():
    """fullgraph + dynamic shapes across two stream lengths (and segment
    counts): one graph, the eager answer."""
    compiled = torch.compile(
        lambda lp, old, adv, m, cu: (
            rlhf_fast.ppo_loss(lp, old, adv, m, agg="seq-mean-token-mean", cu_seqlens=cu)[0]
            + rlhf_fast.ppo_value_loss(lp, old, adv, m, agg="seq-mean-token-sum", cu_seqlens=cu)[0]
        ),
        fullgraph=True,
        dynamic=True,
        backend="aot_eager",
    )
    for lengths in ([5, 0, 9, 2], [7, 1, 30]):
        data, pm, packed, pmask, cu, inside = _packed_case(lengths, make_policy, torch.float32, empty_rows=())
        a = packed[0].clone().requires_grad_()
        got = compiled(a, packed[1], packed[2], pmask, cu)
        got.backward()
        b = packed[0].clone().requires_grad_()
        want = rlhf_fast.ppo_loss(b, packed[1], packed[2], pmask, agg="seq-mean-token-mean", cu_seqlens=cu)[0]
        want = want + rlhf_fast.ppo_value_loss(b, packed[1], packed[2], pmask, agg="seq-mean-token-sum",
                                               cu_seqlens=cu)[0]  # fmt: skip
        want.backward()
        assert torch.equal(got, want) and torch.equal(a.grad, b.grad), lengths


def test_kl_penalty_takes_packed_as_is(backend):
    lp, ref = torch.randn(2, 7), torch.randn(2, 7)
    inside = torch.tensor([[1] * 7, [1] * 3 + [0] * 4], dtype=torch.bool)
    packed = rlhf_fast.kl_penalty(rlhf_fast.pack(lp, inside)[0], rlhf_fast.pack(ref, inside)[0])
    assert torch.equal(packed, rlhf_fast.kl_penalty(lp, ref)[inside])
