"""rlhf_fast.linear_ppo_loss: the PPO / GRPO actor loss straight from hidden
states and the lm_head, with dH, dW (and d bias) computed in the forward.

Naming chain: linear_ppo_loss_fwd_cpu (here: token chunks through at::mm and
the C++ row ops logprobs_fwd / logprobs_bwd / ppo_loss_fwd) ->
torch.ops.rlhf_fast.linear_ppo_loss_fwd -> rlhf_fast.linear_ppo_loss ->
reference.linear_ppo_loss -> tests/test_linear_ppo_loss.py ->
benchmarks/bench_linear_ppo_loss.py.

Why the gradients are in the forward: the loss is known there, and every
per-token upstream gradient of it is token-local once three things are
fixed, all of which depend only on the mask and old / rollout log-probs:
the aggregation weight of each row (row_scale), the rollout-correction
weight w and the kept mask after rejection. They come from one O(N) pass of
ppo_loss_fwd before the chunk loop. Per chunk of tokens then:
  GEMM 1  logits = h_c W^T (+ b)          -> logprobs_fwd: lp, entropy, row max, log s
          g_lp = row_scale * d loss_tok / d lp (here, torch on the chunk's
          (c,) vectors), g_H = -entropy_coef * row_scale
          logprobs_bwd                      -> dz (c, V)
  GEMM 2  dH_c = dz W
  GEMM 3  dW += dz^T h_c,  db += sum dz
3 GEMMs, against 4 for linear_logprobs then ppo_loss (its backward
recomputes the logits). After the loop one more O(N) ppo_loss_fwd pass on
the detached log-probs gives the loss and the stats, bit for bit those of
ppo_loss on the same log-probs. Backward only scales dH, dW, db by the
upstream scalar. Scratch: one (c_pad, V) logits buffer and the chunk's dz,
2 * c * V * 4 bytes, independent of N (default 8 MiB each, 64 rows at
V = 32000).
"""

from __future__ import annotations

import torch

from .. import _backend
from .._dtypes import acc_dtype
from ._autograd import register_autograd
from ._common import (
    FLOAT_DTYPES,
    check_int,
    check_labels_in_range,
    check_same_device,
    check_temperature,
    check_tensor,
    host_value_checks,
    is_compiling,
    once_differentiable,
)
from ._linear_logprobs import GEMM_ROW_MULTIPLE, check_linear_inputs, linear_logprobs
from ._packing import check_cu_seqlens, token_segments
from ._ppo_loss import (
    BASE_STATS,
    LOSS_STATS,
    MASK_DTYPES,
    _check_agg,
    _check_clips,
    _check_coef,
    _check_kind,
    _check_rollout,
    ppo_loss,
)
from ._processed_logprobs import token_params

OP = "rlhf_fast.linear_ppo_loss"
IMPLEMENTED = ("cpp", "triton")  # triton: the two-op path on the Triton kernels
NO_CORRECTION = ("none", 2.0, None, "none", 0.0, 0.0)  # ppo_loss_fwd's rc_* defaults
LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0

# 8 MiB of fp32 logits per chunk: 64 rows at V = 32000 (16 at V >= 131072,
# then 8.4-9.7 MiB). Two such buffers (logits, dz) are the working set, 16
# MiB at V = 32000 against 2 x 24 MiB for linear_logprobs' default; at H =
# 256 one thread ran the 3 GEMMs at 64 rows within ~10% of 256 rows (noisy,
# shared 2-core machine), so the smaller tile costs little time.
CHUNK_BYTES = 8 * 2**20
MIN_CHUNK_ROWS = 16


