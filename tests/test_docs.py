"""The README and docs/ agree with the committed results: every quoted
number is regenerated from benchmarks/results/ by make_readme_table and must
already be what is written, and every relative link points at a file (and,
for #anchors, a heading) that exists."""

import glob
import os
import re

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
