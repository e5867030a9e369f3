"""Reference of the packed-layout helpers (docs/packing.md): plain loops over
segments, the oracle of rlhf_fast.pack / unpack / expand_to_tokens /
segment_ids.

Layout: 1-D token tensors of length `total` (sequences back to back) and
cu_seqlens, (S + 1,) int32 / int64 offsets from 0 to total (flash-attn's
varlen convention); segment s is tokens cu_seqlens[s] .. cu_seqlens[s+1] - 1.
"""

from __future__ import annotations

import torch


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64: the segment each packed token belongs to."""
    cu = cu_seqlens.tolist()
    out = torch.empty(total, dtype=torch.int64, device=cu_seqlens.device)
    for s in range(len(cu) - 1):
        out[cu[s] : cu[s + 1]] = s
    return out


def expand_to_tokens(seq_values: torch.Tensor, cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Each segment's value repeated over its tokens: (S, ...) -> (total, ...)."""
    cu = cu_seqlens.tolist()
    parts = [seq_values[s : s + 1].expand(cu[s + 1] - cu[s], *seq_values.shape[1:]) for s in range(len(cu) - 1)]
    if not parts:
        return seq_values.new_empty((0, *seq_values.shape[1:]))
    return torch.cat(parts, dim=0)


def pack(x: torch.Tensor, mask: torch.Tensor):
    """Row b's elements where mask[b] != 0, in order, rows back to back:
    x (B, T, ...), mask (B, T) -> (packed (total, ...), cu_seqlens (B + 1,) int32)."""
    rows, lengths = [], [0]
    for b in range(x.shape[0]):
        keep = mask[b] != 0
        rows.append(x[b][keep])
        lengths.append(lengths[-1] + int(keep.sum()))
    packed = torch.cat(rows, dim=0) if rows else x.new_empty((0, *x.shape[2:]))
    return packed, torch.tensor(lengths, dtype=torch.int32, device=x.device)


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, *, padding_value=0):
    """The inverse of pack for right-padded rows: (total, ...) -> (S, max_len, ...),
    segment s in row s from position 0, padding_value after it."""
    cu = cu_seqlens.tolist()
    S = len(cu) - 1
    out = torch.full((S, max_len, *packed.shape[1:]), padding_value, dtype=packed.dtype, device=packed.device)
    for s in range(S):
        n = cu[s + 1] - cu[s]
        if n > max_len:
            raise ValueError(f"unpack: segment {s} has {n} tokens, more than max_len={max_len}")
        out[s, :n] = packed[cu[s] : cu[s + 1]]
    return out
