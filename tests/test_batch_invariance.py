"""Batch invariance: a token's log-prob (and entropy) does not depend on what
else is in the batch. For logprobs_from_logits, linear_logprobs, sample's raw
log-probs and vocab_parallel_logprobs, a row's result must be bitwise equal
whatever the batch size, the row's position, the chunk size, the number of
CPU threads and the padding around it; on the C++ kernels and the Triton
kernels (interpreter). Every comparison is torch.equal: no tolerance.
(docs/rollout_correction.md states the guarantee and its limits.)"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
from _compare import assert_close, logit_scale
from conftest import CPU_BACKENDS

import rlhf_fast

V = 1003  # not a power of two: a ragged last block
# linear_logprobs' Triton kernels under the interpreter: 13-20 s a case in one process, ~90 s beside a
# second pytest worker (2 cores at load average ~8)
SLOW_TRITON = [pytest.param(b, marks=pytest.mark.slow) if b == "triton" else b for b in CPU_BACKENDS]


def _rows(n, dtype=torch.float32, H=None):
    """n distinct rows of logits (or hidden states), with -inf and large entries in some."""
    x = torch.randn(n, H or V, dtype=torch.float64) * 3
    x[0, ::7] = -float("inf") if H is None else 0.0
    x[1, 5] = 1e4 if H is None else 30.0
    return x.to(dtype)


def _compositions(n_rows, rng, count=6):
    """Batches drawn from the row pool: random sizes, orders, duplicates."""
    out = [torch.arange(n_rows), torch.arange(n_rows).flip(0)]
    for _ in range(count):
        size = int(torch.randint(1, 3 * n_rows, (1,), generator=rng))
        out.append(torch.randint(n_rows, (size,), generator=rng))
    return out


def _threads(*counts):
    prev = torch.get_num_threads()
    for c in counts:
        torch.set_num_threads(c)
        try:
            yield c
        finally:
            torch.set_num_threads(prev)


def _assert_rows_equal(got, anchors, idx, what):
    for pos, r in enumerate(idx.tolist()):
        for g, a in zip(got, anchors):
            assert torch.equal(g[pos], a[r]), f"{what}: row {r} at position {pos} of {len(idx)} differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_from_logits(backend, dtype):
    rng = torch.Generator().manual_seed(1)
    pool, labels = _rows(9, dtype), torch.randint(V, (9,), generator=rng)
    # anchors: each row alone, one thread
    anchors = [[], []]
    for _ in _threads(1):
        for r in range(9):
            lp, ent = rlhf_fast.logprobs_from_logits(
                pool[r : r + 1], labels[r : r + 1], temperature=0.7, return_entropy=True
            )
            anchors[0].append(lp[0])
            anchors[1].append(ent[0])
    for threads in _threads(1, 2):
        for idx in _compositions(9, rng):
            lp, ent = rlhf_fast.logprobs_from_logits(pool[idx], labels[idx], temperature=0.7, return_entropy=True)
            _assert_rows_equal((lp, ent), anchors, idx, f"{backend} {dtype} threads={threads}")
        # padding: the rows inside a (B, T, V) batch with ignored positions around them, read as a strided view
        big = torch.zeros(3, 8, V + 5, dtype=dtype)
        lab = torch.full((3, 8), -100)
        where = [(0, 2, 4), (1, 0, 0), (2, 7, 8)]  # (b, t, pool row)
        for b, t, r in where:
            big[b, t, :V] = pool[r]
            lab[b, t] = labels[r]
        lp, ent = rlhf_fast.logprobs_from_logits(big[..., :V], lab, temperature=0.7, return_entropy=True)
        for b, t, r in where:
            assert torch.equal(lp[b, t], anchors[0][r]) and torch.equal(ent[b, t], anchors[1][r]), (b, t, r)


@pytest.mark.parametrize("backend", SLOW_TRITON, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_logprobs(backend, dtype):
    H, n = 64, 7
    rng = torch.Generator().manual_seed(2)
    hidden = _rows(n, dtype, H=H)
    W = (torch.randn(V, H, dtype=torch.float64) / 8).to(dtype)
    labels = torch.randint(V, (n,), generator=rng)
    anchors = [[], []]
    for _ in _threads(1):
        for r in range(n):
            lp, ent = rlhf_fast.linear_logprobs(hidden[r : r + 1], W, labels[r : r + 1], return_entropy=True)
            anchors[0].append(lp[0])
            anchors[1].append(ent[0])
    for threads in _threads(1, 2):
        for idx in _compositions(n, rng, count=4):
            for chunk in (1, 3, 16, None):
                lp, ent = rlhf_fast.linear_logprobs(hidden[idx], W, labels[idx], return_entropy=True, chunk_size=chunk)
                _assert_rows_equal((lp, ent), anchors, idx, f"{backend} {dtype} chunk={chunk} threads={threads}")
        # padding: ignored tokens around the rows change which tokens share a chunk
        lab = torch.full((2 * n,), -100)
        lab[1::2] = labels
        hid = torch.zeros(2 * n, H, dtype=dtype)
        hid[1::2] = hidden
        lp, ent = rlhf_fast.linear_logprobs(hid, W, lab, return_entropy=True, chunk_size=2)
        assert torch.equal(lp[1::2], torch.stack(anchors[0])) and torch.equal(ent[1::2], torch.stack(anchors[1]))


def test_linear_logprobs_triton_any_split_count(monkeypatch):
    """On a GPU the Triton forward picks its vocabulary split count from N (to
    fill the SMs). A token's bits must not follow: the kernel reduces fixed
    vocabulary units (V / 128 wide) and merges them in one tree, whatever the
    splits. Here the split count is forced through the programs wanted."""
    from rlhf_fast.triton import linear_logprobs as lin

    H, n = 64, 7
    rng = torch.Generator().manual_seed(4)
    hidden = _rows(n, torch.float32, H=H)
    W = (torch.randn(V, H, dtype=torch.float64, generator=rng) / 8).float()
    labels = torch.randint(V, (n,), generator=rng)
    cfg = lin.tile_config(n, V, H, True, 4)
    runs = []
    with rlhf_fast.use_backend("triton"):
        for wanted in (1, 4, 64):
            monkeypatch.setattr(lin, "_programs_wanted", lambda device, w=wanted: w)
            splits = lin.num_splits(n, V, cfg["BLOCK_N"], cfg["BLOCK_V"], wanted, cfg["GROUP"])
            runs.append((splits, *rlhf_fast.linear_logprobs(hidden, W, labels, return_entropy=True)))
    assert len({r[0] for r in runs}) == 3, [r[0] for r in runs]
    for splits, lp, ent in runs[1:]:
        assert torch.equal(lp, runs[0][1]) and torch.equal(ent, runs[0][2]), (runs[0][0], splits)


def test_sample_raw_logprobs(backend):
    """sample's raw log-prob of the drawn token is the single-row logprobs_from_logits
    of that token, bit for bit, whatever the batch and the truncation settings."""
    rng = torch.Generator().manual_seed(3)
    pool = _rows(8)
    # torch's thread count reaches the C++ kernels only: the Triton
    # interpreter runs its programs one at a time in numpy (76 s for both)
    for threads in _threads(*((1,) if backend == "triton" else (1, 2))):
        for idx in _compositions(8, rng, count=4):
            g = torch.Generator().manual_seed(int(idx.sum()))
            for kw in (dict(temperature=0.8), dict(temperature=1.0, top_k=50, top_p=0.9), dict(temperature=0.0)):
                out = rlhf_fast.sample(pool[idx], generator=g, **kw)
                T = kw["temperature"] or 1.0
                for pos, r in enumerate(idx.tolist()):
                    # bit for bit against the same kernel family's log-prob op (the
                    # Triton family sums exp2 per strip, the C++ one exp per lane, so
                    # across families they agree to rounding, not to the bit)
                    want = rlhf_fast.logprobs_from_logits(pool[r : r + 1], out.tokens[pos : pos + 1], temperature=T)
                    assert torch.equal(out.logprobs[pos], want[0]), f"{backend} {kw} threads={threads} row {r}"
                    with rlhf_fast.use_backend("cpp"):
                        other = rlhf_fast.logprobs_from_logits(
                            pool[r : r + 1], out.tokens[pos : pos + 1], temperature=T
                        )
                    assert_close(out.logprobs[pos], other[0], "agree", "across families", scale=logit_scale(pool[r], T))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vocab_parallel_logprobs(backend):
    """One rank (a gloo group of size 1): the merge of the shard statistics is
    per token, so the row result cannot depend on the batch either."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not built")
    started = not dist.is_initialized()
    if started:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        rng = torch.Generator().manual_seed(4)
        pool, labels = _rows(6), torch.randint(V, (6,), generator=rng)
        anchors = [[], []]
        for r in range(6):
            lp, ent = rlhf_fast.vocab_parallel_logprobs(
                pool[r : r + 1], labels[r : r + 1], vocab_start=0, vocab_size=V, return_entropy=True
            )
            anchors[0].append(lp[0])
            anchors[1].append(ent[0])
        for threads in _threads(1, 2):
            for idx in _compositions(6, rng, count=3):
                lp, ent = rlhf_fast.vocab_parallel_logprobs(
                    pool[idx], labels[idx], vocab_start=0, vocab_size=V, return_entropy=True
                )
                _assert_rows_equal((lp, ent), anchors, idx, f"vocab_parallel {backend} threads={threads}")
                # and equal to the single-device kernel
                lp1 = rlhf_fast.logprobs_from_logits(pool[idx], labels[idx])
                assert torch.equal(lp, lp1)
    finally:
        if started:
            dist.destroy_process_group()
