"""What a compiled GPU kernel does that the Triton interpreter hides.

- Every @triton.jit kernel compiles for sm_90a / sm_80 (benchmarks/gpu/offline_compile.py);
  a global read inside a kernel, which the interpreter accepts, fails that compile.
- NaN through max / min: a compiled tl.maximum returns the non-NaN operand (max.f32), so
  NaN handling must be explicit (triton 3.9's interpreter already models this: np.fmax).
- Python floats reach a compiled kernel as fp32 (the interpreter keeps doubles): the
  `gpu_scalar_args` fixture makes the interpreter do the same, so fp64 exactness is tested
  on the compiled semantics.
- Labels out of range never read out of bounds; launches run under the tensors' device.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from _compare import assert_close

import rlhf_fast
from rlhf_fast import reference

REPO = Path(__file__).resolve().parents[1]
triton = pytest.importorskip("triton")
interpreted = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not interpreted, reason="interpreter semantics test (CPU run)")


def _offline(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run code in a process where Triton compiles instead of interpreting."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------- offline compile


def test_kernel_table_lists_every_launched_jit_function():
    """launch_cases.KERNELS is complete: every @triton.jit in rlhf_fast.triton
    is either listed there (launched from the host) or called by a kernel."""
    proc = _offline(
        """
        from benchmarks.gpu.offline_compile import jit_functions, coverage_problems, capture_launches
        kernels, helpers = jit_functions()
        print(len(kernels), len(helpers))
        errs = coverage_problems(capture_launches())
        print("\\n".join(errs))
        raise SystemExit(1 if errs else 0)
        """
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n_kernels, n_helpers = map(int, proc.stdout.split()[:2])
    assert n_kernels == 20 and n_helpers >= 10, proc.stdout


def test_offline_compile_rejects_a_global_read_inside_a_kernel(tmp_path):
    """The defect class the interpreter cannot see: it runs this kernel, a GPU
    compile refuses it. The fixed spelling (a literal inside the kernel) compiles."""
    mod = tmp_path / "broken_kernels.py"
    mod.write_text(
        textwrap.dedent(
            """
            import triton
            import triton.language as tl

            NEG_INF = float("-inf")

            @triton.jit
            def bad_kernel(x_ptr, n, BLOCK: tl.constexpr):
                offs = tl.arange(0, BLOCK)
                x = tl.load(x_ptr + offs, mask=offs < n, other=NEG_INF)
                tl.store(x_ptr + offs, x, mask=offs < n)

            @triton.jit
            def good_kernel(x_ptr, n, BLOCK: tl.constexpr):
                offs = tl.arange(0, BLOCK)
                x = tl.load(x_ptr + offs, mask=offs < n, other=float("-inf"))
                tl.store(x_ptr + offs, x, mask=offs < n)
            """
        )
    )
    proc = _offline(
        f"""
        import sys, json
        sys.path.insert(0, {str(tmp_path)!r})
        from benchmarks.gpu.offline_compile import compile_one, problems
        for name in ("bad_kernel", "good_kernel"):
            launch = dict(module="broken_kernels", kernel=name, signature={{"x_ptr": "*fp32", "n": "i32",
                          "BLOCK": "constexpr"}}, constexprs={{"BLOCK": 128}}, spec={{"x_ptr": "D", "n": ""}},
                          num_warps=4, num_stages=3, cases=["test"])
            r = compile_one(launch, 90, use_cache=False)
            print(json.dumps(dict(name=name, ok=r["ok"], error=r["error"], problems=problems(r))))
        """
    )
    assert proc.returncode == 0, proc.stderr
    import json

    bad, good = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    assert not bad["ok"] and "NEG_INF" in bad["error"] and bad["problems"], bad
    assert good["ok"] and not good["problems"], good


def test_problems_flags_shared_memory_and_spills():
    from benchmarks.gpu.offline_compile import problems

    base = dict(kernel="_logprobs_fwd_kernel", triton="x", constexprs={}, ok=True, registers=255, shared=0)
    assert problems(dict(base, target="sm_90", shared=232448 + 1))  # over Hopper's 227 KiB
    assert not problems(dict(base, target="sm_90", shared=232448))
    assert problems(dict(base, target="sm_80", shared=166912 + 1))
    assert problems(dict(base, target="sm_90", spill_stores=4, spill_loads=4))  # streaming kernels: 0 B
    assert not problems(dict(base, target="sm_90", spill_stores=0, spill_loads=0))
    assert problems(dict(base, ok=False, target="sm_90", error="CompilationError"))


def test_last_program_ticket_needs_its_fences():
    """The offline check's reading of the last-program pattern (as Triton
    3.6 / 3.9 compile it for sm_90 and sm_80): barrier, GPU-scope fence,
    ticket atomic, L1 invalidation before the hand-off barrier. Each missing
    piece is reported."""
    from benchmarks.gpu.offline_compile import _ticket_ordered, parse_sass, problems

    lines = [
        "STG.E desc[UR4][R2.64], R9 ;",
        "BAR.SYNC.DEFER_BLOCKING 0x0 ;",
        "@P0 MEMBAR.ALL.GPU ;",
        "@P0 ATOMG.E.ADD.STRONG.GPU PT, R3, desc[UR12][R2.64], R5 ;",
        "POPC R7, R7 ;",
        "CCTL.IVALL ;",
        "BAR.SYNC.DEFER_BLOCKING 0x0 ;",
        "LDS R2, [UR8] ;",
    ]

    def ordered(keep):
        sass = "".join(f"        /*{16 * k:04x}*/   {line}\n" for k, line in enumerate(ln for ln in lines if keep(ln)))
        insts = parse_sass(sass)
        return _ticket_ordered(insts, next(k for k, (_, i) in enumerate(insts) if "ATOMG" in i))

    assert ordered(lambda ln: True)
    assert not ordered(lambda ln: "MEMBAR" not in ln)
    assert not ordered(lambda ln: "CCTL" not in ln)
    assert not ordered(lambda ln: not ln.startswith("BAR.SYNC"))
    base = dict(kernel="_ppo_loss_fwd_kernel", triton="x", constexprs={}, ok=True, registers=128, shared=0)
    assert problems(dict(base, target="sm_90", ticket_ordered=False))
    assert not problems(dict(base, target="sm_90", ticket_ordered=True))


def test_sass_loop_parser_counts_the_hot_loop():
    from benchmarks.gpu.offline_compile import hot_loops, parse_sass

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
    .L_x_0:
        /*0020*/                   FMUL R3, R2, R2 ;
        /*0030*/                   MUFU.EX2 R3, R3 ;
        /*0040*/                   FADD R2, R3, R2 ;
        /*0050*/               @P0 BRA `(.L_x_0) ;
        /*0060*/                   EXIT ;
        /*0070*/                   BRA 0x70;
        /*0080*/                   NOP;
    """
    loops = hot_loops(parse_sass(sass))
    assert loops == [dict(start=0x20, end=0x50, instructions=4, mufu=1)]


