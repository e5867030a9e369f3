"""The packed layout, checked in one place (docs/packing.md), and the helpers
between it and the padded one: rlhf_fast.pack / unpack / expand_to_tokens /
segment_ids.

Naming chain: rlhf_fast::pack / rlhf_fast::unpack (custom ops over torch
indexing, here, with fake kernels) -> rlhf_fast.pack / unpack ->
reference.pack / unpack -> tests/test_packing.py.

Layout: token tensors are 1-D, `total` tokens long, sequences back to back;
cu_seqlens is an int32 or int64 (S + 1,) tensor of offsets, cu_seqlens[0] = 0,
cu_seqlens[S] = total, non-decreasing (an empty segment is allowed). The
same convention as flash-attn's varlen API, so a batch packed for the model
feeds the advantage and loss ops as it is.

What is checked where (the label checks' rule, ops/_common.host_value_checks):
- always, on the host, free: the dtype, 1-D, at least one offset, the device;
- on CPU tensors (and on GPU with RLHF_FAST_CHECK_INPUTS=1): the values (first
  offset 0, last offset total, non-decreasing), raising ValueError naming the
  first bad offset. The C++ kernels check them again (under torch.compile
  the Python checks do not run) and raise the same;
- on GPU by default no host sync: the kernels clamp every offset into
  [0, total], so no bad offset reads out of bounds, and a segment whose
  offsets are out of order gives NaN outputs, as a bad label does.
"""

from __future__ import annotations

import torch

from ._common import INDEX_DTYPES, check_int, check_tensor, host_value_checks


