"""rlhf_fast.sample: validation, per-row parameters, seeds from a
torch.Generator, backend dispatch and fake (meta) registration.

Naming chain: _sample_fwd_kernel and its launcher sample_fwd_triton
(triton/sampling.py), sample_fwd_cpu
(csrc/cpu/sampling.cpp) -> torch.ops.rlhf_fast.sample_fwd /
sample_fwd_triton -> rlhf_fast.sample -> reference.sample ->
tests/test_sampling.py -> benchmarks/bench_sampling.py.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from .. import _backend, reference
from ._common import FLOAT_DTYPES, check_tensor, host_value_checks, is_compiling, min_temperature

OP = "rlhf_fast.sample"
IMPLEMENTED = ("triton", "cpp")
_INT_DTYPES = (torch.int32, torch.int64)


class SampleOutput(NamedTuple):
    tokens: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor  # (B,) fp32: under softmax(logits / T), as logprobs_from_logits
    processed_logprobs: torch.Tensor  # (B,) fp32: under the truncated, renormalised distribution


# ---------------------------------------------------------------- parameters


def _scalar(name: str, value, lo: float, hi: float, lo_open: bool, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "an int" if integer else "a float"
        raise TypeError(f"{OP}: {name} must be {kind} or a (B,) tensor, got {type(value).__name__}")
    if integer and not isinstance(value, numbers.Integral):
        raise TypeError(f"{OP}: {name} must be an int or a (B,) int tensor, got {value!r}")
    v = int(value) if integer else float(value)
    # comparisons, not math.isfinite: they trace as guards on a SymFloat
    # under torch.compile(dynamic=True); NaN fails them all
    bad = not ((lo < v if lo_open else lo <= v) and v <= hi and -math.inf < v < math.inf)
    if bad:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"{OP}: {name} must be in {rng}, got {value}")
    return v


def _row_tensor(name, value, B, device, dtype, lo, hi, lo_open, integer=False):
    """-> ((B,) tensor of `dtype`, is_default_scalar)."""
    if not isinstance(value, torch.Tensor):
        v = _scalar(name, value, lo, hi, lo_open, integer)
        return torch.full((B,), v, dtype=dtype, device=device), v
    check_tensor(OP, name, value, _INT_DTYPES if integer else FLOAT_DTYPES + _INT_DTYPES)
    if value.device != device:
        raise ValueError(f"{OP}: {name} is on {value.device} but logits are on {device}")
    if value.dim() == 0:
        value = value.expand(B)
    if tuple(value.shape) != (B,):
        raise ValueError(f"{OP}: {name} must be a scalar or have shape ({B},), got {tuple(value.shape)}")
    # Value checks read the tensor: free on CPU, a host sync on GPU, so they
    # run only for CPU tensors (GPU callers own their per-row values).
    if host_value_checks(device) and value.numel():
        v = value.double()
        bad = (v <= lo if lo_open else v < lo) | (v > hi) | ~v.isfinite()
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
            raise ValueError(f"{OP}: {name}[{i}] = {value[i].item()} is outside {rng}")
    return value.to(dtype), None


def _check_tiny_temperature(temperature, temp: torch.Tensor, dtype: torch.dtype) -> None:
    """temperature > 0 but so small that 1 / T overflows the kernels' math
    dtype (every key would be inf or NaN): a clear error instead. Scalars
    always; (B,) tensors on CPU outside torch.compile (on GPU that would be
    a host sync, as for the other per-row checks)."""
    t_min = min_temperature(dtype)
    math_dtype = "float64" if dtype == torch.float64 else "float32"
    hint = (
        f"1 / temperature overflows {math_dtype}, the sampler's math dtype; use 0 for greedy or a value >= {t_min:.3g}"
    )
    if not isinstance(temperature, torch.Tensor):
        if 0.0 < temperature < t_min:
            raise ValueError(f"{OP}: temperature={temperature} is too small: {hint}")
    elif host_value_checks(temp.device) and temp.numel():
        tiny = (temp > 0) & (temp < t_min)
        if bool(tiny.any()):
            i = int(tiny.nonzero()[0, 0])
            raise ValueError(f"{OP}: temperature[{i}] = {temp[i].item()} is too small: {hint}")


def row_params(B: int, device: torch.device, temperature, top_k, top_p, min_p, dtype: torch.dtype = torch.float32):
    """Scalars or (B,) tensors -> (temperature f64, top_k i64, top_p f64,
    min_p f64) as (B,) tensors, and whether any row may truncate. dtype: the
    logits' dtype (it sets the smallest temperature > 0 allowed)."""
    inf = float("inf")
    temp, t_s = _row_tensor("temperature", temperature, B, device, torch.float64, 0.0, inf, False)
    _check_tiny_temperature(t_s if t_s is not None else temperature, temp, dtype)
    tk, tk_s = _row_tensor("top_k", top_k, B, device, torch.int64, 0, 2**62, False, integer=True)
    tp, tp_s = _row_tensor("top_p", top_p, B, device, torch.float64, 0.0, 1.0, True)
    mp, mp_s = _row_tensor("min_p", min_p, B, device, torch.float64, 0.0, 1.0, False)
    # known-off scalars skip the threshold search entirely (no sort, no bisection)
    filtered = not (tk_s == 0 and tp_s == 1.0 and mp_s == 0.0)
    return temp, tk, tp, mp, filtered


