"""Vocab-parallel log-probs and entropy: exact results on tensor-parallel
vocabulary shards, with O(tokens) communication.

Each rank of a process group holds the logits (..., V_r) of a contiguous
vocabulary range [vocab_start, vocab_start + V_r) (Megatron's
ColumnParallelLinear output, torch's loss-parallel DTensor Shard(-1)), or the
rows (V_r, H) of the lm_head for the fused linear variant. Every rank gets the
same fp32 log p(label) and entropy of softmax(z), z = logits / T, over the
full vocabulary, and backward gives each rank the gradient of its own shard.

Naming chain: no kernels of its own (the log-prob family's
rlhf_fast::logprobs_fwd / _bwd and logprobs_fwd_triton / _bwd_triton run on
each shard) -> rlhf_fast.vocab_parallel_logprobs /
vocab_parallel_linear_logprobs -> _reference_fwd / _reference_bwd here and
reference.logprobs_from_logits on the gathered logits ->
tests/test_vocab_parallel.py -> benchmarks/bench_vocab_parallel.py.

How the local work reuses the single-device kernels (no second row math):
the registered op rlhf_fast::logprobs_fwd (C++ on CPU, Triton / CUDA on GPU)
already returns, per row of a shard, its raw max m_r, log s_r (s_r = sum
exp((x - m_r) / T)) and the shard's entropy ent_r = log s_r - w_r/s_r, all
in shifted coordinates, and the owning rank's own log-prob of the label,
lp_r = (x_y - m_r) / T - log s_r (exact to the row's spread at any offset):
all the merge needs. With M = max_r m_r (one MAX all-reduce of the raw
maxima), a_r = (m_r - M) / T + log s_r (the shard's log-mass relative to
exp(M / T), exact to the spread: lse_r - max lse cancelled two numbers of
the offset's size), S_r = exp(a_r) and the chain rule of entropy,
H = sum_r q_r ent_r + H(q), q_r = S_r / S:

    S = sum_r S_r,  U = sum_r S_r * (ent_r - a_r),  Z = lp_r + a_r  (one SUM all-reduce of (3, N))
    log s = log S (relative to M),  log p = Z - log S,  H = log S + U / S

Every term of U is >= 0 and log S >= 0, so H is a sum of non-negative terms
(no cancellation of large logits). Per token: 4 fp32 values sent, 16 bytes,
whatever V is. A small validation all-reduce (2W + 20 int64, independent of
N and V) checks the shard layout and the label shape first; validate=False
drops it for a hot loop whose layout is known. One rank returns its row
op's outputs as they are (the single-device bits).

Backward calls rlhf_fast::logprobs_bwd with the *global* shift M, log S and
entropy: p = exp((x - M) / T - log S) and E_p[d] = log S - H, i.e. the
global softmax restricted to the shard, every term of the row's spread
(the label's logit, the other natural anchor, may live on another rank).
No communication (the outputs are
replicated, so every rank receives the same upstream gradient, as with
Megatron's vocab_parallel_cross_entropy). A row whose label lives on another
rank is run with local label 0 (the op needs a label in [0, V_r)); its one
wrong element, which got the + g_lp / T of the one-hot, is recomputed from
the same formula (N elements, O(tokens)).

The linear variant runs token chunks of hidden @ W_r.T + b_r through the same
two ops (what linear_logprobs does on CPU), not the fused linear op: that op
has no way to leave out the one-hot of a label that is not in the shard,
and fixing its dW / dH afterwards would cancel bf16-rounded terms. dH is
all-reduced once in backward (in fp32 for bf16 / fp16 inputs).

With nothing compiled (backend "reference"), _reference_fwd / _reference_bwd
stand in for the two ops, from torch reductions over the shard, as every op's
reference fallback does. Not traceable by torch.compile (one host sync per
call, process-group arguments): call it outside the compiled region.

A row whose shard is entirely -inf gives NaN from the kernel (log 0 - ...);
those rows alone (found with one host sync, shared with the label check)
are re-checked and count as S_r = 0, so a row whose only finite logits are
on another rank is exact. NaN or +inf logits still give NaN for the row.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from .. import _backend
from .._dtypes import acc_dtype
from ._common import as_rows, check_positive_float
from ._linear_logprobs import _row_chunks, check_linear_inputs, default_chunk_size
from ._logprobs import check_logits_labels

OP = "rlhf_fast.vocab_parallel_logprobs"
OP_LINEAR = "rlhf_fast.vocab_parallel_linear_logprobs"
IMPLEMENTED = ("triton", "cuda", "cpp")
_LOCAL_IGNORE = -1  # local labels are in [0, V_r): -1 marks an ignored row for the row ops
_MAX_DIMS = 8  # label dims compared by the validation all-reduce


@dataclasses.dataclass(frozen=True)
class _Layout:
    group: object  # ProcessGroup or None (no process group: one rank)
    world: int
    vocab_start: int
    local_size: int
    vocab_size: int


# ---------------------------------------------------------------- layout and checks


def _group_and_world(group):
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return None, 1
    group = group if group is not None else dist.group.WORLD
    return group, dist.get_world_size(group)


def _layout(op, group, vocab_start, local_size, vocab_size, labels, validate) -> _Layout:
    """Checks that the shards tile [0, V) and that every rank has labels of
    one shape, with one all-reduce of 2W + 2 + 2 * (1 + _MAX_DIMS) int64."""
    group, world = _group_and_world(group)
    if vocab_start is not None and (
        isinstance(vocab_start, bool) or int(vocab_start) != vocab_start or vocab_start < 0
    ):
        raise ValueError(f"{op}: vocab_start must be an int >= 0, got {vocab_start!r}")
    if world == 1:
        if vocab_start not in (None, 0):
            raise ValueError(
                f"{op}: a group of size 1 holds the whole vocabulary, so vocab_start must be 0, got {vocab_start}"
            )
        if vocab_size is not None and vocab_size != local_size:
            raise ValueError(f"{op}: the shards do not tile [0, vocab_size={vocab_size}): one rank holds {local_size}")
        return _Layout(group, 1, 0, local_size, local_size)
    if not validate:
        if vocab_start is None or vocab_size is None:
            raise ValueError(
                f"{op}: validate=False needs vocab_start and vocab_size (nothing is exchanged to infer them)"
            )
        if not (0 <= vocab_start and vocab_start + local_size <= vocab_size):
            raise ValueError(
                f"{op}: shard [{vocab_start}, {vocab_start + local_size}) is outside [0, vocab_size={vocab_size})"
            )
        return _Layout(group, world, int(vocab_start), local_size, int(vocab_size))
    rank = dist.get_rank(group)
    # gloo reduces CPU tensors; NCCL needs them on the labels' GPU
    dev = torch.device("cpu") if dist.get_backend(group) == "gloo" else labels.device
    shape = list(labels.shape)
    if len(shape) > _MAX_DIMS:
        shape = shape[: _MAX_DIMS - 1] + [labels.numel()]
    shape = [len(labels.shape)] + shape + [0] * (_MAX_DIMS - len(shape))
    meta = torch.full((2 * world + 2 + 2 * len(shape),), -1, dtype=torch.int64)
    meta[rank] = -1 if vocab_start is None else int(vocab_start)
    meta[world + rank] = local_size
    vs = -1 if vocab_size is None else int(vocab_size)
    meta[2 * world : 2 * world + 2] = torch.tensor([vs, -vs if vocab_size is not None else -(2**62)])
    tail = torch.tensor(shape, dtype=torch.int64)
    meta[2 * world + 2 :] = torch.cat([tail, -tail])
    meta = meta.to(dev)
    dist.all_reduce(meta, op=dist.ReduceOp.MAX, group=group)
    meta = meta.cpu().tolist()
    starts, sizes = meta[:world], meta[world : 2 * world]
    k = len(shape)
    if meta[2 * world + 2 : 2 * world + 2 + k] != [-x for x in meta[2 * world + 2 + k :]]:
        raise ValueError(
            f"{op}: labels have different shapes across the group's ranks (this rank: {tuple(labels.shape)}); "
            "every rank must pass the same labels"
        )
    if vocab_size is not None and (meta[2 * world] != vocab_size or -meta[2 * world + 1] != vocab_size):
        raise ValueError(f"{op}: ranks passed different vocab_size values (this rank: {vocab_size})")
    if all(s == -1 for s in starts):  # none given: shards in rank order
        starts = [sum(sizes[:r]) for r in range(world)]
    elif any(s == -1 for s in starts):
        raise ValueError(f"{op}: some ranks passed vocab_start and some did not; pass it on every rank or none")
    total = sum(sizes)
    order = sorted(range(world), key=lambda r: (starts[r], sizes[r]))
    pos = 0
    for r in order:
        if starts[r] != pos:
            shards = ", ".join(f"rank {q}: [{starts[q]}, {starts[q] + sizes[q]})" for q in range(world))
            raise ValueError(
                f"{op}: the vocabulary shards do not tile [0, {total}) (gap or overlap at {pos}): {shards}"
            )
        pos += sizes[r]
    if vocab_size is not None and total != vocab_size:
        raise ValueError(f"{op}: the shards tile [0, {total}) but vocab_size is {vocab_size}")
    return _Layout(group, world, starts[rank], local_size, total)


def _check_labels_identical(op, labels, layout: _Layout) -> None:
    """Debug check: max and -min of the labels over the group agree with this
    rank's labels (2N int64 sent)."""
    if layout.world == 1 or labels.numel() == 0:
        return
    y = labels.reshape(-1).to(torch.int64)
    both = torch.cat([y, -y])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=layout.group)
    n = y.numel()
    if not (torch.equal(both[:n], y) and torch.equal(-both[n:], y)):
        raise ValueError(
            f"{op}: labels differ across the group's ranks (check_labels=True); every rank needs the same labels"
        )