def check_cu_seqlens(op: str, cu_seqlens, total: int, device: torch.device, name: str = "cu_seqlens") -> int:
    """Checks cu_seqlens against a packed stream of `total` tokens on
    `device` (the module docstring says which checks run where). Returns S,
    the number of segments."""
    check_tensor(op, name, cu_seqlens, INDEX_DTYPES)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(
            f"{op}: {name} must be 1-D (S + 1,) offsets starting at 0 and ending at total, "
            f"got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != device:
        raise ValueError(f"{op}: {name} is on {cu_seqlens.device} but the token tensors are on {device}")
    if host_value_checks(device):
        cu = cu_seqlens.cpu()
        if int(cu[0]) != 0:
            raise ValueError(f"{op}: {name}[0] must be 0, got {int(cu[0])}")
        if int(cu[-1]) != total:
            raise ValueError(f"{op}: {name}[-1] = {int(cu[-1])} must equal the number of packed tokens ({total})")
        steps = cu[1:] - cu[:-1]
        if bool((steps < 0).any()):
            s = int((steps < 0).nonzero()[0])
            raise ValueError(
                f"{op}: {name} must be non-decreasing: {name}[{s}] = {int(cu[s])} > {name}[{s + 1}] = {int(cu[s + 1])}"
            )
    return cu_seqlens.shape[0] - 1


def check_packed_tokens(op: str, name: str, t: torch.Tensor, cu_seqlens, *, dtypes=None) -> int:
    """A packed token tensor: 1-D (total,) plus its cu_seqlens. Returns S."""
    check_tensor(op, name, t, dtypes)
    if t.dim() != 1:
        raise ValueError(
            f"{op}: with cu_seqlens, {name} must be 1-D (total,) packed tokens, got shape {tuple(t.shape)}"
        )
    return check_cu_seqlens(op, cu_seqlens, t.shape[0], t.device)


def token_segments(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """segment_ids without the checks, for ops that have run them: one
    binary search per token (searchsorted), no host sync; every id is in
    [0, S - 1] even for offsets that are out of order, so indexing with it
    never leaves the segment arrays."""
    tokens = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    ids = torch.searchsorted(cu_seqlens[1:], tokens, right=True)
    return ids.clamp_(max=max(cu_seqlens.shape[0] - 2, 0))


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64: the segment of each packed token."""
    op = "rlhf_fast.segment_ids"
    total = check_int(op, "total", total, lo=0)
    check_cu_seqlens(op, cu_seqlens, total, cu_seqlens.device)
    return token_segments(cu_seqlens, total)


def expand_to_tokens(seq_values: torch.Tensor, cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Each segment's value broadcast over its tokens: (S, ...) -> (total, ...),
    e.g. GRPO's per-response advantages onto a packed stream. total: the
    packed length (cu_seqlens[-1], read on the host when None: one sync on
    GPU; pass it, e.g. packed.shape[0], to avoid that)."""
    op = "rlhf_fast.expand_to_tokens"
    check_tensor(op, "seq_values", seq_values)
    if seq_values.dim() < 1:
        raise ValueError(f"{op}: seq_values must be (S, ...), got a 0-dim tensor")
    if total is None:
        total = int(cu_seqlens[-1]) if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.numel() else 0
    S = check_cu_seqlens(op, cu_seqlens, total, seq_values.device)
    if seq_values.shape[0] != S:
        raise ValueError(f"{op}: seq_values has {seq_values.shape[0]} rows but cu_seqlens describes {S} segments")
    if S == 0:
        return seq_values.new_empty((0, *seq_values.shape[1:]))
    return seq_values.index_select(0, token_segments(cu_seqlens, total))


# ---------------------------------------------------------------- pack / unpack


@torch.library.custom_op("rlhf_fast::pack", mutates_args=())
def _pack_op(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keep = mask != 0
    lengths = keep.sum(dim=1, dtype=torch.int32)
    cu = torch.zeros(x.shape[0] + 1, dtype=torch.int32, device=x.device)
    torch.cumsum(lengths, dim=0, out=cu[1:])
    return x[keep], cu


@_pack_op.register_fake
def _(x, mask):
    total = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty((total, *x.shape[2:])), x.new_empty((x.shape[0] + 1,), dtype=torch.int32)


@torch.library.custom_op("rlhf_fast::unpack", mutates_args=())
def _unpack_op(packed: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, padding_value: float) -> torch.Tensor:
    S, total = cu_seqlens.shape[0] - 1, packed.shape[0]
    out = packed.new_full((S, max_len, *packed.shape[1:]), padding_value)
    if total == 0 or S == 0:
        return out
    seg = token_segments(cu_seqlens, total)
    pos = torch.arange(total, device=packed.device) - cu_seqlens.to(torch.int64).index_select(0, seg)
    # a position past max_len (only where the checks above could not run)
    # lands in a spare column that is cut off: never out of bounds
    col = torch.where((pos >= 0) & (pos < max_len), pos, torch.full_like(pos, max_len))
    wide = packed.new_full((S, max_len + 1, *packed.shape[1:]), padding_value)
    wide[seg, col] = packed
    return wide[:, :max_len].contiguous()


@_unpack_op.register_fake
def _(packed, cu_seqlens, max_len, padding_value):
    return packed.new_empty((cu_seqlens.shape[0] - 1, max_len, *packed.shape[1:]))


def pack(x: torch.Tensor, mask: torch.Tensor):
    """Padded -> packed: row b's elements where mask[b] != 0, in order, rows
    back to back. x: (B, T, ...) any dtype; mask: (B, T) bool or 0/1 (an
    attention mask: left or right padding, or holes). Returns (packed
    (total, ...), cu_seqlens (B + 1,) int32). total depends on the mask's
    values, so on GPU this reads it on the host (one sync), as any boolean
    index does."""
    op = "rlhf_fast.pack"
    check_tensor(op, "x", x)
    check_tensor(op, "mask", mask)
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be (B, T, ...), got shape {tuple(x.shape)}")
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{op}: mask must have shape (B, T) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"{op}: mask is on {mask.device} but x is on {x.device}")
    if mask.is_complex():
        raise TypeError(f"{op}: mask must be bool or a real 0/1 tensor, got {mask.dtype}")
    return _pack_op(x, mask)


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, *, padding_value: float = 0.0):
    """Packed -> padded: (total, ...) -> (S, max_len, ...), segment s in row
    s from position 0 (right padding), padding_value after it. Every segment
    must fit in max_len: checked on CPU (ValueError); on GPU, where that
    would be a host sync, the tokens of a longer segment past max_len are
    dropped (set RLHF_FAST_CHECK_INPUTS=1 to check there too)."""
    op = "rlhf_fast.unpack"
    check_tensor(op, "packed", packed)
    if packed.dim() < 1:
        raise ValueError(f"{op}: packed must be (total, ...), got a 0-dim tensor")
    max_len = check_int(op, "max_len", max_len, lo=0)
    S = check_cu_seqlens(op, cu_seqlens, packed.shape[0], packed.device)
    if host_value_checks(packed.device) and S > 0:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).cpu()
        if int(lengths.max()) > max_len:
            s = int(lengths.argmax())
            raise ValueError(f"{op}: segment {s} has {int(lengths[s])} tokens, more than max_len={max_len}")
    return _unpack_op(packed, cu_seqlens, max_len, float(padding_value))
