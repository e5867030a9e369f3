"""Which backends exist here, why one is missing, and which one a call uses.

Backends, fastest first per device:
  cuda tensors: the op's GPU kernels ("triton" or "cuda"), then "reference"
  cpu tensors:  "cpp", then "reference"
RLHF_FAST_BACKEND=<name> (or `with rlhf_fast.use_backend(name):`) forces one;
forcing one that is not available for the call raises BackendUnavailable.
"triton" also runs on CPU tensors under TRITON_INTERPRET=1 (the test suite
does this), but is never picked there unless forced.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import threading

import torch

log = logging.getLogger("rlhf_fast")

BACKENDS = ("reference", "cpp", "triton", "cuda")
ENV_VAR = "RLHF_FAST_BACKEND"


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this call; the message says why and what to do."""


def _load_extension():
    try:
        mod = importlib.import_module("rlhf_fast._C")
        return mod, None
    except Exception as exc:  # ImportError, or an undefined symbol after a torch upgrade
        return None, f"{type(exc).__name__}: {exc}"


_C, _C_ERROR = _load_extension()
if _C is None:
    log.warning(
        "rlhf_fast: compiled extension not loaded (%s); using the pure-PyTorch reference. "
        "Build it with `pip install --no-build-isolation -e .`",
        _C_ERROR,
    )
BUILD_INFO = dict(_C.build_info()) if _C is not None else {}


def _probe_triton():
    try:
        import triton  # noqa: F401

        return True, None
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


HAVE_TRITON, _TRITON_ERROR = _probe_triton()


def triton_interpret() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (the tests).
    Launchers also pass it to the kernels as ROUND_BY_HAND / UPCAST, the
    interpreter's bf16 workarounds; launches_kernels is the guard."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launches_kernels(t: torch.Tensor) -> bool:
    """The one Triton-interpreter guard, called by every triton_op body
    before it launches. On CUDA tensors, or without the interpreter: True
    (wrap_triton records the launch while tracing). Under the interpreter
    (TRITON_INTERPRET=1, CPU tensors) wrap_triton hands back the interpreted
    kernel itself, so: fake or meta tensors (opcheck's fake-tensor test,
    torch.compile's shape propagation) give False, and the body returns its
    allocated outputs unlaunched; a graph being traced (AOTAutograd's
    functional tensors) could not hold the eager launch, so that raises
    rather than compiling to empty outputs."""
    if t.device.type == "cuda" or not triton_interpret():
        return True
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    if isinstance(t, FunctionalTensor):
        raise BackendUnavailable(
            "rlhf_fast: Triton kernels under TRITON_INTERPRET=1 cannot be traced by torch.compile; "
            "use the cpp backend on CPU tensors, or CUDA tensors for triton"
        )
    return not (is_fake(t) or t.device.type == "meta")


def has_cpp() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return "cuda" in BUILD_INFO.get("backends", ())


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """None if `backend` can run on `device`, else the reason and the fix."""
    if backend == "reference":
        return None
    if backend == "cpp":
        if _C is None:
            return f"the compiled extension did not load ({_C_ERROR}); run `pip install --no-build-isolation -e .`"
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, got {device}"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device}"
        if _C is None:
            return f"the compiled extension did not load ({_C_ERROR})"
        if not has_cuda_kernels():
            return (
                "rlhf_fast._C was built without CUDA kernels; rebuild with a CUDA build of torch and nvcc "
                "(RLHF_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e .)"
            )
        return None
    if backend == "triton":
        if not HAVE_TRITON:
            return f"triton is not importable ({_TRITON_ERROR}); pip install triton"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpret()):
            return None
        return f"the triton backend runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device}"
    return f"unknown backend {backend!r}; choose one of {BACKENDS}"


CPU_ISAS = ("baseline", "avx2", "avx512")  # narrowest first


def cpu_isas() -> tuple[str, ...]:
    """The vector ISAs whose copy of the C++ CPU kernels can run here,
    narrowest first (() without the extension)."""
    if _C is None:
        return ()
    return CPU_ISAS[: CPU_ISAS.index(_C.build_info()["cpu_isa_best"]) + 1]


