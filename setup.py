"""Builds rlhf_fast._C: C++ CPU kernels always; CUDA kernels where a CUDA
build of torch and nvcc exist.

Environment:
  RLHF_FAST_BUILD_CUDA=0/1   force the CUDA part off / on (default: auto)
  RLHF_FAST_CUDA_ARCHS       "8.0;9.0" by default (A100, H100/H200)
  RLHF_FAST_NATIVE=1         add -march=native (never the default: wheels
                             must run on any x86-64 with AVX2)
  RLHF_FAST_DEBUG_INFO=1     keep Python's -g (debug info): off by default
  MAX_JOBS                   parallel compile jobs (read by torch's builder)
  RLHF_FAST_SKIP_EXT=1       no extension: the Makefile's `pip install -e .` then
                             only records the package, its dependencies and the
                             rlhf-fast command, and the extension is built by
                             `python setup.py build_ext --inplace` into a kept
                             build/ folder, so ninja recompiles only what changed
                             (pip would build it from scratch in a throw-away one)
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("RLHF_FAST_BUILD_CUDA")
    have = torch.version.cuda is not None and CUDA_HOME is not None
    if flag is None:
        return have
    if flag == "1" and not have:
        raise RuntimeError(
            "RLHF_FAST_BUILD_CUDA=1 but "
            + ("torch is a CPU build" if torch.version.cuda is None else "nvcc (CUDA_HOME) was not found")
        )
    return flag == "1"


def _gencode(archs: str) -> list:
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip()
        if arch:
            num = arch.replace(".", "")
            flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    return flags


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extension():
    with_cuda = _want_cuda()
    # Kernel .cu files are torch-free; *_ops.cpp next to them is the torch glue.
    sources = _rel(
        [os.path.join(ROOT, "csrc", "ops.cpp"), os.path.join(ROOT, "csrc", "module.cpp")]
        + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    # -ffp-contract=off: GCC would otherwise fuse x * inv_t - m into one FMA
    # that skips the rounding of m = max(x) * inv_t, so d = z - m is not 0 at
    # the max (a one-hot row then gets log p = 1e-7 instead of 0), and the
    # AVX2/AVX-512 copies would round differently from the SSE2 one.
    # -fno-trapping-math: nothing here relies on FP exceptions; with traps
    # assumed GCC will not if-convert `valid ? f(x) : 0` loops.
    cxx = [
        "-O3",
        "-std=c++20",
        "-fopenmp",
        "-ffp-contract=off",
        "-fno-trapping-math",
        "-Wall",
        "-Wno-unknown-pragmas",
        "-Wno-psabi",
    ]
    if os.environ.get("RLHF_FAST_NATIVE") == "1":
        cxx.append("-march=native")
    # Python's CFLAGS bring -g; DWARF for torch's headers and the kernels'
    # template copies was ~40% of the compile: an empty file with ATen.h and
    # torch/library.h took 12.6 s with -g, 7.1 s with -g0 (GCC 12). -g0 comes
    # after -g on the command line, so it wins.
    if os.environ.get("RLHF_FAST_DEBUG_INFO") != "1":
        cxx.append("-g0")
    define_macros = []
    kwargs = {}
    if with_cuda:
        archs = os.environ.get("RLHF_FAST_CUDA_ARCHS", "8.0;9.0")
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_ops.cpp")))
        define_macros += [("RLHF_FAST_WITH_CUDA", None), ("RLHF_FAST_CUDA_ARCHS", f'"{archs}"')]
        kwargs["extra_compile_args"] = {
            "cxx": cxx,
            "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"] + _gencode(archs),
        }
        ext_cls = CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext_cls = CppExtension
    return ext_cls(
        name="rlhf_fast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        define_macros=define_macros,
        extra_link_args=["-fopenmp"],
        **kwargs,
    )


setup(
    ext_modules=[] if os.environ.get("RLHF_FAST_SKIP_EXT") == "1" else [extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