# ---------------------------------------------------------------- launch device


def test_every_triton_launch_runs_under_the_tensors_device(monkeypatch):
    """Tensors on cuda:1 with cuda:0 current: every launcher of every op must
    launch inside torch.cuda.device(cuda:1). Fake CUDA tensors, no GPU needed."""
    proc = _offline(
        """
        import contextlib, torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        import benchmarks.gpu.launch_cases as lc
        from benchmarks.gpu.offline_compile import capture_launches
        entered = []

        @contextlib.contextmanager
        def fake_guard(device):
            entered.append(torch.device(device).index)
            try:
                yield
            finally:
                entered.pop()

        # torch's Python indexing of a fake CUDA tensor needs a CUDA build; the
        # same views through select / narrow do not
        def getitem(self, idx):
            out, dim = self, 0
            for i in idx if isinstance(idx, tuple) else (idx,):
                if isinstance(i, int):
                    out = out.select(dim, i)
                else:
                    start, stop, _ = i.indices(out.shape[dim])
                    out, dim = out.narrow(dim, start, stop - start), dim + 1
            return out

        torch.Tensor.__getitem__ = getitem
        torch.Tensor.__setitem__ = lambda self, idx, value: None  # shapes only: nothing is computed
        seen = []
        import benchmarks.gpu.offline_compile as oc
        real_describe = oc.describe_launch
        def describe(kernel, args, kwargs, grid, case):
            seen.append((kernel.fn.__name__, entered[-1] if entered else None))
            return real_describe(kernel, args, kwargs, grid, case)
        oc.describe_launch = describe
        torch.cuda.device = fake_guard
        lc.DEVICE = "cuda:1"
        with FakeTensorMode(allow_non_fake_inputs=True):
            capture_launches()
        wrong = sorted({k for k, d in seen if d != 1})
        print(len(seen), wrong)
        raise SystemExit(1 if wrong or not seen else 0)
        """
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


# ---------------------------------------------------------------- NaN, labels, fp64 scalars


@pytest.fixture
def gpu_scalar_args(monkeypatch):
    """Python float kernel arguments arrive as fp32, as in a compiled launch."""
    import triton.language as tl
    from triton.runtime import interpreter as itp

    orig = itp._implicit_cvt

    def cvt(arg):
        if isinstance(arg, float):
            return tl.tensor(itp.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return orig(arg)

    monkeypatch.setattr(itp, "_implicit_cvt", cvt)


@needs_interpreter
def test_fp32_scalar_fixture_changes_fp64_results(gpu_scalar_args):
    """The fixture is live: an fp64 kernel fed 1/0.7 as fp32 would be ~1e-8 off."""
    from triton.runtime import interpreter as itp

    assert isinstance(itp._implicit_cvt(0.7), triton.language.tensor)


@needs_interpreter
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_fp64_logprobs_exact_with_compiled_scalar_semantics(gpu_scalar_args, temperature):
    logits = torch.randn(6, 1003, dtype=torch.float64) * 30
    labels = torch.randint(0, 1003, (6,))
    ref_lp, ref_h = reference.logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=True)
    with rlhf_fast.use_backend("triton"):
        lp, h = rlhf_fast.logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=True)
    assert_close(lp, ref_lp, "agree", "fp64 logprobs")
    assert_close(h, ref_h, "agree", "fp64 entropy")


