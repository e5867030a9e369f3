"""The accumulation dtype: one rule for the reference, the ops' fakes and
the Triton launchers (the C++ kernels follow the same rule)."""

from __future__ import annotations

import torch


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any input is float64 (the tests' oracle dtype, where the
    kernels must be exact to ~1e-15), else float32: bf16 / fp16 sums over a
    152k-wide vocabulary or a 8192-token row would lose 2-3 digits."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
