"""Records the demo's numbers that the README and docs/trainer.md quote, into
benchmarks/results/demo-cpu.json (then `python -m benchmarks.make_readme_table`
writes them into the docs).

    python -m benchmarks.record_demo [--seeds 0 1 2] [--out benchmarks/results/demo-cpu.json]

Runs, each in its own process as a user would: `rlhf-fast demo` for every
seed, `rlhf-fast demo --quick`, and 10 PPO steps of examples/ppo_tiny.yaml
with `train --threads 1` and with torch's default thread count (pure training
time summed from metrics.jsonl's time/step, plus the command's wall time).
Nothing here is asserted: it only records.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _cli(*args: str, env: dict | None = None) -> float:
    """Run `python -m rlhf_fast.cli ARGS` from the repository root; wall seconds."""
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "rlhf_fast.cli", *args], cwd=ROOT, check=True, env=env, stdout=subprocess.DEVNULL
    )
    return round(time.perf_counter() - t0, 1)


def _demo(tmp: str, seed: int, quick: bool) -> dict:
    out = os.path.join(tmp, f"demo-{seed}-{'quick' if quick else 'full'}")
    wall = _cli("demo", "--out", out, "--seed", str(seed), *(["--quick"] if quick else []))
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    summary["command_wall_seconds"] = wall  # with interpreter start and imports
    return summary


def _train_threads(tmp: str, threads: int | None, steps: int = 10) -> dict:
    out = os.path.join(tmp, f"train-{threads}")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torch's own default when None
    args = [
        "train",
        "ppo",
        "--config",
        "examples/ppo_tiny.yaml",
        "--fresh",
        "--set",
        f"steps={steps}",
        "--set",
        f"out_dir={out}",
        "--set",
        "progress=false",
    ]
    if threads is not None:
        args += ["--threads", str(threads)]
    else:  # torch's default: what `train` did before --threads existed
        import torch

        args += ["--threads", str(torch.get_num_threads())]
    wall = _cli(*args, env=env)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {
        "threads": threads or "torch default",
        "steps": len(rows),
        "command_wall_seconds": wall,
        "train_seconds": round(sum(r["time/step"] for r in rows), 2),
        "final_reward": rows[-1]["reward"] if rows else None,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "demo-cpu.json"))
    ap.add_argument("--note", default=None, help="free text stored with the machine facts (e.g. 'loaded machine')")
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    from benchmarks.harness import machine_facts

    facts = machine_facts("cpu")
    facts["command"] = "python -m benchmarks.record_demo " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.note:
        facts["note"] = args.note
    with open("/proc/loadavg") as f:
        facts["loadavg_before"] = f.read().split()[:3]
    with tempfile.TemporaryDirectory() as tmp:
        doc = {"machine": facts, "full": {}, "quick": None, "train_threads": []}
        for seed in args.seeds:
            doc["full"][str(seed)] = _demo(tmp, seed, quick=False)
            print(f"demo seed {seed}: {doc['full'][str(seed)]['wall_seconds']} s", flush=True)
        doc["quick"] = _demo(tmp, args.seeds[0], quick=True)
        print(f"demo --quick: {doc['quick']['wall_seconds']} s", flush=True)
        for threads in (1, None):
            doc["train_threads"].append(_train_threads(tmp, threads))
            print(f"train ppo 10 steps: {doc['train_threads'][-1]}", flush=True)
    with open("/proc/loadavg") as f:
        facts["loadavg_after"] = f.read().split()[:3]
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