@needs_interpreter
def test_fp64_linear_logprobs_exact_with_compiled_scalar_semantics(gpu_scalar_args):
    h = torch.randn(37, 32, dtype=torch.float64)
    w = torch.randn(203, 32, dtype=torch.float64)
    y = torch.randint(0, 203, (37,))
    ref = reference.linear_logprobs(h, w, y, temperature=0.7)
    with rlhf_fast.use_backend("triton"):
        out = rlhf_fast.linear_logprobs(h, w, y, temperature=0.7)
    ref = ref[0] if isinstance(ref, tuple) else ref
    out = out[0] if isinstance(out, tuple) else out
    assert_close(out, ref, "agree", "fp64 linear logprobs")


@needs_interpreter
def test_fp64_group_advantages_eps_exact_with_compiled_scalar_semantics(gpu_scalar_args):
    scores = torch.tensor([1.0, 1.0 + 1e-7, 1.0 - 1e-7, 1.0], dtype=torch.float64)
    ref = reference.group_advantages(scores, 4, estimator="grpo", eps=1e-7)
    with rlhf_fast.use_backend("triton"):
        out = rlhf_fast.group_advantages(scores, 4, estimator="grpo", eps=1e-7)
    assert_close(out, ref, "agree", "fp64 group advantages")


def _ppo_inputs(dtype=torch.float32):
    B, T = 3, 9
    lp = torch.randn(B, T, dtype=dtype) * 0.3
    old = lp + torch.randn(B, T, dtype=dtype) * 0.2
    adv = torch.randn(B, T, dtype=dtype)
    mask = torch.ones(B, T, dtype=torch.bool)
    return lp, old, adv, mask


@pytest.mark.parametrize("where", ["logprobs", "old_logprobs", "advantages"])
def test_nan_at_a_valid_position_gives_a_nan_loss_like_torch(backend, where):
    """max.f32 / min.f32 drop NaN on a GPU: without explicit propagation the
    clamps turned a NaN log-ratio into +-20 and a finite loss."""
    lp, old, adv, mask = _ppo_inputs()
    {"logprobs": lp, "old_logprobs": old, "advantages": adv}[where][1, 4] = float("nan")
    ref = torch.ops.rlhf_fast  # noqa: F841  (the registered ops are what run below)
    lp = lp.requires_grad_()
    out = rlhf_fast.ppo_loss(lp, old, adv, mask, ref_logprobs=old, kl_coef=0.1, kl_kind="k3", dual_clip=3.0)
    loss = out[0] if isinstance(out, tuple) else out.loss
    assert torch.isnan(loss), f"{backend}: NaN in {where} gave a finite loss {loss}"
    with rlhf_fast.use_backend("reference"):
        lp_ref = lp.detach().clone().requires_grad_()
        out_ref = rlhf_fast.ppo_loss(lp_ref, old, adv, mask, ref_logprobs=old, kl_coef=0.1, kl_kind="k3", dual_clip=3.0)
        loss_ref = out_ref[0] if isinstance(out_ref, tuple) else out_ref.loss
    loss.backward()
    loss_ref.backward()
    assert_close(lp.grad, lp_ref.grad, "agree", f"{backend} grad (NaN rows in place)")


