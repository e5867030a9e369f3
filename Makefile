# The README's commands. Each target sets itself up first, so a fresh clone
# needs nothing but Python 3.10+ and a C++ compiler.
PY ?= python3
PIP := $(PY) -m pip
# torch first: the CPU build where there is no GPU, so pip never pulls the
# several-GB CUDA wheels onto a CPU machine; then the project without build
# isolation, so it compiles against that torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test bench cuda-check gpu-compile-check kernels-table integrations clean

setup:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	$(PIP) install pybind11 ninja setuptools wheel
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install --no-build-isolation -e ".[test,bench]"
	$(PY) -c "import rlhf_fast._C" || (echo "rlhf_fast._C failed to build or load" && exit 1)

# The main job: what runs here, then the end-to-end RLHF demo (SFT, simulated
# preferences, reward model, PPO) on a tiny Llama; results in out/demo.
demo: setup
	rlhf-fast info
	rlhf-fast demo --out out/demo

# verl 0.9.1, OpenRLHF 0.11.2 and TRL 1.16.0 for the adapter tests, without
# any CUDA wheel (the script refuses a plan that would touch torch).
integrations:
	bash scripts/install_integrations.sh

test: setup cuda-check gpu-compile-check integrations
	$(PY) -m pytest tests -q

bench: setup
	rlhf-fast bench --json benchmarks/results/latest-cpu.json --plot benchmarks/results/latest-cpu.png
	$(PY) -m benchmarks.make_readme_table

# Every .cu compiles with nvcc for sm_80 and sm_90 (skipped where no nvcc).
cuda-check:
	bash scripts/check_cuda_compile.sh

# Every Triton kernel compiled for sm_90a and sm_80 with no GPU, with the
# installed Triton and with the GPU machine's (3.6.0, in its own cached
# folder): fails on a compile error, shared memory over the limit or spills
# over budget. Results are cached by kernel source; a cold run compiles ~260
# specialisations per Triton version.
gpu-compile-check:
	TRITON_DEFAULT_FP_FUSION=1 $(PY) -m benchmarks.gpu.offline_compile
	TRITON_DEFAULT_FP_FUSION=1 $(PY) -m benchmarks.gpu.offline_compile --triton 3.6.0

# The static table (registers, spills, shared memory, SASS per element) in
# benchmarks/results/kernels-sm90.json and docs/kernels.md.
kernels-table:
	TRITON_DEFAULT_FP_FUSION=1 $(PY) -m benchmarks.gpu.offline_compile --triton 3.6.0 \
		--json benchmarks/results/kernels-sm90.json --markdown docs/kernels.md

clean:
	rm -rf build *.egg-info rlhf_fast/_C*.so
