"""The GPU dispatcher follows measurements: a backend measured faster on a
GPU model (rlhf_fast/_gpu_dispatch.py, generated from a compass run) goes
first for that model only; nothing measured keeps each op's own order."""

import json

import torch

from benchmarks.gpu import dispatch_table
from rlhf_fast import _backend, _gpu_dispatch

COMPASS_ROWS = [
    dict(op="copy", shape="1 GiB", dtype="u8", ours_median_s=0.0005, device="NVIDIA H200"),
    dict(op="logprobs fwd+entropy", shape=[16384, 151936], backend="triton", ours_median_s=0.0030),
    dict(op="logprobs fwd+entropy", shape=[16384, 151936], backend="cuda", ours_median_s=0.0020),
    dict(op="logprobs fwd+bwd", shape=[4096, 32000], backend="triton", ours_median_s=0.0012),
    dict(op="logprobs fwd+bwd", shape=[4096, 32000], backend="cuda", ours_median_s=0.0011),
    dict(op="gae", shape=[1024, 8192], ours_median_s=0.0001),
]


def test_the_faster_backend_per_op_is_read_from_compass(tmp_path):
    prefs = dispatch_table.preferences(COMPASS_ROWS)
    assert prefs == {
        "H200": {"logprobs_from_logits": dict(backend="cuda", total_median_s=dict(cuda=0.0031, triton=0.0042))}
    }
    # a backend that failed on a row never wins
    failed = COMPASS_ROWS + [
        dict(op="logprobs fwd+bwd", shape=[1, 1], backend="cuda", ours_median_s=float("nan"), error="RuntimeError")
    ]
    assert dispatch_table.preferences(failed) == {}
    path = tmp_path / "compass.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in COMPASS_ROWS))
    assert dispatch_table.main([str(path)]) == 0
    rendered = dispatch_table.render(prefs, "x")
    scope = {}
    exec(compile(rendered, "gpu_dispatch", "exec"), scope)
    assert scope["MEASURED"] == prefs


def test_measured_backend_goes_first_on_that_gpu_model_only(monkeypatch):
    impl = ("triton", "cuda", "cpp")
    cuda = torch.device("cuda", 0)
    assert _backend.measured_order("logprobs_from_logits", cuda, impl) == impl  # nothing measured
    monkeypatch.setattr(_gpu_dispatch, "MEASURED", {"H200": {"logprobs_from_logits": {"backend": "cuda"}}})
    monkeypatch.setattr(_backend, "_device_name", lambda device: "NVIDIA H200")
    assert _backend.measured_order("logprobs_from_logits", cuda, impl) == ("cuda", "triton", "cpp")
    assert _backend.measured_order("sample", cuda, ("triton", "cpp")) == ("triton", "cpp")
    monkeypatch.setattr(_backend, "_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    assert _backend.measured_order("logprobs_from_logits", cuda, impl) == impl
