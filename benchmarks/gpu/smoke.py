"""First contact with a GPU: launch every Triton kernel once at a real shape,
compare with plain torch on the same GPU, and print how each kernel compiled
there (registers, spills, shared memory). Needs no rlhf_fast._C.

    python3 -m benchmarks.gpu.smoke --json $OUT/smoke.json

Each check is independent: one failure is recorded and the others still run.
Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

os.environ["TRITON_INTERPRET"] = "0"

import torch

import rlhf_fast
from rlhf_fast import reference

DEV = "cuda"


def _close(name, got, want, atol, rtol=0.0):
    got, want = got.double(), want.double()
    finite = torch.isfinite(want)
    if not torch.equal(torch.isfinite(got), finite):
        raise AssertionError(f"{name}: non-finite values differ from torch")
    err = (got[finite] - want[finite]).abs()
    bound = atol + rtol * want[finite].abs()
    if bool((err > bound).any()):
        raise AssertionError(f"{name}: max error {float(err.max()):.3g} over bound")
    return float(err.max()) if err.numel() else 0.0


def check_logprobs_huge():
    """bf16 (16384, 151936): N*V = 2.49e9 > 2^31, so the last rows' offsets
    need 64-bit arithmetic. Checked on the last 8 rows against torch."""
    N, V = 16384, 151936
    logits = torch.randn(N, V, device=DEV, dtype=torch.bfloat16) * 4
    labels = torch.randint(0, V, (N,), device=DEV)
    lp, h = rlhf_fast.logprobs_from_logits(logits, labels, return_entropy=True)
    tail = logits[-8:].float().log_softmax(-1)
    want_lp = tail.gather(-1, labels[-8:, None])[:, 0]
    want_h = -(tail.exp() * tail).sum(-1)
    return dict(
        lp_err=_close("logprobs tail", lp[-8:], want_lp, 1e-3), h_err=_close("entropy tail", h[-8:], want_h, 1e-3)
    )


def check_logprobs_grad():
    N, V = 4096, 32000
    x = (torch.randn(N, V, device=DEV) * 3).bfloat16().requires_grad_()
    y = torch.randint(0, V, (N,), device=DEV)
    lp, h = rlhf_fast.logprobs_from_logits(x, y, temperature=0.7, return_entropy=True)
    w = torch.randn(N, device=DEV)
    (lp * w + 0.1 * h).sum().backward()
    xr = x.detach().double().requires_grad_()
    lpr, hr = reference.logprobs_from_logits(xr, y, temperature=0.7, return_entropy=True)
    (lpr * w.double() + 0.1 * hr).sum().backward()
    return dict(lp_err=_close("logprobs", lp, lpr, 2e-5, 1e-5), grad_err=_close("grad", x.grad, xr.grad, 1e-4, 1e-2))


def check_linear():
    N, H, V = 2048, 1024, 32000
    h = (torch.randn(N, H, device=DEV) / H**0.5).bfloat16().requires_grad_()
    w = torch.randn(V, H, device=DEV).bfloat16().requires_grad_()
    y = torch.randint(0, V, (N,), device=DEV)
    lp = rlhf_fast.linear_logprobs(h, w, y)
    lp.sum().backward()
    hr, wr = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    lpr = (hr @ wr.T).log_softmax(-1).gather(-1, y[:, None])[:, 0]
    lpr.sum().backward()
    return dict(
        lp_err=_close("linear logprobs", lp, lpr, 5e-2, 1e-2),
        dh_err=_close("dH", h.grad, hr.grad, 5e-2, 5e-2),
        dw_err=_close("dW", w.grad, wr.grad, 5e-2, 5e-2),
    )


def check_sampler():
    B, V = 128, 131072
    logits = torch.randn(B, V, device=DEV, dtype=torch.bfloat16) * 3
    g = torch.Generator(device=DEV).manual_seed(0)
    out = rlhf_fast.sample(logits, temperature=0.8, top_p=0.9, generator=g)
    raw = rlhf_fast.logprobs_from_logits(logits, out.tokens, temperature=0.8)
    if not torch.equal(out.logprobs, raw):
        raise AssertionError("sampler raw log-probs are not bit-identical to logprobs_from_logits")
    probs = (logits.float() / 0.8).softmax(-1)
    sp, _ = probs.sort(-1, descending=True)
    cut = sp[torch.arange(B, device=DEV), ((sp.cumsum(-1) < 0.9).sum(-1)).clamp(max=V - 1)]
    picked = probs.gather(-1, out.tokens[:, None])[:, 0]
    if bool((picked < cut * (1 - 1e-3)).any()):
        raise AssertionError("a sampled token lies outside the top-p set")
    return dict(rows=B)


def _offset_rows(big, sign, dtype, n=8, V=32003):
    """(n, V) logits in [o - 6u, o] (or [-o, -o + 6u]), u = max(1, 8 ulp(o)):
    a spread of a few of the offset's own spacings, every value exact."""
    o = torch.tensor(big, dtype=dtype)
    ulp = float(o - torch.nextafter(o, torch.zeros((), dtype=dtype))) if big else 0.0
    steps = torch.rand(n, V, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 6
    x = (big - max(1.0, 8 * ulp) * steps) if sign > 0 else (-big + max(1.0, 8 * ulp) * steps)
    return x.to(dtype).to(DEV)


def check_magnitude():
    """Log-prob, entropy, fused-linear and sampler log-probs against float64
    of the same numbers, error relative to the row's spread, at offsets 0,
    1e2, 1e4, 1e7, 1e30 and the dtype's max (both signs): the kernels
    subtract the max before scaling by 1 / T. Bound 2e-5 (fp32 math)."""
    worst = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        for big in (0.0, 1e2, 1e4, 1e7, 1e30, torch.finfo(dtype).max):
            for sign in (1, -1):
                x = _offset_rows(big, sign, dtype)
                n, V = x.shape
                y = torch.randint(0, V, (n,), device=DEV)
                for t in (1.0,) if big == torch.finfo(dtype).max else (1.0, 0.7):
                    xd = x.double()
                    z = (xd - xd.amax(-1, keepdim=True)) / t
                    logp = z.log_softmax(-1)
                    scale = (z.amax(-1) - z.amin(-1)).clamp(min=1.0)
                    name = f"{dtype} {sign}*{big:.3g} T={t}"

                    def rel(got, want):
                        return float(((got.double() - want) / scale).abs().max())

                    lp, h = rlhf_fast.logprobs_from_logits(x, y, temperature=t, return_entropy=True)
                    lpl, hl = rlhf_fast.linear_logprobs(
                        torch.eye(n, dtype=dtype, device=DEV), x.T.contiguous(), y, temperature=t, return_entropy=True
                    )
                    out = rlhf_fast.sample(x, temperature=t, top_k=50)
                    kept = z >= z.topk(50, -1).values[:, -1:]
                    want_p = z.gather(1, out.tokens[:, None])[:, 0] - torch.where(kept, z, -torch.inf).logsumexp(-1)
                    errs = dict(
                        lp=rel(lp, logp.gather(1, y[:, None])[:, 0]),
                        h=rel(h, -(logp.exp() * logp).sum(-1)),
                        linear_lp=rel(lpl, logp.gather(1, y[:, None])[:, 0]),
                        linear_h=rel(hl, -(logp.exp() * logp).sum(-1)),
                        sample_lp=rel(out.logprobs, logp.gather(1, out.tokens[:, None])[:, 0]),
                        sample_processed=rel(out.processed_logprobs, want_p),
                    )
                    for what, err in errs.items():
                        if not err <= 2e-5:  # NaN fails too
                            raise AssertionError(f"{name} {what}: error {err:.3g} relative to the spread")
                    worst = max(worst, *errs.values())
    return dict(worst_relative_error=worst)


def check_ppo():
    B, T = 256, 8192
    lp = (torch.randn(B, T, device=DEV) * 0.3).requires_grad_()
    old = lp.detach() + torch.randn(B, T, device=DEV) * 0.1
    adv = torch.randn(B, T, device=DEV)
    mask = torch.rand(B, T, device=DEV) > 0.2
    out = rlhf_fast.ppo_loss(lp, old, adv, mask, ref_logprobs=old, kl_coef=0.1, kl_kind="k3", dual_clip=3.0)
    loss = out[0] if isinstance(out, tuple) else out.loss
    loss.backward()
    with rlhf_fast.use_backend("reference"):
        lr = lp.detach().double().requires_grad_()
        o = rlhf_fast.ppo_loss(
            lr, old.double(), adv.double(), mask, ref_logprobs=old.double(), kl_coef=0.1, kl_kind="k3", dual_clip=3.0
        )
        ref_loss = o[0] if isinstance(o, tuple) else o.loss
        ref_loss.backward()
    return dict(
        loss_err=_close("ppo loss", loss.detach(), ref_loss.detach(), 1e-6, 1e-5),
        grad_err=_close("ppo grad", lp.grad, lr.grad, 1e-9, 1e-4),
    )


def check_advantages():
    x = torch.randn(1024, 8192, device=DEV)
    m = torch.rand(1024, 8192, device=DEV) > 0.3
    got = rlhf_fast.whiten(x, m)
    want = reference.whiten(x.double(), m)
    s = torch.randn(4096, device=DEV)
    ga = rlhf_fast.group_advantages(s, 16)
    gw = reference.group_advantages(s.double(), 16)
    kl = rlhf_fast.kl_penalty(x, x * 0.9, kind="k3")
    klr = reference.kl_penalty(x.double(), x.double() * 0.9, kind="k3")
    return dict(
        whiten_err=_close("whiten", got, want, 1e-5, 1e-5),
        group_err=_close("group", ga, gw, 1e-5, 1e-5),
        kl_err=_close("kl", kl, klr, 1e-5, 1e-5),
    )


def compiled_kernels() -> list[dict]:
    """Registers / spills / shared memory of every Triton kernel compiled so far."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import rlhf_fast.triton as pkg

    rows = []
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(mod).items():
            if not isinstance(obj, JITFunction) or obj.fn.__module__ != mod.__name__:
                continue
            for entry in getattr(obj, "device_caches", {}).values():
                cache = entry[0] if isinstance(entry, tuple) else entry
                for k in getattr(cache, "values", lambda: [])():
                    md = getattr(k, "metadata", None)
                    rows.append(
                        dict(
                            kernel=name,
                            registers=getattr(k, "n_regs", None),
                            spills=getattr(k, "n_spills", None),
                            shared=getattr(md, "shared", None),
                            num_warps=getattr(md, "num_warps", None),
                        )
                    )
    return rows


CHECKS = [
    check_logprobs_huge, check_logprobs_grad, check_linear, check_sampler, check_magnitude, check_ppo, check_advantages,
]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    results, failed = {}, 0
    with rlhf_fast.use_backend("triton"):
        for check in CHECKS:
            t0 = time.perf_counter()
            try:
                info = check()
                results[check.__name__] = dict(ok=True, **info)
            except Exception as exc:
                failed += 1
                results[check.__name__] = dict(
                    ok=False, error=f"{type(exc).__name__}: {exc}", tb=traceback.format_exc()[-3000:]
                )
            results[check.__name__]["seconds"] = round(time.perf_counter() - t0, 2)
            print(
                check.__name__, json.dumps({k: v for k, v in results[check.__name__].items() if k != "tb"}), flush=True
            )
            torch.cuda.empty_cache()
            if args.json:  # results land as soon as they exist
                with open(args.json, "w") as f:
                    json.dump(dict(checks=results), f, indent=1)
    kernels = compiled_kernels()
    for row in kernels:
        print("compiled", json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(checks=results, compiled=kernels, torch=torch.__version__, device=torch.cuda.get_device_name()),
                f,
                indent=1,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
