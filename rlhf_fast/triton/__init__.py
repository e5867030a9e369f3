"""@triton.jit kernels, one module per op family. Importing this package
requires triton; rlhf_fast.ops imports it only when triton is importable."""