def test_nan_value_and_kl_propagate(backend):
    lp, old, ret, mask = _ppo_inputs()
    v = lp.clone()
    v[0, 2] = float("nan")
    vl = rlhf_fast.ppo_value_loss(v, old, ret, mask, clip=0.2)
    vl = vl[0] if isinstance(vl, tuple) else getattr(vl, "loss", vl)
    assert torch.isnan(vl)
    for kind in ("k1", "k2", "k3", "abs"):
        kl = rlhf_fast.kl_penalty(v, old, kind=kind)
        assert torch.isnan(kl[0, 2]) and torch.isfinite(kl[1]).all(), kind


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_of_range_label_is_never_read_and_gives_nan(dtype):
    """torch.compile skips the host's label check; the kernel itself must not
    read logits[label] for a label outside [0, V) (an out-of-bounds load)."""
    V = 50
    logits = torch.randn(1, 4, V, dtype=dtype)
    labels = torch.tensor([[3, V + 1000, -7, -100]])
    lp, h, m, log_s = torch.ops.rlhf_fast.logprobs_fwd_triton(logits, labels, 1.0, -100, True)
    assert torch.isfinite(lp[0, 0]) and torch.isnan(lp[0, 1]) and torch.isnan(lp[0, 2]) and lp[0, 3] == 0
    assert torch.isfinite(h[0, :3]).all() and torch.isfinite(log_s[0, :3]).all()  # the row's statistics stand
    g = torch.ops.rlhf_fast.logprobs_bwd_triton(torch.ones(1, 4), None, logits, labels, m, log_s, h, 1.0, -100)
    assert torch.isnan(g[0, 1]).all() and torch.isnan(g[0, 2]).all() and torch.isfinite(g[0, 0]).all()


@needs_interpreter
def test_linear_logprobs_out_of_range_label_gives_nan():
    h = torch.randn(4, 16)
    w = torch.randn(40, 16)
    labels = torch.tensor([1, 40, -5, -100])
    lp, ent, _, _ = torch.ops.rlhf_fast.linear_logprobs_fwd_triton(h, w, None, labels, 1.0, -100, 64)
    assert torch.isfinite(lp[0]) and torch.isnan(lp[1]) and torch.isnan(lp[2]) and lp[3] == 0


# ---------------------------------------------------------------- no host sync


NO_SYNC_PRELUDE = """
import torch, rlhf_fast
from rlhf_fast import _backend

# Meta tensors stand in for CUDA ones: each op picks the backend it would
# pick on a GPU (the CUDA scans too: their registered fakes run here) and
# runs its launchers, which skip the launch on meta, forward and backward.
_choose = _backend.choose
_backend.choose = lambda op, device, impl: _choose(op, torch.device("cuda") if device.type == "meta" else device, impl)
_backend.has_cuda_kernels = lambda: True
# autocast knows no meta device: treat it as CPU, where it is off
_autocast, _enabled = torch.autocast, torch.is_autocast_enabled
torch.autocast = lambda device_type, *a, **k: _autocast("cpu" if device_type == "meta" else device_type, *a, **k)
torch.is_autocast_enabled = lambda *a: False if a and a[0] == "meta" else _enabled(*a)
"""

