"""TRL adapter: `rlhf_fast.integrations.trl.patch()`.

Replaces, in `trl.trainer.utils` and wherever a TRL module imported them by
name (the experimental CPO / ORPO / SDPO / SDFT / A2PO / TPO trainers and their
loss_utils in TRL 1.16):
- selective_log_softmax(logits, index, temperature=1.0, row_mask=None)
- entropy_from_logits(logits, chunk_size=128)
- selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0, row_mask=None)
with one pass of rlhf_fast.logprobs_from_logits over the logits instead of
TRL's per-row Python loop (CPU, and GPU where TRL's own Triton kernel does not
apply).

Semantics kept (TRL 1.16, read from trl/trainer/utils.py):
- Output dtype: the logits' dtype, as TRL's torch path returns (bf16 logits ->
  bf16 log-probs); float32 where TRL itself would have taken its fused Triton
  kernel (CUDA/XPU, fp16/bf16/fp32, ndim <= 3, unit vocab stride) - decided by
  calling TRL's own `_supports_trl_loss_kernel` at call time.
- Temperature divides out of place in TRL (`logits / temperature`), and here it
  is folded into the kernel: the caller's logits are never modified.
- row_mask: rows where it is 0 give 0 (and no gradient), as TRL's masked_fill.
- temperature <= 0, a (..., K) index (top-K gather), 0-/1-dim or empty logits,
  integer logits, a non-integer chunk_size: the original runs (it raises or
  handles them itself). Each such reason is logged once.

And the fused lm-head path that GRPO / RLOO / DPO / KTO / SFT / async GRPO
take in TRL 1.16 (`model(..., fused_lm_head=True)` -> `outputs.log_probs`):
- trl.trainer.utils._ChunkedLogProbFunction (TRL's chunked hidden x lm_head
  log-prob autograd function) -> rlhf_fast.linear_logprobs: same log-probs and
  entropy, gradients for hidden, weight and bias, the logits never
  materialised beyond one chunk. Covered: outputs within ("log_probs",
  "entropy"), no final_logit_softcapping, logit_scale == 1, 2-D hidden; the
  other statistics (log_sum_sq_probs, mean_logits, is_top1; asked for by
  GOLD / distillation metrics) and softcapped heads (Gemma 2/3) go to TRL's own.
  Entropy is returned with its gradient (TRL's is for logging).

Not covered: Online DPO, GKD, GOLD and distillation compute log_softmax inline
on full logits; nothing to patch there.

Supported: TRL >=1.16,<1.17 (patch() raises UnsupportedVersion outside).
"""

from __future__ import annotations

import torch

from ._patching import NO_LABEL, Fallback, Patcher, Target, is_real, make_replacement

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INTS = (torch.int32, torch.int64)


def _trl_kernel_path(mod, logits, index=None, row_mask=None) -> bool:
    """Would TRL itself have used its fused Triton kernel (fp32 outputs)?"""
    supports = getattr(mod, "_supports_trl_loss_kernel", None)
    triton_ok = getattr(mod, "is_triton_available", None)
    if supports is None or triton_ok is None:
        return False
    if index is None:
        return bool(triton_ok() and supports(logits))
    return bool(triton_ok() and supports(logits, index, row_mask))


def _check_logits(logits) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dtype not in _FLOATS:
        raise Fallback("logits that are not a float tensor")
    if logits.dim() < 2:
        raise Fallback("logits with fewer than 2 dims")
    if logits.numel() == 0:
        raise Fallback("empty logits")


def _labels(logits, index, row_mask):
    if not isinstance(index, torch.Tensor) or index.dtype not in _INTS:
        raise Fallback("an index that is not an int32/int64 tensor")
    if tuple(index.shape) != tuple(logits.shape[:-1]):
        raise Fallback("an index of shape (..., K) or a shape other than logits.shape[:-1]")
    if index.device != logits.device:
        raise Fallback("index on another device than logits")
    if row_mask is None:
        return index
    if not isinstance(row_mask, torch.Tensor) or tuple(row_mask.shape) != tuple(index.shape):
        raise Fallback("a row_mask whose shape is not index.shape")
    # masked rows get a label that our kernel skips: 0 and no gradient, like TRL's masked_fill
    return torch.where(row_mask == 0, torch.full_like(index, NO_LABEL, dtype=torch.int64), index.long())


def _temperature(t) -> float:
    if not is_real(t):
        raise Fallback("a temperature that is not a Python number")
    t = float(t)
    if not (t > 0 and t != float("inf")):
        raise Fallback("temperature <= 0 or infinite (the original raises)")
    return t


