"""rlhf_fast.linear_ppo_loss vs Liger-Kernel's LigerFusedLinearGRPOLoss and
our two-op path, GRPO token-mean loss forward + backward from hidden states.

Contenders, same inputs, same process for the times:
  ours    rlhf_fast.linear_ppo_loss: dH, dW in the forward, 3 GEMMs per token
  two_op  rlhf_fast.linear_logprobs then rlhf_fast.ppo_loss: 4 GEMMs (the
          backward recomputes the logits)
  liger   liger_kernel 0.8.5 LigerFusedLinearGRPOLoss(loss_type="bnpo",
          beta=0, compiled=False): chunks of one sequence, each through its
          vocab-chunked selective log-prob (forward, then a backward that
          recomputes the logits: 4 GEMMs), all inside its forward
Times: interleaved rounds (one call of each per round), medians.
Working memory: peak RSS of one call above the RSS before it (inputs and
one warm-up call done), in a fresh subprocess per contender, with glibc's
mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0,
so RSS follows live memory) and, for comparison, without; "work" subtracts
the dH and dW outputs every contender must hold.

    python -m benchmarks.bench_linear_ppo_loss [--shapes 8x512,2x8192] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

H, V = 256, 32000
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
NAMES = ("ours", "two_op", "liger")
PEERS = {"liger": "Liger LigerFusedLinearGRPOLoss 0.8.5 (chunked torch)", "two_op": "linear_logprobs + ppo_loss"}


def make_inputs(B, T, h=H, v=V, device="cpu"):
    import rlhf_fast

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, h, generator=g)
    weight = torch.randn(v, h, generator=g) * h**-0.5
    labels = torch.randint(0, v, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    adv_seq = torch.randn(B, generator=g)
    with torch.no_grad():
        lp = rlhf_fast.linear_logprobs(hidden, weight, labels)
    old = lp + 0.1 * torch.randn(B, T, generator=g)  # ratios around 1, some clipped
    x = dict(hidden=hidden, weight=weight, labels=labels, mask=mask, adv_seq=adv_seq, old=old)
    return {k: t.to(device) for k, t in x.items()}


def run(quick: bool = True, device: str | None = None, tiny: bool = False) -> list:
    """The suite's entry (python -m benchmarks, benchmarks/test_bench.py):
    ours vs the two-op path and Liger through harness.compare (allocator
    peaks, not RSS: `main` below measures RSS in subprocesses)."""
    from benchmarks.harness import compare

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if tiny:
        cases = [(2, 16, 32, 1000)]
    else:
        cases = [(8, 512, H, V)] if quick else [(8, 512, H, V), (2, 8192, H, V)]
    records = []
    for B, T, h, v in cases:
        x = make_inputs(B, T, h, v, device)
        try:
            import liger_kernel  # noqa: F401

            liger = make_fn("liger", x)
        except ImportError:
            liger = "not installed; pip install --no-deps liger-kernel==0.8.5"
        base = {PEERS["two_op"]: make_fn("two_op", x), PEERS["liger"]: liger}
        records += compare(
            op="linear_ppo_loss", impl="cpp", fn=make_fn("ours", x), baselines=base, shape=f"({B}x{T}, {h}, {v})",
            dtype="float32", device=device, mode="fwd+bwd", warmup=1, repeat=3 if tiny else 5,
            interleave=tuple(base),
        )  # fmt: skip
    return records


def make_fn(name, x):
    """fn() -> (hidden grad, weight grad) of one forward + backward."""
    import rlhf_fast

    B, T = x["labels"].shape
    adv_tok = x["adv_seq"][:, None].expand(B, T)
    h = x["hidden"].clone().requires_grad_()
    w = x["weight"].clone().requires_grad_()
    if name == "ours":

        def loss():
            return rlhf_fast.linear_ppo_loss(h, w, x["labels"], x["old"], adv_tok, x["mask"])[0]

    elif name == "two_op":

        def loss():
            lp = rlhf_fast.linear_logprobs(h, w, x["labels"])
            return rlhf_fast.ppo_loss(lp, x["old"], adv_tok, x["mask"])[0]

    else:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        mod = LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False, loss_type="bnpo")

        def loss():
            return mod(h, w, x["labels"], x["mask"], x["adv_seq"], old_per_token_logps=x["old"])[0]

    def fn():
        h.grad = w.grad = None
        loss().backward()
        return h.grad, w.grad

    def clear():
        h.grad = w.grad = None

    fn.clear = clear
    return fn


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(name, B, T):
    """Run in a fresh process: working memory of one call."""
    torch.set_num_threads(1)
    x = make_inputs(B, T)
    fn = make_fn(name, x)
    fn()  # warm-up: lazy initialisation, first-call allocations
    fn.clear()  # its dH, dW freed: the measured call's count in its peak
    gc.collect()
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    out = fn()
    peak = _status("VmHWM") - base
    del out
    grads = B * T * H * 4 + V * H * 4  # the dH, dW outputs, fp32
    print(json.dumps({"peak": peak, "work": peak - grads}))


def measure_memory(name, B, T, fixed):
    env = dict(os.environ)
    for k in FIXED_MMAP:
        env.pop(k, None)
    if fixed:
        env.update(FIXED_MMAP)
    cmd = [sys.executable, "-m", "benchmarks.bench_linear_ppo_loss", "--child", name, str(B), str(T)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def rel(a, b):
    return float((a - b).norm() / b.norm())


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="8x512,2x8192")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", nargs=3)
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.child:
        return child(a.child[0], int(a.child[1]), int(a.child[2]))
    torch.set_num_threads(a.threads)
    from importlib.metadata import version

    import liger_kernel  # noqa: F401  (fails early, naming the package, if missing)

    print(f"torch {torch.__version__}, liger-kernel {version('liger-kernel')}, threads {a.threads}, H={H} V={V} fp32")
    results = []
    for shape in a.shapes.split(","):
        B, T = (int(s) for s in shape.split("x"))
        x = make_inputs(B, T)
        fns = {n: make_fn(n, x) for n in NAMES}
        grads = {n: fns[n]() for n in NAMES}  # also the warm-up
        agree = {n: (rel(grads[n][0], grads["liger"][0]), rel(grads[n][1], grads["liger"][1])) for n in NAMES[:2]}
        del grads
        times = {n: [] for n in NAMES}
        for _ in range(a.rounds):
            for n in NAMES:
                t0 = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - t0)
        del fns
        gc.collect()
        med = {n: statistics.median(v) for n, v in times.items()}
        mem = {n: {str(f): measure_memory(n, B, T, f) for f in (True, False)} for n in NAMES}
        r = {"B": B, "T": T, "median_s": med, "times_s": times, "memory": mem, "grad_rel_vs_liger": agree}
        results.append(r)
        mib = 2**20
        print(f"\n{B} x {T} tokens ({a.rounds} rounds)")
        print("| | time (median) | vs liger | work, fixed mmap | vs liger | peak, fixed | work, default malloc |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for n in NAMES:
            mf, md = mem[n]["True"], mem[n]["False"]
            print(
                f"| {n} | {med[n]:.2f} s | {med[n] / med['liger']:.2f}x | {mf['work'] / mib:.1f} MiB | "
                f"{mf['work'] / mem['liger']['True']['work']:.2f}x | {mf['peak'] / mib:.1f} MiB | {md['work'] / mib:.1f} MiB |"
            )
        for n, (eh, ew) in agree.items():
            print(f"{n} vs liger: dH {eh:.1e}, dW {ew:.1e} relative")
    if a.json:
        write_json(a.json, results, a.threads)


def write_json(path, results, threads):
    """The harness's format (benchmarks/make_readme_table.py renders its
    records into docs/benchmarks.md): one fwd+bwd record per shape and peer,
    peak = RSS above the inputs with the fixed mmap threshold (outputs
    included); the full measurements under "detail"."""
    from benchmarks.harness import Record, machine_facts

    records = []
    for r in results:
        for peer, label in PEERS.items():
            records.append(
                Record(
                    op="linear_ppo_loss", impl="cpp", baseline=label, shape=f"({r['B']}x{r['T']}, {H}, {V})",
                    dtype="float32", device="cpu", mode="fwd+bwd", median_s=r["median_s"]["ours"],
                    baseline_median_s=r["median_s"][peer], speedup=r["median_s"][peer] / r["median_s"]["ours"],
                    peak_mem_bytes=r["memory"]["ours"]["True"]["peak"],
                    baseline_peak_mem_bytes=r["memory"][peer]["True"]["peak"], threads=threads,
                ).as_dict()
            )  # fmt: skip
    facts = machine_facts("cpu")
    facts["cpu_threads"] = threads  # the timed threads (a --child process sets its own)
    facts["command"] = "python -m benchmarks.bench_linear_ppo_loss --json " + path
    facts["note"] = "peak: RSS with MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0"
    with open(path, "w") as f:
        json.dump({"machine": facts, "records": records, "summary": summary(results), "detail": results}, f, indent=1)


def summary(results):
    """Per shape and contender the numbers docs/linear_ppo_loss.md quotes."""
    mib = 2**20
    out = []
    for r in results:
        med, mem = r["median_s"], r["memory"]
        lw = mem["liger"]["True"]["work"]
        out.append(
            {
                n: {
                    "time_s": med[n],
                    "time_vs_liger": med[n] / med["liger"],
                    "work_mib": mem[n]["True"]["work"] / mib,
                    "work_vs_liger": mem[n]["True"]["work"] / lw,
                    "peak_mib": mem[n]["True"]["peak"] / mib,
                    "peak_default_mib": mem[n]["False"]["peak"] / mib,
                }
                for n in NAMES
            }
        )
    return out


if __name__ == "__main__":
    main()
