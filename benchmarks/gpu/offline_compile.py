"""Compile every Triton kernel for Hopper (sm_90a) and Ampere (sm_80) on a
machine without a GPU, and fail on what a real GPU would reject.

    python -m benchmarks.gpu.offline_compile                    # installed Triton
    python -m benchmarks.gpu.offline_compile --triton 3.6.0     # the GPU machine's Triton
    python -m benchmarks.gpu.offline_compile --triton 3.6.0 --json benchmarks/results/kernels-sm90.json

1. Capture: the launchers (the triton_ops of rlhf_fast/triton/) run on meta
   tensors with torch.library.wrap_triton replaced by a recorder, for the
   inputs of launch_cases.py. Each launch they would make on a GPU is kept:
   kernel, argument types, constexprs, num_warps / num_stages, as the
   launcher chose them with its GPU rules (TRITON_INTERPRET is unset here).
2. Compile: each distinct launch through triton.compile for
   GPUTarget("cuda", 90, 64) and ("cuda", 80, 64): the front end rejects what
   the interpreter accepts (a global read inside @triton.jit, a dtype mix a
   GPU lowering refuses), and the PTX is assembled by the ptxas Triton ships.
3. Measure: `ptxas -v` gives registers and spill bytes, Triton's metadata the
   shared memory; the cubin's SASS (Triton's cuobjdump) gives the
   instructions and MUFU (ex2 / lg2 / rcp ...) operations of the hot loop.
4. Fail on: a compile error, shared memory over the target's limit, spills
   over the kernel's budget (launch_cases.KERNELS), a kernel that no case
   reaches.

What the counts cannot tell: issue efficiency (dual issue, stalls on
memory or MUFU), achieved occupancy, cache behaviour, and the trip counts of
data-dependent loops (the sampler's threshold searches). Instructions per element is
the hot loop's static length over the elements one thread handles per trip;
it is a ceiling on speed, never a measurement of it.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("RLHF_FAST_CACHE", Path.home() / ".cache" / "rlhf_fast"))
TARGETS = {90: dict(arch="sm_90a", smem=232448), 80: dict(arch="sm_80", smem=166912)}
TORCH_TO_TRITON = {
    "torch.float32": "fp32",
    "torch.bfloat16": "bf16",
    "torch.float16": "fp16",
    "torch.float64": "fp64",
    "torch.int64": "i64",
    "torch.int32": "i32",
    "torch.int16": "i16",
    "torch.int8": "i8",
    "torch.uint8": "u8",
    "torch.bool": "i1",
}


# ------------------------------------------------------------------ capture


def capture_launches(cases=None) -> list[dict]:
    """Run each case's launcher on meta tensors and record its launches."""
    import torch

    os.environ.pop("TRITON_INTERPRET", None)
    import rlhf_fast.ops  # noqa: F401  (before torch.autocast is stubbed below: ops modules decorate with it)
    from rlhf_fast.triton import linear_logprobs as lin

    from . import launch_cases

    launches: list[dict] = []
    current = [""]

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(describe_launch(self.kernel, args, kwargs, grid, current[0]))

            return launch

    real = torch.library.wrap_triton, lin._programs_wanted, torch.autocast
    torch.library.wrap_triton = Recorder
    lin._programs_wanted = lambda device: 2 * 132  # an H100's SMs, as on a GPU
    torch.autocast = lambda *a, **k: contextlib.nullcontext()  # meta is no autocast device
    try:
        for desc, thunk in cases if cases is not None else launch_cases.all_cases():
            current[0] = desc
            thunk()
    finally:
        torch.library.wrap_triton, lin._programs_wanted, torch.autocast = real
    return launches


def _arg_type(value) -> tuple[str, str]:
    """(triton signature type, specialisation) of one runtime argument, as
    Triton's JIT would see it on a GPU: pointers 16-byte aligned (torch's
    allocations are), integers divisible by 16 marked so."""
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + TORCH_TO_TRITON[str(value.dtype)], "D"
    if isinstance(value, bool):
        return "i1", ""
    if isinstance(value, int):
        ty = "i32" if -(2**31) <= value < 2**31 else "i64"
        return ty, "D" if value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", ""
    if value is None:
        return "constexpr", ""
    raise TypeError(f"unsupported kernel argument {value!r}")


