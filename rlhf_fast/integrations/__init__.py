"""Swap rlhf_fast kernels into the stack you already run.

    import rlhf_fast.integrations.trl as rf_trl       # or .verl / .openrlhf
    rf_trl.patch()                                     # -> list of the functions replaced

Each stack module has patch(), unpatch() and the context manager patched().
A stack that is not installed (or does not import here) is skipped: patch()
returns []. See docs/integrations.md for what each one replaces and what not.
The submodules are imported on demand, so importing rlhf_fast never imports
TRL, verl or OpenRLHF.
"""

import importlib

STACKS = ("trl", "verl", "openrlhf")


def __getattr__(name):
    if name in STACKS:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(name)


__all__ = list(STACKS)
