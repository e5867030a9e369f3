"""Autograd for the C++ ops, registered without torch.library's per-call
schema walk.

torch.library.register_autograd's generated forward re-fills the schema's
default arguments on every call (torch/_library/utils.fill_defaults), and
reads `schema.arguments`, a fresh list of Argument objects, once per
argument: O(arguments^2) Python work. For rlhf_fast::ppo_loss_fwd (21
arguments) that is 0.6 ms per call on this project's 2.5 GHz Xeon, about
12% of a whole (64, 4096) fp32 forward + backward step (measured with
cProfile: 0.120 s of 0.233 s over 200 tiny calls). `register_autograd`
below installs the same thing torch.library does (an autograd.Function
around a redispatch below the Autograd key), with the defaults read once.

The Triton ops (torch.library.triton_op) get the same kernel: theirs was
installed when they were defined (CustomOpDef registers one at once), so
`register_autograd(..., triton_op=op)` registers the formula with torch's
API first, then overrides that kernel (torch's stays where the override is
refused). ppo_loss_fwd_triton has the same 21 arguments (its schema walk
measured 396 us per call here), and on a GPU the whole eager call is
otherwise a few launches: the walk would be most of it.

Forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad): the
kernels have no jvp, and the dispatcher would run them below the Autograd key
and return outputs without a tangent, which every forward-mode API reads as
zero. The kernel below raises instead, naming the op and the reference
backend (plain PyTorch, where forward mode works). The check costs one
module-global read per call when no forward-AD level is open.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as _fwad

_LIB = torch.library.Library("rlhf_fast", "IMPL")


# registered op -> public function, for error messages
_PUBLIC_NAMES = {"logprobs_fwd": "logprobs_from_logits", "processed_logprobs_fwd": "logprobs_from_logits"}


def public_name(name: str) -> str:
    """rlhf_fast::<name> -> the rlhf_fast.<function> that calls it."""
    base = name.removesuffix("_triton")
    return _PUBLIC_NAMES.get(base, base.removesuffix("_fwd"))


def forward_ad_error(op: str) -> RuntimeError:
    return RuntimeError(
        f"forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad) is not supported by {op}: its "
        "fused kernel has no jvp, so its outputs would carry zero tangents. Use reverse mode (backward, "
        "torch.func.grad / jacrev / vjp), or rlhf_fast.use_backend('reference') (plain PyTorch) for forward-mode AD"
    )


def _any_tangent(args) -> bool:
    """Whether a forward-AD tangent rides on a tensor argument. An open level
    (forward_ad.dual_level, or torch.func.jvp / jacfwd, which open one too) is
    the cheap test; only then is each tensor unpacked."""
    if getattr(_fwad, "_current_level", 0) < 0:
        return False
    return any(isinstance(a, torch.Tensor) and _fwad.unpack_dual(a).tangent is not None for a in args)


def register_autograd(name: str, backward: Callable, *, setup_context: Callable, triton_op=None) -> None:
    """torch.library.register_autograd("rlhf_fast::<name>", backward,
    setup_context=setup_context) for an op with no keyword-only
    arguments: setup_context(ctx, inputs, output) sees every argument, the
    defaulted ones filled in; backward(ctx, *grads) returns one gradient
    per argument (trailing Nones beyond those passed are allowed).
    triton_op: the op's CustomOpDef, for an op defined with
    torch.library.triton_op, whose Autograd kernel this one overrides."""
    if triton_op is not None:
        triton_op.register_autograd(backward, setup_context=setup_context)
    op = getattr(torch.ops.rlhf_fast, name).default
    arguments = op._schema.arguments  # one read
    if any(a.kwarg_only for a in arguments):
        raise NotImplementedError(f"rlhf_fast::{name}: keyword-only arguments are not supported here")
    # the dispatcher drops trailing arguments equal to their defaults
    defaults = tuple(a.default_value if a.has_default_value() else None for a in arguments)
    below_autograd = torch._C._after_autograd_keyset

    def redispatch(keyset, args):
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & below_autograd, *args)

    class Generated(torch.autograd.Function):
        @staticmethod
        def forward(ctx, keyset, *args):
            out = redispatch(keyset, args)
            setup_context(ctx, args + defaults[len(args) :], out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            # backward sees the op's own arguments, as under torch.library
            needs = ctx.needs_input_grad
            ctx.needs_input_grad = needs[1:]
            try:
                return (None, *backward(ctx, *grads))  # None for keyset
            finally:
                ctx.needs_input_grad = needs

    Generated.__name__ = f"GeneratedBackwardFor_rlhf_fast_{name}"

    op_name = f"rlhf_fast.{public_name(name)}"

    def autograd_kernel(keyset, *args):
        if _any_tangent(args):
            raise forward_ad_error(op_name)
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return Generated.apply(keyset, *args)
        return redispatch(keyset, args)

    if triton_op is None:
        _LIB.impl(name, autograd_kernel, "Autograd", with_keyset=True)
        return
    with warnings.catch_warnings():
        # the dispatcher warns that it overrides the triton_op's kernel: intended
        warnings.filterwarnings("ignore", message=r"(?s).*Overriding a previously registered kernel")
        try:
            _LIB.impl(name, autograd_kernel, "Autograd", with_keyset=True, allow_override=True)
        except (TypeError, RuntimeError):  # a torch without allow_override: torch's kernel stays
            pass
