"""gae / discounted_returns on the packed layout (1-D streams + cu_seqlens,
docs/packing.md): bit for bit the padded op on the same sequences, and the
float64 reference (a loop over segments calling the padded reference)."""

from __future__ import annotations

import pytest
import torch
from _compare import assert_close

import rlhf_fast
from rlhf_fast import reference as ref
from rlhf_fast._backend import _C, BUILD_INFO

ISAS = ["baseline", "avx2", "avx512"]


@pytest.fixture
def cpp():
    with rlhf_fast.use_backend("cpp"):
        yield


def padded_batch(B, T, dtype=torch.float32, lengths=None):
    """Right-padded rows (attention mask = the first `lengths` tokens) with a
    response mask that has holes (multi-turn observation tokens) and a fully
    masked row, and NaN in every padded slot."""
    lengths = torch.randint(0, T + 1, (B,)) if lengths is None else lengths
    attn = torch.arange(T)[None, :] < lengths[:, None]
    m = attn & (torch.rand(B, T) > 0.3)
    if B > 2:
        m[2] = False  # a fully masked response inside a non-empty segment
    r, v = torch.randn(B, T, dtype=dtype), torch.randn(B, T, dtype=dtype)
    r[~attn], v[~attn] = float("nan"), float("nan")
    return r, v, m, attn


def pack_all(attn, *xs):
    out = [rlhf_fast.pack(x, attn)[0] for x in xs]
    return (*out, rlhf_fast.pack(xs[0], attn)[1])