def _local_labels(labels, layout: _Layout, ignore_index: int):
    """(local label, owned, active): local label in [0, V_r) on every active
    row (0 where the label is on another rank), _LOCAL_IGNORE on ignored rows."""
    y = labels.to(torch.int64)
    active = y != ignore_index
    local = y - layout.vocab_start
    owned = active & (local >= 0) & (local < layout.local_size)
    dummy = torch.where(active, torch.zeros_like(local), torch.full_like(local, _LOCAL_IGNORE))
    return torch.where(owned, local, dummy), owned, active


def _inv_t(temperature: float, acc: torch.dtype) -> float:
    # the kernels multiply by 1/T rounded to the accumulation dtype
    return float(torch.tensor(1.0 / temperature, dtype=acc))


def _all_reduce(t: torch.Tensor, op, layout: _Layout) -> None:
    if layout.world > 1:
        dist.all_reduce(t, op=op, group=layout.group)


# ---------------------------------------------------------------- the local row ops


def _row_ops(backend: str):
    if backend == "triton":
        return torch.ops.rlhf_fast.logprobs_fwd_triton, torch.ops.rlhf_fast.logprobs_bwd_triton
    if backend == "reference":
        return _reference_fwd, _reference_bwd
    return torch.ops.rlhf_fast.logprobs_fwd, torch.ops.rlhf_fast.logprobs_bwd


