"""The benchmark harness itself (benchmarks/harness.py, plot.py,
make_readme_table.py, the `rlhf-fast bench` runner): fast, no kernel timing."""

from __future__ import annotations

import json
import os
import struct
import sys
import time
import zlib

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import harness  # noqa: E402
from benchmarks.harness import Record, compare, format_table, peak_memory, time_fn  # noqa: E402

REQUIRED = (
    "op",
    "impl",
    "baseline",
    "shape",
    "dtype",
    "device",
    "median_s",
    "baseline_median_s",
    "speedup",
    "peak_mem_bytes",
)  # every field a compare() record must carry


def test_peak_memory_counts_a_known_allocation():
    n = 1 << 20  # 4 MiB of fp32, alive at the end of the call (returned)
    peak = peak_memory(lambda: torch.empty(n, dtype=torch.float32))
    assert 4 * n <= peak < 4 * n + 64 * 1024, peak


def test_peak_memory_sees_freed_temporaries():
    def fn():
        tmp = torch.empty(1 << 20, dtype=torch.float32)  # 4 MiB, freed before return
        del tmp
        return torch.empty(1 << 18, dtype=torch.float32)  # 1 MiB returned

    peak = peak_memory(fn)
    assert 4 * (1 << 20) <= peak < 5 * (1 << 20) + 64 * 1024, peak


def test_time_fn_measures_a_sleep_and_bounds_slow_calls():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.01)

    t = time_fn(fn, warmup=2, repeat=5)
    assert 0.009 <= t < 0.05, t
    assert len(calls) == 2 + 5
    calls.clear()
    time_fn(lambda: (calls.append(1), time.sleep(0.05)), repeat=50, budget_s=0.2)
    assert len(calls) <= 1 + 4  # one first call, no warm-up, max(3, 0.2 / 0.05) timed


def test_time_interleaved_alternates_calls_and_gives_each_its_median():
    order = []

    def sleeper(name, s):
        return lambda: (order.append(name), time.sleep(s))

    fast, slow = harness.time_interleaved([sleeper("a", 0.002), sleeper("b", 0.01)], warmup=1, repeat=4)
    assert 0.0015 <= fast < 0.009 <= slow < 0.05, (fast, slow)
    assert order == ["a", "b"] + ["a", "b"] * 4  # warm-up, then one call of each per round
    # compare(interleave=names) times those peers in the same rounds as ours,
    # the others on their own; a skip stays a skip
    order.clear()
    recs = compare(
        op="toy",
        impl="ours",
        fn=sleeper("ours", 0.002),
        baselines={"peer": sleeper("peer", 0.01), "alone": sleeper("alone", 0.004), "absent": "pip install x"},
        shape="(1,)",
        dtype="float32",
        device="cpu",
        mode="fwd",
        warmup=1,
        repeat=3,
        interleave=("peer",),
    )
    assert [r.baseline for r in recs] == [None, "peer", "alone", "absent"]
    assert recs[1].speedup > 2 and recs[2].speedup > 1.2 and recs[3].status == "skipped: pip install x"
    assert order[:8] == ["ours", "peer"] * 4  # warm-up and 3 rounds, before "alone" is timed


def test_compare_records_have_the_required_fields_and_a_skip():
    x = torch.randn(1000)
    peers = {"peer": lambda: x + x, "absent": "pip install x"}
    recs = compare(
        op="toy",
        impl="ours",
        fn=lambda: x * 2,
        baselines=peers,
        shape="(1000,)",
        dtype="float32",
        device="cpu",
        mode="fwd",
        bytes_moved=8000,
        warmup=1,
        repeat=3,
    )
    assert [r.baseline for r in recs] == [None, "peer", "absent"]
    for r in recs:
        d = r.as_dict()
        assert all(k in d for k in REQUIRED), d
        assert r.median_s > 0 and r.gb_per_s > 0 and r.threads == torch.get_num_threads()
    peer, absent = recs[1], recs[2]
    assert peer.status == "ok" and peer.speedup == pytest.approx(peer.baseline_median_s / peer.median_s)
    assert peer.peak_mem_bytes >= 4000 and peer.baseline_peak_mem_bytes >= 4000
    assert absent.status == "skipped: pip install x" and absent.speedup is None
    harness.attach_bandwidth(recs, copy_gb_per_s=2 * recs[0].gb_per_s)
    assert recs[0].pct_of_copy == pytest.approx(50.0)
    table = format_table(recs)
    assert "peer" in table and "skipped: pip install x" in table and "(50%)" in table


