"""The rlhf-fast command line: demo | train | info (bench moved to `python -m benchmarks`).

Only the standard library is imported at the top: torch, transformers and
the ops load inside the command that needs them, so `rlhf-fast --help` and
argument errors answer in ~0.2 s instead of the ~9 s a full import takes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Errors a user can fix from the command line or the YAML: printed as one
# line (`--traceback` / `--debug` shows the full trace). Anything else keeps its traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
# The same for what a run meets on the way, defined with the trainer (imported once it is): a checkpoint that
# cannot be trusted, a file that cannot be written (disk full, read-only), a reward function that raised.
RUN_ERRORS = ("CheckpointError", "WriteError", "RewardError")


def format_info(report: dict) -> str:
    lines = [
        f"rlhf_fast {report.get('rlhf_fast', '?')}  torch {report['torch']}  (CUDA {report['torch_cuda'] or 'none'})",
        f"GPU: {report['cuda_device'] or 'none visible'}",
        f"compiled extension: {'loaded' if report['extension_loaded'] else 'NOT loaded: ' + str(report['extension_error'])}",
    ]
    build = report.get("build") or {}
    if build:
        lines.append(
            f"  built with {build.get('compiler')}; kernels: {', '.join(build.get('backends', []))}; "
            f"CUDA archs: {build.get('cuda_archs') or '-'}; OpenMP threads: {build.get('omp_max_threads')}; "
            f"CPU AVX2: {build.get('cpu_avx2')}, AVX-512: {build.get('cpu_avx512f')}"
        )
    lines.append(f"triton importable: {report['triton_importable']}")
    lines.append(f"forced backend (RLHF_FAST_BACKEND): {report['forced_backend'] or 'none (automatic)'}")
    lines.append("backends:")
    for name, per_dev in report["backends"].items():
        lines.append(f"  {name:9s} cpu: {per_dev['cpu']}")
        lines.append(f"  {'':9s} cuda: {per_dev['cuda']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-fast", description="Fused kernels for PPO-style RLHF")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="what is built and which backends run here")
    p_info.add_argument("--json", action="store_true", help="print the report as JSON")
    sub.add_parser("bench", help="moved: run `python -m benchmarks` from a source checkout")
    p_demo = sub.add_parser("demo", help="end-to-end RLHF on a tiny Llama: SFT, preferences, reward model, PPO")
    p_demo.add_argument("--out", default="out/demo", help="output directory (default out/demo)")
    p_demo.add_argument("--quick", action="store_true", help="shortened run for CI (~30-90 s)")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch intra-op threads (default 1: the ~0.1M-parameter model's matmuls are too small "
        "to split, and extra threads only contend on a shared machine)",
    )
    p_train = sub.add_parser(
        "train",
        help="train from a YAML config (see examples/)",
        description="Train from a YAML config; --set KEY=VALUE overrides any key of it.",
    )
    p_train.add_argument("algo", choices=["ppo", "grpo", "rm", "dpo"])
    p_train.add_argument("--config", required=True, help="YAML file (see examples/*.yaml)")
    p_train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, value read as YAML (repeatable): --set lr=1e-5 --set "
        "steps=50; a dotted key sets a nested one: --set lora.r=16",
    )
    p_train.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch intra-op threads. Default: $OMP_NUM_THREADS when set, else 1 for model "
        "tiny-demo (its matmuls are too small to split), else torch's default (one per core)",
    )
    p_train.add_argument(
        "--traceback", "--debug", dest="traceback", action="store_true", help="on an error, print the full traceback"
    )
    p_train.add_argument(
        "--fresh",
        action="store_true",
        help="start at step 0, deleting out_dir's checkpoint.pt, metrics.jsonl and model.pt "
        "(default: resume from out_dir/checkpoint.pt when it exists)",
    )
    args = parser.parse_args(argv)

    if args.cmd == "info":
        import rlhf_fast

        report = rlhf_fast.info()
        print(json.dumps(report, indent=2, default=str) if args.json else format_info(report))
        return 0
    if args.cmd == "demo":
        from .demo.pipeline import run_demo

        summary = run_demo(args.out, quick=args.quick, seed=args.seed, threads=args.threads)
        print(json.dumps(summary, indent=2))
        print(f"wrote {args.out}/summary.json, metrics.jsonl, samples.md, plot.png")
        return 0 if summary["true_score_rose"] else 1
    if args.cmd == "train":
        try:
            return _train(args)
        except Exception as e:
            if args.traceback or not is_user_error(e):
                raise
            hint = "" if isinstance(e, USER_ERRORS) else " (--debug shows the traceback)"
            print(f"rlhf-fast train: error: {_one_line(e)}{hint}", file=sys.stderr)
            return 2
    if args.cmd == "bench":
        # The benchmarks are not part of the installed package (a wheel has
        # only rlhf_fast/); running them from here meant editing sys.path.
        print(
            "rlhf-fast bench: the benchmarks run from a source checkout's root: python -m benchmarks --help",
            file=sys.stderr,
        )
        return 2
    return 1


def is_user_error(e: BaseException) -> bool:
    """Whether `rlhf-fast train` reports e as one line: USER_ERRORS, and
    RUN_ERRORS (looked up in the trainer's modules: a run that never imported
    them cannot have raised them)."""
    if isinstance(e, USER_ERRORS):
        return True
    mods = [sys.modules.get(f"rlhf_fast.trainer.{m}") for m in ("checkpoint", "atomic_io", "rewards")]
    kinds = tuple(getattr(m, n) for m in mods if m is not None for n in RUN_ERRORS if hasattr(m, n))
    return isinstance(e, kinds)


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return n


def _one_line(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or 'no such file or directory'}"
    text = " ".join(str(e).split())
    return text if text else type(e).__name__


def train_threads(requested: int | None, model_spec) -> int | None:
    """The torch thread count for `train`, or None to keep torch's default.
    tiny-demo gets 1: its ~0.1M-parameter matmuls are too small to split, so
    more threads only add synchronisation and, on a shared box, contention
    (10 PPO steps at 1 and at 2 threads: benchmarks/results/demo-cpu.json,
    train_threads)."""
    if requested is not None:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return None  # torch already follows it
    return 1 if model_spec in (None, "tiny-demo") else None


def _train(args) -> int:
    import yaml

    from .trainer.config import apply_overrides, load_yaml

    if not os.path.isfile(args.config):
        raise FileNotFoundError(2, "config file not found", args.config)
    try:
        data = load_yaml(args.config)
    except yaml.YAMLError as e:
        raise ValueError(f"{args.config} is not valid YAML: {e}") from e
    model_spec = apply_overrides(data, args.overrides).get("model") if isinstance(data, dict) else None

    import gc

    import torch
    import torch.distributed as dist

    threads, before = train_threads(args.threads, model_spec), torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    from .demo.train_source import train_from_yaml  # the trainer's run, with `model: tiny-demo` registered
    from .trainer.summary import train_summary

    try:
        trainer = train_from_yaml(args.algo, args.config, fresh=args.fresh, overrides=args.overrides)
        if trainer.rank == 0:
            print(f"(torch threads: {torch.get_num_threads()})")
            print(train_summary(trainer, args.algo))
    finally:
        torch.set_num_threads(before)  # callers in the same process (tests) keep theirs
    del trainer  # DDP reducers go before the process group, not at interpreter teardown (seen hung)
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
