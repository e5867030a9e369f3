"""Regenerates the README's benchmark section and every number quoted in the
README and docs/ from the committed results.

    python -m benchmarks.make_readme_table [--results benchmarks/results] [--out docs/benchmarks.md]
    python -m benchmarks.make_readme_table --check    # exit 1 if any page disagrees with the results

A number quoted in prose sits between markers naming where it comes from:
  <!--n:bench gae;fwd;(64, 2048);float32;1;verl-style;speedup-->269×<!--/n-->
      a benchmark record: op;mode;shape;dtype;threads;a substring of the peer's
      name;field (speedup, ours, peer, ours_peak, peer_peak)
  <!--n:json demo-cpu.json full.0.wall_seconds .0f-->54<!--/n-->
      a value in a results file: file, dotted path, format spec
and is rewritten from that source on every run, so it cannot drift. Every
page that quotes a results file names that file's machine and commit: a
<!--sources-->...<!--/sources--> block, regenerated on every run (--add-sources
appends one to a page that has none), lists each file the page cites.

The README carries a short headline table (HEADLINE: six rows of one run, one
machine, one commit); docs/benchmarks.md carries every record.

Reads every benchmarks/results/*.json (written by `python -m benchmarks --json`,
a bench module's --json, or benchmarks/gpu/run_device.sh), groups records by
device (the CPU or GPU name in the machine facts) and keeps, for each
(op, mode, shape, dtype, peer), the newest record by date. One table per
device, with the dates, versions and notes (e.g. "loaded machine") of the
runs it came from. Nothing here is measured: it only formats data.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _time(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms" if s >= 1e-2 else f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} µs"


def _mib(b: int | None) -> str:
    if b is None:
        return "-"
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"


_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # older results used short names


def _device_name(m: dict) -> str:
    if m.get("device", "cpu").startswith("cuda"):
        return f"GPU: {m.get('gpu', 'unknown GPU')}"
    return f"CPU: {m.get('cpu', 'unknown CPU')}"


def facts(doc: dict) -> tuple[str, str, str]:
    """(machine, commit, date) of a results file. An offline compile (no
    machine facts) names its Triton version and targets instead."""
    m = doc.get("machine", {})
    machine = m.get("gpu") or m.get("cpu")
    if not machine and doc.get("targets"):
        machine = f"offline compile for {' / '.join(doc['targets'])} with Triton {doc.get('triton', '?')}, no GPU"
    commit = m.get("git_commit") or doc.get("git_commit")
    date = m.get("date") or doc.get("generated") or "?"
    return machine or "unknown machine", f"commit {commit}" if commit else "commit not recorded", date[:10]


def provenance(name: str, doc: dict) -> str:
    """`name`: machine, commit, date (and the load when it was recorded): the
    facts every page quoting that file states."""
    m = doc.get("machine", {})
    load = f", load average {m['loadavg_before'][0]} at the start" if m.get("loadavg_before") else ""
    return f"`{name}`: " + ", ".join(facts(doc)) + load


def load(results_dir: str) -> dict[str, dict]:
    """{device name: {"rows": {key: (record, run)}, "runs": [run facts]}}, newest record per key."""
    runs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or "records" not in doc:
            continue  # not ours (e.g. pytest-benchmark's JSON)
        if doc.get("table") is False:
            continue  # a one-off comparison kept beside the table, not in it
        m = doc.get("machine", {})
        runs.append((m.get("date", ""), os.path.basename(path), m, doc["records"]))
    out: dict[str, dict] = {}
    for _date, name, m, records in sorted(runs, key=lambda r: r[0]):  # oldest first: newer overwrite
        dev = out.setdefault(_device_name(m), {"rows": {}, "runs": {}})
        used = False
        for r in records:
            if r.get("baseline") is None:
                continue
            # threads in the key: a 1-thread and a 2-thread run are different measurements
            threads = r.get("threads") or (None if m.get("gpu") else m.get("cpu_threads"))
            r["dtype"] = _DTYPES.get(r["dtype"], r["dtype"])
            key = (r["op"], r["mode"], r["shape"], r["dtype"], r["baseline"], threads)
            dev["rows"][key] = (r, name)
            used = True
        if used:
            dev["runs"][name] = m
    return out


def _ppo_step_table(rows: dict) -> list[str]:
    """Per phase of one PPO step: ms and share of the step, ours vs the reference backend."""
    steps = [(k, r) for k, (r, _) in rows.items() if k[0] == "ppo_step" and r.get("speedup")]
    out = []
    for shape, threads in dict.fromkeys((k[2], k[5]) for k, _ in steps):
        phases = {k[1]: r for k, r in steps if (k[2], k[5]) == (shape, threads)}
        if "total" not in phases:
            continue
        tot = phases["total"]
        thr = f", {threads} thread{'s' if threads != 1 else ''}" if threads else ""
        out += [
            "",
            f"One PPO step, {shape} ({tot['device']}{thr}, {tot['dtype']}):",
            "",
            "| phase | rlhf_fast | share | reference backend | share | speedup |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for phase, r in phases.items():
            ours, ref = r["median_s"], r["baseline_median_s"]
            out.append(
                f"| {phase} | {_time(ours)} | {100 * ours / tot['median_s']:.0f}% | {_time(ref)} | "
                f"{100 * ref / tot['baseline_median_s']:.0f}% | {r['speedup']:.2f}× |"
            )
        out += [
            "",
            "`values`, `rewards` and `optimizer` run the same code in both loops: their ratio (ideally 1.00×) "
            "is this run's noise.",
        ]
    return out


def render(results_dir: str) -> str:
    lines = [
        "## Benchmarks",
        "",
        "Generated by `python -m benchmarks.make_readme_table` from the committed JSON in `benchmarks/results/`;",
        "do not edit by hand. Speedup = the peer's median / ours (> 1: rlhf_fast is faster), timed in the same",
        "run after warm-up. Peak = the most memory one call allocates beyond its inputs (outputs included).",
        "GB/s = bytes the op must move / our median, with % of the machine's measured copy bandwidth.",
        "",
        "```bash",
        "python -m benchmarks --quick                     # every family on small CPU shapes (a few minutes)",
        "python -m benchmarks --op logprobs --op ppo_step # some families, full shapes",
        "python -m benchmarks --quick --threads 1 --json out.json --plot out.png   # records + machine facts, chart",
        "pytest benchmarks/ --benchmark-only              # the same cases through pytest-benchmark, tiny shapes",
        "bash benchmarks/gpu/run_device.sh                # on a GPU: build, GPU tests, suite, results to commit",
        "python -m benchmarks.make_readme_table           # this page, from benchmarks/results/*.json",
        "```",
        "",
        "A peer that is not installed (or GPU-only, on a CPU run) is listed as skipped with the install hint.",
        "`ppo_step` times one PPO step on a tiny Llama (V = 32000) phase by phase, with rlhf_fast's kernels and",
        "with `RLHF_FAST_BACKEND=reference` (the same loop in pure PyTorch): where the time goes, and what the",
        "kernels buy in each phase.",
    ]
    for device, data in sorted(load(results_dir).items()):
        rows, runs = data["rows"], data["runs"]
        cited = {name for _, name in rows.values()}
        lines += ["", f"### {device}", ""]
        for name in sorted(cited, key=lambda n: runs[n].get("date", "")):
            m = runs[name]
            vers = ", ".join(f"{k} {m[k]}" for k in ("torch", "triton", "cuda", "transformers", "trl") if m.get(k))
            extra = f"; torch threads {m['cpu_threads']}" if m.get("cpu_threads") and not m.get("gpu") else ""
            extra += f" of {m['cpu_count']} cores" if extra and m.get("cpu_count") else ""
            note = f"; note: {m['note']}" if m.get("note") and m["note"] not in (m.get("command") or "") else ""
            # results recorded before the runner moved out of the package name
            # the old spelling of the same command; show the one that runs now
            command = (m.get("command") or "").replace("rlhf-fast bench", "python -m benchmarks")
            cmd = f"; `{command}`" if command else ""
            lines.append(f"- {provenance(name, {'machine': m})}, {vers}{extra}{cmd}{note}")
        lines += _ppo_step_table(rows)
        lines += [
            "",
            "| op | mode | shape | dtype | threads | vs | ours | peer | speedup | ours peak | peer peak | ours GB/s |",
            "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for (op, mode, shape, dtype, peer, threads), (r, _) in rows.items():
            dtype = f"{dtype} | {threads or '-'}"  # the threads column rides along with dtype
            if op == "ppo_step":
                continue
            if not str(r.get("status", "ok")).startswith("ok"):
                lines.append(
                    f"| {op} | {mode} | {shape} | {dtype} | {peer} | {_time(r.get('median_s'))} | "
                    f"{r['status']} | | | | |"
                )
                continue
            bw = "-"
            if r.get("gb_per_s"):
                bw = f"{r['gb_per_s']:.1f}"
                if r.get("copy_gb_per_s"):
                    bw += f" ({100 * r['gb_per_s'] / r['copy_gb_per_s']:.0f}%)"
            lines.append(
                f"| {op} | {mode} | {shape} | {dtype} | {peer} | {_time(r['median_s'])} | "
                f"{_time(r['baseline_median_s'])} | {r['speedup']:.2f}× | {_mib(r.get('peak_mem_bytes'))} | "
                f"{_mib(r.get('baseline_peak_mem_bytes'))} | {bw} |"
            )
    return "\n".join(lines) + "\n"


# The README's six rows: one run (one machine, one commit), one row per op
# family and the end-to-end PPO step. (op, mode, shape, dtype, a substring of
# the peer's name).
HEADLINE_FILE = "cpu-quick.json"
HEADLINE = (
    ("logprobs", "fwd+bwd", "(1024, 32000)", "float32", "torch eager"),
    ("linear_logprobs", "fwd+bwd", "(1024, 256, 32000)", "float32", "materialised"),
    ("gae", "fwd", "(64, 2048)", "float32", "verl-style loop"),
    ("ppo_loss", "fwd+bwd", "(16, 1024)", "float32", "eager reference chain"),
    ("sample", "fwd", "(64, 32000) top_p", "float32", "HF TopPLogitsWarper"),
    ("ppo_step", "total", "B=8 P=32 R=32 V=32000 h=128 L=2", "float32", "RLHF_FAST_BACKEND=reference"),
)


def render_headline(results_dir: str) -> str:
    with open(os.path.join(results_dir, HEADLINE_FILE)) as f:
        doc = json.load(f)
    m = doc["machine"]
    lines = [
        "## Benchmarks",
        "",
        "Six rows of one run at one commit:",
        f"{provenance(HEADLINE_FILE, doc)}, {m.get('cpu_threads', '?')} torch threads"
        + (f" ({m['note']})." if m.get("note") else "."),
        "Speedup = the peer's median / ours, timed in the same run (> 1: rlhf_fast is faster); peak = the most",
        "memory one call allocates beyond its inputs. Every record, per machine, with newer per-family runs on other",
        "commits and the commands that measure them: [docs/benchmarks.md](docs/benchmarks.md). Generated by",
        "`python -m benchmarks.make_readme_table`.",
        "",
        "| op | mode | shape | vs | ours | peer | speedup | ours peak | peer peak |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for op, mode, shape, dtype, peer in HEADLINE:
        hits = [
            r
            for r in doc["records"]
            if (r["op"], r["mode"], r["shape"], _DTYPES.get(r["dtype"], r["dtype"])) == (op, mode, shape, dtype)
            and peer in (r.get("baseline") or "")
            and str(r.get("status", "ok")).startswith("ok")
        ]
        if len(hits) != 1:
            raise KeyError(f"{HEADLINE_FILE}: {len(hits)} records for headline row {op} {mode} {shape} {peer}")
        r = hits[0]
        lines.append(
            f"| {op} | {mode} | {shape} {dtype} | {r['baseline']} | {_time(r['median_s'])} | "
            f"{_time(r['baseline_median_s'])} | {r['speedup']:.2f}× | {_mib(r.get('peak_mem_bytes'))} | "
            f"{_mib(r.get('baseline_peak_mem_bytes'))} |"
        )
    return "\n".join(lines) + "\n"


_NUM = re.compile(r"<!--n:(\w+) ([^>]*?)-->(.*?)<!--/n-->", re.S)


def _speedup(x: float) -> str:
    return f"{x:.0f}×" if x >= 100 else f"{x:.1f}×" if x >= 10 else f"{x:.2f}×"


_FIELDS = {
    "speedup": lambda r: _speedup(r["speedup"]),
    "ours": lambda r: _time(r["median_s"]),
    "peer": lambda r: _time(r["baseline_median_s"]),
    "ours_peak": lambda r: _mib(r.get("peak_mem_bytes")),
    "peer_peak": lambda r: _mib(r.get("baseline_peak_mem_bytes")),
}


def _bench_hit(devices: dict, spec: str) -> tuple[dict, str]:
    """The one record a bench marker names, and the results file it is in."""
    op, mode, shape, dtype, threads, peer, _field = (p.strip() for p in spec.split(";"))
    hits = [
        (r, name)
        for data in devices.values()
        if not data.get("gpu")
        for (o, m, sh, dt, pe, th), (r, name) in data["rows"].items()
        if (o, m, sh, dt, str(th)) == (op, mode, shape, dtype, threads)
        and peer in pe
        and str(r.get("status", "ok")).startswith("ok")
    ]
    if len(hits) != 1:
        raise KeyError(f"bench {spec!r}: {len(hits)} matching records (need exactly 1)")
    return hits[0]


def _bench_value(devices: dict, spec: str) -> str:
    return _FIELDS[spec.split(";")[-1].strip()](_bench_hit(devices, spec)[0])


def _json_value(results_dir: str, spec: str) -> str:
    name, path, *fmt = spec.split(" ")
    with open(os.path.join(results_dir, name)) as f:
        v = json.load(f)
    for part in path.split("."):
        v = v[int(part)] if isinstance(v, list) else v[part]
    return format(v, fmt[0] if fmt else "")


_SOURCES = re.compile(r"\n*<!--sources-->.*?<!--/sources-->\n?", re.S)


def cited_files(text: str, devices: dict) -> list[str]:
    """Results files a page quotes: those its markers read, and any results
    file it names in backticks (the generated tables name theirs)."""
    names = []
    for kind, spec, _value in _NUM.findall(text):
        names.append(_bench_hit(devices, spec)[1] if kind == "bench" else spec.split(" ")[0])
    results = os.path.join(HERE, "results")
    for n in re.findall(r"`([\w.-]+\.json)`", text):
        path = os.path.join(results, n)
        if os.path.exists(path):
            with open(path) as f:
                doc = json.load(f)
            if isinstance(doc, dict) and ("machine" in doc or "targets" in doc):
                names.append(n)
    return list(dict.fromkeys(names))


def _docs(results_dir: str, names: list[str]) -> dict[str, dict]:
    out = {}
    for name in names:
        with open(os.path.join(results_dir, name)) as f:
            out[name] = json.load(f)
    return out


def fill_numbers(text: str, results_dir: str, devices: dict, sources: bool = True, append_sources: bool = False) -> str:
    """Rewrite every <!--n:...-->value<!--/n--> in `text` from its source, and
    the page's sources block (with append_sources, added to a page that
    quotes a results file and has none)."""

    def sub(m: re.Match) -> str:
        kind, spec = m.group(1), m.group(2)
        value = _bench_value(devices, spec) if kind == "bench" else _json_value(results_dir, spec)
        return f"<!--n:{kind} {spec}-->{value}<!--/n-->"

    text = _NUM.sub(sub, text)
    if not sources:  # a generated page whose run list already names every file's machine and commit
        return text
    body = _SOURCES.sub("", text) if "<!--sources-->" in text else text
    names = cited_files(body, devices)
    if not names:
        return text
    block = "\n".join(
        ["<!--sources-->", "Where the generated numbers on this page come from:", ""]
        + [f"- {provenance(n, doc)}" for n, doc in _docs(results_dir, names).items()]
        + ["<!--/sources-->"]
    )
    if "<!--sources-->" in text:
        return re.sub(r"<!--sources-->.*?<!--/sources-->", lambda _: block, text, flags=re.S)
    if append_sources:
        return text.rstrip("\n") + "\n\n" + block + "\n"
    return text


def pages() -> list[str]:
    root = os.path.dirname(HERE)
    return [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "docs", "benchmarks.md"))
    ap.add_argument(
        "--readme",
        default=os.path.join(os.path.dirname(HERE), "README.md"),
        help="README whose section between the benchmark markers is replaced",
    )
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 listing the pages that would change")
    ap.add_argument(
        "--add-sources", action="store_true", help="append a sources block to every page that quotes a results file"
    )
    args = ap.parse_args(argv)
    text = render(args.results)
    devices = load(args.results)
    wanted = {}
    for page in dict.fromkeys(pages() + [args.out]):
        if page == args.out:  # generated whole
            new = text
        else:
            with open(page) as f:
                new = f.read()
            if page == args.readme:
                new = spliced(new, render_headline(args.results))
        wanted[page] = fill_numbers(
            new, args.results, devices, sources=page != args.out, append_sources=args.add_sources
        )
    stale = []
    for page, new in wanted.items():
        old = open(page).read() if os.path.exists(page) else None
        if old != new:
            stale.append(page)
            if not args.check:
                with open(page, "w") as f:
                    f.write(new)
    if args.check:
        for page in stale:
            print(f"{page}: out of date with {args.results}; run python -m benchmarks.make_readme_table")
        return 1 if stale else 0
    print("updated: " + (", ".join(os.path.relpath(p) for p in stale) or "nothing (all current)"))
    return 0


BEGIN, END = "<!-- benchmarks:begin (generated) -->", "<!-- benchmarks:end -->"


def spliced(readme: str, text: str) -> str:
    """The README with its benchmark section (between the markers) replaced by `text`."""
    if BEGIN not in readme or END not in readme:
        return readme
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{text}{END}{tail}"


if __name__ == "__main__":
    sys.exit(main())
