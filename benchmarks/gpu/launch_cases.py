"""The Triton launches the offline compile check covers, and each kernel's budget.

Every launch here is produced by the real launcher (the triton_op in
rlhf_fast/triton/) called on meta tensors, so its block sizes, num_warps and
num_stages are exactly what that launcher picks on a GPU: nothing is copied
from the launchers into this file. What this file chooses is the inputs:
every dtype each op accepts, each constexpr flag on and off, and shapes that
reach each distinct launch configuration (the production shapes of the GPU
benchmarks included). `KERNELS` lists every @triton.jit kernel that is
launched from the host; tests/test_offline_compile.py proves that list
complete against the package and that the cases below reach all of it.
"""

from __future__ import annotations

import torch

FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# kernel -> how to read its static counts.
#   block: the constexpr whose elements one program streams per iteration of
#          its hot loop (None: no per-element figure, e.g. a GEMM tile);
#   last_program_epilogue: straight-line streaming code, then an epilogue that
#          only the grid's last program runs (its loops are cold): the
#          per-element figure counts what precedes the ticket atomic;
#   spill_budget: spill bytes (stores + loads) allowed, per target. Zero for
#          the streaming kernels on sm_90: a spill is a local-memory round trip
#          per element, dearer than the HBM read itself. The exceptions:
#          - one-program epilogues (the *_finish kernels): 64 B, cold code run once;
#          - linear_logprobs fwd: 64 B, the fp32 and fp64 tiles (ieee dots with
#            no tensor cores at 255 registers: 28 B fp32 under Triton 3.6, 40 B
#            fp64 under 3.9); bf16 / fp16, the training dtypes, spill nothing;
#          - matmul_acc: 64 B, its fp32 read-add-write epilogue of a 128 x 128 tile;
#          - sm_80 GEMM-tile kernels: 512 B. The 128 x 128 tiles are tuned for
#            Hopper; on Ampere they must compile and fit, and spill a little.
#          - group_advantages: 16 B. Triton 3.6 spills 8 B there (a 64-bit
#            stack slot at 32 registers) where 3.9 spills none;
#          - the sampler on sm_90: 24 B. Triton 3.6 spills 8 B in its filtered
#            bf16 / fp16 specialisation at the 128-register cap of 8 warps (the
#            max-shifted keys), and 24 B in the small-vocabulary one (V = 1003,
#            BLOCK_V 1024, 72 registers) since its sweeps became the jit
#            helpers it shares with the processed-log-prob kernel (the same
#            operations; 16 B before); 3.9 spills none. Unmeasured on a GPU;
#          - sm_80 (Ampere must compile and fit; the targets are H100 / H200):
#            the sampler 32 B (its filtered path at the 128-register cap of
#            8 warps, Triton 3.9) and the log-prob backward 16 B (its fp64
#            specialisation, the tests' dtype, under Triton 3.9);
#          - ppo_loss fwd: 16 B. With the launcher's register cap
#            (ppo_policy_loss.fwd_maxnreg) the sm_80 fp32 specialisations with
#            a token-level correction spill 8 B; all else spills nothing;
#          - ppo_value_loss fwd: 16 B, its fp64 specialisation under Triton 3.9
#            (64 registers at 8 warps); fp32 and bf16 spill nothing.
_Z, _E, _G = {90: 0, 80: 0}, {90: 64, 80: 64}, {90: 0, 80: 512}
KERNELS = {
    "_logprobs_fwd_kernel": dict(block="BLOCK_V", spill_budget=_Z),
    "_logprobs_bwd_kernel": dict(block="BLOCK_V", spill_budget={90: 0, 80: 16}),
    "_linear_logprobs_fwd_kernel": dict(block=None, spill_budget={90: 64, 80: 512}),
    "_linear_logprobs_dlogits_kernel": dict(block=None, spill_budget=_G),
    "_matmul_acc_kernel": dict(block=None, spill_budget={90: 64, 80: 512}),
    "_sample_fwd_kernel": dict(block="BLOCK_V", spill_budget={90: 24, 80: 32}),
    "_processed_logprobs_fwd_kernel": dict(block="BLOCK_V", spill_budget={90: 16, 80: 32}),
    "_processed_logprobs_bwd_kernel": dict(block="BLOCK_V", spill_budget=_Z),
    "_ppo_loss_fwd_kernel": dict(block="BLOCK_T", spill_budget={90: 16, 80: 16}, last_program_epilogue=True),
    "_ppo_loss_bwd_kernel": dict(block="BLOCK_T", spill_budget=_Z),
    "_rollout_row_kernel": dict(block="BLOCK_T", spill_budget=_Z),
    "_ppo_value_loss_fwd_kernel": dict(block="BLOCK_T", spill_budget={90: 16, 80: 16}),
    "_ppo_value_loss_finish_kernel": dict(block=None, spill_budget=_E),
    "_kl_penalty_fwd_kernel": dict(block="BLOCK", spill_budget=_Z),
    "_kl_penalty_bwd_kernel": dict(block="BLOCK", spill_budget=_Z),
    "_whiten_stats_kernel": dict(block="BLOCK", spill_budget=_Z),
    "_whiten_merge_kernel": dict(block=None, spill_budget=_E),
    "_whiten_apply_kernel": dict(block="BLOCK", spill_budget=_Z),
    "_whiten_segments_kernel": dict(block="BLOCK", spill_budget=_Z),
    "_group_advantages_fwd_kernel": dict(block=None, spill_budget={90: 16, 80: 16}),
}


