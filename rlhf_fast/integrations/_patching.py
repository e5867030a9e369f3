"""Shared machinery for the TRL / verl / OpenRLHF adapters.

A *target* names one hot function of a stack by module path and attribute
(`"verl.utils.torch_functional", "logprobs_from_logits"`), or a method of the
classes a module defines, or an entry of a registry dict. `Patcher.patch()`
imports the module with importlib (skipping, with a log line, a stack or a
module that does not import), wraps the original with a replacement built from
it, and then also replaces every *other* binding of the same function object
inside the stack's loaded modules: `from trl.trainer.utils import
selective_log_softmax` in a trainer module copied the function into that
module, and patching only the defining module would miss it. Modules imported
while the patch is active get the replacement through their own import.

Each replacement is `functools.wraps(original)`, so `inspect.signature` shows
the original's signature, and it binds the call to that signature before
looking at it: arguments the replacement does not cover (a parameter it does
not know with a non-default value, a dtype, a mode) go to the original, and the
first time each reason is seen it is logged once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("rlhf_fast.integrations")

_ORIGINAL_ATTR = "__rlhf_fast_original__"


class UnsupportedVersion(RuntimeError):
    """patch() on a stack version outside the adapter's tested range."""


class Fallback(Exception):
    """Raised inside a replacement's body: call the original instead."""


# ---------------------------------------------------------------- logging once

_SEEN: set[tuple[str, str]] = set()


def fallback_once(name: str, reason: str) -> None:
    key = (name, reason)
    if key not in _SEEN:
        _SEEN.add(key)
        log.warning("rlhf_fast: %s falls back to the original for %s (logged once)", name, reason)


# ---------------------------------------------------------------- wrappers


def make_replacement(original: Callable, body: Callable, name: str, known: set[str] | None = None) -> Callable:
    """Wrap `original`: bind the call to its signature, run `body(arguments, original)`;
    `body` raises Fallback(reason) for calls it does not cover. With `known`, a
    parameter outside it given a non-default value (an option a newer stack
    version added) also falls back."""
    sig = inspect.signature(original)
    defaults = {k: p.default for k, p in sig.parameters.items()}

    @functools.wraps(original)
    def replacement(*args, **kwargs):
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)  # let the original raise its own error
        bound.apply_defaults()
        try:
            if known is not None:
                only_known(bound.arguments, defaults, known)
            return body(bound.arguments, original)
        except Fallback as why:
            fallback_once(name, str(why))
            return original(*args, **kwargs)

    setattr(replacement, _ORIGINAL_ATTR, original)
    return replacement


def only_known(args: dict, sig_defaults: dict, known: set[str]) -> None:
    """Fallback when a parameter we do not implement was given a non-default value
    (a newer stack version added an option)."""
    for k, v in args.items():
        if k in known or k == "self":
            continue
        default = sig_defaults.get(k, inspect.Parameter.empty)
        if v is default:
            continue
        plain = (bool, int, float, str)
        if isinstance(v, plain) and isinstance(default, plain) and type(v) is type(default) and v == default:
            continue
        raise Fallback(f"argument {k} given a value other than its default (not covered)")


# ---------------------------------------------------------------- targets


@dataclass
class Target:
    """One function to replace.

    module: dotted module path; attr: function name in it. kind: "function"
    (module attribute), "method" (attr is a method name: every class defined in
    the module whose own __dict__ has it), or "registry" (attr is "DICT:key").
    make(original, module) -> replacement.
    """

    module: str
    attr: str
    make: Callable[[Callable, Any], Callable]
    kind: str = "function"


@dataclass
class _Applied:
    owner: Any  # module, class or dict
    key: str
    original: Any
    replacement: Any
    qualname: str


def _set(owner, key, value) -> None:
    if isinstance(owner, dict):
        owner[key] = value
    else:
        setattr(owner, key, value)


