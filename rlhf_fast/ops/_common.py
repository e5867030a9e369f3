"""Input checks shared by every op family: each raises an exception that
names the argument and what was wrong with it."""
from __future__ import annotations

import functools
import math
import numbers

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
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")


def check_positive_float(op: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{op}: {name} must be a Python float, got {type(value).__name__}")
    if isinstance(value, (torch.SymFloat, torch.SymInt)):
        return value
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {value}")
    return value


def check_labels_in_range(op: str, labels: torch.Tensor, V: int, ignore_index: int, v_name: str = "V") -> None:
    """Every label is in [0, V) or ignore_index. N int64 reads next to N*V
    logits; one host sync on GPU. Callers skip it under torch.compile, where
    the CPU kernels still check every label they read."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{op}: label {int(labels[idx])} at position {idx} is outside [0, {v_name}={V}) "
            f"and is not ignore_index ({ignore_index})"
        )


def is_compiling() -> bool:
    return torch.compiler.is_compiling()


def launches_kernels(t: torch.Tensor) -> bool:
    """False only for fake tensors under the CPU Triton interpreter, which
    would otherwise run the kernel on fake storage (opcheck's fake-tensor
    test). On CUDA the launch must always reach wrap_triton, which records
    it while tracing."""
    from torch._subclasses.fake_tensor import is_fake

    from .. import _backend

    return not (_backend.triton_interpret() and (is_fake(t) or t.device.type == "meta"))


def refuse_interpreter_under_compile(op: str, backend: str, device: torch.device) -> None:
    """The interpreter launches kernels eagerly, so a traced graph would lose
    them: refuse instead of returning garbage."""
    from .. import _backend

    if backend == "triton" and device.type != "cuda" and is_compiling():
        raise _backend.BackendUnavailable(
            f"{op}: the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) cannot run under torch.compile; "
            "use the cpp backend on CPU or CUDA tensors for triton"
        )


def kernel_scalars(dtype: torch.dtype, device, *values) -> tuple[torch.Tensor | None, bool]:
    """(scalars tensor or None, from_ptr) for a Triton launch.

    A Python float reaches a compiled Triton kernel as fp32 (the interpreter
    keeps it a double), which moves an fp64 op's 1/T or eps by up to 3e-8
    relative. fp64 inputs therefore get their scalars from a float64 tensor
    (one tiny copy per call: fp64 is the dtype of tests and gradcheck, not of
    training); every other dtype passes them as plain arguments, no copy."""
    if dtype == torch.float64:
        return torch.tensor([float(v) for v in values], dtype=torch.float64, device=device), True
    return None, False


def launch_on_tensor_device(fn):
    """Run a triton_op body under its first tensor's CUDA device: Triton
    launches on the *current* device, so tensors on cuda:1 with cuda:0
    current would be an illegal address (flash-attn's cross-entropy guards
    the same way). No effect on CPU tensors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next(a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        if device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    return wrapper
