"""One rule per edge case, the same on every backend (cpp, triton through the
interpreter, reference): an ignore_index the labels' dtype cannot hold, and
the sampler on empty inputs."""

import pytest
import torch
from conftest import CPU_BACKENDS

import rlhf_fast

BACKENDS = ["reference", *CPU_BACKENDS]


def _calls(logits, labels, ignore_index):
    hidden = torch.eye(logits.shape[0], dtype=logits.dtype)
    return {
        "logprobs_from_logits": lambda: rlhf_fast.logprobs_from_logits(logits, labels, ignore_index=ignore_index),
        "linear_logprobs": lambda: rlhf_fast.linear_logprobs(
            hidden, logits.T.contiguous(), labels, ignore_index=ignore_index
        ),
    }


@pytest.mark.parametrize("ignore_index", [2**40, 2**32 - 100, 2**31, -(2**31) - 1])
@pytest.mark.parametrize("be", BACKENDS)
def test_ignore_index_outside_int32_with_int32_labels_is_refused(be, ignore_index):
    """Before: the reference ignored label 0 at 2**40 (wrapped), cpp raised
    at 2**32 - 100, Triton gave NaN. Now a ValueError naming both, and the
    inputs are untouched."""
    logits = torch.randn(4, 6)
    labels = torch.tensor([0, 1, 5, 2], dtype=torch.int32)
    before = (logits.clone(), labels.clone())
    with rlhf_fast.use_backend(be):
        for name, call in _calls(logits, labels, ignore_index).items():
            with pytest.raises(ValueError, match=rf"ignore_index={ignore_index} cannot be held .* int32"):
                call()
                pytest.fail(f"{be} {name}: no error")
    assert torch.equal(logits, before[0]) and torch.equal(labels, before[1])


@pytest.mark.parametrize("be", BACKENDS)
def test_ignore_index_at_the_int32_edges_and_with_int64_labels(be):
    """In range it is honoured exactly: int32 labels at the int32 extremes,
    and int64 labels with an ignore_index past int32 (label 0 not ignored)."""
    logits = torch.randn(4, 6, dtype=torch.float64)
    want_all = torch.log_softmax(logits, -1)
    for ignore_index, labels in (
        (2**31 - 1, torch.tensor([0, 2**31 - 1, 5, 2], dtype=torch.int32)),
        (-(2**31), torch.tensor([0, 3, -(2**31), 2], dtype=torch.int32)),
        (2**40, torch.tensor([0, 1, 2**40, 2], dtype=torch.int64)),
    ):
        ignored = labels == ignore_index
        safe = torch.where(ignored, 0, labels).long()
        want = torch.where(ignored, 0.0, want_all.gather(1, safe[:, None])[:, 0])
        with rlhf_fast.use_backend(be):
            for name, call in _calls(logits, labels, ignore_index).items():
                torch.testing.assert_close(call(), want, rtol=1e-10, atol=1e-12, msg=f"{be} {name} {ignore_index}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("be", BACKENDS)
def test_sample_empty_batch_and_empty_vocabulary(be, dtype):
    """B = 0: empty outputs (int64 tokens) on every backend, with any filter;
    V = 0 with B > 0: a ValueError naming the empty vocabulary. The reference
    function itself follows the same rule (it raised IndexError)."""
    with rlhf_fast.use_backend(be):
        for V in (0, 5):
            for cfg in (dict(), dict(top_k=2, top_p=0.5), dict(temperature=0.0)):
                out = rlhf_fast.sample(torch.randn(0, V, dtype=dtype), **cfg)
                assert [t.shape for t in out] == [(0,)] * 3, (V, cfg)
                assert out.tokens.dtype == torch.int64
        with pytest.raises(ValueError, match="empty vocabulary"):
            rlhf_fast.sample(torch.randn(3, 0, dtype=dtype))
    p = [
        torch.zeros(0, dtype=torch.int64),
        torch.ones(0),
        torch.zeros(0, dtype=torch.int64),
        torch.ones(0),
        torch.zeros(0),
    ]
    out = rlhf_fast.reference.sample(torch.randn(0, 0, dtype=dtype), *p)
    assert [t.shape for t in out] == [(0,)] * 3
    p = [
        torch.zeros(2, dtype=torch.int64),
        torch.ones(2),
        torch.zeros(2, dtype=torch.int64),
        torch.ones(2),
        torch.zeros(2),
    ]
    with pytest.raises(ValueError, match="empty vocabulary"):
        rlhf_fast.reference.sample(torch.randn(2, 0, dtype=dtype), *p)