def _logprobs_pass(mod, a, return_entropy: bool):
    """What selective_log_softmax and its _and_entropy variant share: the
    checks (Fallback to TRL's own otherwise), masked rows given a skipped
    label, the temperature folded into one rlhf_fast.logprobs_from_logits
    pass. Returns (its output, the dtype TRL would have returned)."""
    import rlhf_fast

    logits, row_mask = a["logits"], a["row_mask"]
    _check_logits(logits)
    labels = _labels(logits, a["index"], row_mask)
    t = _temperature(a["temperature"])
    dtype = torch.float32 if _trl_kernel_path(mod, logits, a["index"], row_mask) else logits.dtype
    out = rlhf_fast.logprobs_from_logits(
        logits, labels, temperature=t, ignore_index=NO_LABEL, return_entropy=return_entropy
    )
    return out, dtype


def _make_selective_log_softmax(original, mod):
    def body(a, original):
        lp, dtype = _logprobs_pass(mod, a, return_entropy=False)
        return lp.to(dtype)

    return make_replacement(original, body, "trl selective_log_softmax")


def _make_entropy_from_logits(original, mod):
    def body(a, original):
        import rlhf_fast

        logits, chunk = a["logits"], a["chunk_size"]
        if not isinstance(logits, torch.Tensor) or logits.dtype not in _FLOATS:
            raise Fallback("logits that are not a float tensor")
        if logits.dim() < 1 or logits.numel() == 0:
            raise Fallback("empty or 0-dim logits")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
            raise Fallback("a chunk_size that is not a positive int (the original raises)")
        # chunk_size only bounds TRL's peak memory; our kernel never materialises (N, V)
        zeros = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
        _, ent = rlhf_fast.logprobs_from_logits(logits, zeros, return_entropy=True)
        return ent.to(torch.float32 if _trl_kernel_path(mod, logits) else logits.dtype)

    return make_replacement(original, body, "trl entropy_from_logits")


def _make_selective_log_softmax_and_entropy(original, mod):
    def body(a, original):
        (lp, ent), dtype = _logprobs_pass(mod, a, return_entropy=True)
        ent = ent.to(dtype)
        return lp.to(dtype), ent if a["entropy_requires_grad"] else ent.detach()

    return make_replacement(original, body, "trl selective_log_softmax_and_entropy")


# ---------------------------------------------------------------- fused lm-head log-probs

_LINEAR_OUTPUTS = {"log_probs", "entropy"}


def _make_chunked_logprob(original, mod):
    """A stand-in for TRL's ChunkedLogProbFunction: only `.apply(...)` is used
    (trl/trainer/utils.py, the fused_lm_head forward)."""
    from ._patching import fallback_once

    def apply(
        hidden,
        weight,
        bias,
        targets,
        temperature,
        chunk_size,
        final_logit_softcapping=None,
        logit_scale=1.0,
        outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"),
    ):
        import rlhf_fast

        args = (hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)
        why = None
        if final_logit_softcapping is not None:
            why = "final_logit_softcapping"
        elif not (is_real(logit_scale) and float(logit_scale) == 1.0):
            why = "logit_scale != 1"
        elif set(outputs) - _LINEAR_OUTPUTS:
            why = f"outputs {sorted(set(outputs) - _LINEAR_OUTPUTS)}"
        elif not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or hidden.dtype != weight.dtype:
            why = "hidden that is not (N, H) in the weight's dtype"
        elif isinstance(temperature, torch.Tensor) or not is_real(temperature) or not float(temperature) > 0:
            why = "a temperature that is not a positive number"
        if why is not None:
            fallback_once("trl ChunkedLogProbFunction", why)
            return original.apply(*args)
        lp, ent = rlhf_fast.linear_logprobs(
            hidden, weight, targets, bias=bias, temperature=float(temperature), return_entropy=True
        )
        return lp, (ent if "entropy" in outputs else None), None, None, None

    cls = type(
        "RlhfFastChunkedLogProbFunction", (), {"apply": staticmethod(apply), "__doc__": _make_chunked_logprob.__doc__}
    )
    cls.__rlhf_fast_original__ = original
    return cls


TARGETS = [
    Target("trl.trainer.utils", "_ChunkedLogProbFunction", _make_chunked_logprob),
    Target("trl.trainer.utils", "selective_log_softmax", _make_selective_log_softmax),
    Target("trl.trainer.utils", "entropy_from_logits", _make_entropy_from_logits),
    Target("trl.trainer.utils", "selective_log_softmax_and_entropy", _make_selective_log_softmax_and_entropy),
]

SUPPORTED = ("1.16.0", "1.17.0")
_patcher = Patcher("trl", TARGETS, SUPPORTED)
register, patch, unpatch, patched, replaced = _patcher.module_api()

__all__ = ["patch", "unpatch", "patched", "replaced", "register", "TARGETS", "SUPPORTED"]