def set_cpu_isa(name: str) -> str:
    """Run the C++ CPU kernels' `name` copy (baseline | avx2 | avx512) from now
    on, process-wide (RLHF_FAST_CPU_ISA sets the start value); returns the
    previous one. Every vectorised CPU kernel follows it."""
    if _C is None:
        raise BackendUnavailable(f"no C++ CPU kernels to switch: the compiled extension did not load ({_C_ERROR})")
    if name not in cpu_isas():
        raise ValueError(f"CPU ISA {name!r} is not available here; choose one of {cpu_isas()}")
    return _C.set_cpu_isa(name)


@contextlib.contextmanager
def use_cpu_isa(name: str):
    """`set_cpu_isa(name)` inside a `with` block, restored after it."""
    prev = set_cpu_isa(name)
    try:
        yield
    finally:
        _C.set_cpu_isa(prev)


_local = threading.local()


def forced_backend() -> str | None:
    name = getattr(_local, "forced", None) or os.environ.get(ENV_VAR) or None
    if name is not None and name not in BACKENDS:
        raise BackendUnavailable(f"{ENV_VAR}={name!r} is not a backend; choose one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend inside a `with` block (None restores automatic choice)."""
    if name is not None and name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {BACKENDS}")
    prev = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = prev


def choose(op: str, device: torch.device, implemented: tuple[str, ...]) -> str:
    """The backend that runs `op` on `device`. `implemented` lists the op's
    backends fastest first; "reference" is always implicitly last."""
    forced = forced_backend()
    if forced is not None:
        if forced != "reference" and forced not in implemented:
            raise BackendUnavailable(
                f"rlhf_fast.{op} has no {forced!r} implementation (it has {implemented + ('reference',)})"
            )
        reason = why_unavailable(forced, device)
        if reason is not None:
            how = f"rlhf_fast.use_backend({forced!r})" if getattr(_local, "forced", None) else f"{ENV_VAR}={forced}"
            raise BackendUnavailable(f"rlhf_fast.{op}: backend {forced!r} forced by {how} is unavailable: {reason}")
        return forced
    if device.type == "cuda":
        implemented = measured_order(op, device, implemented)
    for name in implemented:
        if name == "triton" and device.type != "cuda":
            continue  # the interpreter is for tests, never an automatic choice
        if why_unavailable(name, device) is None:
            return name
    return "reference"


def measured_order(op: str, device: torch.device, implemented: tuple[str, ...]) -> tuple[str, ...]:
    """`implemented` with the backend measured faster on this GPU model first
    (rlhf_fast/_gpu_dispatch.py, generated from a committed GPU run)."""
    from ._gpu_dispatch import MEASURED

    if not MEASURED:
        return implemented
    name = _device_name(device)
    for model, prefs in MEASURED.items():
        best = prefs.get(op, {}).get("backend")
        if model in name and best in implemented:
            return (best,) + tuple(b for b in implemented if b != best)
    return implemented


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def info() -> dict:
    """Everything a user needs to know about what runs here and why."""
    cuda_ok = torch.cuda.is_available()
    dev_cpu, dev_gpu = torch.device("cpu"), torch.device("cuda")
    report = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda_ok else None,
        "extension_loaded": _C is not None,
        "extension_error": _C_ERROR,
        "build": BUILD_INFO,
        "triton_importable": HAVE_TRITON,
        "forced_backend": os.environ.get(ENV_VAR),
        "backends": {},
    }
    for name in BACKENDS:
        reasons = {dev.type: why_unavailable(name, dev) for dev in (dev_cpu, dev_gpu)}
        if reasons["cuda"] is None and not cuda_ok:  # the reference "runs" on CUDA only where a GPU exists
            reasons["cuda"] = "no CUDA device visible to torch"
        if name in ("cuda", "triton") and not cuda_ok:
            reasons["cuda"] = "no CUDA device visible to torch"
        report["backends"][name] = {d: ("available" if r is None else r) for d, r in reasons.items()}
    return report