# The hot kernels at the GPU benchmarks' production shapes, with the static
# GPU performance goals: (label, kernel, the launch case it must
# come from, HBM bytes moved per element, SASS instructions per element goal,
# MUFU per element goal). Bytes: a bf16 logit read is 2 B; the log-prob
# backward reads the logit and writes its gradient (4 B); ppo_loss fwd reads
# five fp32 tokens and the bool mask and writes d loss / d logp (25 B).
HOT = [
    ("logprobs fwd + entropy, bf16", "_logprobs_fwd_kernel", "logprobs fwd torch.bfloat16 V=151936", 2, 12, 1),
    ("logprobs fwd, bf16", "_logprobs_fwd_kernel", "logprobs fwd torch.bfloat16 V=151936 no entropy", 2, 9, 1),
    (
        "logprobs bwd + entropy grad, bf16",
        "_logprobs_bwd_kernel",
        "logprobs bwd torch.bfloat16 V=151936 grad_entropy=True",
        4,
        10,
        1,
    ),
    ("logprobs bwd, bf16", "_logprobs_bwd_kernel", "logprobs bwd torch.bfloat16 V=151936 grad_entropy=False", 4, 10, 1),
    ("sample (plain), bf16", "_sample_fwd_kernel", "sample torch.bfloat16 V=131072 filtered=False", 2, None, None),
    (
        "sample (top-k/p/min-p), bf16",
        "_sample_fwd_kernel",
        "sample torch.bfloat16 V=131072 filtered=True",
        2,
        None,
        None,
    ),
    (
        "ppo_loss fwd, fp32",
        "_ppo_loss_fwd_kernel",
        "ppo_loss fwd torch.float32 (256,8192) ent=True kl=k3 dual=3.0 token-mean",
        25,
        None,
        None,
    ),
    ("ppo_loss bwd, fp32", "_ppo_loss_bwd_kernel", "ppo_loss bwd torch.float32 (256,8192) ent=True", 13, None, None),
    ("whiten apply, fp32", "_whiten_apply_kernel", "whiten torch.float32 shift=True", 9, None, None),
]


# meta tensors by default; tests use fake CUDA tensors on cuda:1 (FakeTensorMode)
DEVICE = "meta"


def _m(shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device=DEVICE)


