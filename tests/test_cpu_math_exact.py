"""cpu_math.h's exp_pm20 and clampv give the bits of the forms they replaced.

exp_pm20 drops exp_nonpos's underflow guard and applies 2^n by an integer add
to the exponent; clampv is a min then a max. Both are meant to change no bit
(the CPU kernels' results, and the agreement of their ISA copies, rest on it),
so a C++ program compares them lane by lane over an eighth of all floats in
[-20, 20] (and the special values), compiled as the AVX2 copy and as the
baseline x86-64 copy. It needs only the C++ compiler that builds the extension.
"""

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "tests" / "cpp" / "check_cpu_math.cpp"
# the extension's floating-point flags (setup.py): the property under test depends on them
FLAGS = ["-O3", "-std=c++20", "-ffp-contract=off", "-fno-trapping-math", "-Wno-psabi"]
TARGETS = {"avx2": ["-march=x86-64-v3"], "baseline": []} if platform.machine() == "x86_64" else {"native": []}


def _cxx() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    assert cxx, "no C++ compiler found (the extension's build needs one too)"
    return cxx


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_exp_pm20_and_clampv_keep_their_bits(target, tmp_path):
    exe = tmp_path / f"check_{target}"
    cmd = [_cxx(), *FLAGS, *TARGETS[target], f"-I{ROOT / 'csrc' / 'include'}", str(SRC), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    if target == "avx2" and "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX2: the program compiled, it cannot run here")
    out = subprocess.run([str(exe), "8"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 of " in out.stdout.splitlines()[-2] and " 0 of " in out.stdout.splitlines()[-1], out.stdout
