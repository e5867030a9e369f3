"""Input checks shared by every op family: each raises an exception that
names the argument and what was wrong with it; and the once_differentiable
backward wrapper. (The Triton launchers' helpers are in triton/_common.py,
the interpreter guard is rlhf_fast._backend.launches_kernels.)"""

from __future__ import annotations

import functools
import math
import numbers
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(op: str, name: str, t, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype {allowed}; got {str(t.dtype).replace('torch.', '')}")


def check_same_device(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device"
            )


def check_positive_float(op: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{op}: {name} must be a Python float, got {type(value).__name__}")
    if not isinstance(value, (torch.SymFloat, torch.SymInt)):
        value = float(value)
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) a
    # float argument is a SymFloat, which math.isfinite cannot trace, while a
    # comparison becomes a guard (NaN fails both).
    if not (0.0 < value < math.inf):
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {value}")
    return value


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_int(op: str, name: str, value, lo: int = INT64_MIN, hi: int = INT64_MAX) -> int:
    """A Python int (not a float, not a bool) in [lo, hi]: int(1.5) would
    silently truncate and a value past int64 would fail later as an
    OverflowError that names nothing."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{op}: {name} must be an int, got {value!r} ({type(value).__name__})")
    if not isinstance(value, torch.SymInt):
        value = int(value)
    if not (lo <= value <= hi):
        if hi == INT64_MAX and lo != INT64_MIN:
            raise ValueError(f"{op}: {name} must be >= {lo}, got {value}")
        what = "the int64 range " if (lo, hi) == (INT64_MIN, INT64_MAX) else ""
        raise ValueError(f"{op}: {name} must be in {what}[{lo}, {hi}], got {value}")
    return value


def check_ignore_index(op: str, value, labels: torch.Tensor) -> int:
    """An int that the labels' dtype can hold. An ignore_index outside the
    int32 range with int32 labels matches no label, yet each backend met it
    its own way (the reference wrapped it, the C++ op refused it, the Triton
    kernel compared a truncated value): refused here, once, for every
    backend, naming both."""
    value = check_int(op, "ignore_index", value)
    info = torch.iinfo(labels.dtype)
    if not (info.min <= value <= info.max):
        raise ValueError(
            f"{op}: ignore_index={value} cannot be held by the labels' dtype "
            f"{str(labels.dtype).replace('torch.', '')} (range [{info.min}, {info.max}]), so no label could "
            "ever equal it; pass an ignore_index in that range (e.g. -100) or int64 labels"
        )
    return value


def min_temperature(dtype: torch.dtype) -> float:
    """Smallest temperature the kernels take for inputs of `dtype`: they
    multiply by 1 / T in their math dtype (fp32; fp64 for fp64 inputs), which
    overflows to inf below 1 / finfo.max (2.9e-39 in fp32, 5.6e-309 in fp64)
    and turns every row into NaN. Twice that, so 1 / T stays finite after
    rounding: 5.9e-39 (fp32 math), 1.1e-308 (fp64)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return 2.0 / torch.finfo(acc).max


def check_temperature(op: str, value, dtype: torch.dtype) -> float:
    """A finite temperature > 0 whose 1 / T is finite in the kernels' math
    dtype (see min_temperature). logits / T must still fit that dtype: a
    row where it overflows gives NaN, as a row containing +inf does."""
    value = check_positive_float(op, "temperature", value)
    t_min = min_temperature(dtype)
    if value < t_min:
        math_dtype = "float64" if dtype == torch.float64 else "float32"
        raise ValueError(
            f"{op}: temperature={value} is too small: 1 / temperature overflows {math_dtype}, the math dtype for "
            f"{str(dtype).replace('torch.', '')} inputs; it must be >= {t_min:.3g}"
        )
    return value


CHECK_INPUTS_ENV = "RLHF_FAST_CHECK_INPUTS"


def host_value_checks(device: torch.device) -> bool:
    """Whether to run the checks that read tensor values on the host (label
    range, per-row gamma / lam / temperature ranges). Always on CPU, where
    they cost no synchronisation; off on GPU, where each would be a host sync
    that stalls the stream and breaks CUDA-graph capture, unless
    RLHF_FAST_CHECK_INPUTS=1 (for debugging). Off under torch.compile. With
    the checks off, the kernels never read out of bounds: a bad label gives
    that row a NaN log-prob and gradient (docs/kernels.md, the contract)."""
    if is_compiling():
        return False
    return device.type == "cpu" or os.environ.get(CHECK_INPUTS_ENV, "0") == "1"


def check_labels_in_range(op: str, labels: torch.Tensor, V: int, ignore_index: int, v_name: str = "V") -> None:
    """Every label is in [0, V) or ignore_index. N int64 reads next to N*V
    logits; one host sync on GPU, so callers run it only where
    host_value_checks() allows."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{op}: label {int(labels[idx])} at position {idx} is outside [0, {v_name}={V}) "
            f"and is not ignore_index ({ignore_index})"
        )


def is_compiling() -> bool:
    return torch.compiler.is_compiling()


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on a gradient computed under create_graph=True, attached to
    the forward's differentiable inputs: differentiating it raises."""

    @staticmethod
    def forward(ctx, message, grad, *inputs):
        ctx.message = message
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.message)


def once_differentiable(op: str):
    """Decorator for a register_autograd backward whose kernels have no
    backward of their own. Without it, backward(create_graph=True) records
    the *_bwd ops, which torch's autograd fallback then differentiates as
    zero (silently wrong), or gives gradients that do not require grad
    ("element 0 of tensors does not require grad"). With it the first-order
    gradients are the same, and usable under create_graph=True in a loss that
    is not differentiated again, but differentiating them raises an error
    that says so, on every backend. The error node is attached to every saved
    tensor that requires grad, so autograd.grad(g, inputs) reaches it."""

    msg = (
        f"{op}: double backward is not supported: its gradient comes from a fused kernel with no backward "
        "of its own. Do not differentiate a gradient taken with create_graph=True through this op, or run "
        "it with rlhf_fast.use_backend('reference') (plain PyTorch) for higher-order gradients"
    )

    def wrap(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if not torch.is_grad_enabled():  # the usual first-order backward
                return backward(ctx, *grads)
            with torch.no_grad():
                out = backward(ctx, *grads)
            inputs = [t for t in ctx.saved_tensors if t is not None and t.requires_grad]
            return tuple(
                _NoDoubleBackward.apply(msg, g, *inputs) if isinstance(g, torch.Tensor) and g.is_floating_point() else g
                for g in out
            )

        return wrapper

    return wrap


def as_rows(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (A, B, V) *view* whenever the leading dims collapse into
    two strided dims: logits[:, :-1] of a (B, T, V) tensor stays a view, so
    the kernels read the original storage and nothing is copied."""
    V = logits.shape[-1]
    if V > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()  # vocab-strided input: rare, one copy
    merged: list[list[int]] = []  # [size, stride] of collapsed leading dims
    for size, stride in zip(logits.shape[:-1], logits.stride()[:-1]):
        if size == 1:
            continue
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    n = logits.numel() // V if V else 0
    if len(merged) > 2:  # three un-collapsible strided dims: copy
        return logits.reshape(1, n, V)
    sizes = [1] * (2 - len(merged)) + [m[0] for m in merged]
    return logits.reshape(sizes[0], sizes[1], V)
