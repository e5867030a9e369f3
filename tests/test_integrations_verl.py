"""rlhf_fast.integrations.verl against the installed verl (0.9.x): every
replacement compared with verl's own function (values, metrics, gradients),
with the global_batch_info verl's actor loss passes; plus a Ray worker patched
through the worker-process setup hook. Skipped when verl is not installed
(scripts/install_integrations.sh installs it)."""

import contextlib
import os

import pytest
import torch
from _compare import assert_close, assert_equal

verl = pytest.importorskip("verl")
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_F = pytest.importorskip("verl.utils.torch_functional")
rv = pytest.importorskip("rlhf_fast.integrations.verl")


class Cfg(dict):
    """What compute_policy_loss_vanilla reads from verl's ActorConfig."""

    def __init__(self, gbi, clip=0.2, low=None, high=None, c=3.0):
        super().__init__(clip_ratio_c=c)
        self.clip_ratio, self.clip_ratio_low, self.clip_ratio_high = clip, low, high
        self.global_batch_info = gbi


def masks(B, T, g):
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    m = torch.arange(T)[None] < lengths[:, None]
    m[1, 2:5] = False  # a hole (multi-turn observation tokens)
    m[3] = False  # an empty row
    return m


def both(fn_name, *args, **kw):
    orig = getattr(core_algos, fn_name)
    with rv.patched() as names:
        assert any(fn_name in n for n in names)
        rep = (
            core_algos.POLICY_LOSS_REGISTRY["vanilla"] if fn_name.endswith("vanilla") else getattr(core_algos, fn_name)
        )
        assert rep is not orig
        return orig, rep


AGG = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
# what verl's actor loss fills in (workers/utils/losses.py): none (single process, no global counts),
# and one of 4 micro-batches of a 2-rank run with the global counts
GBI = [
    {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None, "loss_scale_factor": None},
    {"dp_size": 2, "batch_num_tokens": 211, "global_batch_size": 32, "loss_scale_factor": None},
    {
        "dp_size": 2,
        "batch_num_tokens": torch.tensor(211),
        "global_batch_size": torch.tensor(32),
        "loss_scale_factor": 64,
    },
]


@pytest.mark.parametrize("mode", AGG)
@pytest.mark.parametrize("gi", range(len(GBI)))
def test_policy_loss_matches_verl(mode, gi):
    g = torch.Generator().manual_seed(gi)
    B, T = 8, 13
    m = masks(B, T, g)
    old = -torch.rand(B, T, generator=g, dtype=torch.float32) * 3
    lp0 = (old + 0.4 * torch.randn(B, T, generator=g)).clamp(max=0)
    adv = torch.randn(B, T, generator=g)
    orig = core_algos.compute_policy_loss_vanilla
    cfg = Cfg(dict(GBI[gi]), low=0.2, high=0.28)
    out = []
    for patched in (False, True):
        lp = lp0.clone().requires_grad_(True)
        kw = dict(
            old_log_prob=old,
            log_prob=lp,
            advantages=adv,
            response_mask=m,
            loss_agg_mode=mode,
            config=cfg,
            rollout_is_weights=None,
        )
        if patched:
            with rv.patched():
                fn = core_algos.get_policy_loss_fn("vanilla")
                assert fn is not orig
                loss, met = fn(**kw)
        else:
            loss, met = orig(**kw)
        loss.backward()
        out.append((loss.detach(), met, lp.grad))
    (l0, m0, g0), (l1, m1, g1) = out
    assert l1.dtype == l0.dtype and l1.shape == l0.shape
    assert_close(l1, l0, "peer", "loss")
    assert_close(g1, g0, "peer", "grad")
    assert m1.keys() == m0.keys()
    for k in m0:
        assert m1[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-7), k


def test_policy_loss_declines_rollout_is_weights():
    g = torch.Generator().manual_seed(0)
    m = masks(6, 9, g)
    old, lp, adv = -torch.rand(6, 9, generator=g), -torch.rand(6, 9, generator=g), torch.randn(6, 9, generator=g)
    w = torch.rand(6, 9, generator=g)
    cfg = Cfg(dict(GBI[0]))
    ref = core_algos.compute_policy_loss_vanilla(old, lp, adv, m, "token-mean", cfg, w)
    with rv.patched():
        got = core_algos.get_policy_loss_fn("vanilla")(old, lp, adv, m, "token-mean", cfg, w)
    assert_equal(got[0], ref[0], "loss")  # the original ran


