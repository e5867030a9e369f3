"""rlhf_fast.integrations.trl on TRL's fused lm-head path (TRL 1.16): the
replacement of `_ChunkedLogProbFunction` against TRL's own (values, entropy,
gradients for hidden / weight / bias), and a real GRPOTrainer run (tiny model
built here, CPU) showing rlhf_fast.linear_logprobs is called and the losses
equal the unpatched run. Skipped when TRL is not installed."""

import pytest
import torch
from _compare import assert_close
from _tiny_models import decoder_config

trl_utils = pytest.importorskip("trl.trainer.utils")
rf_trl = pytest.importorskip("rlhf_fast.integrations.trl")


def _run(fn, hidden0, weight0, bias0, targets, temperature, outputs):
    h, w = hidden0.clone().requires_grad_(True), weight0.clone().requires_grad_(True)
    b = None if bias0 is None else bias0.clone().requires_grad_(True)
    lp, ent, *_ = fn.apply(h, w, b, targets, temperature, 64, None, 1.0, outputs)
    (lp.sum() + (0.0 if ent is None else 0.0 * ent.sum())).backward()
    return lp.detach(), (None if ent is None else ent.detach()), h.grad, w.grad, (None if b is None else b.grad)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_logprob_matches_trl(temperature, with_bias):
    g = torch.Generator().manual_seed(0)
    N, H, V = 37, 24, 1003
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    bias = torch.randn(V, generator=g) if with_bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    orig = trl_utils._ChunkedLogProbFunction
    ref = _run(orig, hidden, weight, bias, targets, temperature, ("log_probs", "entropy"))
    with rf_trl.patched() as names:
        assert "trl.trainer.utils._ChunkedLogProbFunction" in names
        rep = trl_utils._ChunkedLogProbFunction
        assert rep is not orig
        got = _run(rep, hidden, weight, bias, targets, temperature, ("log_probs", "entropy"))
    for a, b in zip(got, ref):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_close(a, b, "peer")


def test_chunked_logprob_declines_other_outputs():
    g = torch.Generator().manual_seed(1)
    h, w, t = torch.randn(5, 8, generator=g), torch.randn(11, 8, generator=g), torch.randint(0, 11, (5,), generator=g)
    with rf_trl.patched():
        out = trl_utils._ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 64, None, 1.0, ("log_probs", "is_top1"))
    assert out[4] is not None  # TRL's own ran


def _tiny_grpo(tmp_path, steps, patched):
    """A GRPOTrainer on a 2-layer Qwen2 built in code with a word-level tokenizer; returns
    ([(loss, grad_norm) per step], calls to linear_logprobs, seconds per step)."""
    import time

    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    import rlhf_fast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", *[f"w{i}" for i in range(254)]])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    cfg = Qwen2Config(**decoder_config(256, max_position_embeddings=64, eos_token_id=1, bos_token_id=1))
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(tmp_path / "tiny")  # GRPOTrainer builds the KL reference model from the policy's path
    model.config._name_or_path = str(tmp_path / "tiny")
    ds = Dataset.from_dict({"prompt": [" ".join(f"w{(i * 7 + j) % 250 + 2}" for j in range(5)) for i in range(16)]})

    def reward(completions, **kw):
        return [float(len(c)) % 7 for c in completions]

    args = GRPOConfig(
        output_dir=str(tmp_path / ("p" if patched else "u")),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=steps,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        seed=0,
        use_cpu=True,
        save_strategy="no",
        beta=0.04,
        bf16=False,
        dataloader_num_workers=0,
    )
    calls = []
    op = rlhf_fast.linear_logprobs

    def counting(*a, **k):
        calls.append(1)
        return op(*a, **k)

    rlhf_fast.linear_logprobs = counting
    try:
        with rf_trl.patched() if patched else _Null():
            tr = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok)
            t0 = time.perf_counter()
            tr.train()
            dt = (time.perf_counter() - t0) / steps
    finally:
        rlhf_fast.linear_logprobs = op
    losses = [(h["loss"], h["grad_norm"]) for h in tr.state.log_history if "loss" in h]
    return losses, len(calls), dt


class _Null:
    def __enter__(self):
        return []

    def __exit__(self, *a):
        return False


@pytest.mark.slow  # two TRL GRPO runs in subprocesses, ~20 s
def test_grpo_trainer_calls_rlhf_fast_and_matches(tmp_path):
    """The main trainer of TRL 1.16 reaches rlhf_fast through the fused lm-head
    path (fails if the adapter replaces nothing GRPOTrainer calls), and the
    losses of 3 steps equal the unpatched run's to fp32 rounding."""
    ref, n_ref, _ = _tiny_grpo(tmp_path, 3, patched=False)
    got, n_got, _ = _tiny_grpo(tmp_path, 3, patched=True)
    assert n_ref == 0 and n_got > 0
    assert len(got) == len(ref) == 3
    for (lg, gg), (lr, gr) in zip(got, ref):  # (loss, grad norm) per step
        assert lg == pytest.approx(lr, rel=1e-4, abs=1e-6)
        assert gg == pytest.approx(gr, rel=1e-4, abs=1e-6)
    assert any(gr > 0 for _, gr in ref)


if __name__ == "__main__":
    # Time and peak memory per GRPO step, each way in its own process (peak RSS is per process):
    #   OMP_NUM_THREADS=1 PYTHONPATH=. python tests/test_integrations_trl.py [steps]
    import json
    import pathlib
    import resource
    import subprocess
    import sys
    import tempfile

    if len(sys.argv) > 2:  # child: steps, patched
        steps, patched = int(sys.argv[1]), sys.argv[2] == "1"
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        hist, n, dt = _tiny_grpo(pathlib.Path(tempfile.mkdtemp()), steps, patched)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(
            json.dumps(
                {
                    "patched": patched,
                    "ms_per_step": dt * 1e3,
                    "calls": n,
                    "peak_rss_mib": peak / 1024,
                    "rss_growth_mib": (peak - base) / 1024,
                    "loss": [h[0] for h in hist],
                }
            )
        )
    else:
        steps = sys.argv[1] if len(sys.argv) > 1 else "5"
        for patched in ("0", "1", "0", "1"):
            out = subprocess.run([sys.executable, __file__, steps, patched], capture_output=True, text=True)
            print(out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-2000:])
