"""rlhf_fast.integrations.openrlhf against the installed OpenRLHF (0.11.x):
each replacement compared with OpenRLHF's own function (values, gradients,
in-place temperature), the names the actor and experience maker call, the
declined losses, and a Ray worker patched through the setup hook. Skipped when
OpenRLHF is not installed (scripts/install_integrations.sh installs it).

OpenRLHF imports flash_attn (models/ring_attn_utils.py) and vllm
(trainer/ray/vllm_engine.py) at module level, both CUDA builds; on CPU,
stand-in modules are planted whose functions raise if called (nothing here
calls them; the log-prob path then takes OpenRLHF's own torch fallback, as
without flash-attn's Triton cross-entropy)."""

import contextlib
import importlib
import importlib.machinery
import os
import sys
import types

import pytest
import torch
from _compare import assert_close, assert_equal

pytest.importorskip("openrlhf")


# CUDA-only modules OpenRLHF imports at module level -> the names it takes from them
_CUDA_ONLY = {
    "flash_attn": (),
    "flash_attn.utils": (),
    "flash_attn.bert_padding": ("index_first_axis", "pad_input", "rearrange", "unpad_input"),
    "flash_attn.utils.distributed": ("all_gather",),
    "vllm": ("LLM", "SamplingParams"),
    "vllm.inputs": ("TokensPrompt",),
    "vllm.utils": ("random_uuid",),
}


def _plant_flash_attn() -> list[str]:
    """Plant stand-ins for the CUDA-only modules that are not installed; their functions raise if called.
    Returns the names it planted."""
    planted = []

    def absent(*a, **k):
        raise RuntimeError("a CUDA-only package is not installed (CPU test stand-in)")

    for name, attrs in _CUDA_ONLY.items():
        try:
            importlib.import_module(name)
            continue
        except ImportError:
            pass
        if name not in sys.modules:
            planted.append(name)
        m = sys.modules.setdefault(name, types.ModuleType(name))
        m.__path__ = []
        m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        for f in attrs:
            setattr(m, f, absent)
    return planted


@contextlib.contextmanager
def _stand_ins():
    """The stand-ins exist only while this module imports OpenRLHF and runs
    its tests: left in sys.modules they break every later importer that
    probes vllm's version (TRL does), whichever order the tests run in."""
    planted = _plant_flash_attn()
    try:
        yield
    finally:
        for name in planted:
            sys.modules.pop(name, None)


with _stand_ins():
    ou = pytest.importorskip("openrlhf.models.utils")
    em = pytest.importorskip("openrlhf.trainer.ppo_utils.experience_maker")
    actor_mod = pytest.importorskip("openrlhf.models.actor")
    ro = pytest.importorskip("rlhf_fast.integrations.openrlhf")


@pytest.fixture(scope="module", autouse=True)
def _cuda_only_stand_ins():
    with _stand_ins():
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_match_openrlhf(dtype, temperature):
    g = torch.Generator().manual_seed(0)
    z0 = (torch.randn(3, 7, 1003, generator=g) * 4).to(dtype)
    y = torch.randint(0, 1003, (3, 7), generator=g)
    res = []
    for patched in (False, True):
        leaf = z0.clone().requires_grad_(True)
        z = leaf * 1  # non-leaf: the in-place division needs one
        with ro.patched() if patched else contextlib.nullcontext():
            lp = ou.log_probs_from_logits(z, y, temperature)
        lp.float().sum().backward()
        res.append((lp.detach().float(), z.detach().float(), leaf.grad.float(), lp.dtype))
    (a0, z0_, g0, d0), (a1, z1, g1, d1) = res
    assert d0 == d1
    assert_close(a1, a0, "peer", "logprobs", dtype=dtype)
    assert_equal(z1, z0_, "logits")  # the logits were divided in place, as OpenRLHF does
    assert_close(g1, g0, "peer", "grad", dtype=dtype)


def _maker():
    cls = next(c for c in vars(em).values() if isinstance(c, type) and "get_advantages_and_returns" in c.__dict__)
    return cls.__new__(cls)