def test_gae_matches_verl():
    g = torch.Generator().manual_seed(1)
    B, T = 7, 33
    m = masks(B, T, g).float()
    m[3, 0] = 1.0
    r, v = torch.randn(B, T, generator=g) * m, torch.randn(B, T, generator=g)
    ref = core_algos.compute_gae_advantage_return(r, v, m, 0.99, 0.95)
    with rv.patched():
        got = core_algos.get_adv_estimator_fn("gae")(r, v, m, 0.99, 0.95)
    for a, b in zip(got, ref):
        assert_close(a, b, "peer")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_entropy_match_verl(dtype):
    g = torch.Generator().manual_seed(2)
    z0 = (torch.randn(3, 5, 1003, generator=g) * 4).to(dtype)
    y = torch.randint(0, 1003, (3, 5), generator=g)
    res = []
    for patched in (False, True):
        z = z0.clone().requires_grad_(True)
        with rv.patched() if patched else contextlib.nullcontext():
            lp = verl_F.logprobs_from_logits(z, y)
            ent = verl_F.entropy_from_logits(z)
        (lp.float().sum() + 0.3 * ent.float().sum()).backward()
        res.append((lp.detach().float(), ent.detach().float(), z.grad.float()))
    for a, b in zip(res[1], res[0]):
        assert_close(a, b, "peer", dtype=dtype)


def test_kl_penalty_left_to_verl():
    with rv.patched() as names:
        assert not any("kl_penalty" in n for n in names)


def test_replaces_what_the_actor_loss_calls():
    """verl's actor loss (workers/utils/losses.py) looks the policy loss up in
    POLICY_LOSS_REGISTRY and GAE in ADV_ESTIMATOR_REGISTRY: the patch must reach both."""
    with rv.patched():
        assert hasattr(core_algos.get_policy_loss_fn("vanilla"), "__rlhf_fast_original__")
        assert hasattr(core_algos.get_adv_estimator_fn("gae"), "__rlhf_fast_original__")


def test_unsupported_version_raises(monkeypatch):
    from rlhf_fast.integrations._patching import UnsupportedVersion

    monkeypatch.setattr(rv._patcher, "supported", ("0.1.0", "0.5.0"))
    with pytest.raises(UnsupportedVersion, match="0.9"):
        rv.patch()
    assert rv.replaced() == []


@pytest.mark.slow
def test_ray_worker_patched_by_setup_hook():
    """The documented way to reach verl's actor/critic workers: ray.init with
    runtime_env worker_process_setup_hook = rlhf_fast.integrations.verl.patch."""
    ray = pytest.importorskip("ray")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ray.init(
        num_cpus=1,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "worker_process_setup_hook": "rlhf_fast.integrations.verl.patch",
            "env_vars": {"PYTHONPATH": root, "OMP_NUM_THREADS": "1"},
        },
    )
    try:

        @ray.remote
        def in_worker():
            from verl.trainer.ppo import core_algos as ca

            fn = ca.get_policy_loss_fn("vanilla")
            x = -torch.rand(4, 6)
            from omegaconf import OmegaConf  # a module-level class here would make Ray import this test file

            cfg = OmegaConf.create(
                {
                    "clip_ratio": 0.2,
                    "clip_ratio_low": None,
                    "clip_ratio_high": None,
                    "clip_ratio_c": 3.0,
                    "global_batch_info": {"dp_size": 1},
                }
            )
            calls = []
            import rlhf_fast

            op = rlhf_fast.ppo_policy_loss
            rlhf_fast.ppo_policy_loss = lambda *a, **k: calls.append(1) or op(*a, **k)
            try:
                loss, _ = fn(x, x + 0.1, torch.randn(4, 6), torch.ones(4, 6, dtype=torch.bool), "token-mean", cfg)
            finally:
                rlhf_fast.ppo_policy_loss = op
            return hasattr(fn, "__rlhf_fast_original__"), len(calls), float(loss), os.getpid()

        is_ours, n_calls, loss, pid = ray.get(in_worker.remote(), timeout=300)  # a cold Ray worker on 2 busy cores
        assert is_ours and n_calls == 1 and pid != os.getpid()
    finally:
        ray.shutdown()


def test_rollout_logprobs_mode_pairing():
    """verl's rollout asks vLLM for processed log-probs by default (docs/integrations.md); the
    trainer-side op that matches them under truncation is logprobs_from_logits(top_k=, top_p=),
    while the tempered log-prob verl's actor computes (our patched function) differs from them
    by the log of the kept mass."""
    from verl.workers.config.rollout import RolloutConfig

    import rlhf_fast

    assert RolloutConfig.__dataclass_fields__["logprobs_mode"].default == "processed_logprobs"
    logits = torch.randn(64, 500) * 3
    out = rlhf_fast.sample(logits, temperature=0.7, top_k=40, top_p=0.9, generator=torch.Generator().manual_seed(0))
    processed = rlhf_fast.logprobs_from_logits(logits, out.tokens, temperature=0.7, top_k=40, top_p=0.9)
    assert torch.equal(processed, out.processed_logprobs)
    with rv.patched():
        tempered = verl_F.logprobs_from_logits(logits / 0.7, out.tokens)  # verl's actor divides by T first
    assert_close(tempered, out.logprobs, "peer", "verl tempered log-probs vs the sampler's raw ones")
    assert bool((processed > tempered).all())  # renormalised onto the kept set