def test_format_table_shows_ours_when_every_peer_is_skipped():
    r = Record("toy", "ours", None, "(1,)", "fp32", "cpu", "fwd", median_s=0.002)
    s = Record("toy", "ours", "absent", "(1,)", "fp32", "cpu", "fwd", median_s=0.002, status="skipped: pip install x")
    assert "2.000" in format_table([r, s]) and "2.000" in format_table([r])


def test_collecting_records_cases_instead_of_timing():
    cases = []
    slow = lambda: time.sleep(10)  # noqa: E731  never called while collecting
    with harness.collecting(cases):
        recs = compare(
            op="toy",
            impl="ours",
            fn=slow,
            baselines={"peer": slow, "absent": "why"},
            shape="s",
            dtype="d",
            device="cpu",
            mode="fwd",
        )
        compare(
            op="toy", impl="ours", fn=slow, baselines={"peer2": slow}, shape="s", dtype="d", device="cpu", mode="fwd"
        )
    assert [c.id for c in cases] == ["toy-fwd-s-d-ours", "toy-fwd-s-d-peer", "toy-fwd-s-d-peer2"]
    assert {c.group for c in cases} == {"toy-fwd-s-d"} and recs[0].status.startswith("skipped")
    assert harness._collector is None


def test_machine_facts_has_device_versions_and_date():
    facts = harness.machine_facts("cpu")
    for k in ("date", "torch", "device", "cpu", "git_commit", "transformers", "python"):
        assert k in facts, k
    assert facts["date"][:2] == "20" and facts["torch"] == torch.__version__


def _png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    idat = data.index(b"IDAT")
    (n,) = struct.unpack(">I", data[idat - 4 : idat])
    raw = zlib.decompress(data[idat + 4 : idat + 4 + n])
    assert len(raw) == h * (1 + 3 * w)
    return w, h, raw


def test_speedup_chart_is_a_valid_png():
    from benchmarks.plot import speedup_chart

    recs = [
        Record("toy", "ours", f"peer{k}", "(1,)", "fp32", "cpu", "fwd", median_s=1.0, baseline_median_s=s, speedup=s)
        for k, s in enumerate((0.5, 1.0, 3.0, 150.0))
    ]
    recs.append(Record("toy", "ours", "absent", "(1,)", "fp32", "cpu", "fwd", status="skipped: pip install x"))
    w, h, raw = _png_size(speedup_chart(recs))
    assert w > 500 and h > 5 * 20
    assert raw.count(bytes((60, 160, 90))) > 100 and raw.count(bytes((210, 80, 70))) > 10  # green and red bars


def test_readme_table_from_results(tmp_path):
    from benchmarks.make_readme_table import render

    recs = [
        Record(
            "toy",
            "ours",
            "peer",
            "(8, 8)",
            "fp32",
            "cpu",
            "fwd",
            median_s=0.001,
            baseline_median_s=0.003,
            speedup=3.0,
            peak_mem_bytes=2**20,
            baseline_peak_mem_bytes=2**21,
        ).as_dict(),
        Record("toy", "ours", "absent", "(8, 8)", "fp32", "cpu", "fwd", status="skipped: pip install x").as_dict(),
    ]
    old = {
        "machine": {"date": "2026-01-01T00:00:00+00:00", "device": "cpu", "cpu": "Toy CPU", "torch": "2.0"},
        "records": [dict(recs[0], baseline_median_s=0.009, speedup=9.0)],
    }
    new = {
        "machine": {"date": "2026-02-01T00:00:00+00:00", "device": "cpu", "cpu": "Toy CPU", "torch": "2.13"},
        "records": recs,
    }
    for name, doc in (("old.json", old), ("new.json", new)):
        (tmp_path / name).write_text(json.dumps(doc))
    md = render(str(tmp_path))
    assert "Toy CPU" in md and "3.00×" in md and "9.00×" not in md  # the newer result wins
    assert "skipped: pip install x" in md and "2026-02-01" in md and "torch 2.13" in md


def test_runner_rejects_an_unknown_op_and_lists_families(capsys):
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit, match="unknown op"):
        main(["--op", "no_such_op"])
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"logprobs", "advantages", "ppo_step"} <= set(listed)


