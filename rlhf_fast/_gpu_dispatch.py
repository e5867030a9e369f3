"""Measured GPU backend preferences, written by benchmarks/gpu/dispatch_table.py
from a lent GPU's compass run (benchmarks/gpu/run_device.sh); do not edit by hand.

MEASURED[device name substring][public op] = the backend that was faster there,
with the evidence. Empty until a GPU run is committed: each op then keeps its
IMPLEMENTED order (Triton first)."""

MEASURED: dict[str, dict[str, dict]] = {}