def describe_launch(kernel, args, kwargs, grid, case: str) -> dict:
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in kwargs}
    params = kernel.params
    values = dict(zip([p.name for p in params], args))
    values.update(kwargs)
    signature, constexprs, spec = {}, {}, {}
    for p in params:
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = _constexpr_repr(v)
        else:
            ty, sp = _arg_type(v)
            if p.name in getattr(kernel, "do_not_specialize", ()) or p.num in getattr(kernel, "do_not_specialize", ()):
                sp = ""
            signature[p.name] = ty
            if ty == "constexpr":
                constexprs[p.name] = None
            spec[p.name] = sp
    return dict(
        module=kernel.fn.__module__,
        kernel=kernel.fn.__name__,
        signature=signature,
        constexprs=constexprs,
        spec=spec,
        num_warps=options.get("num_warps", 4),
        num_stages=options.get("num_stages", 3),
        **({"maxnreg": options["maxnreg"]} if "maxnreg" in options else {}),
        grid=[int(g) for g in grid] if isinstance(grid, tuple) else str(grid),
        case=case,
    )


def _constexpr_repr(v):
    """JSON-able form of a constexpr value; tl dtypes become 'tl.float32'."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    name = getattr(v, "name", None)
    if name is not None:
        return f"tl.{name}"
    raise TypeError(f"unsupported constexpr {v!r}")


def distinct(launches: list[dict]) -> list[dict]:
    """One entry per compiled specialisation, with the cases that reach it."""
    seen: dict[str, dict] = {}
    for launch in launches:
        key = _launch_key(launch)
        if key not in seen:
            seen[key] = dict(launch, cases=[])
            seen[key].pop("case")
            seen[key].pop("grid")
        seen[key]["cases"].append(launch["case"])
    return list(seen.values())


def _launch_key(launch: dict) -> str:
    keys = ("module", "kernel", "signature", "constexprs", "spec", "num_warps", "num_stages")
    parts = [launch[k] for k in keys] + ([launch["maxnreg"]] if "maxnreg" in launch else [])
    return json.dumps(parts, sort_keys=True)


# ------------------------------------------------------------------ compile


def _tools(capability: int = 90) -> dict:
    """The ptxas Triton itself assembles with for this target (its PTX
    version must match), and the cuobjdump it ships."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return dict(ptxas=get_ptxas(capability).path, cuobjdump=str(bin_dir / "cuobjdump"))