def _logprobs_cases(ops):
    fwd, bwd = ops.logprobs.logprobs_fwd_triton._init_fn, ops.logprobs.logprobs_bwd_triton._init_fn
    out = []
    # every dtype at a production vocabulary (the 4096-wide block); both backward flags
    for dt in FLOATS:
        x, y = _m((1, 16, 151936), dt), _m((1, 16), torch.int64)
        out.append((f"logprobs fwd {dt} V=151936", lambda x=x, y=y: fwd(x, y, 1.0, -100, True)))
        out.append((f"logprobs fwd {dt} V=151936 no entropy", lambda x=x, y=y: fwd(x, y, 1.0, -100, False)))
        for has_gh in (False, True):
            rows = (_m((1, 16)), _m((1, 16)), _m((1, 16)))  # row_max, log_s, entropy
            args = (_m((1, 16)), _m((1, 16)) if has_gh else None, x, y, *rows, 1.0, -100)
            out.append((f"logprobs bwd {dt} V=151936 grad_entropy={has_gh}", lambda a=args: bwd(*a)))
    # narrow blocks and an odd row stride, as tests and small vocabularies launch them
    for V in (7, 1003):
        x, y = _m((2, 3, V), torch.bfloat16), _m((2, 3), torch.int32)
        out.append((f"logprobs fwd bf16 V={V} int32 labels", lambda x=x, y=y: fwd(x, y, 0.7, -100, True)))
    return out


def _linear_cases(ops):
    from rlhf_fast.ops._linear_logprobs import default_chunk_size

    mod = ops.linear_logprobs
    fwd, bwd = mod.linear_logprobs_fwd_triton._init_fn, mod.linear_logprobs_bwd_triton._init_fn
    out = []
    shapes = {dt: [(8192, 4096, 131072)] for dt in FLOATS}
    shapes[torch.bfloat16].append((1937, 3584, 152064))
    shapes[torch.float64] = [(1937, 64, 1003)]  # fp64 is for tests: tiles by dtype, not by shape
    for dt, dims in shapes.items():
        for N, H, V in dims:
            for has_bias in (False, True):
                h, w, y = _m((N, H), dt), _m((V, H), dt), _m((N,), torch.int64)
                b = _m((V,), dt) if has_bias else None
                tag = f"{dt} N={N} H={H} V={V} bias={has_bias}"
                out.append((f"linear fwd {tag}", lambda h=h, w=w, b=b, y=y: fwd(h, w, b, y, 1.0, -100, 4096)))
                chunk = default_chunk_size(N, V, torch.device("cuda"))
                for has_gh in (False, True) if has_bias else (True,):
                    rows = (_m((N,)), _m((N,)), _m((N,)))  # row_max, log_s, entropy
                    args = (_m((N,)), _m((N,)) if has_gh else None, h, w, b, y, *rows, 1.0, -100, chunk)
                    out.append((f"linear bwd {tag} grad_entropy={has_gh}", lambda a=args: bwd(*a)))
    return out


def _sampling_cases(ops):
    fwd = ops.sampling.sample_fwd_triton._init_fn
    out = []
    for dt, V in [(dt, 131072) for dt in FLOATS] + [(torch.bfloat16, 1003)]:
        B = 128
        args = (
            _m((B, V), dt),
            _m((B,), torch.int64),
            _m((B,), torch.float64),
            _m((B,), torch.int64),
            _m((B,), torch.float64),
            _m((B,), torch.float64),
        )
        for filtered in (False, True):
            out.append((f"sample {dt} V={V} filtered={filtered}", lambda a=args, f=filtered: fwd(*a, f)))
    # scoring given labels under the same truncation (logprobs_from_logits(top_k=, top_p=, min_p=))
    score = ops.sampling.processed_logprobs_fwd_triton._init_fn
    score_bwd = ops.sampling.processed_logprobs_bwd_triton._init_fn
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        N, V = 128, 131072
        x, y = _m((N, V), dt), _m((N,), torch.int64)
        params = (_m((N,), torch.float64), _m((N,), torch.int64), _m((N,), torch.float64), _m((N,), torch.float64))
        for filtered, ent in ((True, False), (True, True), (False, True)):
            tag = f"{dt} V={V} filtered={filtered} entropy={ent}"
            out.append(
                (f"processed_logprobs fwd {tag}", lambda a=(x, y, *params), f=filtered, e=ent: score(*a, -100, f, e))
            )
        stats, ent_out = _m((N, 3)), _m((N,))
        for has_lp, has_ent in ((True, False), (True, True), (False, True)):
            args = (_m((N,)) if has_lp else None, _m((N,)) if has_ent else None, x, y, params[0], stats, ent_out, -100)
            tag = f"{dt} V={V} grad_logprobs={has_lp} grad_entropy={has_ent}"
            out.append((f"processed_logprobs bwd {tag}", lambda a=args: score_bwd(*a)))
    return out


