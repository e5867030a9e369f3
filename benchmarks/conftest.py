"""pytest-benchmark entry: `pytest benchmarks/ --benchmark-only`.

Never part of the default test run: pyproject's testpaths is ["tests"], and
CI runs `pytest tests`, which does not load this folder. Under pytest without
pytest-benchmark the cases are skipped with the install hint.
"""