def _reference_fwd(rows, labels, temperature, ignore_index, compute_entropy):
    """Fallback when nothing is compiled: the op's (lp, ent, row_max, log_s)
    from torch reductions over one (A, B, V_r) float copy."""
    from ..reference import logprobs_from_logits as ref

    acc = acc_dtype(rows.dtype)
    lp, ent = ref(rows, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=True)
    x = rows.to(acc)
    m = x.amax(-1)
    log_s = torch.logsumexp((x - m.unsqueeze(-1)) * _inv_t(temperature, acc), dim=-1)
    keep = labels != ignore_index
    zero = torch.zeros_like(m)
    ent = ent if compute_entropy else zero
    return lp, ent, torch.where(keep, m, zero), torch.where(keep, log_s, zero)


def _reference_bwd(g_lp, g_h, rows, labels, row_max, log_s, entropy, temperature, ignore_index):
    acc = acc_dtype(rows.dtype)
    d = (rows.to(acc) - row_max.unsqueeze(-1)) * _inv_t(temperature, acc)
    p = torch.exp(d - log_s.unsqueeze(-1))
    t = torch.where(p > 0, p * (d - (log_s - entropy).unsqueeze(-1)), torch.zeros_like(p))
    active = labels != ignore_index
    onehot = torch.zeros_like(p).scatter_(-1, torch.where(active, labels, 0).long().unsqueeze(-1), 1.0)
    g_h = g_h if g_h is not None else torch.zeros_like(g_lp)
    dz = (g_lp.unsqueeze(-1) * (onehot - p) - g_h.unsqueeze(-1) * t) / temperature
    return torch.where(active.unsqueeze(-1), dz, torch.zeros_like(dz)).to(rows.dtype)


