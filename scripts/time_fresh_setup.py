"""Times a newcomer's first minutes from a fresh clone and writes
benchmarks/results/setup-cpu.json (the README quotes it).

    python scripts/time_fresh_setup.py [--out benchmarks/results/setup-cpu.json]

In a temporary folder: `git clone` of this repository (its committed HEAD),
a virtual environment, then, each timed: `make demo` (first: builds the
extension), `make demo` again (set-up skipped), `make setup` alone (the
up-to-date check), one touched .cpp then `make setup` (ninja recompiles one
file), `rlhf-fast --help` and `python -c "import rlhf_fast"`.

The environment is made with --system-site-packages so that what is timed is
the build, the set-up checks and the demo, not downloads (which depend on the
network: the first `pip install` of torch's CPU wheel and transformers adds
their download time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(cmd: list[str], cwd: str, log: str) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=cwd, check=True, stdout=f, stderr=subprocess.STDOUT)
    return round(time.perf_counter() - t0, 2)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "setup-cpu.json"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs) and print its path")
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    from benchmarks.harness import machine_facts

    work = tempfile.mkdtemp(prefix="rlhf_fast_setup_")
    repo, venv = os.path.join(work, "repo"), os.path.join(work, "venv")
    subprocess.run(["git", "clone", "-q", ROOT, repo], check=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
    py = os.path.join(venv, "bin", "python")
    make = ["make", f"PY={py}"]
    facts = machine_facts("cpu")
    facts["command"] = "python scripts/time_fresh_setup.py"
    with open("/proc/loadavg") as f:
        facts["loadavg_before"] = f.read().split()[:3]
    res: dict = {"machine": facts}

    def demo_seconds() -> float:
        with open(os.path.join(repo, "out", "demo", "summary.json")) as f:
            return json.load(f)["wall_seconds"]

    res["first_make_demo_s"] = timed(make + ["demo"], repo, os.path.join(work, "make_demo_1.log"))
    res["first_demo_itself_s"] = demo_seconds()
    res["first_setup_s"] = round(res["first_make_demo_s"] - res["first_demo_itself_s"], 1)
    res["second_make_demo_s"] = timed(make + ["demo"], repo, os.path.join(work, "make_demo_2.log"))
    res["second_demo_itself_s"] = demo_seconds()
    res["setup_check_s"] = timed(make + ["setup"], repo, os.path.join(work, "make_setup_3.log"))
    os.utime(os.path.join(repo, "csrc", "cpu", "ppo_loss.cpp"))
    res["one_file_rebuild_s"] = timed(make + ["setup"], repo, os.path.join(work, "make_setup_touch.log"))
    res["help_s"] = timed([os.path.join(venv, "bin", "rlhf-fast"), "--help"], repo, os.path.join(work, "help.log"))
    res["import_s"] = timed([py, "-c", "import rlhf_fast"], work, os.path.join(work, "import.log"))
    with open("/proc/loadavg") as f:
        facts["loadavg_after"] = f.read().split()[:3]
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=2))
    print(f"wrote {args.out}" + (f"; logs in {work}" if args.keep else ""))
    if not args.keep:
        subprocess.run(["rm", "-rf", work], check=True)


if __name__ == "__main__":
    main()
