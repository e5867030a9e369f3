"""The rlhf-fast command line: info | bench (demo and train arrive with the trainer)."""
from __future__ import annotations

import argparse
import json
import sys


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
    p_bench = sub.add_parser("bench", help="run the kernel benchmarks")
    p_bench.add_argument("--quick", action="store_true", help="small CPU shapes")
    p_bench.add_argument("--op", action="append", default=None,
                         help="only this op family (e.g. logprobs; repeatable; see --list)")  # fmt: skip
    p_bench.add_argument("--json", dest="json_file", default=None, help="write JSON records + machine facts here")
    p_bench.add_argument("--plot", dest="plot_file", default=None, help="write a PNG chart of the speedups here")
    p_bench.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for ours and peers alike")
    p_bench.add_argument("--note", default=None, help="free text stored with the machine facts (e.g. 'loaded machine')")
    p_bench.add_argument("--list", action="store_true", help="list the op families and exit")
    args = parser.parse_args(argv)

    if args.cmd == "info":
        import rlhf_fast

        report = rlhf_fast.info()
        print(json.dumps(report, indent=2, default=str) if args.json else format_info(report))
        return 0
    if args.cmd == "bench":
        from .bench import available_ops, run

        if args.list:
            print("\n".join(available_ops()))
            return 0
        return run(quick=args.quick, op=args.op, json_file=args.json_file, plot_file=args.plot_file,
                   threads=args.threads, note=args.note)  # fmt: skip
    return 1


if __name__ == "__main__":
    sys.exit(main())