def _shard_stats(fwd, rows, labels_local, owned, temperature):
    """Per row of a (A, B, V_r) shard: m_r, log s_r, ent_r (log s_r NaN for
    an all -inf shard row, fixed in _merge) and the owned label's log-prob
    within the shard (0 elsewhere)."""
    acc = acc_dtype(rows.dtype)
    if rows.shape[-1] == 0:  # an empty shard (V < world size under DTensor chunking)
        neg = torch.full(rows.shape[:2], float("-inf"), dtype=acc, device=rows.device)
        return neg, neg, torch.zeros_like(neg), torch.zeros_like(neg)
    lp_r, ent, m_r, log_s_r = fwd(rows, labels_local, temperature, _LOCAL_IGNORE, True)
    # the owned label's log-prob within the shard, (x_y - m_r) / T - log s_r:
    # exact to the row's spread, where z_y - lse would cancel the offset
    return m_r, log_s_r, ent, torch.where(owned, lp_r, torch.zeros_like(lp_r))


def _merge(op, stats_r, active, labels, rows_of, layout: _Layout, owned, temperature):
    """Shard statistics (m_r, log s_r, ent_r, lp_r) -> global (logprobs,
    entropy, row max, log s): one MAX of (N,) and one SUM all-reduce of
    (3, N) values. rows_of(idx) returns the shard rows idx (for the rare
    all -inf check)."""
    m_r, log_s_r, ent_r, lp_r = stats_r
    bad = active & torch.isnan(log_s_r)
    out_of_range = active & ((labels < 0) | (labels >= layout.vocab_size))
    flags = torch.stack([bad.any(), out_of_range.any()]).tolist()  # one host sync
    if flags[1]:
        idx = out_of_range.nonzero()[0]
        raise ValueError(
            f"{op}: label {int(labels[tuple(idx)])} at position {tuple(idx.tolist())} is outside "
            f"[0, V={layout.vocab_size}) and is not ignore_index"
        )
    if layout.world == 1:  # the row op's own outputs: the single-device bits
        return lp_r, ent_r, m_r, log_s_r
    fix = torch.zeros_like(bad)
    if flags[0]:
        idx = bad.nonzero(as_tuple=True)
        empty = (rows_of(idx) == float("-inf")).all(-1)
        fix[idx] = empty
        neg = torch.full_like(log_s_r, float("-inf"))
        m_r, log_s_r = torch.where(fix, neg, m_r), torch.where(fix, neg, log_s_r)
        ent_r = torch.where(fix, torch.zeros_like(ent_r), ent_r)
    m = torch.where(torch.isnan(m_r), torch.full_like(m_r, float("-inf")), m_r)
    _all_reduce(m, dist.ReduceOp.MAX, layout)
    ref = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    # (m_r - M) / T + log s_r: the shard's log-mass against exp(M / T); NaN
    # rows stay NaN and reach S through the SUM
    a = (m_r - ref) * _inv_t(temperature, m_r.dtype) + log_s_r
    s_r = torch.exp(a)
    u_r = torch.where(s_r > 0, s_r * (ent_r - a), torch.zeros_like(s_r))
    # log p = lp_r + a_r - log S, from the owning rank's lp_r; a label on an
    # all -inf shard row is a -inf token
    z = torch.where(owned, torch.where(fix, torch.full_like(a, float("-inf")), lp_r + a), torch.zeros_like(a))
    stats = torch.stack([s_r, u_r, z])
    _all_reduce(stats, dist.ReduceOp.SUM, layout)
    s, u, z = stats.unbind(0)
    log_s = torch.log(s)
    zero = torch.zeros_like(s)
    nan = torch.full_like(s, float("nan"))
    ent = torch.where(active, torch.where(s > 0, log_s + u / s, nan), zero)
    lp = torch.where(active, torch.where(s > 0, z - log_s, nan), zero)
    return lp, ent, torch.where(active, ref, zero), torch.where(active, log_s, zero)


