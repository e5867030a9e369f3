"""Per-object compiler seconds of the last extension build, from ninja's log.

    rm -rf build && CCACHE_DISABLE=1 MAX_JOBS=2 python setup.py build_ext --inplace
    python scripts/ninja_times.py [build_dir ...]

With several build folders (say a pristine copy's and this one's) it prints one
column per folder, so a before / after table comes from one command. A folder
with a cpu.txt (scripts/cxx_cpu_time.sh: user + sys seconds per compile, which
on a loaded machine do not count the time spent waiting for a core) gets a
second column with those.
"""

import glob
import os
import sys


def times(build_dir: str) -> dict:
    (log,) = glob.glob(os.path.join(build_dir, "temp*", ".ninja_log"))
    out = {}
    with open(log) as f:
        for line in f:
            if line.startswith("#"):
                continue
            start, end, _, path, _ = line.split("\t")
            # the last entry of an object wins: a rebuild replaces it
            name = path.split("/temp", 1)[1].split("/", 1)[1]
            out[name] = (int(end) - int(start)) / 1000
    return out


def cpu_times(build_dir: str) -> dict | None:
    path = os.path.join(build_dir, "cpu.txt")
    if not os.path.exists(path):
        return None
    out = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 4 and parts[3].endswith(".o"):
                out[parts[3]] = float(parts[0]) + float(parts[1])
    return out


def main(argv: list) -> None:
    heads, cols = [], []
    for d in argv or ["build"]:
        heads.append(f"{d} (wall s)")
        cols.append(times(d))
        cpu = cpu_times(d)
        if cpu is not None:
            heads.append(f"{d} (CPU s)")
            cols.append(cpu)
    dirs = heads
    names = sorted({n for c in cols for n in c}, key=lambda n: -max(c.get(n, 0) for c in cols))
    print("| object | " + " | ".join(dirs) + " |")
    print("|---" * (len(dirs) + 1) + "|")
    for n in names:
        print(f"| {n} | " + " | ".join(f"{c[n]:.1f}" if n in c else "-" for c in cols) + " |")
    print("| **total** | " + " | ".join(f"**{sum(c.values()):.1f}**" for c in cols) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
