"""The packed layout's helpers (rlhf_fast.pack / unpack / expand_to_tokens /
segment_ids, docs/packing.md) against their loop references, and the one
cu_seqlens check every packed op goes through."""

import pytest
import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.ops._packing import check_cu_seqlens


def _random_mask(B, T, kind):
    lengths = torch.randint(0, T + 1, (B,))
    pos = torch.arange(T)[None, :]
    if kind == "right":
        return pos < lengths[:, None]
    if kind == "left":
        return pos >= (T - lengths)[:, None]
    return torch.rand(B, T) < 0.6  # holes


@pytest.mark.parametrize("kind", ["right", "left", "holes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_pack_matches_reference_and_unpack_inverts_it(kind, dtype):
    B, T = 7, 13
    x = (torch.randn(B, T, 3) * 100).to(dtype)
    mask = _random_mask(B, T, kind)
    packed, cu = rlhf_fast.pack(x, mask)
    ref_packed, ref_cu = reference.pack(x, mask)
    assert cu.dtype == torch.int32 and torch.equal(cu, ref_cu)
    assert torch.equal(packed, ref_packed)
    padded = rlhf_fast.unpack(packed, cu, T, padding_value=-1)
    assert torch.equal(padded, reference.unpack(packed, cu, T, padding_value=-1))
    if kind == "right":  # right padding round-trips exactly
        assert torch.equal(padded[mask], x[mask])
        assert bool((padded[~mask] == -1).all())


def test_empty_segments_and_empty_stream():
    cu = torch.tensor([0, 0, 3, 3, 5])
    vals = torch.tensor([10.0, 20.0, 30.0, 40.0])
    assert rlhf_fast.expand_to_tokens(vals, cu).tolist() == [20.0, 20.0, 20.0, 40.0, 40.0]
    assert rlhf_fast.segment_ids(cu, 5).tolist() == [1, 1, 1, 3, 3]
    assert torch.equal(rlhf_fast.segment_ids(cu, 5), reference.segment_ids(cu, 5))
    empty = torch.tensor([0])
    assert rlhf_fast.expand_to_tokens(torch.zeros(0), empty, 0).shape == (0,)
    assert rlhf_fast.unpack(torch.zeros(0), empty, 4).shape == (0, 4)
    packed, cu0 = rlhf_fast.pack(torch.zeros(3, 4), torch.zeros(3, 4))
    assert packed.shape == (0,) and cu0.tolist() == [0, 0, 0, 0]


def test_expand_to_tokens_10000_segments():
    lengths = torch.randint(0, 9, (10_000,))
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    vals = torch.randn(10_000)
    out = rlhf_fast.expand_to_tokens(vals, cu, int(cu[-1]))
    assert torch.equal(out, torch.repeat_interleave(vals, lengths))


@pytest.mark.parametrize(
    "cu, total, message",
    [
        (torch.tensor([1, 3, 5]), 5, r"cu_seqlens\[0\] must be 0"),
        (torch.tensor([0, 3, 4]), 5, r"must equal the number of packed tokens \(5\)"),
        (torch.tensor([0, 4, 2, 5]), 5, r"non-decreasing: cu_seqlens\[1\] = 4 > cu_seqlens\[2\] = 2"),
        (torch.tensor([0.0, 5.0]), 5, "must have dtype int32, int64"),
        (torch.tensor([[0, 5]]), 5, r"must be 1-D \(S \+ 1,\)"),
        (torch.zeros(0, dtype=torch.int64), 0, r"must be 1-D \(S \+ 1,\)"),
    ],
)
def test_bad_offsets_raise_naming_the_problem(cu, total, message):
    with pytest.raises((ValueError, TypeError), match=message):
        check_cu_seqlens("op", cu, total, torch.device("cpu"))
    with pytest.raises((ValueError, TypeError), match=message):
        rlhf_fast.unpack(torch.zeros(total), cu, 8)


def test_unpack_rejects_a_segment_longer_than_max_len():
    with pytest.raises(ValueError, match="segment 1 has 4 tokens, more than max_len=3"):
        rlhf_fast.unpack(torch.zeros(6), torch.tensor([0, 2, 6]), 3)


def test_segment_ids_stay_in_range_for_bad_offsets():
    # the no-sync path (GPU without checks) never indexes out of bounds
    from rlhf_fast.ops._packing import token_segments

    ids = token_segments(torch.tensor([0, 9, 2, 4]), 6)
    assert bool(((ids >= 0) & (ids <= 2)).all())


def test_label_shift_idiom_masks_segment_ends():
    # docs/packing.md's idiom: the last token of a segment gets no label
    ids = torch.tensor([5, 6, 7, 1, 2, 9])
    cu = torch.tensor([0, 3, 3, 6])
    labels = torch.roll(ids, -1)
    last = cu[1:] - 1
    labels[last[cu[1:] > cu[:-1]]] = -100
    assert labels.tolist() == [6, 7, -100, 2, 9, -100]


@pytest.mark.slow  # ~30 s of torch.compile
def test_helpers_compile_fullgraph_dynamic():
    fn = torch.compile(
        lambda p, cu, v: (rlhf_fast.unpack(p, cu, 6), rlhf_fast.expand_to_tokens(v, cu, p.shape[0])),
        fullgraph=True,
        dynamic=True,
    )
    for lengths in ([2, 0, 3], [1, 4, 1, 2]):
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        p, v = torch.randn(int(cu[-1])), torch.randn(len(lengths))
        padded, tok = fn(p, cu, v)
        assert torch.equal(padded, reference.unpack(p, cu, 6))
        assert torch.equal(tok, reference.expand_to_tokens(v, cu))


def test_pack_and_unpack_opcheck():
    x, mask = torch.randn(3, 5), torch.rand(3, 5) < 0.5
    torch.library.opcheck(torch.ops.rlhf_fast.pack.default, (x, mask), test_utils=("test_schema", "test_faketensor"))
    p, cu = rlhf_fast.pack(x, mask)
    torch.library.opcheck(torch.ops.rlhf_fast.unpack.default, (p, cu, 5, 0.0))