def _ppo_cases(ops):
    m, value, kl_mod = ops.ppo_policy_loss, ops.ppo_value_loss, ops.kl_penalty
    out = []

    def policy(dt, B, T, ent, kl, dual, agg):
        t, mask = _m((B, T), dt), _m((B, T), torch.bool)
        args = (
            t,
            t,
            t,
            mask,
            t if ent else None,
            t if kl else None,
            0.01,
            0.1,
            kl or "k1",
            0.2,
            0.28,
            dual,
            agg,
            float(T),
        )
        tag = f"{dt} ({B},{T}) ent={ent} kl={kl} dual={dual} {agg}"
        out.append((f"ppo_loss fwd {tag}", lambda: m.ppo_loss_fwd_triton._init_fn(*args)))

    # every dtype with every feature on, at the benchmark shape and an odd one
    for dt in FLOATS:
        for B, T in ((256, 8192), (3, 17)):
            policy(dt, B, T, True, "k3", 3.0, "token-mean")
    # each flag off, each KL kind and each aggregation: fp32 and bf16
    for dt in (torch.float32, torch.bfloat16):
        policy(dt, 256, 8192, False, None, None, "token-mean")
        for kl in ("k1", "k2", "abs"):
            policy(dt, 256, 8192, False, kl, None, "token-mean")
        for agg in ("seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
            policy(dt, 64, 4096, True, "k3", 3.0, agg)
    # rollout correction: token level (no row pass), sequence / geometric with the row pass, every dtype
    from rlhf_fast import RolloutCorrection as RC

    for dt in FLOATS:
        for spec in (
            RC("token", 2.0, "token_k1", "0.5_2.0"),
            RC("sequence", "0.5_2.0", "seq_mean_k1", 1.01),
            RC("geometric", 2.0, "seq_max_k3", 0.1),
            RC(None, 2.0),
        ):
            t, mask = _m((256, 8192), dt), _m((256, 8192), torch.bool)
            args = (t, t, t, mask, t, t, 0.01, 0.1, "k3", 0.2, 0.28, 3.0, "token-mean", 8192.0, t, *spec.kernel_args())
            tag = f"{dt} (256,8192) {spec.rollout_is} {spec.rollout_rs}"
            out.append((f"ppo_loss fwd rollout correction {tag}", lambda a=args: m.ppo_loss_fwd_triton._init_fn(*a)))
    # packed (cu_seqlens): 1,000 segments of 200 tokens on average (the
    # benchmark's length spread), every kernel's PACKED specialisation
    total, S = 200_000, 1000
    for dt in FLOATS:
        acc = torch.float64 if dt == torch.float64 else torch.float32
        t, mask, cu = _m((total,), dt), _m((total,), torch.bool), _m((S + 1,), torch.int32)
        for spec in (RC(None, 2.0), RC("sequence", "0.5_2.0", "seq_mean_k1", 1.01)):
            roll = t if spec.rollout_is else None
            args = (t, t, t, mask, t, t, 0.01, 0.1, "k3", 0.2, 0.28, 3.0, "seq-mean-token-mean", 1024.0, roll)
            args = args + (*spec.kernel_args(), cu)
            tag = f"{dt} packed ({total}, S={S}) {spec.rollout_is} {spec.rollout_rs}"
            out.append((f"ppo_loss fwd {tag}", lambda a=args: m.ppo_loss_fwd_triton._init_fn(*a)))
        args = (_m((), acc), _m((total,), acc), _m((S,), acc), mask, 0.01, True, dt, dt, cu)
        out.append((f"ppo_loss bwd {dt} packed ({total}, S={S})", lambda a=args: m.ppo_loss_bwd_triton._init_fn(*a)))
        args = (t, t, t, mask, 0.2, "seq-mean-token-mean", 1024.0, cu)
        out.append(
            (f"value_loss {dt} packed ({total}, S={S})", lambda a=args: value.ppo_value_loss_fwd_triton._init_fn(*a))
        )
    for dt in FLOATS:
        acc = torch.float64 if dt == torch.float64 else torch.float32
        B, T = 256, 8192
        mask = _m((B, T), torch.bool)
        for has_ent in (False, True):
            args = (_m((), acc), _m((B, T), acc), _m((B,), acc), mask, 0.01, has_ent, dt, dt)
            out.append(
                (f"ppo_loss bwd {dt} ({B},{T}) ent={has_ent}", lambda a=args: m.ppo_loss_bwd_triton._init_fn(*a))
            )
        t = _m((B, T), dt)
        for clip, agg in ((None, "token-mean"), (0.2, "seq-mean-token-mean")):
            args = (t, t, t, mask, clip, agg, float(T))
            out.append(
                (
                    f"value_loss {dt} ({B},{T}) clip={clip} {agg}",
                    lambda a=args: value.ppo_value_loss_fwd_triton._init_fn(*a),
                )
            )
        for kind in ("k1", "k2", "k3", "abs") if dt == torch.float32 else ("k3",):
            out.append((f"kl fwd {dt} {kind}", lambda t=t, k=kind: kl_mod.kl_penalty_fwd_triton._init_fn(t, t, k)))
            out.append(
                (
                    f"kl bwd {dt} {kind}",
                    lambda t=t, k=kind, a=acc: kl_mod.kl_penalty_bwd_triton._init_fn(_m(t.shape, a), t, t, k),
                )
            )
    return out


def _advantages_cases(ops):
    m = ops.advantages
    out = []
    for dt in FLOATS:
        x = _m((1024, 8192), dt)
        for shift in (False, True) if dt == torch.float32 else (True,):
            args = (x, _m((1024, 8192), torch.bool), shift, 1e-8)
            out.append((f"whiten {dt} shift={shift}", lambda a=args: m.whiten_triton._init_fn(*a)))
        s = _m((4096,), dt)
        for est in m.ESTIMATORS if dt == torch.float32 else ("grpo",):
            out.append(
                (
                    f"group {dt} n=4096 g=16 {est}",
                    lambda s=s, e=est: m.group_advantages_triton._init_fn(s, None, 16, e, 1e-6),
                )
            )
    # packed: 1024 segments of ~200 tokens, one mean / var each
    for dt, shift, cu_dt in [
        (torch.float32, True, torch.int32),
        (torch.float32, False, torch.int64),
        (torch.float64, True, torch.int32),
    ]:
        args = (_m((204800,), dt), _m((204800,), torch.bool), shift, 1e-8, _m((1025,), cu_dt))
        out.append((f"whiten per segment {dt} shift={shift} cu {cu_dt}", lambda a=args: m.whiten_triton._init_fn(*a)))
    s = _m((64,), torch.float32)
    out.append(
        ("group fp32 by id", lambda: m.group_advantages_triton._init_fn(s, _m((64,), torch.int64), 0, "grpo", 1e-6))
    )
    return out


def all_cases():
    """[(description, thunk)]: each thunk calls one launcher on meta tensors."""
    import types

    from rlhf_fast.triton import (
        advantages,
        kl_penalty,
        linear_logprobs,
        logprobs,
        ppo_policy_loss,
        ppo_value_loss,
        sampling,
    )

    ops = types.SimpleNamespace(
        logprobs=logprobs,
        linear_logprobs=linear_logprobs,
        sampling=sampling,
        ppo_policy_loss=ppo_policy_loss,
        ppo_value_loss=ppo_value_loss,
        kl_penalty=kl_penalty,
        advantages=advantages,
    )
    return _logprobs_cases(ops) + _linear_cases(ops) + _sampling_cases(ops) + _ppo_cases(ops) + _advantages_cases(ops)