def _fix_foreign_label(dz, rows, owned, active, g_lp, g_h, row_max, log_s, ent, temperature):
    """Rows whose label is on another rank ran with local label 0: recompute
    element 0 without the one-hot, from the formula the op uses,
    dz = (g_lp * (onehot - p) - g_h * p * (d - E_p[d])) / T,
    d = (x - M) / T, p = exp(d - log S), E_p[d] = log S - H."""
    if rows.shape[-1] == 0:
        return dz
    acc = log_s.dtype
    inv_t = _inv_t(temperature, acc)
    d0 = (rows[..., 0].to(acc) - row_max) * inv_t
    p0 = torch.exp(d0 - log_s)
    t0 = torch.where(p0 > 0, p0 * (d0 - (log_s - ent)), torch.zeros_like(p0))
    g_h = g_h if g_h is not None else torch.zeros_like(g_lp)
    val = (-g_lp * p0 - g_h * t0) * inv_t
    foreign = active & ~owned
    dz[..., 0] = torch.where(foreign, val.to(dz.dtype), dz[..., 0])
    return dz


# ---------------------------------------------------------------- logits variant


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, layout, temperature, ignore_index, backend):
        fwd, bwd = _row_ops(backend)
        rows = as_rows(logits)
        A, B = rows.shape[:2]
        y = labels.reshape(A, B)
        local, owned, active = _local_labels(y, layout, ignore_index)
        stats_r = _shard_stats(fwd, rows, local, owned, temperature)
        lp, ent, row_max, log_s = _merge(OP, stats_r, active, y, lambda idx: rows[idx], layout, owned, temperature)
        ctx.save_for_backward(rows, local, owned, active, row_max, log_s, ent)
        ctx.args = (temperature, bwd, tuple(logits.shape))
        ctx.set_materialize_grads(False)
        return lp.reshape(labels.shape), ent.reshape(labels.shape)

    @staticmethod
    def backward(ctx, g_lp, g_h):
        rows, local, owned, active, row_max, log_s, ent = ctx.saved_tensors
        temperature, bwd, shape = ctx.args
        if g_lp is None and g_h is None:
            return None, None, None, None, None, None
        g_lp = g_lp.reshape(ent.shape).to(ent.dtype) if g_lp is not None else torch.zeros_like(ent)
        g_h = g_h.reshape(ent.shape).to(ent.dtype) if g_h is not None else None
        if rows.shape[-1] == 0:
            return rows.new_zeros(shape), None, None, None, None, None
        dz = bwd(g_lp, g_h, rows, local, row_max, log_s, ent, temperature, _LOCAL_IGNORE)
        dz = _fix_foreign_label(dz, rows, owned, active, g_lp, g_h, row_max, log_s, ent, temperature)
        return dz.reshape(shape), None, None, None, None, None