# Each op's public function on meta tensors, forward and backward. A host
# sync (.item(), bool(t), .tolist(), .nonzero(), a data-dependent shape)
# needs a value a meta tensor does not have, so it raises. (Fake CUDA tensors
# would be closer, but a CPU build of torch aborts in autograd's CUDA guard.)
NO_SYNC_CALLS = {
    "logprobs_from_logits": """
        x = torch.randn(4, 9, 1000, device="meta", requires_grad=True)
        y = torch.randint(0, 1000, (4, 9), device="meta")
        lp, h = rlhf_fast.logprobs_from_logits(x[:, :-1], y[:, 1:], temperature=0.7, return_entropy=True)
        (lp.sum() + h.sum()).backward()
        rlhf_fast.logprobs_from_logits(x, y).sum().backward()
    """,
    "linear_logprobs": """
        h = torch.randn(2, 7, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(1000, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
        y = torch.randint(0, 1000, (2, 7), device="meta")
        lp, ent = rlhf_fast.linear_logprobs(h, w, y, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
    """,
    "sample": """
        x = torch.randn(8, 1000, device="meta")
        rlhf_fast.sample(x, temperature=0.7, top_k=50, top_p=0.9, min_p=0.05)
        rlhf_fast.sample(x, temperature=torch.full((8,), 0.7, device="meta"))
    """,
    "ppo_loss": """
        lp = torch.randn(4, 33, device="meta", requires_grad=True)
        old, adv, ent, ref = (torch.randn(4, 33, device="meta") for _ in range(4))
        mask = torch.ones(4, 33, device="meta", dtype=torch.bool)
        loss, stats = rlhf_fast.ppo_loss(lp, old, adv, mask, entropy=ent, ref_logprobs=ref, kl_coef=0.1)
        loss.backward()
        loss, stats = rlhf_fast.ppo_policy_loss(lp, old, adv, mask, agg="seq-mean-token-mean")
        loss.backward()
        v = torch.randn(4, 33, device="meta", requires_grad=True)
        loss, stats = rlhf_fast.ppo_value_loss(v, old, adv, mask)
        loss.backward()
        rlhf_fast.kl_penalty(lp, ref, kind="k3").sum().backward()
    """,
    "advantages": """
        r, v = torch.randn(4, 33, device="meta"), torch.randn(4, 33, device="meta")
        mask = torch.ones(4, 33, device="meta", dtype=torch.bool)
        rlhf_fast.gae(r, v, mask, gamma=0.99, lam=0.95)
        g = torch.full((4,), 0.99, device="meta")
        rlhf_fast.gae(r, v, mask, gamma=g, lam=g)
        rlhf_fast.discounted_returns(r, mask, gamma=g)
        rlhf_fast.whiten(r, mask)
        rlhf_fast.group_advantages(torch.randn(16, device="meta"), 4, estimator="rloo")
    """,
}


# sample's subprocess takes ~25 s (the sampler's Triton kernels under the probe): the slow tier
@pytest.mark.parametrize(
    "op", [pytest.param(op, marks=pytest.mark.slow) if op == "sample" else op for op in sorted(NO_SYNC_CALLS)]
)
def test_default_gpu_path_makes_no_host_sync(op):
    body = textwrap.indent(textwrap.dedent(NO_SYNC_CALLS[op]), "    ")
    proc = _offline(NO_SYNC_PRELUDE + "if True:\n" + body + "print('ok')\n", timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-4000:]


@pytest.mark.slow  # ~25 s: a fresh interpreter running the probe
def test_the_no_sync_probe_catches_a_sync():
    """The probe itself: a label-range check forced on GPU (RLHF_FAST_CHECK_INPUTS=1) is a host sync, and fails."""
    body = textwrap.indent(textwrap.dedent(NO_SYNC_CALLS["logprobs_from_logits"]), "    ")
    code = "import os; os.environ['RLHF_FAST_CHECK_INPUTS'] = '1'\n" + NO_SYNC_PRELUDE + "if True:\n" + body
    proc = _offline(code, timeout=300)
    assert proc.returncode == 1 and "meta tensors" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.gpu
def test_a_training_step_captures_in_a_cuda_graph():
    """Run by the GPU suite: log-probs, entropy, GAE, whitening and the PPO
    loss, forward and backward, captured in one CUDA graph (any host sync
    raises during capture) and replayed: the replay matches eager."""
    torch.manual_seed(0)
    B, T, V = 8, 64, 32000
    logits = torch.randn(B, T, V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, V, (B, T), device="cuda")
    old = torch.randn(B, T, device="cuda") - 10
    rewards, values = torch.randn(B, T, device="cuda"), torch.randn(B, T, device="cuda")
    mask = torch.rand(B, T, device="cuda") > 0.2

    def step():
        lp, ent = rlhf_fast.logprobs_from_logits(logits, labels, return_entropy=True)
        adv, _ = rlhf_fast.gae(rewards, values, mask, gamma=1.0, lam=0.95)
        adv = rlhf_fast.whiten(adv, mask)
        loss, _ = rlhf_fast.ppo_loss(lp, old, adv, mask, entropy=ent)
        (grad,) = torch.autograd.grad(loss, logits)
        return loss.detach(), grad

    want_loss, want_grad = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up on a side stream, as torch.cuda.graph requires
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss_g, grad_g = step()
    graph.replay()
    torch.cuda.synchronize()
    # equal up to the order of any atomic reduction
    assert_close(loss_g, want_loss, "agree", "graph loss")
    assert_close(grad_g, want_grad, "agree", "graph grad")
