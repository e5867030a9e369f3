"""Turn a lent GPU's compass results into rlhf_fast/_gpu_dispatch.py: for
each public op measured with more than one backend, the backend with the
smaller total median time over the op's rows (the same shapes for each).

    python -m benchmarks.gpu.dispatch_table benchmarks/results/<run>/compass.jsonl [--write]
"""

from __future__ import annotations

import argparse
import json
import pprint
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TARGET = REPO / "rlhf_fast" / "_gpu_dispatch.py"
# compass row name -> the public op whose dispatch it decides
PUBLIC_OP = {
    "logprobs fwd+entropy": "logprobs_from_logits",
    "logprobs fwd+bwd": "logprobs_from_logits",
}


def preferences(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """{device model: {op: {"backend", "median_s" per backend}}} from compass rows."""
    device = next((r["device"] for r in rows if r.get("op") == "copy" and "device" in r), None)
    if device is None:
        raise ValueError("no 'copy' row with the device name: not a compass.jsonl")
    model = next((m for m in ("H200", "H100", "A100", "L40S", "B200") if m in device), device)
    totals: dict[str, dict[str, float]] = {}
    for r in rows:
        op = PUBLIC_OP.get(r.get("op"))
        t = r.get("ours_median_s")
        if op is None or "backend" not in r or t is None or t != t or r.get("error"):
            continue
        totals.setdefault(op, {}).setdefault(r["backend"], 0.0)
        totals[op][r["backend"]] += t
    # a backend that failed on any row never wins: compare only complete sets
    counts = {}
    for r in rows:
        op = PUBLIC_OP.get(r.get("op"))
        if op is not None and "backend" in r:
            counts.setdefault(op, {}).setdefault(r["backend"], [0, 0])
            counts[op][r["backend"]][0 if not r.get("error") else 1] += 1
    out = {}
    for op, per in totals.items():
        ok = {b: t for b, t in per.items() if counts[op][b][1] == 0}
        if len(ok) >= 2:
            best = min(ok, key=ok.get)
            out[op] = dict(backend=best, total_median_s={b: round(t, 6) for b, t in sorted(ok.items())})
    return {model: out} if out else {}


def render(measured: dict, source: str) -> str:
    head = TARGET.read_text().split("MEASURED:")[0]
    return f"{head}MEASURED: dict[str, dict[str, dict]] = {pprint.pformat(measured, width=100)}\n# from {source}\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("compass", nargs="+")
    ap.add_argument("--write", action="store_true", help=f"merge into {TARGET.relative_to(REPO)}")
    args = ap.parse_args(argv)
    measured = {}
    for path in args.compass:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        measured.update(preferences(rows))
    print(json.dumps(measured, indent=1))
    if args.write:
        from rlhf_fast._gpu_dispatch import MEASURED

        TARGET.write_text(render({**MEASURED, **measured}, ", ".join(args.compass)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