def _unwrap_vocab_dtensor(op, name, sharded, dim, tensors, out_like):
    """One helper for both DTensor entry points.

    sharded: the DTensor whose vocabulary dim `dim` (-1 for logits, 0 for the
        lm_head weight) is Shard(dim) on exactly one mesh dim, with no Partial.
    tensors: the arguments to make local (DTensors, plain tensors or None).
    out_like: the outputs take its placements (a DTensor; otherwise all
        Replicate), with the vocabulary's mesh dim made Replicate.
    Returns (the local tensors, group, vocab_start, V, rewrap(out))."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    d = dim % sharded.ndim
    mesh = sharded.device_mesh
    vocab_dims = [i for i, p in enumerate(sharded.placements) if isinstance(p, Shard) and p.dim % sharded.ndim == d]
    if len(vocab_dims) != 1 or any(isinstance(p, Partial) for p in sharded.placements):
        raise ValueError(
            f"{op}: a DTensor {name} needs Shard({dim}) on exactly one mesh dim and no Partial, "
            f"got {sharded.placements}"
        )
    mdim = vocab_dims[0]
    vocab_size = int(sharded.shape[d])
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(sharded.shape, mesh, sharded.placements)
        start = int(offset[d])
    except ImportError:  # torch's chunk rule: ceil(V / n) per rank
        n, r = mesh.size(mdim), mesh.get_local_rank(mdim)
        start = min(vocab_size, -(-vocab_size // n) * r)
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    if isinstance(out_like, DTensor):
        out_placements = [Replicate() if i == mdim else p for i, p in enumerate(out_like.placements)]
    else:
        out_placements = [Replicate()] * mesh.ndim

    def rewrap(t):
        return DTensor.from_local(t, mesh, out_placements, run_check=False)

    return local, mesh.get_group(mdim), start, vocab_size, rewrap


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    group=None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    validate: bool = True,
    check_labels: bool = False,
):
    """log p(label) (and entropy) under softmax(logits / T) over a vocabulary
    sharded across `group`.

    logits: (..., V_r), this rank's contiguous vocabulary range
        [vocab_start, vocab_start + V_r); any leading shape and strides, as in
        logprobs_from_logits. Or a DTensor with Shard(-1) on one mesh dim
        (group, vocab_start and V are read from it; the outputs are DTensors
        replicated on that mesh dim).
    labels: (...) int32 / int64 *global* token ids, the same on every rank.
    group: the tensor-parallel process group (default: the world; with no
        process group initialised, one rank holding all of V).
    vocab_start: this rank's offset; None: shards in rank order (read from
        the validation all-reduce, so validate must be True).
    vocab_size: V, checked against the shards when given.
    validate: one small all-reduce (2W + 20 int64) that checks the shards
        tile [0, V) and the labels have one shape on every rank.
    check_labels: debug: also check the labels are identical (2N int64).
    Returns fp32 (fp64 for fp64 logits) logprobs (...), identical on every
    rank, and with return_entropy=True (logprobs, entropy). ignore_index rows
    give 0 and no gradient. Backward: each rank gets its shard's gradient.
    """
    rewrap = None
    if _is_dtensor(logits):
        if group is not None or vocab_start is not None:
            raise ValueError(f"{OP}: group and vocab_start come from the DTensor; do not pass them")
        unwrapped = _unwrap_vocab_dtensor(OP, "logits", logits, -1, (logits, labels), logits)
        (logits, labels), group, vocab_start, v_dt, rewrap = unwrapped
        vocab_size = v_dt if vocab_size is None else vocab_size
    check_logits_labels(OP, logits, labels, v_name="V_r")
    temperature = check_positive_float(OP, "temperature", temperature)
    layout = _layout(OP, group, vocab_start, logits.shape[-1], vocab_size, labels, validate)
    if check_labels:
        _check_labels_identical(OP, labels, layout)
    backend = _backend.choose("logprobs_from_logits", logits.device, IMPLEMENTED)
    lp, ent = _VocabParallelLogprobs.apply(logits, labels, layout, temperature, int(ignore_index), backend)
    if rewrap is not None:
        lp, ent = rewrap(lp), rewrap(ent)
    return (lp, ent) if return_entropy else lp


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


# ---------------------------------------------------------------- fused linear variant


class _VocabParallelLinearLogprobs(torch.autograd.Function):
    @staticmethod
    @torch.autocast("cpu", enabled=False)  # the chunk GEMMs keep the inputs' dtype
    def forward(ctx, hidden, weight, bias, labels, layout, temperature, ignore_index, chunk_size, backend):
        fwd, bwd = _row_ops(backend)
        h = hidden.reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1)
        local, owned, active = _local_labels(y, layout, ignore_index)
        acc = acc_dtype(hidden.dtype)
        stats_r = tuple(h.new_zeros(y.shape, dtype=acc) for _ in range(4))  # m_r, log s_r, ent_r, lp_r
        for rows in _row_chunks(local, _LOCAL_IGNORE, chunk_size):
            logits = torch.nn.functional.linear(h[rows], weight, bias).unsqueeze(0)
            stats = _shard_stats(fwd, logits, local[rows].unsqueeze(0), owned[rows].unsqueeze(0), temperature)
            for dst, src in zip(stats_r, stats):
                dst[rows] = src[0]
            del logits

        def rows_of(idx):
            return torch.nn.functional.linear(h[idx[0]], weight, bias)

        lp, ent, row_max, log_s = _merge(OP_LINEAR, stats_r, active, y, rows_of, layout, owned, temperature)
        ctx.save_for_backward(h, weight, bias, local, owned, active, row_max, log_s, ent)
        ctx.args = (layout, temperature, chunk_size, bwd, tuple(hidden.shape))
        ctx.set_materialize_grads(False)
        return lp.reshape(labels.shape), ent.reshape(labels.shape)

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, g_lp, g_h):
        h, weight, bias, local, owned, active, row_max, log_s, ent = ctx.saved_tensors
        layout, temperature, chunk_size, bwd, shape = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        none = (None,) * 6
        if g_lp is None and g_h is None:
            return (None, None, None) + none
        acc = ent.dtype
        g_lp = g_lp.reshape(-1).to(acc) if g_lp is not None else torch.zeros_like(ent)
        g_h = g_h.reshape(-1).to(acc) if g_h is not None else None
        N, H = h.shape
        # dH summed over the group in fp32 for bf16 / fp16: one rounding at the end
        d_h = h.new_zeros((N, H), dtype=acc)
        d_w = weight.new_zeros(weight.shape, dtype=acc)
        d_b = weight.new_zeros((weight.shape[0],), dtype=acc) if bias is not None else None
        if weight.shape[0] > 0:
            for rows in _row_chunks(local, _LOCAL_IGNORE, chunk_size):
                hc = h[rows]
                logits = torch.nn.functional.linear(hc, weight, bias).unsqueeze(0)
                gl, lc, lc_m, lc_s, lc_ent = (t[rows].unsqueeze(0) for t in (g_lp, local, row_max, log_s, ent))
                gh = g_h[rows].unsqueeze(0) if g_h is not None else None
                dz = bwd(gl, gh, logits, lc, lc_m, lc_s, lc_ent, temperature, _LOCAL_IGNORE)
                own, act = owned[rows].unsqueeze(0), active[rows].unsqueeze(0)
                dz = _fix_foreign_label(dz, logits, own, act, gl, gh, lc_m, lc_s, lc_ent, temperature)[0]
                del logits
                if need_h:
                    d_h[rows] = (dz @ weight).to(acc)
                if need_w:
                    d_w.addmm_(dz.t().to(acc), hc.to(acc))
                if need_b and d_b is not None:
                    d_b += dz.sum(0, dtype=acc)
                del dz
        if need_h:
            _all_reduce(d_h, dist.ReduceOp.SUM, layout)  # the one O(N * H) collective
        grad_h = d_h.to(h.dtype).reshape(shape) if need_h else None
        grad_w = d_w.to(weight.dtype) if need_w else None
        grad_b = d_b.to(weight.dtype) if (need_b and d_b is not None) else None
        return (grad_h, grad_w, grad_b) + none


def vocab_parallel_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    group=None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    validate: bool = True,
    check_labels: bool = False,
):
    """log p(label) (and entropy) under softmax((hidden @ W.T + b) / T) with
    the lm_head W sharded by vocabulary rows across `group`, without the
    (N, V) logits: token chunks of (chunk_size, V_r) logits at a time.

    hidden: (..., H), replicated on the group (do not also pass it through
        Megatron's copy_to_tensor_model_parallel_region: dH is all-reduced
        here, once, in backward).
    weight: (V_r, H), rows [vocab_start, vocab_start + V_r) of the lm_head
        (ColumnParallelLinear's shard), or a DTensor with Shard(0); bias:
        (V_r,) or None (or a DTensor Shard(0)).
    labels, group, vocab_start, vocab_size, temperature, ignore_index,
    validate, check_labels: as vocab_parallel_logprobs.
    Backward: dW / db of this rank's shard (summed over tokens in fp32,
    rounded once), dH identical on every rank.
    """
    rewrap = None
    if _is_dtensor(weight):
        if group is not None or vocab_start is not None:
            raise ValueError(f"{OP_LINEAR}: group and vocab_start come from the DTensor weight; do not pass them")
        unwrapped = _unwrap_vocab_dtensor(OP_LINEAR, "weight", weight, 0, (hidden, weight, bias, labels), hidden)
        (hidden, weight, bias, labels), group, vocab_start, v_dt, rewrap = unwrapped
        vocab_size = v_dt if vocab_size is None else vocab_size
    hidden, weight, bias = check_linear_inputs(OP_LINEAR, hidden, weight, bias, labels, chunk_size, v_name="V_r")
    temperature = check_positive_float(OP_LINEAR, "temperature", temperature)
    layout = _layout(OP_LINEAR, group, vocab_start, weight.shape[0], vocab_size, labels, validate)
    if check_labels:
        _check_labels_identical(OP_LINEAR, labels, layout)
    backend = _backend.choose("logprobs_from_logits", hidden.device, IMPLEMENTED)
    n = labels.numel()
    chunk = chunk_size or default_chunk_size(n, max(weight.shape[0], 1), hidden.device)
    lp, ent = _VocabParallelLinearLogprobs.apply(
        hidden, weight, bias, labels, layout, temperature, int(ignore_index), max(1, min(chunk, max(n, 1))), backend
    )
    if rewrap is not None:
        lp, ent = rewrap(lp), rewrap(ent)
    return (lp, ent) if return_entropy else lp
