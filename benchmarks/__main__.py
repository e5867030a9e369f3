"""python -m benchmarks [--quick] [--op NAME ...] [--json FILE] [--plot FILE]

Runs the kernel benchmarks from a source checkout's root; each family's
ratios are against peers timed in the same process (see docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import sys

from benchmarks.runner import available_ops, run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description="rlhf_fast kernel benchmarks")
    p.add_argument("--quick", action="store_true", help="small CPU shapes")
    p.add_argument("--op", action="append", default=None, help="only this op family (repeatable; see --list)")
    p.add_argument("--json", dest="json_file", default=None, help="write JSON records + machine facts here")
    p.add_argument("--plot", dest="plot_file", default=None, help="write a PNG chart of the speedups here")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for ours and peers alike")
    p.add_argument("--note", default=None, help="free text stored with the machine facts (e.g. 'loaded machine')")
    p.add_argument("--list", action="store_true", help="list the op families and exit")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(available_ops()))
        return 0
    return run(
        quick=args.quick,
        op=args.op,
        json_file=args.json_file,
        plot_file=args.plot_file,
        threads=args.threads,
        note=args.note,
    )


if __name__ == "__main__":
    sys.exit(main())
