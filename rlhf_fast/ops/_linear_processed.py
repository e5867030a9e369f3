"""rlhf_fast.linear_logprobs(..., top_k=, top_p=, min_p=, temperature=tensor):
the processed log-probs (ops/_processed_logprobs.py) straight from hidden
states and the lm_head, chunk by chunk, so the (N, V) logits never exist.

Per chunk of labelled tokens: logits = hidden_c @ W.T + b, then the
sampler-truncation row op (C++ or Triton, whichever runs the device) for the
log-probs and its (max, threshold, log kept mass) stats. The backward
recomputes each chunk's logits (the GEMM count of the two-op path, four: the
forward does not know the upstream gradient), runs the row backward with the
kept set held fixed, and accumulates dH, dW, d bias in fp32. Scratch: one
chunk of logits and its gradient, as linear_logprobs.
"""

from __future__ import annotations

import torch

from .. import _backend
from ._common import once_differentiable
from ._linear_logprobs import _chunk_logits, _row_chunks, default_chunk_size
from ._processed_logprobs import IMPLEMENTED, token_params

OP = "rlhf_fast.linear_logprobs"


def _row_ops(device):
    backend = _backend.choose("logprobs_from_logits", device, IMPLEMENTED)
    if backend == "triton":
        return torch.ops.rlhf_fast.processed_logprobs_fwd_triton, torch.ops.rlhf_fast.processed_logprobs_bwd_triton
    return torch.ops.rlhf_fast.processed_logprobs_fwd, torch.ops.rlhf_fast.processed_logprobs_bwd


class _LinearProcessed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, params, ignore_index, filtered, want_entropy, chunk):
        fwd, _ = _row_ops(hidden.device)
        N = hidden.shape[0]
        lp, ent = (hidden.new_zeros((N,), dtype=torch.float32) for _ in range(2))
        stats = hidden.new_zeros((N, 3), dtype=torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):  # the chunk GEMMs keep the inputs' dtype
            for rows in _row_chunks(labels, ignore_index, chunk):
                logits = _chunk_logits(hidden[rows], weight, bias)
                p = [t[rows] for t in params]
                out = fwd(logits, labels[rows], *p, ignore_index, filtered, want_entropy)
                for dst, src in zip((lp, ent, stats), out):
                    dst[rows] = src
                del logits, out
        ctx.save_for_backward(hidden, weight, bias, labels, params[0], stats, ent)
        ctx.args = (ignore_index, want_entropy, chunk)
        ctx.mark_non_differentiable(stats)
        return lp, ent, stats

    @staticmethod
    @once_differentiable(OP)
    def backward(ctx, g_lp, g_ent, _g_stats):
        hidden, weight, bias, labels, temp, stats, ent = ctx.saved_tensors
        ignore_index, want_entropy, chunk = ctx.args
        _, bwd = _row_ops(hidden.device)
        g_ent = g_ent if want_entropy else None
        dh = torch.zeros_like(hidden)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if bias is not None else None
        with torch.autocast(hidden.device.type, enabled=False):
            for rows in _row_chunks(labels, ignore_index, chunk):
                h = hidden[rows]
                logits = _chunk_logits(h, weight, bias)
                dz = bwd(
                    g_lp[rows] if g_lp is not None else None,
                    g_ent[rows] if g_ent is not None else None,
                    logits, labels[rows], temp[rows], stats[rows], ent[rows], ignore_index,
                )  # fmt: skip
                dh[rows] = (dz @ weight).to(dh.dtype)
                dw += dz.t().float() @ h.float()
                if db is not None:
                    db += dz.float().sum(0)
                del logits, dz
        return (
            dh,
            dw.to(weight.dtype),
            db.to(bias.dtype) if db is not None else None,
            None, None, None, None, None, None,
        )  # fmt: skip


def linear_processed_logprobs(hidden, weight, bias, labels, temperature, top_k, top_p, min_p, ignore_index,
                              return_entropy, chunk_size):  # fmt: skip
    """hidden (..., H) etc. already checked by linear_logprobs."""
    H, V = hidden.shape[-1], weight.shape[0]
    temp, tk, tp, mp, filtered = token_params(labels, hidden.dtype, temperature, top_k, top_p, min_p)
    rows = hidden.reshape(labels.numel(), H)
    N = rows.shape[0]
    chunk = chunk_size if chunk_size is not None else default_chunk_size(N, V, hidden.device)
    y = labels.reshape(-1)
    lp, ent, _ = _LinearProcessed.apply(
        rows, weight, bias, y, (temp, tk, tp, mp), ignore_index, filtered, return_entropy, min(chunk, max(N, 1))
    )
    lp = lp.reshape(labels.shape)
    return (lp, ent.reshape(labels.shape)) if return_entropy else lp
