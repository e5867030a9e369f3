"""Per-object compiler seconds of the last extension build, from ninja's log.

    rm -rf build && CCACHE_DISABLE=1 MAX_JOBS=2 python setup.py build_ext --inplace
    python scripts/ninja_times.py [build_dir ...]

With several build folders (say a pristine copy's and this one's) it prints one
column per folder, so a before / after table comes from one command.
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


def main(argv: list) -> None:
    dirs = argv or ["build"]
    cols = [times(d) for d in dirs]
    names = sorted({n for c in cols for n in c}, key=lambda n: -max(c.get(n, 0) for c in cols))
    print("| object | " + " | ".join(dirs) + " |")
    print("|---" * (len(dirs) + 1) + "|")
    for n in names:
        print(f"| {n} | " + " | ".join(f"{c[n]:.1f}" if n in c else "-" for c in cols) + " |")
    print("| **total** | " + " | ".join(f"**{sum(c.values()):.1f}**" for c in cols) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