@pytest.mark.parametrize("holes", [False, True])
def test_gae_matches_openrlhf(holes):
    g = torch.Generator().manual_seed(1)
    B, T = 6, 40
    m = (torch.arange(T)[None] < torch.randint(1, T + 1, (B,), generator=g)[:, None]).float()
    if holes:
        m[0, 3:9] = 0
    m[2] = 0
    v, r = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    ref = _maker().get_advantages_and_returns(v, r, m, 0.99, 0.95)
    with ro.patched() as names:
        assert any("get_advantages_and_returns" in n for n in names)
        got = _maker().get_advantages_and_returns(v, r, m, 0.99, 0.95)
    for a, b in zip(got, ref):
        assert_close(a, b, "peer")


def test_replaces_what_the_trainer_calls():
    """The actor's forward calls log_probs_from_logits through its own by-name
    import; the experience maker calls its GAE method: both must be ours."""
    with ro.patched() as names:
        assert hasattr(actor_mod.log_probs_from_logits, "__rlhf_fast_original__")
        assert hasattr(_maker().get_advantages_and_returns, "__rlhf_fast_original__")
        assert not any("Loss" in n or "compute_approx_kl" in n for n in names)  # declined in 0.11


def test_losses_and_kl_left_to_openrlhf():
    from openrlhf.models import loss

    with ro.patched():
        assert not hasattr(loss.PolicyLoss.forward, "__rlhf_fast_original__")
        assert not hasattr(loss.ValueLoss.forward, "__rlhf_fast_original__")
        assert not hasattr(ou.compute_approx_kl, "__rlhf_fast_original__")


def test_unsupported_version_raises(monkeypatch):
    from rlhf_fast.integrations._patching import UnsupportedVersion

    monkeypatch.setattr(ro._patcher, "supported", ("0.12.0", "0.13.0"))
    with pytest.raises(UnsupportedVersion):
        ro.patch()
    assert ro.replaced() == []


@pytest.mark.slow
def test_ray_worker_patched_by_setup_hook(tmp_path):
    """OpenRLHF's actor/critic/ref models are Ray actors: the setup hook patches
    every worker process before it imports OpenRLHF's trainer code."""
    ray = pytest.importorskip("ray")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # the hook module: plant the CPU flash_attn stub, then patch (on a GPU the hook is the patch() alone)
    (tmp_path / "rf_hook.py").write_text(
        f"import sys\nsys.path.insert(0, {os.path.join(root, 'tests')!r})\n"
        "from test_integrations_openrlhf import _plant_flash_attn\n"
        "def setup():\n    _plant_flash_attn()\n    import rlhf_fast.integrations.openrlhf as ro\n    ro.patch()\n"
    )
    ray.init(
        num_cpus=1,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "worker_process_setup_hook": "rf_hook.setup",
            "env_vars": {"PYTHONPATH": f"{root}:{tmp_path}", "OMP_NUM_THREADS": "1"},
        },
    )
    try:

        @ray.remote
        def in_worker():
            from openrlhf.models import actor

            import rlhf_fast

            calls = []
            op = rlhf_fast.logprobs_from_logits
            rlhf_fast.logprobs_from_logits = lambda *a, **k: calls.append(1) or op(*a, **k)
            try:
                lp = actor.log_probs_from_logits(torch.randn(2, 3, 11), torch.zeros(2, 3, dtype=torch.long))
            finally:
                rlhf_fast.logprobs_from_logits = op
            return len(calls), tuple(lp.shape), os.getpid()

        n, shape, pid = ray.get(in_worker.remote(), timeout=300)  # a cold Ray worker on 2 busy cores
        assert n == 1 and shape == (2, 3) and pid != os.getpid()
    finally:
        ray.shutdown()


# ---------------------------------------------------------------- packed samples