class Patcher:
    """patch() / unpatch() / patched() for one stack (package = "trl", ...)."""

    def __init__(self, package: str, targets: list[Target], supported: tuple[str, str] | None = None):
        """supported = (lowest, below): the installed package's version must be
        >= lowest and < below, checked at patch() time."""
        self.package = package
        self.targets = targets
        self.supported = supported
        self._applied: list[_Applied] = []
        self.extra_targets: list[Target] = []  # registered by other modules (register())

    def register(self, target: Target) -> None:
        """Add a replacement from another module (e.g. verl_vocab_parallel); applied by the next patch()."""
        self.extra_targets.append(target)

    def check_version(self) -> str | None:
        """The installed version, or None when the package is not installed.
        Raises UnsupportedVersion outside the supported range."""
        import importlib.metadata as md

        try:
            version = md.version(self.package)
        except md.PackageNotFoundError:
            return None
        if self.supported is not None:
            from packaging.version import Version

            low, below = self.supported
            if not (Version(low) <= Version(version) < Version(below)):
                raise UnsupportedVersion(
                    f"rlhf_fast.integrations.{self.package} supports {self.package} >={low},<{below}; "
                    f"{version} is installed. Nothing was patched: its functions' signatures or scaling may differ."
                )
        return version

    # -------------------------------------------------------------- helpers

    def _stack_modules(self):
        prefix = self.package + "."
        return [
            m for n, m in list(sys.modules.items()) if m is not None and (n == self.package or n.startswith(prefix))
        ]

    def _import(self, path: str):
        try:
            return importlib.import_module(path)
        except Exception as e:  # ImportError, or a stack whose import needs Ray / a GPU
            log.info("rlhf_fast: %s not importable (%s: %s); its functions are not patched", path, type(e).__name__, e)
            return None

    def _apply(self, owner, key, original, replacement, qualname) -> None:
        _set(owner, key, replacement)
        self._applied.append(_Applied(owner, key, original, replacement, qualname))

    # -------------------------------------------------------------- API

    def module_api(self) -> tuple:
        """(register, patch, unpatch, patched, replaced): what each adapter
        module (trl.py, verl.py, openrlhf.py) exports at its top level."""
        return self.register, self.patch, self.unpatch, self.patched, self.replaced

    @property
    def active(self) -> bool:
        return bool(self._applied)

    def replaced(self) -> list[str]:
        return [a.qualname for a in self._applied]

    def patch(self) -> list[str]:
        """Replace every target the installed stack has; returns the qualified
        names replaced (module.attr, module.Class.method, module.DICT[key])."""
        if self._applied:
            return self.replaced()
        if self.check_version() is None:
            log.info("rlhf_fast: %s is not installed; nothing patched", self.package)
            return []
        originals: list[tuple[Any, Any]] = []  # (original, replacement) for the by-name sweep
        for t in [*self.targets, *self.extra_targets]:
            mod = self._import(t.module)
            if mod is None:
                continue
            if t.kind == "function":
                orig = getattr(mod, t.attr, None)
                if orig is None or not callable(orig):
                    continue
                orig = getattr(orig, _ORIGINAL_ATTR, orig)
                rep = t.make(orig, mod)
                self._apply(mod, t.attr, orig, rep, f"{t.module}.{t.attr}")
                originals.append((orig, rep))
            elif t.kind == "method":
                for cls in list(vars(mod).values()):
                    if not (inspect.isclass(cls) and cls.__module__ == mod.__name__ and t.attr in cls.__dict__):
                        continue
                    orig = cls.__dict__[t.attr]
                    if not inspect.isfunction(orig):
                        continue
                    rep = t.make(orig, mod)
                    if rep is None:
                        continue
                    self._apply(cls, t.attr, orig, rep, f"{t.module}.{cls.__name__}.{t.attr}")
            elif t.kind == "registry":
                dname, key = t.attr.split(":", 1)
                reg = getattr(mod, dname, None)
                if not isinstance(reg, dict) or key not in reg:
                    continue
                orig = reg[key]
                # the registry holds the same function as a module attribute we replaced: reuse its replacement
                rep = next((r for o, r in originals if o is orig), None) or t.make(orig, mod)
                self._apply(reg, key, orig, rep, f"{t.module}.{dname}[{key!r}]")
        # names the stack's other modules imported by name (`from .utils import f`)
        for mod in self._stack_modules():
            for name, value in list(vars(mod).items()):
                for orig, rep in originals:
                    if value is orig:
                        self._apply(mod, name, orig, rep, f"{mod.__name__}.{name}")
        if self._applied:
            log.info("rlhf_fast: patched %d functions of %s", len(self._applied), self.package)
        return self.replaced()

    def unpatch(self) -> list[str]:
        """Put every original back (also in stack modules imported while
        patched, which picked up a replacement by name); returns what was restored."""
        restored = self.replaced()
        reps = {id(a.replacement): a.original for a in self._applied}
        for a in reversed(self._applied):
            _set(a.owner, a.key, a.original)
        for mod in self._stack_modules():
            for name, value in list(vars(mod).items()):
                if id(value) in reps and getattr(value, _ORIGINAL_ATTR, None) is reps[id(value)]:
                    setattr(mod, name, reps[id(value)])
        self._applied.clear()
        return restored

    @contextlib.contextmanager
    def patched(self):
        """`with patched() as names:` patch on entry, unpatch on exit (only what this
        block patched: an outer patch() stays)."""
        was_active = self.active
        names = self.patch()
        try:
            yield names
        finally:
            if not was_active:
                self.unpatch()


# ---------------------------------------------------------------- argument checks shared by the adapters


def is_real(x) -> bool:
    import numbers

    return isinstance(x, numbers.Real) and not isinstance(x, bool)


# Label value that never matches a real label: rows masked out by the caller get it, so our
# kernel returns 0 and no gradient there, while any label outside [0, V) still raises.
NO_LABEL = -(2**63)


def check_tokens(what: str, *tensors) -> None:
    """(B, T) float tensors of one shape on one device, or Fallback."""
    import torch

    first = tensors[0]
    for t in tensors:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise Fallback(f"{what} that are not float tensors")
        if t.dim() != 2 or t.shape != first.shape or t.device != first.device:
            raise Fallback(f"{what} that are not (B, T) tensors of one shape and device")


def check_mask(mask, like, *, allow_bool: bool = True):
    """A (B, T) mask of 0/1 (bool, int or float) -> bool tensor, or Fallback.
    A float mask with other values (token weights) would change the stacks'
    masked means, so it falls back; checking costs one host sync, float masks only."""
    import torch

    if not isinstance(mask, torch.Tensor) or mask.shape != like.shape or mask.device != like.device:
        raise Fallback("a mask that is not a tensor of the tokens' shape")
    if mask.dtype == torch.bool:
        if not allow_bool:
            raise Fallback("a bool mask (the original raises)")
        return mask
    if mask.is_floating_point() and bool(((mask != 0) & (mask != 1)).any()):
        raise Fallback("a mask with values other than 0 and 1")
    if mask.is_complex():
        raise Fallback("a complex mask")
    return mask != 0


def unit_interval(name: str, x) -> float:
    """gamma / lambda: a number (or 0-dim tensor) in [0, 1], or Fallback."""
    import torch

    if isinstance(x, torch.Tensor) and x.dim() == 0:
        x = x.item()
    if not is_real(x) or not (0.0 <= float(x) <= 1.0):
        raise Fallback(f"{name} outside [0, 1] or not a number")
    return float(x)
