# The README's commands. Each target sets itself up first, so a fresh clone
# needs nothing but Python 3.10+ (in a virtual environment), a C++ compiler
# and make. Set-up is incremental: stamps under build/stamps record what is
# installed, and the extension is built in place with a kept build/ folder,
# so a second `make demo` skips set-up and a changed .cpp recompiles alone.
PY ?= python3
PIP := $(PY) -m pip
# torch first, from the CPU index unless told otherwise, so pip never pulls
# the several-GB CUDA wheels onto a CPU machine (a GPU machine: install the
# CUDA torch you want first; an importable torch is never replaced).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
MAX_JOBS ?= 2
STAMPS := build/stamps
CSRC := $(shell find csrc -type f)
# The extension is rebuilt when a source, setup.py or torch changes, or when
# the library itself is missing.
EXT_SO := $(wildcard rlhf_fast/_C*.so)

.PHONY: setup setup-test demo test test-fast wheel-check fuzz lint bench cuda-check gpu-compile-check kernels-table integrations clean FORCE

setup: $(STAMPS)/deps-core $(STAMPS)/ext
setup-test: $(STAMPS)/deps-test $(STAMPS)/ext

# Rewritten only when the installed torch version changes. Read from the
# package metadata: importing torch would cost seconds on every run.
TORCH_VERSION = $(PY) -c "import importlib.metadata as m; print(m.version('torch'))"
$(STAMPS)/torch: FORCE
	@mkdir -p $(STAMPS)
	@$(TORCH_VERSION) > $@.new 2>/dev/null || \
		($(PIP) install $(TORCH_SPEC) --index-url $(TORCH_INDEX) && $(TORCH_VERSION) > $@.new)
	@if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; echo "setup: torch $$(cat $@)"; fi

# core: what the demo and the library need; test: plus pytest, peft,
# tensorboard and the benchmark peers (trl, torchrl).
$(STAMPS)/deps-core: pyproject.toml $(STAMPS)/torch
	$(PIP) install pybind11 ninja setuptools wheel
	RLHF_FAST_SKIP_EXT=1 $(PIP) install --no-build-isolation -e .
	@touch $@
$(STAMPS)/deps-test: pyproject.toml $(STAMPS)/torch
	$(PIP) install pybind11 ninja setuptools wheel
	RLHF_FAST_SKIP_EXT=1 $(PIP) install --no-build-isolation -e ".[test,bench]"
	@touch $@ $(STAMPS)/deps-core

$(STAMPS)/ext: $(CSRC) setup.py $(STAMPS)/torch $(if $(EXT_SO),,FORCE) | $(STAMPS)/deps-core
	@echo "setup: building rlhf_fast._C with $(MAX_JOBS) jobs; ninja prints [done/total] as each file finishes."
	@echo "       The first build compiles every file (many minutes on 2 cores: see the README); later ones only what changed."
	MAX_JOBS=$(MAX_JOBS) $(PY) setup.py build_ext --inplace --force
	@$(PY) -c "import torch, rlhf_fast._C" || (echo "rlhf_fast._C failed to build or load" && exit 1)  # torch first: it loads libc10.so
	@touch $@

# The main job: what runs here, then the end-to-end RLHF demo (SFT, simulated
# preferences, reward model, PPO) on a tiny Llama; results in out/demo.
demo: setup
	$(PY) -m rlhf_fast.cli info
	$(PY) -m rlhf_fast.cli demo --out out/demo

# verl 0.9.1, OpenRLHF 0.11.2 and TRL 1.16.0 for the adapter tests, without
# any CUDA wheel (the script refuses a plan that would touch torch).
integrations:
	PYTHON=$(PY) bash scripts/install_integrations.sh

# Deterministic: a fixed seed (printed at the end); two pytest-xdist workers,
# each with half the cores' threads.
TEST_JOBS ?= 2
test: setup-test lint cuda-check gpu-compile-check integrations wheel-check
	$(PY) -m pytest tests -q -n $(TEST_JOBS)

# The fast tier: lint and every test not marked slow (no torchrun, Ray,
# multi-rank gloo or demo runs); `make test` runs everything.
test-fast: setup-test lint
	$(PY) -m pytest tests -q -n $(TEST_JOBS) -m "not slow"

# The binary wheel installs into a fresh venv and runs its compiled ops with
# no compiler on PATH (reuses build/'s objects: no recompile).
wheel-check: setup
	PY=$(PY) bash scripts/check_wheel.sh

# The kernel tests over SEEDS fresh random seeds; prints any failing seed.
SEEDS ?= 5
fuzz: setup-test
	PY=$(PY) SEEDS=$(SEEDS) JOBS=$(TEST_JOBS) bash scripts/fuzz.sh

# ruff (pinned in the test extra): lint rules and formatting, as CI runs them.
lint: setup-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup-test
	$(PY) -m benchmarks --json benchmarks/results/latest-cpu.json --plot benchmarks/results/latest-cpu.png
	$(PY) -m benchmarks.make_readme_table

# Every .cu compiles with nvcc for sm_80 and sm_90 (skipped where no nvcc).
cuda-check:
	bash scripts/check_cuda_compile.sh

# Every Triton kernel compiled for sm_90a and sm_80 with no GPU, with the
# installed Triton and with the GPU machine's (3.6.0, in its own cached
# folder): fails on a compile error, shared memory over the limit or spills
# over budget. Results are cached by kernel source; a cold run compiles ~260
# specialisations per Triton version.
gpu-compile-check: setup-test
	TRITON_DEFAULT_FP_FUSION=1 $(PY) -m benchmarks.gpu.offline_compile
	TRITON_DEFAULT_FP_FUSION=1 $(PY) -m benchmarks.gpu.offline_compile --triton 3.6.0

# The static table (registers, spills, shared memory, SASS per element) in
# benchmarks/results/kernels-sm90.json and docs/kernels.md.
kernels-table:
	TRITON_DEFAULT_FP_FUSION=1 $(PY) -m benchmarks.gpu.offline_compile --triton 3.6.0 \
		--json benchmarks/results/kernels-sm90.json --markdown docs/kernels.md

clean:
	rm -rf build *.egg-info rlhf_fast/_C*.so
