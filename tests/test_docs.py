"""The README and docs/ agree with the committed results: every quoted
number is regenerated from benchmarks/results/ by make_readme_table and must
already be what is written, and every relative link points at a file (and,
for #anchors, a heading) that exists."""

import glob
import json
import os
import re

import pytest

from benchmarks import make_readme_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_numbers_are_generated_and_current(capsys):
    code = make_readme_table.main(["--check"])
    assert code == 0, capsys.readouterr().out
    pages = make_readme_table.pages()
    assert any("<!--n:json demo-cpu.json" in open(p).read() for p in pages)
    assert any("<!--n:json setup-cpu.json" in open(p).read() for p in pages)


def _anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_resolve():
    broken = []
    for page in [os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "*.md")):
        text = open(page).read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(full):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target}")
                continue
            if anchor and full.endswith(".md"):
                heads = {_anchor(h) for h in re.findall(r"^#+ (.+)$", open(full).read(), re.M)}
                if anchor not in heads:
                    broken.append(f"{os.path.relpath(page, ROOT)}: {target} (no such heading)")
    assert not broken, broken


# A path in backticks is a claim that the file exists: a name with a file
# extension, or one that starts at a top-level folder of the repository.
_EXT = r"\.(py|md|json|jsonl|cpp|h|cuh|cu|sh|yaml|yml|toml|txt|png|pt|cfg)"
_TOP = ("csrc/", "rlhf_fast/", "tests/", "benchmarks/", "docs/", "scripts/", "examples/", ".ci/")
# Files that a run writes (the demo, `rlhf-fast train`, TRL scripts), not files in the repository.
GENERATED = {"summary.json", "metrics.jsonl", "samples.md", "plot.png", "checkpoint.pt", "model.pt", "config.json"}
GENERATED_DIRS = ("out/", "out_dir/", "output_dir/", "build/")
# Paths inside the peers' packages (verl 0.9.1's wheel) or a file the reader saves from a doc's example.
EXTERNAL = {
    "workers/utils/losses.py",
    "verl/trainer/ppo/rollout_corr_helper.py",
    "verl/workers/engine/fsdp/transformer_impl.py",
    "openrlhf/models/actor.py",
    "openrlhf/models/model.py",
    "openrlhf/cli/train_ppo_ray.py",
    "tests/trainer/ppo",
    "vp_example.py",
}
# Where a short path is read from: the root, the package (`trainer/ppo.py`), the results folder.
_BASES = ("", "rlhf_fast", os.path.join("benchmarks", "results"))


def _expand(path: str) -> list[str]:
    m = re.search(r"\{([^{}]+)\}", path)
    if not m:
        return [path]
    return [q for alt in m.group(1).split(",") for q in _expand(path[: m.start()] + alt + path[m.end() :])]


def _path_claims(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks: commands, not claims
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    out = []
    for tok in re.findall(r"`([^`\n]+)`", text):
        tok = tok.split("::")[0].rstrip("/")
        if re.search(r"[\s<>=*\[\]$()]", tok) or tok.startswith("."):
            continue
        if re.search(_EXT + r"$", tok) or tok.startswith(_TOP):
            out.append(tok)
    return out


def test_backticked_paths_exist():
    missing = []
    for page in [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        for tok in _path_claims(open(page).read()):
            if tok in GENERATED or tok in EXTERNAL or tok.startswith(GENERATED_DIRS):
                continue
            for path in _expand(tok):
                if not any(os.path.exists(os.path.join(ROOT, base, path)) for base in _BASES):
                    missing.append(f"{os.path.relpath(page, ROOT)}: `{tok}`")
    assert not missing, "paths in backticks that do not exist:\n" + "\n".join(missing)


def test_path_check_can_fail():
    claims = _path_claims(
        "see `csrc/cpu/nope.cpp`, `trainer/ppo.py`, `x = a/b`, `actor/ppo_kl` and\n```\n`in/code.py`\n```"
    )
    assert claims == ["csrc/cpu/nope.cpp", "trainer/ppo.py"]
    assert _expand("tests/test_{a,b}.py") == ["tests/test_a.py", "tests/test_b.py"]
    assert not os.path.exists(os.path.join(ROOT, "csrc/cpu/nope.cpp"))


def test_allowlisted_paths_are_still_cited():
    text = "".join(open(p).read() for p in make_readme_table.pages())
    assert not [p for p in EXTERNAL if f"`{p}" not in text], "drop allow-list entries no page cites"


# Pages of the kernel families that quote results files and have no
# <!--sources--> block yet: `python -m benchmarks.make_readme_table
# --add-sources` adds it; strict, so each entry must go once its page is fixed.
NO_SOURCES_YET: set[str] = set()  # pages that quote a results file without naming its machine and commit


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(p, marks=pytest.mark.xfail(strict=True, reason="no sources block yet"))
        if p in NO_SOURCES_YET
        else p
        for p in sorted(os.path.relpath(q, ROOT) for q in make_readme_table.pages())
    ],
)
def test_generated_numbers_name_their_machine_and_commit(page):
    """A page quoting a number from benchmarks/results/F.json names, on one
    line, F, F's machine (CPU, GPU or offline-compile target) and F's commit,
    so a reader can tell where and from which code it came."""
    results = os.path.join(ROOT, "benchmarks", "results")
    devices = make_readme_table.load(results)
    text = open(os.path.join(ROOT, page)).read()
    bad = []
    for name in make_readme_table.cited_files(text, devices):
        machine, commit, _date = make_readme_table.facts(json.load(open(os.path.join(results, name))))
        if not any(f"`{name}`" in line and machine in line and commit in line for line in text.splitlines()):
            bad.append(f"{page}: no line names {name} with its machine ({machine}) and {commit}")
    assert not bad, "\n".join(bad)


def test_readme_api_table_lists_every_public_name():
    import rlhf_fast

    readme = open(os.path.join(ROOT, "README.md")).read()
    table = "\n".join(line for line in readme.splitlines() if line.startswith("| `"))
    missing = [n for n in rlhf_fast.__all__ if f"`{n}`" not in table]
    assert not missing, f"rlhf_fast.__all__ names with no row in the README's API table: {missing}"


def test_readme_stays_short():
    n = len(open(os.path.join(ROOT, "README.md")).read().splitlines())
    assert n <= 200, f"README.md has {n} lines; move detail to docs/"