def draw_seeds(B: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """(B,) int64 row seeds from `generator` (on `device`; no host sync on GPU):
    each row's noise stream is a counter-based hash of its own seed."""
    # randint_like, not randint(..., (B,)): the same draws, but it also
    # traces under torch.compile(dynamic=True), where B is a SymInt
    like = torch.empty((B,), dtype=torch.int64, device=device)
    return torch.randint_like(like, -(2**63), 2**63 - 1, generator=generator)


def _check_rows(logits: torch.Tensor, temperature: torch.Tensor) -> None:
    """Eager CPU only: a row with no valid token, or one whose distribution
    is undefined, raises, naming the row and the reason (as csrc/cpu/sampling.cpp
    does). One pass over the logits; the finer checks only on failure."""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    inv_t = torch.where(temperature > 0, 1.0 / temperature.clamp(min=1e-300), 1.0).to(x.dtype)
    # max(logits) / T must fit the math dtype (the kernels subtract the max
    # before scaling, so no other logit can overflow); amax propagates NaN,
    # and +inf or only -inf make the max non-finite
    ok = torch.isfinite(x.amax(-1) * inv_t)
    if bool(ok.all()):
        return
    r = int((~ok).nonzero()[0, 0])
    row = x[r]
    if bool(row.isnan().any()):
        why = "contains NaN"
    elif bool(row.isposinf().any()):
        why = "contains +inf, which leaves the distribution undefined (mask tokens with -inf, never +inf)"
    elif bool(row.isneginf().all()):
        why = "has no valid token: every logit is -inf"
    else:
        why = (
            f"overflows {str(x.dtype).replace('torch.', '')} once divided by the temperature "
            f"({temperature[r].item():.3g}); raise the temperature or use 0 for greedy"
        )
    raise ValueError(f"{OP}: row {r} of logits {why}")


# ---------------------------------------------------------------- public API


def sample_with_seeds(logits, seeds, temperature, top_k, top_p, min_p, filtered) -> SampleOutput:
    """The op behind rlhf_fast.sample and rlhf_fast.generate: parameters
    already (B,) tensors (see row_params), seeds (B,) int64."""
    backend = _backend.choose("sample", logits.device, IMPLEMENTED)
    if logits.dtype == torch.float64:
        backend = "reference"  # documented: float64 (oracle) logits run the reference
    if backend != "cpp" and logits.device.type == "cpu" and not is_compiling() and logits.shape[0] > 0:
        _check_rows(logits, temperature)  # the C++ kernel raises the same itself
    if backend == "reference":
        out = reference.sample(logits, seeds, temperature, top_k, top_p, min_p, filtered)
    elif backend == "triton":
        out = torch.ops.rlhf_fast.sample_fwd_triton(logits, seeds, temperature, top_k, top_p, min_p, filtered)
    else:
        out = torch.ops.rlhf_fast.sample_fwd(logits, seeds, temperature, top_k, top_p, min_p, filtered)
    return SampleOutput(*out)


def sample(
    logits: torch.Tensor,
    *,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    generator: torch.Generator | None = None,
) -> SampleOutput:
    """Draw one token per row and return its log-probs.

    logits: (B, V) float32 / bfloat16 / float16 (float64 runs the reference).
    temperature >= 0 (0: greedy, first argmax), top_k >= 0 (0: off), top_p in
    (0, 1] (1: off), min_p in [0, 1] (0: off): Python scalars or (B,) tensors
    on logits' device. Applied in the order temperature, top-k, top-p (on the
    top-k-renormalised distribution), min-p (p >= min_p * p_max); ties at a
    threshold are all kept, so top-k may keep more than k tied tokens.
    generator: a torch.Generator on logits' device; one draw of B seeds per
    call, every row an independent counter-based noise stream.
    Returns SampleOutput(tokens (B,) int64, logprobs (B,) fp32 = what
    logprobs_from_logits(logits, tokens, temperature=T) returns (T = 1 for
    greedy rows), processed_logprobs (B,) fp32 under the truncated,
    renormalised distribution (0 for greedy rows)).
    No host synchronisation on GPU. A row with no valid token (every logit
    -inf), containing NaN or +inf, or where max(logits) / T overflows fp32, never
    yields a token silently: on CPU it raises an error naming the row and the
    reason (eager, and compiled with the cpp backend). On GPU (no host sync,
    so no error is possible) that row's logprobs and processed_logprobs are
    NaN and its token is unspecified: check torch.isnan(out.logprobs) before
    using such rows. temperature > 0 must be >= 5.9e-39 (1 / T finite in
    fp32; checked for scalars and CPU tensors). Thresholds, keys and
    log-probs are on (logits - max) / T, exact to the row's spread at any
    offset. B = 0 gives empty outputs; V = 0 (with B > 0) is a ValueError.
    Under torch.compile(fullgraph=True) pass generator=None: dynamo cannot
    trace a torch.Generator argument.
    """
    check_tensor(OP, "logits", logits, FLOAT_DTYPES)
    if logits.dim() != 2:
        raise ValueError(f"{OP}: logits must be 2-D (B, V), got shape {tuple(logits.shape)}")
    B, V = logits.shape
    if V == 0 and B > 0:
        raise ValueError(f"{OP}: logits have an empty vocabulary dim (V=0)")
    temp, tk, tp, mp, filtered = row_params(B, logits.device, temperature, top_k, top_p, min_p, logits.dtype)
    seeds = draw_seeds(B, logits.device, generator)
    return sample_with_seeds(logits, seeds, temp, tk, tp, mp, filtered)


# ---------------------------------------------------------------- registration


def _fake_fwd(logits, seeds, temperature, top_k, top_p, min_p, filtered):
    B = logits.shape[0]
    return (
        logits.new_empty((B,), dtype=torch.int64),
        logits.new_empty((B,), dtype=torch.float32),
        logits.new_empty((B,), dtype=torch.float32),
    )


if _backend.has_cpp():
    torch.library.register_fake("rlhf_fast::sample_fwd")(_fake_fwd)


if _backend.HAVE_TRITON:
    from ..triton import sampling as kernels  # noqa: F401  (registers sample_fwd_triton; no autograd)