def compile_one(launch: dict, capability: int, use_cache: bool = True) -> dict:
    """Compile one launch for one target; never raises (errors are recorded)."""
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    base = dict(kernel=launch["kernel"], target=f"sm_{capability}", triton=triton.__version__)
    base.update({k: launch[k] for k in ("signature", "constexprs", "num_warps", "num_stages", "cases")})
    if "maxnreg" in launch:
        base["maxnreg"] = launch["maxnreg"]
    key = hashlib.sha256(
        json.dumps([triton.__version__, kernel.cache_key, _launch_key(launch), capability]).encode()
    ).hexdigest()
    cache_file = CACHE / "offline-compile" / f"{key}.json"
    if use_cache and cache_file.exists():
        return dict(json.loads(cache_file.read_text()), cases=launch["cases"])

    constexprs = {}
    for name, v in launch["constexprs"].items():
        constexprs[name] = tl.dtype(v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
    names = [p.name for p in kernel.params]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, sp in launch["spec"].items() if "D" in sp}
    t0 = time.perf_counter()
    try:
        src = ASTSource(kernel, dict(launch["signature"]), constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", capability, 64),
            options=dict(
                num_warps=launch["num_warps"],
                num_stages=launch["num_stages"],
                **({"maxnreg": launch["maxnreg"]} if "maxnreg" in launch else {}),
            ),
        )
    except Exception as exc:  # the point of the check: record, report, fail later
        msg = f"{type(exc).__name__}: {exc}"
        return dict(base, ok=False, error=msg[-2000:], compile_s=round(time.perf_counter() - t0, 2))
    result = dict(base, ok=True, error=None, shared=int(compiled.metadata.shared))
    result.update(_ptxas_stats(compiled.asm["ptx"], capability))
    result.update(_sass_stats(compiled.asm["cubin"], launch, capability))
    result["compile_s"] = round(time.perf_counter() - t0, 2)
    if use_cache:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({k: v for k, v in result.items() if k != "cases"}))
        tmp.replace(cache_file)
    return result


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_stats(ptx: str, capability: int) -> dict:
    arch = TARGETS[capability]["arch"]
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [_tools(capability)["ptxas"], f"-arch={arch}", "-v", str(src), "-o", str(Path(d) / "k.cubin")],
            capture_output=True,
            text=True,
        )
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return dict(ptxas_error=log[-2000:])
    regs = _PTXAS_REGS.search(log)
    spill = _PTXAS_SPILL.search(log)
    return dict(
        registers=int(regs.group(1)) if regs else None,
        stack=int(spill.group(1)) if spill else None,
        spill_stores=int(spill.group(2)) if spill else None,
        spill_loads=int(spill.group(3)) if spill else None,
    )


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\b(?:BRA|BRX)\b.*?(?:0x([0-9a-f]+)|`\(\.L_x_(\d+)\))")
_LABEL = re.compile(r"^\s*\.L_x_(\d+):")


def parse_sass(text: str) -> list[tuple[int, str]]:
    """[(address, instruction)] of one kernel; labels resolved to addresses."""
    insts, labels, pending = [], {}, []
    for line in text.splitlines():
        lab = _LABEL.match(line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = _SASS_LINE.search(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            insts.append((addr, m.group(2)))
    out = []
    for addr, inst in insts:
        b = _BRANCH.search(inst)
        if b and b.group(2) is not None and b.group(2) in labels:
            inst = f"{inst} @target={labels[b.group(2)]:#x}"
        out.append((addr, inst))
    return out


def hot_loops(insts: list[tuple[int, str]]) -> list[dict]:
    """Innermost loops (a backward branch and the code it jumps back over),
    with their instruction and MUFU counts. NOPs are padding and not counted."""
    loops = []
    for addr, inst in insts:
        if not re.search(r"\bBRA\b", inst):
            continue
        m = re.search(r"@target=0x([0-9a-f]+)", inst) or re.search(r"\bBRA\b[^`]*0x([0-9a-f]+)", inst)
        if m and int(m.group(1), 16) < addr:  # == addr: the trap loop after EXIT
            loops.append((int(m.group(1), 16), addr))
    innermost = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    out = []
    for lo, hi in sorted(set(innermost)):
        body = [i for a, i in insts if lo <= a <= hi and not i.startswith("NOP")]
        out.append(dict(start=lo, end=hi, instructions=len(body), mufu=sum("MUFU" in i for i in body)))
    return out


def _opcode(inst: str) -> str:
    """SASS opcode of one instruction, its predicate (@P0, @!P1) left off."""
    words = inst.split()
    return words[1] if words[0].startswith("@") and len(words) > 1 else words[0]


def _ticket_ordered(insts: list, ticket: int) -> bool:
    """The last-program pattern as compiled: a CTA barrier, then a GPU-scope
    memory barrier (the ticket's release: every thread's partial stores before
    it), the ticket atomic at GPU scope, then an L1 invalidation before the
    barrier that hands the ticket to the other threads (its acquire: the last
    program's loads of the other programs' partials miss any stale line).
    Triton 3.6 and 3.9 compile tl.atomic_add(sem="acq_rel", scope="gpu") to
    MEMBAR.ALL.GPU, ATOMG.E.ADD.STRONG.GPU, CCTL.IVALL on sm_90 and sm_80."""
    ops = [_opcode(i) for _, i in insts]
    if ticket >= len(ops) or "GPU" not in insts[ticket][1]:
        return False
    bar = max((k for k in range(ticket) if ops[k].startswith("BAR.SYNC")), default=-1)
    fence = any(ops[k].startswith("MEMBAR") and "GPU" in insts[k][1] for k in range(bar + 1, ticket))
    # before the barrier that hands the ticket to the other threads
    nxt = next((k for k in range(ticket + 1, len(ops)) if ops[k].startswith("BAR.SYNC")), len(ops))
    acquire = any(ops[k].startswith("CCTL.IVALL") for k in range(ticket + 1, nxt))
    return bar >= 0 and fence and acquire