def _bert_padding(monkeypatch):
    """flash_attn.bert_padding's four helpers in plain torch (the packing path
    uses only these from flash-attn), bound where OpenRLHF imported them."""
    import einops
    from openrlhf.models import ring_attn_utils as rau

    def unpad_input(x, attention_mask):
        lens = attention_mask.sum(-1, dtype=torch.int32)
        idx = attention_mask.flatten().nonzero().flatten()
        cu = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
        return x.flatten(0, 1)[idx], idx, cu, int(lens.max()), lens

    def pad_input(x, indices, batch, seqlen):
        out = x.new_zeros((batch * seqlen, *x.shape[1:]))
        out[indices] = x
        return out.view(batch, seqlen, *x.shape[1:])

    for name, fn in {
        "unpad_input": unpad_input,
        "pad_input": pad_input,
        "index_first_axis": lambda x, idx: x[idx],
        "rearrange": einops.rearrange,
    }.items():
        monkeypatch.setattr(rau, name, fn)


def test_packed_samples_actor_runs_our_op_on_the_packed_stream(monkeypatch):
    """OpenRLHF 0.11's packed-samples path (packing_samples=True) unpads the
    batch inside Actor.forward, runs the model on (1, total) tokens with
    position_ids restarting per sample, calls log_probs_from_logits on the
    packed (1, total, V) logits and pads the log-probs back before GAE and the
    loss. The patch must serve that call, and the packed run must give the
    padded run's log-probs."""
    from _tiny_models import tiny_llama

    _bert_padding(monkeypatch)
    model = tiny_llama(seed=3, vocab_size=61).eval()
    # as Actor.__init__ sets for a model it loads: transformers detects packed
    # rows from position_ids only when no KV cache is built
    model.config.use_cache = False
    actor = actor_mod.Actor(model)
    g = torch.Generator().manual_seed(5)
    B, T = 4, 24
    seqs = torch.randint(3, 61, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, (lo, hi) in enumerate([(0, 24), (5, 19), (9, 24), (2, 7)]):  # left pad, right pad, both
        mask[b, lo:hi] = 1
    action_mask = mask[:, -12:].bool()

    import rlhf_fast

    seen = []
    op = rlhf_fast.logprobs_from_logits
    monkeypatch.setattr(rlhf_fast, "logprobs_from_logits", lambda z, *a, **k: seen.append(z.shape) or op(z, *a, **k))
    out = {}
    with torch.no_grad():
        for packing, patched in ((False, False), (True, False), (True, True)):
            actor.packing_samples = packing
            with ro.patched() if patched else contextlib.nullcontext():
                out[packing, patched] = actor(seqs, action_mask, mask)
    assert seen == [torch.Size([1, int(mask.sum()), 61])]  # one call, on the packed stream
    assert_close(out[True, True], out[True, False], "peer")
    valid = action_mask & mask[:, -12:].bool()
    assert_close(out[True, True][valid], out[False, False][valid], "peer")  # packed == padded where it counts


def test_rollout_logprobs_mode_pairing():
    """OpenRLHF asks vLLM for processed log-probs when its importance-sampling correction is on
    (docs/integrations.md): under truncation those are logprobs_from_logits(top_k=, top_p=), bit for
    bit the sampler's, while its actor's tempered log-prob (our patched function) differs by the log
    of the kept mass."""
    import inspect

    from openrlhf.cli import train_ppo_ray

    import rlhf_fast

    src = inspect.getsource(train_ppo_ray)
    assert '"processed_logprobs" if args.algo.advantage.is_correction_level != "off" else None' in src
    logits = torch.randn(64, 500) * 3
    out = rlhf_fast.sample(logits, temperature=0.7, top_k=40, top_p=0.9, generator=torch.Generator().manual_seed(0))
    processed = rlhf_fast.logprobs_from_logits(logits, out.tokens, temperature=0.7, top_k=40, top_p=0.9)
    assert torch.equal(processed, out.processed_logprobs)
    with ro.patched():
        tempered = ou.log_probs_from_logits(logits.clone(), out.tokens, 0.7)
    assert_close(tempered, out.logprobs, "peer", "OpenRLHF tempered log-probs vs the sampler's raw ones")
    assert bool((processed > tempered).all())