def _isas():
    return ISAS[: ISAS.index(BUILD_INFO["cpu_isa_best"]) + 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("B,T", [(1, 1), (5, 33), (37, 300), (40, 1025)])
def test_packed_equals_padded_bit_for_bit(cpp, dtype, B, T):
    """Every ISA copy (16- and 8-lane tiles, the scalar loop): the packed op
    on pack(padded rows) is pack(the padded op's outputs), exactly."""
    r, v, m, attn = padded_batch(B, T, dtype)
    gamma, lam = torch.rand(B) * 0.2 + 0.8, torch.rand(B)
    rp, vp, mp, cu = pack_all(attn, r, v, m)
    prev = _C.set_cpu_isa(_isas()[-1])
    try:
        for isa in _isas():
            _C.set_cpu_isa(isa)
            adv, ret = rlhf_fast.gae(r, v, m, gamma=gamma, lam=lam)
            padv, pret = rlhf_fast.gae(rp, vp, mp, gamma=gamma, lam=lam, cu_seqlens=cu)
            assert padv.shape == pret.shape == rp.shape
            assert torch.equal(padv, adv[attn]), f"{isa}: packed advantages differ from padded"
            assert torch.equal(pret, ret[attn]), f"{isa}: packed returns differ from padded"
            g = rlhf_fast.discounted_returns(r, m, gamma=gamma)
            pg = rlhf_fast.discounted_returns(rp, mp, gamma=gamma, cu_seqlens=cu)
            assert torch.equal(pg, g[attn]), f"{isa}: packed discounted returns differ from padded"
    finally:
        _C.set_cpu_isa(prev)
    r64, v64 = rp.double(), vp.double()
    want = ref.gae(r64, v64, mp, gamma=gamma.double(), lam=lam.double(), cu_seqlens=cu)
    assert_close(padv, want[0], "value", "packed advantages vs float64")
    assert_close(pret, want[1], "value", "packed returns vs float64")
    assert_close(pg, ref.discounted_returns(r64, mp, gamma=gamma.double(), cu_seqlens=cu), "value")


def test_reference_packed_is_the_padded_reference_per_segment():
    r, v, m, attn = padded_batch(6, 40, torch.float64)
    rp, vp, mp, cu = pack_all(attn, r, v, m)
    got = ref.gae(rp, vp, mp, gamma=0.9, lam=0.8, cu_seqlens=cu)
    want = ref.gae(r.nan_to_num(), v.nan_to_num(), m, gamma=0.9, lam=0.8)
    assert torch.equal(got[0], want[0][attn]) and torch.equal(got[1], want[1][attn])
    with rlhf_fast.use_backend("reference"):
        assert torch.equal(rlhf_fast.gae(rp, vp, mp, gamma=0.9, lam=0.8, cu_seqlens=cu)[0], got[0])


def _segments_case(lengths, dtype=torch.float64):
    lengths = torch.tensor(lengths, dtype=torch.int64)
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    total = int(cu[-1])
    r, v = torch.randn(total, dtype=dtype), torch.randn(total, dtype=dtype)
    m = torch.rand(total) > 0.2
    return r, v, m, cu


@pytest.mark.parametrize(
    "lengths",
    [
        [1],  # one segment of one token
        [7],  # one segment
        [1, 1, 1, 5, 1],  # length-1 segments
        [0, 3, 0, 0, 4, 0],  # empty segments (allowed by the layout)
        [0],  # no token at all
        [17] * 40 + [1000, 3, 250],  # lanes of equal and very different lengths
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_awkward_segments(cpp, lengths, dtype):
    r, v, m, cu = _segments_case(lengths, dtype)
    for gl in [(0.99, 0.95), (1.0, 1.0), (0.0, 0.0)]:
        adv, ret = rlhf_fast.gae(r, v, m, gamma=gl[0], lam=gl[1], cu_seqlens=cu)
        want = ref.gae(r.double(), v.double(), m, gamma=gl[0], lam=gl[1], cu_seqlens=cu)
        assert_close(adv, want[0], "value")
        assert_close(ret, want[1], "value")
        assert torch.all(adv[~m] == 0) and torch.all(ret[~m] == 0)
        g = rlhf_fast.discounted_returns(r, m, gamma=gl[0], cu_seqlens=cu)
        assert_close(g, ref.discounted_returns(r.double(), m, gamma=gl[0], cu_seqlens=cu), "value")


def test_carry_resets_at_every_segment_and_passes_masked_holes(cpp):
    """Two segments [1, 1 | 1, 1] with gamma = lam = 1, values 0: the first
    token of segment 0 sees only its own segment's rewards (2, not 4); a hole
    (masked token) inside a segment keeps the carry (verl multi-turn)."""
    r = torch.ones(6, dtype=torch.float64)
    v = torch.zeros(6, dtype=torch.float64)
    m = torch.tensor([1, 0, 1, 1, 1, 1], dtype=torch.bool)
    cu = torch.tensor([0, 3, 6])
    adv, _ = rlhf_fast.gae(r, v, m, gamma=1.0, lam=1.0, cu_seqlens=cu)
    assert adv.tolist() == [2.0, 0.0, 1.0, 3.0, 2.0, 1.0]
    assert rlhf_fast.discounted_returns(r, m, gamma=1.0, cu_seqlens=cu).tolist() == adv.tolist()


def test_ten_thousand_segments(cpp):
    lengths = torch.randint(0, 9, (10_000,))
    r, v, m, cu = _segments_case(lengths.tolist(), torch.float32)
    adv, ret = rlhf_fast.gae(r, v, m, gamma=0.99, lam=0.95, cu_seqlens=cu.long())
    want = ref.gae(r.double(), v.double(), m, gamma=0.99, lam=0.95, cu_seqlens=cu)
    assert_close(adv, want[0], "value")
    assert_close(ret, want[1], "value")


def test_per_segment_gamma_lam(cpp):
    r, v, m, cu = _segments_case([5, 0, 9, 1, 30])
    gamma = torch.tensor([1.0, 0.5, 0.0, 0.9, 0.99], dtype=torch.float64)
    lam = torch.tensor([0.95, 1.0, 0.5, 0.0, 0.9], dtype=torch.float64)
    adv, _ = rlhf_fast.gae(r, v, m, gamma=gamma, lam=lam, cu_seqlens=cu)
    assert_close(adv, ref.gae(r, v, m, gamma=gamma, lam=lam, cu_seqlens=cu)[0], "value")
    for s in range(5):  # segment s equals a scalar call on that segment alone
        lo, hi = int(cu[s]), int(cu[s + 1])
        one = rlhf_fast.gae(r[lo:hi], v[lo:hi], m[lo:hi], gamma=float(gamma[s]), lam=float(lam[s]),
                            cu_seqlens=torch.tensor([0, hi - lo]))[0]  # fmt: skip
        assert torch.equal(adv[lo:hi], one)
    with pytest.raises(ValueError, match=r"gamma as a tensor must have shape \(5,\)"):
        rlhf_fast.gae(r, v, m, gamma=torch.ones(4), cu_seqlens=cu)


def test_bad_cu_seqlens_raise(cpp):
    r, v, m, cu = _segments_case([3, 4])
    cases = [
        (torch.tensor([1, 3, 7]), r"cu_seqlens\[0\] must be 0"),
        (torch.tensor([0, 3, 6]), r"cu_seqlens\[-1\] = 6 must equal the number of packed tokens \(7\)"),
        (torch.tensor([0, 5, 3, 7]), r"non-decreasing: cu_seqlens\[1\] = 5 > cu_seqlens\[2\] = 3"),
        (torch.tensor([0.0, 7.0]), "cu_seqlens must have dtype"),
        (torch.tensor([[0, 7]]), "1-D"),
    ]
    for bad, pattern in cases:
        with pytest.raises((ValueError, TypeError), match=pattern):
            rlhf_fast.gae(r, v, m, cu_seqlens=bad)
        with pytest.raises((ValueError, TypeError), match=pattern):
            rlhf_fast.discounted_returns(r, m, cu_seqlens=bad)
        with pytest.raises(RuntimeError, match=pattern):  # the C++ op checks again (torch.compile skips Python)
            torch.ops.rlhf_fast.gae(r, v, m, 1.0, 1.0, None, None, bad)
    with pytest.raises(ValueError, match="must be 1-D"):
        rlhf_fast.gae(r[None], v[None], m[None], cu_seqlens=cu)
    with pytest.raises(ValueError, match="values must have the rewards' shape"):
        rlhf_fast.gae(r, v[:-1], m, cu_seqlens=cu)
    with pytest.raises(ValueError, match="mask must have shape"):
        rlhf_fast.discounted_returns(r, m[:-1], cu_seqlens=cu)


def test_opcheck_packed_schema():
    r, v, m, cu = _segments_case([3, 0, 9, 1], torch.float32)
    rows = torch.tensor([0.9, 1.0, 0.5, 0.7])
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for args in [(r, v, m, 0.99, 0.95, None, None, cu), (r, v, m, 1.0, 1.0, rows, rows, cu.long())]:
        torch.library.opcheck(torch.ops.rlhf_fast.gae.default, args, test_utils=utils)
    torch.library.opcheck(torch.ops.rlhf_fast.discounted_returns.default, (r, m, 0.9, None, cu), test_utils=utils)


def test_compile_fullgraph_dynamic_two_totals(cpp):
    def step(r, v, m, cu):
        adv, ret = rlhf_fast.gae(r, v, m, gamma=0.99, lam=0.95, cu_seqlens=cu)
        return adv, ret, rlhf_fast.discounted_returns(r, m, gamma=0.99, cu_seqlens=cu)

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for lengths in ([5, 0, 12, 3], [40, 1, 7, 9, 2]):
        args = _segments_case(lengths, torch.float32)
        for got, want in zip(compiled(*args), step(*args)):
            assert torch.equal(got, want)


# ---------------------------------------------------------------- whiten on a packed stream


@pytest.mark.parametrize("lengths", [[1], [0, 3, 0, 1, 40], [300, 2, 700], [5] * 200])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_packed(backend, lengths, shift_mean):
    """Global: the same as whiten on the (1, total) view (the padded op on
    one row). per_segment=True: each segment whitened on its own, which is the
    padded op on that segment's row."""
    x, _, m, cu = _segments_case(lengths)
    x = x * 3 + 2
    glob = rlhf_fast.whiten(x, m, shift_mean=shift_mean, cu_seqlens=cu)
    assert torch.equal(glob, rlhf_fast.whiten(x[None], m[None], shift_mean=shift_mean)[0])
    assert_close(glob, ref.whiten(x, m, shift_mean=shift_mean), "value")
    seg = rlhf_fast.whiten(x, m, shift_mean=shift_mean, cu_seqlens=cu, per_segment=True)
    assert seg.dtype == torch.float64 and seg.shape == x.shape
    assert_close(seg, ref.whiten(x, m, shift_mean=shift_mean, cu_seqlens=cu), "value")
    assert torch.all(seg[~m] == 0)
    for s in range(len(lengths)):
        lo, hi = int(cu[s]), int(cu[s + 1])
        if hi > lo:
            one = rlhf_fast.whiten(x[None, lo:hi], m[None, lo:hi], shift_mean=shift_mean)[0]
            assert_close(seg[lo:hi], one, "agree", f"segment {s}")
    x32 = x.float()
    seg32 = rlhf_fast.whiten(x32, m.int(), cu_seqlens=cu.long(), per_segment=True)
    assert seg32.dtype == torch.float32
    assert_close(seg32, ref.whiten(x32.double(), m, cu_seqlens=cu), "value")


def test_whiten_per_segment_ties_and_few_valid(backend):
    """eps = 0: a segment of tied values, one of a single valid token and a
    fully masked one all give exactly 0, never NaN."""
    x = torch.tensor([-0.1] * 7 + [3.0, 5.0] + [2.0, 9.0], dtype=torch.float64)
    m = torch.tensor([1] * 7 + [1, 0] + [0, 0], dtype=torch.bool)
    cu = torch.tensor([0, 7, 9, 11])
    got = rlhf_fast.whiten(x, m, eps=0.0, cu_seqlens=cu, per_segment=True)
    assert torch.equal(got, torch.zeros_like(x))
    kept = rlhf_fast.whiten(x, m, eps=0.0, shift_mean=False, cu_seqlens=cu, per_segment=True)
    assert torch.equal(kept, torch.where(m, x, torch.zeros_like(x)))


def test_whiten_packed_errors_and_opcheck(cpp):
    x, _, m, cu = _segments_case([3, 4], torch.float32)
    with pytest.raises(ValueError, match="per_segment=True needs cu_seqlens"):
        rlhf_fast.whiten(x, m, per_segment=True)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] = 6 must equal"):
        rlhf_fast.whiten(x, m, cu_seqlens=torch.tensor([0, 3, 6]), per_segment=True)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        torch.ops.rlhf_fast.whiten(x, m, True, 1e-8, torch.tensor([0, 5, 3, 7]))
    with pytest.raises(ValueError, match="must be 1-D"):
        rlhf_fast.whiten(x[None], m[None], cu_seqlens=cu, per_segment=True)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.rlhf_fast.whiten.default, (x, m, True, 1e-8, cu), test_utils=utils)
    torch.library.opcheck(
        torch.ops.rlhf_fast.whiten_triton.default,
        (x, m, False, 1e-8, cu),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_whiten_packed_compile_two_totals(cpp):
    def step(x, m, cu):
        return rlhf_fast.whiten(x, m, cu_seqlens=cu, per_segment=True), rlhf_fast.whiten(x, m, cu_seqlens=cu)

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for lengths in ([5, 0, 12, 3], [40, 1, 7, 9, 2]):
        x, _, m, cu = _segments_case(lengths, torch.float32)
        for got, want in zip(compiled(x, m, cu), step(x, m, cu)):
            assert torch.equal(got, want)


@pytest.mark.gpu
def test_gae_cuda_packed_matches_cpu():
    """Run by the GPU suite: the CUDA warp-per-segment scan vs the C++ kernel,
    segments from empty to 5000 tokens, int32 and int64 offsets, and
    10,000 segments of length 8."""
    for lengths in ([0, 1, 2, 255, 256, 257, 5000, 0, 33], [8] * 10_000):
        r, v, m, cu = _segments_case(lengths, torch.float32)
        with rlhf_fast.use_backend("cpp"):
            want = rlhf_fast.gae(r, v, m, gamma=0.99, lam=0.95, cu_seqlens=cu)
            want_g = rlhf_fast.discounted_returns(r, m, gamma=0.999, cu_seqlens=cu)
        for c in (cu.cuda(), cu.long().cuda()):
            got = rlhf_fast.gae(r.cuda(), v.cuda(), m.cuda(), gamma=0.99, lam=0.95, cu_seqlens=c)
            assert_close(got[0].cpu(), want[0], "value")
            assert_close(got[1].cpu(), want[1], "value")
            got_g = rlhf_fast.discounted_returns(r.cuda(), m.cuda(), gamma=0.999, cu_seqlens=c)
            assert_close(got_g.cpu(), want_g, "value")