def _sass_stats(cubin: bytes, launch: dict, capability: int) -> dict:
    from . import launch_cases

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        proc = subprocess.run([_tools()["cuobjdump"], "-sass", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(sass_error=(proc.stdout + proc.stderr)[-1000:])
    insts = parse_sass(proc.stdout)
    body = [i for _, i in insts if not i.startswith("NOP")]
    loops = hot_loops(insts)
    out = dict(sass_instructions=len(body), sass_mufu=sum("MUFU" in i for i in body), loops=loops)
    spec = launch_cases.KERNELS.get(launch["kernel"], {})
    block = spec.get("block")
    if block and block in launch["constexprs"]:
        per_thread = launch["constexprs"][block] / (32 * launch["num_warps"])
        if spec.get("last_program_epilogue"):
            # straight-line streaming code, then the last program's epilogue
            # (cold, run once): every program runs what precedes the ticket atomic
            ticket = next((k for k, (_, i) in enumerate(insts) if _opcode(i).startswith("ATOM")), len(insts))
            streamed = [i for _, i in insts[:ticket] if not i.startswith("NOP")]
            insts_hot, mufu_hot = len(streamed), sum("MUFU" in i for i in streamed)
            out["ticket_ordered"] = _ticket_ordered(insts, ticket)
        elif loops:  # the longest innermost loop: the sweep that dominates
            hot = max(loops, key=lambda lp: lp["instructions"])
            insts_hot, mufu_hot = hot["instructions"], hot["mufu"]
        else:  # straight-line kernel: everything it executes, per element
            insts_hot, mufu_hot = out["sass_instructions"], out["sass_mufu"]
        out["elements_per_thread"] = per_thread
        out["insts_per_element"] = round(insts_hot / per_thread, 2)
        out["mufu_per_element"] = round(mufu_hot / per_thread, 2)
    return out


# ------------------------------------------------------------------ checks


def problems(result: dict) -> list[str]:
    from . import launch_cases

    where = f"{result['kernel']} [{result['target']}, triton {result['triton']}] {result['constexprs']}"
    if not result["ok"]:
        return [f"{where}: does not compile: {result['error']}"]
    out = []
    for key in ("ptxas_error", "sass_error"):
        if result.get(key):
            out.append(f"{where}: {key}: {result[key]}")
    limit = TARGETS[int(result["target"][3:])]["smem"]
    if result["shared"] > limit:
        out.append(f"{where}: needs {result['shared']} B of shared memory, over the {limit} B limit")
    spills = (result.get("spill_stores") or 0) + (result.get("spill_loads") or 0)
    budget = launch_cases.KERNELS.get(result["kernel"], {}).get("spill_budget", {}).get(int(result["target"][3:]), 0)
    if spills > budget:
        out.append(f"{where}: spills {spills} B (budget {budget} B) at {result.get('registers')} registers")
    if result.get("ticket_ordered") is False:
        out.append(f"{where}: the last-program ticket lacks its barrier, GPU-scope fence or L1 invalidation")
    return out


# constexpr flags the GPU launchers only ever set one way (UPCAST: the
# interpreter's bf16 tl.dot workaround; ROUND_BY_HAND: its truncating bf16 cast)
ONE_WAY_FLAGS = {"UPCAST": False, "ROUND_BY_HAND": False}


def jit_functions() -> tuple[set[str], set[str]]:
    """(kernels, helpers) among the @triton.jit functions of rlhf_fast.triton:
    a helper is called from another jit function's source, a kernel is not."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import rlhf_fast.triton as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__:
                found[name] = obj.src
    called = {n for n in found for other, src in found.items() if other != n and re.search(rf"\b{n}\(", src)}
    return set(found) - called, called


def coverage_problems(launches: list[dict]) -> list[str]:
    """Every launched kernel is in launch_cases.KERNELS and reached by a case,
    and every boolean constexpr flag of it is compiled both ways."""
    from . import launch_cases

    kernels, _ = jit_functions()
    out = [
        f"{k}: a @triton.jit kernel missing from launch_cases.KERNELS"
        for k in sorted(kernels - set(launch_cases.KERNELS))
    ]
    out += [
        f"{k}: in launch_cases.KERNELS but not a kernel of rlhf_fast.triton"
        for k in sorted(set(launch_cases.KERNELS) - kernels)
    ]
    out += [f"{k}: no launch case reaches this kernel" for k in missing_kernels(launches)]
    flags: dict[tuple[str, str], set] = {}
    for launch in launches:
        for name, v in launch["constexprs"].items():
            if isinstance(v, bool):
                flags.setdefault((launch["kernel"], name), set()).add(v)
    for (kernel, name), seen in sorted(flags.items()):
        want = {ONE_WAY_FLAGS[name]} if name in ONE_WAY_FLAGS else {False, True}
        if seen != want:
            out.append(
                f"{kernel}: constexpr {name} compiled only as {sorted(seen)}; add a case for {sorted(want - seen)}"
            )
    return out


def missing_kernels(launches: list[dict]) -> list[str]:
    from . import launch_cases

    reached = {launch["kernel"] for launch in launches}
    return sorted(set(launch_cases.KERNELS) - reached)


# ------------------------------------------------------------------ driver


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def run(capabilities=(90, 80), jobs=None, use_cache=True, cases=None, only=None, log=print):
    """Capture, compile and check; returns (results, problems)."""
    t0 = time.perf_counter()
    launches = capture_launches(cases)
    todo = [lw for lw in distinct(launches) if not only or lw["kernel"] in only]
    log(
        f"offline compile: {len(launches)} launches from the launchers -> {len(todo)} specialisations "
        f"x {len(capabilities)} targets"
    )
    work = [(launch, cap) for launch in todo for cap in capabilities]
    jobs = jobs or os.cpu_count() or 1
    results = []
    if jobs == 1:
        results = [compile_one(lw, cap, use_cache) for lw, cap in work]
    else:
        import multiprocessing as mp

        ctx = mp.get_context("fork")
        with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init) as pool:
            results = list(pool.map(compile_one, *zip(*work), [use_cache] * len(work)))
    errs = [p for r in results for p in problems(r)]
    errs += coverage_problems(launches) if cases is None else []
    log(f"offline compile: {len(results)} compiles in {time.perf_counter() - t0:.1f} s, {len(errs)} problems")
    return results, errs


def summary_table(results: list[dict]) -> list[dict]:
    """Per kernel and target, the heaviest production specialisation's counts:
    the widest block (the production shapes launch the widest; a 16-wide tile
    for V = 7 would make the per-element counts meaningless), then the largest
    register use, then instructions per element; fp64, the tests' dtype, only
    where a kernel has nothing else."""
    from . import launch_cases

    rows: dict[tuple, dict] = {}
    has_other = {(r["kernel"], r["target"]) for r in results if r["ok"] and "*fp64" not in r["signature"].values()}

    def rank(r):
        block = launch_cases.KERNELS.get(r["kernel"], {}).get("block")
        width = r["constexprs"].get(block, 0) if block else 0
        return (width, r.get("registers") or 0, r.get("insts_per_element") or 0)

    for r in results:
        if not r["ok"]:
            continue
        if "*fp64" in r["signature"].values() and (r["kernel"], r["target"]) in has_other:
            continue
        key = (r["kernel"], r["target"])
        if key not in rows or rank(r) > rank(rows[key]):
            rows[key] = r
    keep = (
        "kernel",
        "target",
        "triton",
        "constexprs",
        "num_warps",
        "num_stages",
        "registers",
        "spill_stores",
        "spill_loads",
        "shared",
        "sass_instructions",
        "insts_per_element",
        "mufu_per_element",
    )
    return [{k: rows[key].get(k) for k in keep} for key in sorted(rows)]


# Instructions per element one H100 / H200 can issue while streaming bf16 at
# copy bandwidth: 132 SMs x 4 warp-instructions x 32 lanes x 1.98 GHz =
# 3.3e13 thread-instructions/s over 1.5e12 (H100) or 2.2e12 (H200) elements/s.
ISSUE_BUDGET = {"H100": 22, "H200": 15}
ISSUE_RATE = 132 * 4 * 32 * 1.98e9  # thread-instructions / s
MUFU_RATE = 132 * 16 * 1.98e9  # ex2 / lg2 results / s (16 per SM per clock)
COPY_BYTES_PER_S = {"H100": 3.0e12, "H200": 4.3e12}  # a device-to-device copy, read + write


def occupancy(registers: int, warps: int, shared: int) -> float:
    """Resident warps / 64 on an sm_90 SM: registers are allocated per warp
    in 256-register units (8 per thread) from 64 K; 228 KiB of shared memory
    with 1 KiB reserved per block; at most 32 blocks and 64 warps."""
    per_warp = -(-max(registers, 1) // 8) * 8 * 32
    blocks = min(65536 // (per_warp * warps), 32, 64 // warps)
    if shared:
        blocks = min(blocks, (228 * 1024) // (shared + 1024))
    return blocks * warps / 64


def predicted_fraction(insts: float, mufu: float, bytes_per_elem: float, gpu: str) -> float:
    """Fraction of copy bandwidth a streaming kernel can reach when issue and
    the MUFU pipe are perfect: bandwidth time over the largest of the
    bandwidth, issue and MUFU times per element."""
    t_bw = bytes_per_elem / COPY_BYTES_PER_S[gpu]
    return t_bw / max(t_bw, insts / ISSUE_RATE, (mufu or 0) / MUFU_RATE)


def hot_table(results: list[dict]) -> list[dict]:
    """launch_cases.HOT: each hot kernel's production specialisation on sm_90."""
    from . import launch_cases

    rows = []
    for label, kernel, case, nbytes, goal_insts, goal_mufu in launch_cases.HOT:
        found = [
            r for r in results if r["ok"] and r["kernel"] == kernel and r["target"] == "sm_90" and case in r["cases"]
        ]
        if not found:
            continue
        r = found[0]
        ipe, mpe = r.get("insts_per_element"), r.get("mufu_per_element")
        row = dict(
            label=label,
            kernel=kernel,
            case=case,
            triton=r["triton"],
            num_warps=r["num_warps"],
            registers=r["registers"],
            spill=(r["spill_stores"] or 0) + (r["spill_loads"] or 0),
            occupancy=occupancy(r["registers"], r["num_warps"], r["shared"]),
            insts_per_element=ipe,
            mufu_per_element=mpe,
            bytes_per_element=nbytes,
            goal_insts=goal_insts,
            goal_mufu=goal_mufu,
        )
        for gpu in COPY_BYTES_PER_S:
            row[f"predicted_{gpu}"] = round(predicted_fraction(ipe, mpe, nbytes, gpu), 3) if ipe is not None else None
        rows.append(row)
    return rows


def linear_waves() -> list[dict]:
    """The fused linear log-prob forward's grid at the GPU benchmark shapes on
    132 SMs (H100 and H200): splits chosen by the launcher's own rule."""
    import triton

    from rlhf_fast.triton.linear_logprobs import num_splits, tile_config, wave_efficiency

    out = []
    for N, H, V in ((8192, 4096, 131072), (1937, 3584, 152064)):
        cfg = tile_config(N, V, H, False, 2)
        splits = num_splits(N, V, cfg["BLOCK_N"], cfg["BLOCK_V"], 2 * 132, cfg["GROUP"])
        rows = triton.cdiv(N, cfg["BLOCK_N"])
        out.append(
            dict(
                shape=(N, H, V),
                splits=splits,
                programs=rows * splits,
                waves=triton.cdiv(rows * splits, 132),
                efficiency=round(wave_efficiency(rows, V, cfg["BLOCK_V"], splits, 132), 3),
            )
        )
    return out


def hot_markdown(results: list[dict]) -> list[str]:
    lines = [
        "",
        "## The hot kernels at production shapes",
        "",
        "The specialisation each GPU benchmark launches, against the static goals. Predicted fraction of copy "
        "bandwidth = t_bw / max(t_bw, t_issue, t_mufu) per element, with t_bw = bytes / copy rate (3.0 TB/s H100, "
        f"4.3 TB/s H200), t_issue = instructions / {ISSUE_RATE:.3g} per s (132 SMs x 4 schedulers x 32 lanes x "
        f"1.98 GHz) and t_mufu = MUFU ops / {MUFU_RATE:.3g} per s (16 per SM per clock): perfect issue, no stalls, so "
        "an upper bound. Occupancy: resident warps of 64 from registers and shared memory.",
        "",
        "| kernel | warps | registers | spill B | occupancy | insts / elem (goal) | MUFU / elem (goal) | B / elem "
        "| predicted H100 | predicted H200 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in hot_table(results):
        gi = f" (<= {r['goal_insts']})" if r["goal_insts"] else ""
        gm = f" ({r['goal_mufu']})" if r["goal_mufu"] else ""
        lines.append(
            f"| {r['label']} (`{r['kernel']}`) | {r['num_warps']} | {r['registers']} | {r['spill']} | "
            f"{r['occupancy']:.0%} | {r['insts_per_element']}{gi} | {r['mufu_per_element']}{gm} | "
            f"{r['bytes_per_element']} | {r['predicted_H100']:.0%} | {r['predicted_H200']:.0%} |"
        )
    lines += [
        "",
        "`linear_logprobs` forward grid (bf16, 128 x 128 tiles, one program resident per SM, 132 SMs): every program "
        "of a wave waits for the longest vocabulary split, so efficiency = useful tile-steps / (waves x 132 x the "
        "longest split's tiles).",
        "",
        "| (N, H, V) | splits | programs | waves | wave efficiency |",
        "|---|---|---|---|---|",
    ]
    for w in linear_waves():
        lines.append(f"| {w['shape']} | {w['splits']} | {w['programs']} | {w['waves']} | {w['efficiency']:.1%} |")
    return lines


def markdown(results: list[dict], version: str) -> str:
    lines = [
        f"Offline compile for sm_90a with triton {version} (`python -m benchmarks.gpu.offline_compile --triton "
        f"{version} --json benchmarks/results/kernels-sm90.json --markdown docs/kernels.md`). Per kernel, its heaviest "
        "production specialisation (the widest block, then the most registers; fp64, the tests' dtype, only where a "
        "kernel has nothing else). Instructions and MUFU "
        "ops per element: the longest innermost loop's SASS "
        "over the elements one thread handles per trip (straight-line kernels: the whole kernel). Streaming at copy "
        f"bandwidth leaves about {ISSUE_BUDGET['H100']} instructions per bf16 element on an H100 and "
        f"{ISSUE_BUDGET['H200']} on an H200 at perfect issue; a kernel above that is predicted issue-bound. "
        "Not measured on a GPU: issue efficiency, stalls, occupancy and caches are outside this model.",
        "",
        "| kernel | constexprs | warps | registers | spill B | shared B | SASS | insts / elem | MUFU / elem | H100 | H200 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary_table(results):
        if r["target"] != "sm_90":
            continue
        ipe = r["insts_per_element"]
        verdict = {
            k: ("-" if ipe is None else ("bandwidth" if ipe <= b else "issue-bound")) for k, b in ISSUE_BUDGET.items()
        }
        consts = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.startswith("BLOCK") or k == "ACC")
        spill = (r["spill_stores"] or 0) + (r["spill_loads"] or 0)
        lines.append(
            f"| `{r['kernel']}` | {consts} | {r['num_warps']} | {r['registers']} | {spill} | {r['shared']} | "
            f"{r['sass_instructions']} | {ipe if ipe is not None else '-'} | "
            f"{r['mufu_per_element'] if r['mufu_per_element'] is not None else '-'} | {verdict['H100']} | {verdict['H200']} |"
        )
    return "\n".join(lines + hot_markdown(results)) + "\n"


def _ensure_triton(version: str) -> Path:
    """Triton `version` in its own --target folder (never replacing the installed one)."""
    target = CACHE / f"triton-{version}"
    if not (target / "triton" / "__init__.py").exists():
        print(f"installing triton=={version} into {target} (cached for later runs)", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), f"triton=={version}"],
            check=True,
        )
    return target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--triton", help="compile with this Triton release, installed into its own cached folder")
    ap.add_argument("--targets", default="90,80", help="compute capabilities (default 90,80)")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--json", help="write every specialisation's counts here")
    ap.add_argument("--only", action="append", help="compile only this kernel (repeatable)")
    ap.add_argument("--markdown", help="write the sm_90 summary table here (docs/kernels.md)")
    args = ap.parse_args(argv)

    if args.triton:
        import importlib.metadata

        if importlib.metadata.version("triton") != args.triton or os.environ.get("_RLHF_FAST_TRITON_PATH"):
            if not os.environ.get("_RLHF_FAST_TRITON_PATH"):
                path = _ensure_triton(args.triton)
                env = dict(os.environ, _RLHF_FAST_TRITON_PATH=str(path))
                env["PYTHONPATH"] = os.pathsep.join([str(path), str(REPO), env.get("PYTHONPATH", "")])
                rest = [a for a in (argv if argv is not None else sys.argv[1:])]
                return subprocess.call(
                    [sys.executable, "-m", "benchmarks.gpu.offline_compile", *rest], env=env, cwd=REPO
                )
    import triton

    if args.triton and triton.__version__ != args.triton:
        print(f"asked for triton {args.triton} but imported {triton.__version__} from {triton.__file__}")
        return 2
    caps = tuple(int(c) for c in args.targets.split(","))
    results, errs = run(caps, args.jobs, not args.no_cache, only=args.only)
    if args.json:
        from ..harness import _git_commit

        doc = dict(
            triton=triton.__version__,
            targets=[f"sm_{c}" for c in caps],
            generated=time.strftime("%Y-%m-%d"),
            git_commit=_git_commit(),  # pages quoting these numbers name the code they came from
            command="python -m benchmarks.gpu.offline_compile " + " ".join(argv if argv is not None else sys.argv[1:]),
            note=__doc__.split("What the counts cannot tell: ")[1].split("\n\n")[0].replace("\n", " "),
            summary=summary_table(results),
            hot=hot_table(results),
            linear_waves=linear_waves(),
            specialisations=results,
        )
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(
            "# Triton kernels as compiled for Hopper\n\n" + markdown(results, triton.__version__)
        )
    for line in summary_table(results):
        if line["target"] == "sm_90":
            print(
                f"  {line['kernel']:34s} regs {line['registers']!s:>4} spill {line['spill_stores']!s:>3}/"
                f"{line['spill_loads']!s:<3} smem {line['shared']:>6} insts/elem {line['insts_per_element']!s:>6} "
                f"mufu/elem {line['mufu_per_element']!s:>5}"
            )
    for r in hot_table(results):
        if r["goal_insts"] and r["insts_per_element"] > r["goal_insts"]:
            errs.append(
                f"{r['kernel']} ({r['label']}): {r['insts_per_element']} SASS instructions per element, "
                f"over its goal of {r['goal_insts']}"
            )
        print(
            f"  hot: {r['label']:36s} insts/elem {r['insts_per_element']!s:>6} mufu/elem {r['mufu_per_element']!s:>5} "
            f"occupancy {r['occupancy']:.0%} predicted H100 {r['predicted_H100']:.0%} H200 {r['predicted_H200']:.0%}"
        )
    for e in errs:
        print("FAIL", e)
    return 1 if errs else 0


if __name__ == "__main__":
    sys.exit(main())