def test_python_m_benchmarks_runs_from_the_checkout_root():
    """The documented command, in a fresh interpreter: no sys.path edits in the package."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--list"], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ppo_loss" in out.stdout.split()


def test_rlhf_fast_bench_points_to_the_checkout_command(capsys):
    from rlhf_fast.cli import main

    assert main(["bench"]) == 2
    assert "python -m benchmarks" in capsys.readouterr().err


def test_every_bench_module_takes_the_common_signature():
    import importlib
    import inspect

    from benchmarks.runner import available_ops

    for name in available_ops():
        params = inspect.signature(importlib.import_module(f"benchmarks.bench_{name}").run).parameters
        assert {"quick", "device", "tiny"} <= set(params), name
        assert all(p.default is not inspect.Parameter.empty for p in params.values()), name


def test_a_failing_peer_is_recorded_as_skipped_and_ours_is_kept():
    def broken_peer():
        raise AttributeError("module 'torch.nn.functional' has no attribute 'linear_cross_entropy'")

    recs = compare(
        op="x",
        impl="ours",
        fn=lambda: torch.ones(8).sum(),
        baselines={"broken": broken_peer, "ok": lambda: torch.ones(8)},
        shape="(8,)",
        dtype="float32",
        device="cpu",
        mode="fwd",
        warmup=0,
        repeat=2,
    )
    by = {r.baseline: r for r in recs}
    assert by[None].status == "ok" and by[None].median_s > 0
    assert by["broken"].status.startswith("skipped: peer failed: AttributeError") and by["broken"].median_s > 0
    assert by["ok"].status == "ok" and by["ok"].speedup is not None


def test_linear_bench_runs_without_torch_linear_cross_entropy(monkeypatch):
    """torch < 2.13 (the lent GPU machine has 2.11) has no F.linear_cross_entropy."""
    import benchmarks.bench_linear_logprobs as bench

    monkeypatch.setattr(bench, "HAVE_TORCH_LCE", False)
    monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy", raising=False)
    recs = bench.run(quick=True, device="cpu", tiny=True)
    ours = [r for r in recs if r.baseline in (None, "materialised") and r.status == "ok"]
    lce = [r for r in recs if r.baseline == "torch_lce"]
    assert ours and lce and all(r.status.startswith("skipped: torch.nn.functional.linear_cross_entropy") for r in lce)


def test_gpu_compass_rollout_correction_rows_on_cpu(tmp_path, monkeypatch):
    """The device script's rollout-correction family (benchmarks/gpu/compass.py
    ppo_rc) runs end to end, here on CPU with host timers in place of CUDA
    events, and writes one row per correction with the fields its goals need:
    a lent GPU is too rare to find a typo there."""
    from benchmarks.bench_ppo_loss import CORRECTIONS

    interpret = os.environ.get("TRITON_INTERPRET")
    from benchmarks.gpu import compass

    # importing it must not switch the interpreter off for the tests after this one
    assert os.environ.get("TRITON_INTERPRET") == interpret

    def host_times(fn, repeat):
        out = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out

    def host_timed(fn, repeat=20, warmup=3):
        for _ in range(warmup):
            fn()
        times = host_times(fn, repeat)
        return dict(median_s=sorted(times)[len(times) // 2], back_to_back_s=sum(times) / len(times))

    monkeypatch.setattr(compass, "DEV", "cpu")
    monkeypatch.setattr(compass, "cuda_event_times", host_times)
    monkeypatch.setattr(compass, "timed", host_timed)
    out = tmp_path / "compass.jsonl"
    compass.ppo_rc(compass.Writer(str(out), copy_bw=1e10), B=4, T=64)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["op"] for r in rows] == [f"ppo_loss+rollout_correction fwd+bwd ({n})" for n in CORRECTIONS]
    for r in rows:
        assert r["shape"] == [4, 64] and r["peer"] == "eager reference chain (same correction)"
        assert r["ours_median_s"] > 0 and r["uncorrected_median_s"] > 0 and r["peer_median_s"] > 0
        assert r["slowdown_vs_uncorrected"] == pytest.approx(r["ours_median_s"] / r["uncorrected_median_s"])
        assert r["speedup"] == pytest.approx(r["peer_median_s"] / r["ours_median_s"])