def default_chunk_size(V: int) -> int:
    rows = CHUNK_BYTES // (4 * max(V, 1))
    return max(MIN_CHUNK_ROWS, rows // GEMM_ROW_MULTIPLE * GEMM_ROW_MULTIPLE)


# ---------------------------------------------------------------- token-local PPO math


def token_grad(lp, old, adv, ref, w, *, clip_low, clip_high, dual_clip, kl_coef, kl_kind):
    """d loss_tok / d lp for kept tokens, (c,) in lp's dtype: the clipped
    surrogate (times the stop-gradient rollout weight w) plus kl_coef times
    the KL estimator's derivative. The same selects as the fused C++ loss
    (csrc/cpu/ppo_policy_loss.cpp, policy_tok): torch's gradient of max / min
    (half to each side on a tie), clamps pass the gradient at their bounds."""
    zero = torch.zeros((), dtype=lp.dtype)
    x = lp - old
    r = torch.exp(x.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    l1 = -adv * r  # also d l1 / d x
    l2 = -adv * r.clamp(lo, hi)
    g2 = torch.where((r >= lo) & (r <= hi), l1, zero)
    dl = torch.where(l1 > l2, l1, torch.where(l2 > l1, g2, 0.5 * (l1 + g2)))
    if dual_clip is not None:
        l3 = -adv * dual_clip
        c1 = torch.maximum(l1, l2)
        d2 = torch.where(c1 < l3, dl, torch.where(c1 > l3, zero, 0.5 * dl))
        dl = torch.where(adv < 0, d2, dl)
    dl = torch.where((x >= -LOG_RATIO_CLAMP) & (x <= LOG_RATIO_CLAMP), dl, zero)
    if w is not None:
        dl = dl * w
    if ref is None or kl_coef == 0.0:
        return dl
    d = lp - ref
    if kl_kind == "k1":
        dk = torch.ones_like(d)
    elif kl_kind == "k2":
        dk = d
    elif kl_kind == "abs":
        dk = torch.sign(d)
    else:  # k3 = clamp(exp(k) - k - 1, +-10), k = clamp(-d, +-20)
        e = torch.exp((-d).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        kld = e - (-d).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) - 1
        ok = (d.abs() <= LOG_RATIO_CLAMP) & (kld.abs() <= K3_CLAMP)
        dk = torch.where(ok, 1 - e, zero)
    return dl + kl_coef * dk


# ---------------------------------------------------------------- layout


class _Rows:
    """The token tensors' (B, T) row view for ppo_loss_fwd: the padded layout
    as it is; the packed one scattered to (S, longest segment), right padded.
    `flat` maps a (B, T) tensor back to the N hidden rows' order."""

    def __init__(self, labels: torch.Tensor, cu_seqlens: torch.Tensor | None):
        self.shape = labels.shape
        if cu_seqlens is None:
            self.B, self.T = labels.shape
            self.seg = self.pos = None
            return
        N, S = labels.shape[0], cu_seqlens.shape[0] - 1
        cu = cu_seqlens.to(torch.int64)
        lengths = cu[1:] - cu[:-1]
        self.B, self.T = S, int(lengths.max()) if S > 0 else 0  # one host read on GPU
        self.seg = token_segments(cu, N)
        self.pos = torch.arange(N, device=labels.device) - cu.index_select(0, self.seg)

    def rows(self, x: torch.Tensor | None, fill=0):
        if x is None:
            return None
        if self.seg is None:
            return x.reshape(self.B, self.T)
        out = x.new_full((self.B, self.T), fill)
        out[self.seg, self.pos] = x
        return out

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1) if self.seg is None else x[self.seg, self.pos]


# ---------------------------------------------------------------- the CPU kernel


def _ppo_fwd(lp, old, adv, mask, ent, ref, a):
    return torch.ops.rlhf_fast.ppo_loss_fwd(
        lp, old, adv, mask, ent, ref, a["entropy_coef"], a["kl_coef"], a["kl_kind"], a["clip_low"],
        a["clip_high"], a["dual_clip"], a["agg"], a["agg_norm"], a["rollout"], *a["rc"],
    )  # fmt: skip


@torch.autocast("cpu", enabled=False)
def linear_ppo_loss_fwd_cpu(
    hidden, weight, bias, labels, old, adv, mask, ref, rollout, cu_seqlens, temperature, sampling, filtered,
    ignore_index, entropy_coef, kl_coef, kl_kind, clip_low, clip_high, dual_clip, agg, agg_norm,
    rc_is, rc_is_upper, rc_is_lower, rc_rs, rc_rs_lower, rc_rs_upper, chunk_size, need_dh, need_dw, need_db,
):  # fmt: skip
    shape = hidden.shape
    H, V = shape[-1], weight.shape[0]
    hidden = hidden.reshape(labels.numel(), H)  # a view unless the leading dims are strided
    N = hidden.shape[0]
    acc = acc_dtype(hidden.dtype)
    lay = _Rows(labels, cu_seqlens)
    mask_r = lay.rows(mask, False)
    a = dict(
        entropy_coef=entropy_coef, kl_coef=kl_coef, kl_kind=kl_kind, clip_low=clip_low, clip_high=clip_high,
        dual_clip=dual_clip, agg=agg, agg_norm=float(max(lay.T, 1)) if agg_norm is None else agg_norm,
        rollout=lay.rows(rollout), rc=(rc_is, rc_is_upper, rc_is_lower, rc_rs, rc_rs_lower, rc_rs_upper),
    )  # fmt: skip
    old_r = lay.rows(old)

    # Pass 1 (O(N)): at lp = old and A = -1 the ratio is 1, inside the clip, so
    # the fused loss's dtok = d loss_tok / d lp is the rollout weight w on the
    # kept tokens (1 without importance weights), 0 elsewhere; row_scale is
    # the aggregation weight of each row after rejection.
    pre = dict(a, entropy_coef=0.0, kl_coef=0.0, dual_clip=None)
    _, _, w_r, row_scale, keep_r = _ppo_fwd(old_r, old_r, torch.full_like(old_r, -1.0), mask_r, None, None, pre)
    keep = lay.flat(keep_r if keep_r.dim() == 2 else mask_r)
    # per token: the row's aggregation weight, 0 where rejected
    scale = lay.flat(row_scale[:, None].expand(lay.B, lay.T)) if lay.B * lay.T else row_scale.new_zeros((N,))
    scale = torch.where(keep, scale, torch.zeros((), dtype=scale.dtype))
    w = lay.flat(w_r) if rc_is != "none" else None
    lab = labels.reshape(-1)

    lp = torch.zeros((N,), dtype=acc)
    ent = torch.zeros((N,), dtype=acc)
    dh = torch.zeros((N, H) if need_dh else (0,), dtype=hidden.dtype)
    dw = torch.zeros((V, H) if need_dw else (0,), dtype=acc)
    db = torch.zeros((V,) if need_db else (0,), dtype=acc)
    need_grad = need_dh or need_dw or need_db
    # masked tokens and ignored labels cost no GEMM (rejected ones do: their
    # log-probs are returned, as by the two-op path)
    sel = lay.flat(mask_r) & (lab != ignore_index)
    idx = sel.nonzero().squeeze(1)
    if idx.numel() == N:
        chunks = [slice(lo, min(N, lo + chunk_size)) for lo in range(0, N, chunk_size)]
    else:
        chunks = list(idx.split(chunk_size))
    # Batch invariance: every GEMM runs on a multiple of 16 rows (zero rows
    # padded in, as linear_logprobs does), so a token's logits, log-prob and
    # dH row have the same bits whatever N, chunk_size and its position.
    c_pad = -(-min(chunk_size, max(N, 1)) // GEMM_ROW_MULTIPLE) * GEMM_ROW_MULTIPLE
    h_buf = hidden.new_zeros((c_pad, H))
    z_buf = hidden.new_empty((c_pad, V))
    old_f, adv_f = old.reshape(-1), adv.reshape(-1)
    ref_f = ref.reshape(-1) if ref is not None else None
    for rows in chunks:
        h = hidden[rows]
        m = h.shape[0]
        mp = -(-m // GEMM_ROW_MULTIPLE) * GEMM_ROW_MULTIPLE
        h_buf[:m].copy_(h)
        h_buf[m:mp].zero_()
        if bias is None:
            torch.mm(h_buf[:mp], weight.t(), out=z_buf[:mp])
        else:
            torch.addmm(bias, h_buf[:mp], weight.t(), out=z_buf[:mp])
        z = z_buf[:m].unsqueeze(0)
        lab_c = lab[rows].unsqueeze(0)
        if sampling is None:
            lp_c, ent_c, max_c, log_s_c = torch.ops.rlhf_fast.logprobs_fwd(z, lab_c, temperature, ignore_index, True)
        else:  # per-token temperature / the sampler's truncation (ops/_processed_logprobs.py)
            s = sampling[rows]
            s_args = (s[:, 0], s[:, 1].to(torch.int64), s[:, 2], s[:, 3])
            lp_c, ent_c, st_c = torch.ops.rlhf_fast.processed_logprobs_fwd(
                z[0], lab_c[0], *s_args, ignore_index, filtered, True
            )
            lp_c, ent_c = lp_c.unsqueeze(0), ent_c.unsqueeze(0)
        lp[rows], ent[rows] = lp_c[0], ent_c[0]
        if not need_grad:
            continue
        s_c = scale[rows].to(acc)
        g_lp = s_c * token_grad(
            lp_c[0], old_f[rows].to(acc), adv_f[rows].to(acc), ref_f[rows].to(acc) if ref_f is not None else None,
            w[rows] if w is not None else None, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
            kl_coef=kl_coef, kl_kind=kl_kind,
        )  # fmt: skip
        g_h = (-entropy_coef * s_c).unsqueeze(0) if entropy_coef != 0.0 else None
        if sampling is None:
            dz = torch.ops.rlhf_fast.logprobs_bwd(
                g_lp.unsqueeze(0), g_h, z, lab_c, max_c, log_s_c, ent_c, temperature, ignore_index
            )[0]
        else:
            dz = torch.ops.rlhf_fast.processed_logprobs_bwd(
                g_lp, g_h[0] if g_h is not None else None, z[0], lab_c[0], s_args[0], st_c, ent_c[0], ignore_index
            )
        if need_dh:
            if mp != m:  # the short last chunk: dz padded with zero rows in the logits buffer
                z_buf[:m].copy_(dz)
                z_buf[m:mp].zero_()
                dh_c = torch.mm(z_buf[:mp], weight)[:m]
            else:
                dh_c = torch.mm(dz, weight)
            dh[rows] = dh_c
        if need_dw:
            if dz.dtype == acc:
                dw.addmm_(dz.t(), h_buf[:m])
            else:  # bf16 / fp16: each chunk's product in fp32, summed in fp32
                dw.addmm_(dz.t().to(acc), h_buf[:m].to(acc))
        if need_db:
            db += dz.sum(0, dtype=acc)
        del dz

    # Pass 2 (O(N)): the loss and the stats from the detached log-probs, the
    # fused ppo_loss kernel's own (its dtok is not used).
    lp_r, ent_r = lay.rows(lp), lay.rows(ent)
    loss, stats, _, _, _ = _ppo_fwd(lp_r, old_r, lay.rows(adv), mask_r, ent_r, lay.rows(ref), a)
    return (
        loss,
        stats,
        lp.reshape(lay.shape),
        ent.reshape(lay.shape),
        dh.reshape(shape) if need_dh else dh,
        dw.to(weight.dtype),
        db.to(weight.dtype),
    )


# ---------------------------------------------------------------- registration


@torch.library.custom_op("rlhf_fast::linear_ppo_loss_fwd", mutates_args=(), device_types="cpu")
def _fwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    rollout_logprobs: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    temperature: float,
    sampling: torch.Tensor | None,
    filtered: bool,
    ignore_index: int,
    entropy_coef: float,
    kl_coef: float,
    kl_kind: str,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    agg: str,
    agg_norm: float | None,
    rc_is: str,
    rc_is_upper: float,
    rc_is_lower: float | None,
    rc_rs: str,
    rc_rs_lower: float,
    rc_rs_upper: float,
    chunk_size: int,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (B, T, H) with labels and the token tensors (B, T), or (N, H)
    and (N,) with cu_seqlens; weight (V, H), bias (V,) or None; mask bool.
    Returns loss (0-dim), stats (len(LOSS_STATS),), logprobs, entropy
    (labels' shape), and dH (hidden's shape), dW (V, H), db (V,) of the loss
    ((0,) where need_* is False). hidden is taken in its own shape, not a
    view: a gradient returned for a view is a new tensor that autograd may
    take over as .grad even while the graph is retained (then aliasing dH).
    sampling: None, or (N, 4) float64 per token (temperature, top_k, top_p,
    min_p; temperature then ignored), scored as logprobs_from_logits(top_k=,
    top_p=, min_p=) does; filtered as processed_logprobs_fwd's."""
    return linear_ppo_loss_fwd_cpu(
        hidden, weight, bias, labels, old_logprobs, advantages, mask, ref_logprobs, rollout_logprobs, cu_seqlens,
        temperature, sampling, filtered, ignore_index, entropy_coef, kl_coef, kl_kind, clip_low, clip_high, dual_clip, agg, agg_norm,
        rc_is, rc_is_upper, rc_is_lower, rc_rs, rc_rs_lower, rc_rs_upper, chunk_size, need_dh, need_dw, need_db,
    )  # fmt: skip


@_fwd_op.register_fake
def _fake_fwd(hidden, weight, bias, labels, *args):
    need_dh, need_dw, need_db = args[-3:]
    acc = acc_dtype(hidden.dtype)
    H, V = hidden.shape[-1], weight.shape[0]
    return (
        hidden.new_empty((), dtype=acc),
        hidden.new_empty((len(LOSS_STATS),), dtype=acc),
        hidden.new_empty(labels.shape, dtype=acc),
        hidden.new_empty(labels.shape, dtype=acc),
        hidden.new_empty(hidden.shape if need_dh else (0,)),
        weight.new_empty((V, H) if need_dw else (0,)),
        weight.new_empty((V,) if need_db else (0,)),
    )


def _setup_context(ctx, inputs, output):
    _, stats, lp, ent, dh, dw, db = output
    ctx.save_for_backward(dh, dw, db)
    ctx.needs = inputs[-3:]
    ctx.mark_non_differentiable(stats, lp, ent, dh, dw, db)
    ctx.set_materialize_grads(False)


def _eager_value(t: torch.Tensor) -> bool:
    """t is a plain CPU tensor read outside any tracing (reading it is free)."""
    return (
        type(t) is torch.Tensor
        and t.device.type == "cpu"
        and not is_compiling()
        and torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is None
    )


@once_differentiable(OP)
def _backward(ctx, grad_loss, *_):
    # the gradient of the loss w.r.t. hidden / weight / bias, scaled by the upstream scalar
    out = [None] * 32
    if grad_loss is None:  # only the stats were used
        return tuple(out)
    dh, dw, db = ctx.saved_tensors
    # loss.backward() passes 1: the stored gradients are then the answer, and
    # returning them (autograd takes them over as .grad once the saved copies
    # are released) saves a copy of dH and dW: 35 MiB at 8 x 512 tokens,
    # V = 32000, H = 256, half the working memory. Eager CPU only: under
    # torch.compile / make_fx (fake, functional or proxied tensors) the value
    # is not known while tracing.
    one = _eager_value(grad_loss) and bool(grad_loss == 1)
    for i, g, need in zip((0, 1, 2), (dh, dw, db), ctx.needs):
        if need:
            out[i] = g if one else (g * grad_loss).to(g.dtype)
    return tuple(out)


# rlhf_fast's registration (ops/_autograd.py): torch.library's own walks the
# 30-argument schema on every call, 1.5 ms here (measured with cProfile).
register_autograd("linear_ppo_loss_fwd", _backward, setup_context=_setup_context, triton_op=_fwd_op)


# ---------------------------------------------------------------- public API


def _check_token_tensors(labels, cu_seqlens, **tensors):
    for name, t in tensors.items():
        if t is None:
            continue
        check_tensor(OP, name, t, MASK_DTYPES if name == "mask" else FLOAT_DTYPES)
        if t.shape != labels.shape:
            raise ValueError(f"{OP}: {name} must have the shape of labels {tuple(labels.shape)}, got {tuple(t.shape)}")
        check_same_device(OP, "labels", labels, **{name: t})
    if cu_seqlens is None:
        if labels.dim() != 2:
            raise ValueError(
                f"{OP}: padded hidden must be (B, T, H) (labels (B, T)); got labels of shape {tuple(labels.shape)}; "
                "pass cu_seqlens for packed (N, H) hidden"
            )
        return None
    if labels.dim() != 1:
        raise ValueError(f"{OP}: with cu_seqlens, hidden must be packed (N, H), got labels {tuple(labels.shape)}")
    return check_cu_seqlens(OP, cu_seqlens, labels.shape[0], labels.device)


def linear_ppo_loss(
    hidden,
    weight,
    labels,
    old_logprobs,
    advantages,
    mask,
    *,
    bias=None,
    temperature=1.0,
    ignore_index=-100,
    entropy_coef=0.0,
    ref_logprobs=None,
    kl_coef=0.0,
    kl_kind="k3",
    clip_low=0.2,
    clip_high=None,
    dual_clip=None,
    agg="token-mean",
    agg_norm=None,
    rollout_logprobs=None,
    rollout_correction=None,
    cu_seqlens=None,
    chunk_size=None,
    top_k=None,
    top_p=None,
    min_p=None,
):
    """ppo_loss(linear_logprobs(hidden, weight, labels, ...), ...) in one op,
    without the (N, V) logits and with 3 GEMMs instead of 4.

    hidden: (B, T, H) padded, or (N, H) packed with cu_seqlens (S + 1,)
        (docs/packing.md); weight (V, H), bias (V,) or None, same float dtype.
    labels, old_logprobs, advantages, mask (and ref_logprobs,
        rollout_logprobs): hidden.shape[:-1]. Every keyword of ppo_loss, with
        its meaning (the entropy bonus uses the entropy of softmax(logits / T)).
    Returns (loss, stats, logprobs, entropy): loss and stats as ppo_loss
    returns them; logprobs, entropy the detached per-token values (fp32, fp64
    for fp64 inputs) where mask != 0 and label != ignore_index, 0 elsewhere
    (masked tokens cost no GEMM). Gradients reach hidden, weight and bias. Packed: agg_norm defaults to
    the longest segment, as ppo_loss's. chunk_size: tokens per GEMM chunk,
    default 8 MiB of fp32 logits (64 rows at V = 32000, at least 16).
    temperature: a scalar, or a (B,) / per-token tensor; top_k / top_p /
    min_p: the sampler's truncation (logprobs_from_logits' meaning, -inf
    outside the kept set; mask such tokens), scalars or tensors likewise.
    """
    hidden, weight, bias = check_linear_inputs(OP, hidden, weight, bias, labels, chunk_size)
    V = weight.shape[0]
    S = _check_token_tensors(
        labels, cu_seqlens, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
        ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs,
    )  # fmt: skip
    del S
    sampling, filtered, given_temperature = None, False, temperature
    if isinstance(temperature, torch.Tensor) or top_k is not None or top_p is not None or min_p is not None:
        temp, tk, tp, mp, filtered = token_params(labels, hidden.dtype, temperature, top_k, top_p, min_p)
        sampling = torch.stack([temp, tk.double(), tp, mp], 1)
        temperature = 1.0  # unused: sampling carries it per token
    temperature = check_temperature(OP, temperature, hidden.dtype)
    ignore_index = check_int(OP, "ignore_index", ignore_index)
    rc_args = _check_rollout(OP, rollout_logprobs, rollout_correction) or NO_CORRECTION
    clip_low, clip_high, dual_clip = _check_clips(OP, clip_low, clip_high, dual_clip)
    if cu_seqlens is None or agg_norm is not None:
        agg_norm = _check_agg(OP, agg, agg_norm, labels.shape[-1])
    else:
        _check_agg(OP, agg, None, 1, packed=True)  # the longest segment, as ppo_loss: read inside the op
    entropy_coef = _check_coef(OP, "entropy_coef", entropy_coef)
    kl_coef = _check_coef(OP, "kl_coef", kl_coef)
    kl_kind = _check_kind(OP, kl_kind)
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError(f"{OP}: kl_coef={kl_coef} needs ref_logprobs")
    if V == 0 and labels.numel() > 0:
        raise ValueError(f"{OP}: weight has an empty vocabulary dim (V=0)")
    if host_value_checks(hidden.device):
        check_labels_in_range(OP, labels, V, ignore_index, v_name="V = weight.shape[0]")
    mask = mask if mask.dtype == torch.bool else mask != 0
    names = LOSS_STATS if rollout_logprobs is not None else BASE_STATS
    backend = _backend.choose("linear_ppo_loss", hidden.device, IMPLEMENTED)
    if backend != "cpp":
        return _two_op(
            hidden, weight, bias, labels, old_logprobs, advantages, mask, given_temperature, ignore_index, cu_seqlens,
            chunk_size, dict(top_k=top_k, top_p=top_p, min_p=min_p), dict(
                ref_logprobs=ref_logprobs, entropy_coef=entropy_coef, kl_coef=kl_coef, kl_kind=kl_kind,
                clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg, agg_norm=agg_norm,
                rollout_logprobs=rollout_logprobs, rollout_correction=rollout_correction,
            ),
        )  # fmt: skip
    grad_on = torch.is_grad_enabled()
    loss, stats, lp, ent, _, _, _ = _fwd_op(
        hidden, weight, bias, labels, old_logprobs, advantages, mask, ref_logprobs, rollout_logprobs, cu_seqlens,
        temperature, sampling, filtered, ignore_index, entropy_coef, kl_coef, kl_kind, clip_low, clip_high, dual_clip,
        agg, agg_norm, *rc_args, chunk_size if chunk_size is not None else default_chunk_size(V),
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )  # fmt: skip
    return loss, dict(zip(names, stats.unbind(0))), lp, ent


def _two_op(
    hidden, weight, bias, labels, old, adv, mask, temperature, ignore_index, cu_seqlens, chunk_size, filters, kw
):
    """Where the fused CPU op does not run (CUDA, or no C++ extension): the
    two public ops, linear_logprobs then ppo_loss (4 GEMMs: the backward
    recomputes the logits), packed inputs as they are."""
    lp, ent = linear_logprobs(
        hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index,
        return_entropy=True, chunk_size=chunk_size, **filters,
    )  # fmt: skip
    keep = (mask != 0) & (labels != ignore_index)
    loss, stats = ppo_loss(lp, old, adv, mask, entropy=ent, cu_seqlens=cu_seqlens, **kw)
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    return loss, stats, torch.where(keep, lp.detach(), zero), torch.where(keep, ent.detach(), zero)
