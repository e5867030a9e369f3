"""Forward-mode AD through every differentiable op.

The fused kernels have no jvp: on the cpp and Triton backends
torch.func.jvp, torch.func.jacfwd and torch.autograd.forward_ad must raise an
error naming the op and the reference backend (a zero tangent would be a
silent wrong answer). The reference backend is plain PyTorch: its tangents
must match a float64 central difference, which also proves the cases are
differentiable (a test that could only see zeros would prove nothing).
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import CPU_BACKENDS

import rlhf_fast

MODES = ("jvp", "jacfwd", "forward_ad")


def _case(name, dtype=torch.float64):
    """-> (public name, f(x) -> tensor, x): the direction of differentiation
    is the op's first differentiable input; every float input has `dtype`."""
    g = torch.Generator().manual_seed(7)
    B, T, V, H = 2, 3, 7, 4

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    if name in ("logprobs", "entropy"):
        y = torch.tensor([1, 6, 0, -100, 3, 2]).reshape(B, T)
        k = 0 if name == "logprobs" else 1
        return (
            "logprobs_from_logits",
            lambda z: rlhf_fast.logprobs_from_logits(z, y, temperature=0.7, return_entropy=True)[k],
            rnd(B, T, V),
        )
    if name in ("linear_logprobs", "linear_entropy"):
        w, y = rnd(V, H), torch.tensor([1, 6, 0, 3, 2])
        k = 0 if name == "linear_logprobs" else 1
        return "linear_logprobs", lambda h: rlhf_fast.linear_logprobs(h, w, y, return_entropy=True)[k], rnd(5, H)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    old, adv, ref = rnd(B, T) - 1, rnd(B, T), rnd(B, T) - 1
    if name == "ppo_loss":
        return (
            "ppo_loss",
            lambda lp: rlhf_fast.ppo_loss(lp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, clip_low=0.3)[0],
            old + 0.1 * rnd(B, T),
        )
    if name == "ppo_value_loss":
        returns = rnd(B, T)
        return (
            "ppo_value_loss",
            lambda v: rlhf_fast.ppo_value_loss(v, old, returns, mask, clip=0.5)[0],
            old + 0.3 * rnd(B, T),
        )
    assert name == "kl_penalty"
    return "kl_penalty", lambda lp: rlhf_fast.kl_penalty(lp, ref, kind="k3"), ref + 0.5 * rnd(B, T)


CASES = ("logprobs", "entropy", "linear_logprobs", "linear_entropy", "ppo_loss", "ppo_value_loss", "kl_penalty")


def _tangent(f, x, v, mode):
    if mode == "jvp":
        return torch.func.jvp(f, (x,), (v,))[1]
    if mode == "jacfwd":
        jac = torch.func.jacfwd(f)(x)  # out.shape + x.shape
        return (jac * v).flatten(jac.dim() - x.dim()).sum(-1)
    with fwAD.dual_level():
        out = f(fwAD.make_dual(x, v))
        return fwAD.unpack_dual(out).tangent


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kernel_backend", CPU_BACKENDS)
def test_forward_ad_raises_on_kernels(kernel_backend, case, mode):
    for dtype in (torch.float64, torch.float32):
        public, f, x = _case(case, dtype)
        with rlhf_fast.use_backend(kernel_backend):
            with pytest.raises(
                RuntimeError, match=rf"forward-mode AD .* not supported by rlhf_fast\.{public}.*reference"
            ):
                _tangent(f, x, torch.randn_like(x), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_forward_ad_reference_matches_central_difference(case, mode):
    _, f, x = _case(case)
    v = torch.randn_like(x)
    with rlhf_fast.use_backend("reference"):
        got = _tangent(f, x, v, mode)
        h = 1e-6
        want = (f(x + h * v) - f(x - h * v)) / (2 * h)
    assert got is not None
    assert want.abs().max() > 1e-3  # a direction the op actually responds to
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kernel_backend", CPU_BACKENDS)
def test_reverse_mode_unchanged_with_a_dual_level_open(kernel_backend):
    """An open forward-AD level alone (no tangent on the inputs) must not
    stop the kernels: only a tangent raises."""
    _, f, x = _case("logprobs", torch.float32)
    x = x.requires_grad_()
    with rlhf_fast.use_backend(kernel_backend), fwAD.dual_level():
        f(x).sum().backward()
    xr = x.detach().double().requires_grad_()
    with rlhf_fast.use_backend("reference"):
        f(xr).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)
