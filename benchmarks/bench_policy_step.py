"""The GRPO update's policy loss and backward through the trainer's two paths,
at long responses: what `policy_loss: fused` (the default) buys.

  fused   the trunk's hidden states and the lm_head weight straight into
          rlhf_fast.linear_ppo_loss (trainer/policy_trainer.py fused_loss):
          dH and dW in the forward, no (B, R, V) logits
  logits  the lm_head's (B, R, V) logits, logprobs_from_logits, ppo_loss
          (`policy_loss: logits`)

A tiny Llama (hidden 64, 2 layers, V = 32000), one prompt of 16 tokens and
one response of R tokens, GRPO token-mean loss with group advantages; the
model forward, the loss and the backward, as one micro-step of the update.
Each (path, R) runs in a fresh subprocess with glibc's mmap threshold fixed
(RSS follows live memory): after one warm-up step, the peak RSS of a step
above the RSS before it (Linux's VmHWM, reset through /proc/self/clear_refs),
and the median time of 3 more.

    python -m benchmarks.bench_policy_step [--lengths 1024,4096,16384] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
V, HIDDEN, LAYERS, P = 32000, 64, 2, 16


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _one(path: str, R: int, threads: int) -> dict:
    import torch

    import rlhf_fast
    from rlhf_fast.trainer.models import _left_padded_positions, head_loss, response_logprobs

    from .llama import causal_lm, llama_config

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = llama_config(V, HIDDEN, LAYERS)
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, P + R + 8)
    lm = causal_lm(cfg, "cpu")
    B = 1
    seq = torch.randint(0, V, (B, P + R))
    attn = torch.ones_like(seq)
    resp = torch.ones(B, R, dtype=torch.bool)
    labels = seq[:, P:]
    adv = torch.randn(B, 1).expand(B, R).contiguous()
    with torch.no_grad():
        old, _ = response_logprobs(lm, seq, attn, resp, P)
    old = old + 0.05 * torch.randn_like(old)

    def step():
        if path == "fused":

            def loss_fn(h, w, b):
                return rlhf_fast.linear_ppo_loss(h[:, P - 1 : -1], w, labels, old, adv, resp, bias=b)[0]

            loss = head_loss(lm, loss_fn, input_ids=seq, attention_mask=attn, position_ids=_left_padded_positions(attn))
        else:
            logp, ent = response_logprobs(lm, seq, attn, resp, P, return_entropy=True)
            loss = rlhf_fast.ppo_loss(logp, old, adv, resp, entropy=ent)[0]
        loss.backward()
        lm.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()  # warm-up: one-time allocations (thread pools, MKL buffers) stay out of the peak
    first = time.perf_counter() - t0
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    rss0 = _rss_mib()
    step()
    peak = _hwm_mib() - rss0
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"path": path, "R": R, "peak_mib": peak, "median_s": statistics.median(times), "first_s": first}


def run(quick: bool = True, device: str | None = None, tiny: bool = False) -> list:
    """The suite's entry (python -m benchmarks, benchmarks/test_bench.py): in
    process, so peaks are VmHWM resets in this process (`main` runs each
    case in a fresh one). CPU only: the fused path's GPU kernel is the
    two-op one."""
    from .harness import Record

    device = device or "cpu"
    if device != "cpu":
        return [Record("policy step", "fused", "logits path", "-", "float32", device, "fwd+bwd",
                       status="skipped: CPU benchmark (the GPU runs the two-op path)")]  # fmt: skip
    lengths = [64] if tiny else [1024] if quick else [1024, 4096, 16384]
    import torch

    threads = torch.get_num_threads()
    rows = [_one(path, R, threads) for R in lengths for path in ("fused", "logits")]
    return _records(rows, threads)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lengths", default="1024,4096,16384")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        path, R = args.child.split(":")
        print(json.dumps(_one(path, int(R), args.threads)))
        return
    rows = []
    for R in [int(v) for v in args.lengths.split(",")]:
        for path in ("fused", "logits"):
            cmd = [sys.executable, "-m", "benchmarks.bench_policy_step", "--child", f"{path}:{R}"]
            cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **FIXED_MMAP})
            if out.returncode != 0:
                rows.append({"path": path, "R": R, "error": out.stderr.strip().splitlines()[-1:]})
            else:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    print(f"{'R':>6} {'path':7} {'time s':>8} {'peak MiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['R']:>6} {r['path']:7} error: {r['error']}")
        else:
            print(f"{r['R']:>6} {r['path']:7} {r['median_s']:8.3f} {r['peak_mib']:9.1f}")
    if args.json:
        write(args.json, rows, args.threads)


def write(path: str, rows: list, threads: int) -> None:
    """Records (fused vs the logits path, per R) + machine facts, the format
    benchmarks/make_readme_table.py reads."""
    import torch

    from .harness import machine_facts, write_json

    torch.set_num_threads(threads)
    records = _records(rows, threads)
    facts = machine_facts("cpu")
    facts["command"] = f"python -m benchmarks.bench_policy_step --threads {threads} --json {path}"
    facts["note"] = "peak: RSS of one micro-step above the RSS before it, MALLOC_MMAP_THRESHOLD_=65536"
    write_json(path, records, facts)


def _records(rows: list, threads: int) -> list:
    from .harness import Record

    by = {(r["path"], r["R"]): r for r in rows}
    records = []
    for R in sorted({r["R"] for r in rows}):
        f, g = by.get(("fused", R), {}), by.get(("logits", R), {})
        shape = f"B=1 P={P} R={R} V={V} h={HIDDEN} L={LAYERS}"
        if "median_s" not in f or "median_s" not in g:
            why = f.get("error") or g.get("error")
            records.append(Record("policy step", "fused", "logits path", shape, "float32", "cpu", "fwd+bwd",
                                  status=f"skipped: {why}"))  # fmt: skip
            continue
        records.append(
            Record(
                "policy step",
                "fused",
                "logits path",
                shape,
                "float32",
                "cpu",
                "fwd+bwd",
                median_s=f["median_s"],
                baseline_median_s=g["median_s"],
                speedup=g["median_s"] / f["median_s"],
                peak_mem_bytes=int(f["peak_mib"] * 2**20),
                baseline_peak_mem_bytes=int(g["peak_mib"] * 2**20),
                threads=threads,
            )  # fmt: skip
        )
    return records


if __name__ == "__main__":
    main()
