"""The RL update and the advantages without a Trainer: Lightning's Fabric stands in for it (one CPU process), so each
test runs one real rollout of a tiny policy and one update in well under a second of update time.

These check what the Lightning-fit tests of test_base.py check end to end, at the level of the step: the advantages
against a direct per-group computation, the update moves the adapters (and only them), masked samples cannot change
the update, a non-finite loss skips the optimizer step, and the optimizer-step count of the settings.
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch

from firm.algorithms.advantages import Advantages, world_advantages
from firm.algorithms.config import RLConfig, SamplerConfig
from firm.algorithms.diffusion_nft import DiffusionNFT
from firm.algorithms.flow_grpo import FlowGRPO
from firm.critics.stats import ImageStatsCritic
from firm.rewards.combiners import QMAReward
from tests.policies.conftest import tiny_policy_config

PROMPTS = ["a red circle", "a blue square top left", "green triangle", "a big yellow circle"]


def _reference_advantages(r: torch.Tensor, g: torch.Tensor, eps: float, clip: float) -> torch.Tensor:
    """Flow-GRPO's per-prompt normalisation, written out: (r - mean) / (std + eps) over each group's valid rewards
    (population std), clipped; a missing reward gets 0."""
    out = torch.zeros_like(r)
    for label in g.unique():
        idx = ((g == label) & ~torch.isnan(r)).nonzero().flatten()
        vals = r[idx]
        out[idx] = ((vals - vals.mean()) / (vals.std(unbiased=False) + eps)).clamp(-clip, clip)
    return out


def test_world_advantages_match_the_per_group_formula_on_every_rank():
    cfg = RLConfig(adv_eps=1e-4, adv_clip_max=5.0, drop_zero_std_groups=True)
    world_r = torch.tensor([0.1, float("nan"), 0.5, 0.9, 0.3, 0.3, float("nan"), 0.3, 0.2, 0.8, 0.4, 0.6])
    world_g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    expected = _reference_advantages(world_r, world_g, 1e-4, 5.0)
    ranks = 2
    b = world_r.numel() // ranks
    for rank in range(ranks):
        mine = slice(rank * b, (rank + 1) * b)
        gather = lambda x: _gather(x, world_r, world_g)  # noqa: E731
        adv = world_advantages(world_r[mine], world_g[mine], cfg, gather=gather, rank=rank)
        assert isinstance(adv, Advantages)
        torch.testing.assert_close(adv.adv, expected[mine])
        torch.testing.assert_close(adv.all_adv, expected)
        keep = ~torch.isnan(world_r) & (world_g != 1)  # group 1's valid rewards are all 0.3: dropped
        assert adv.keep.tolist() == keep[mine].tolist() and adv.world_keep_host.tolist() == keep.tolist()
        assert adv.global_keep == int(keep.sum()) == 7 and isinstance(adv.keep_host, np.ndarray)
        assert adv.zero_std_group_frac == pytest.approx(1 / 3)
    assert expected.abs().sum() > 1  # the check is not about zeros


def _gather(x: torch.Tensor, world_r: torch.Tensor, world_g: torch.Tensor) -> torch.Tensor:
    """Stands in for the all-gather of two ranks: the world's tensor of the same kind."""
    return world_r.clone() if x.dtype == torch.float32 else world_g.clone()


def _module(cls, **kw):
    cfg = cls.Config(
        policy=tiny_policy_config("sd3"),
        sampler=kw.pop("sampler", SamplerConfig(num_steps=3, noise_level=0.7)),
        critic=ImageStatsCritic.Config(),
        reward=QMAReward.Config(),
        rollout_chunk=4,
        weight_decay=0.0,  # so that a zero gradient leaves the weights exactly where they are
        **kw,
    )
    module = cls(cfg)
    fabric = L.Fabric(accelerator="cpu", devices=1)
    fabric.setup(module, module.configure_optimizers())  # the module's optimizers, backward and clipping
    return module


def _batch(b: int = 8, group_size: int = 4) -> dict:
    return {
        "prompt": [PROMPTS[i // group_size % len(PROMPTS)] for i in range(b)],
        "image": [None] * b,
        "group": torch.arange(b) // group_size,
        "key": [f"k{i}" for i in range(b)],
    }


def _lora(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.policy.named_adapter_parameters("default").items()}


def _with_adv(adv: Advantages, values: torch.Tensor) -> Advantages:
    return Advantages(**{**adv.__dict__, "adv": values, "all_adv": values})


@pytest.fixture(scope="module")
def grpo_step():
    torch.manual_seed(0)
    module = _module(FlowGRPO, kl_beta=0.0)
    batch = _batch()
    roll = module.rollout(batch)
    adv = module.advantages(roll.reward.rewards, batch["group"])
    return module, roll, adv


@pytest.mark.parametrize("cls", [FlowGRPO, DiffusionNFT])
def test_update_moves_only_the_adapters_and_reports_finite_metrics(cls):
    module = _module(cls, inner_epochs=2, train_batch_size=4)
    batch = _batch()
    roll = module.rollout(batch)
    adv = module.advantages(roll.reward.rewards, batch["group"])
    assert adv.adv.abs().sum() > 0  # a real learning signal
    base = {k: v.detach().clone() for k, v in module.policy.named_parameters() if "lora_" not in k}
    before = _lora(module)
    steps = []
    opt = module.optimizers()
    real_step = opt.step
    opt.step = lambda *a, **k: (steps.append(1), real_step(*a, **k))[1]
    metrics = module.update(roll, adv)
    after = _lora(module)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, dict(module.policy.named_parameters())[k]) for k, v in base.items())
    assert len(steps) == module.optimizer_steps_per_rl_step(local_batch=8) == 4  # 2 epochs x 8 / 4
    assert metrics and all(math.isfinite(v) for v in metrics.values()), metrics
    assert "train/grad_norm" in metrics and module.skipped_nonfinite == 0


def test_masked_samples_cannot_change_the_update(grpo_step):
    module, roll, adv = grpo_step
    keep = torch.tensor([True, False] * 4)
    masked = Advantages(**{**adv.__dict__, "keep": keep, "keep_host": keep.numpy(), "world_keep_host": keep.numpy()})
    masked.global_keep = int(keep.sum())
    start = _lora(module)
    opt_state = {k: v for k, v in module.optimizers().optimizer.state_dict().items()}

    def weights_after(advantages: torch.Tensor) -> dict[str, torch.Tensor]:
        for k, v in module.policy.named_adapter_parameters("default").items():
            v.data.copy_(start[k])
        module.optimizers().optimizer.load_state_dict(opt_state)
        module.update(roll, _with_adv(masked, advantages))
        return _lora(module)

    a = weights_after(adv.adv.clone())
    other = adv.adv.clone()
    other[~keep] = torch.tensor([5.0, -5.0, 3.0, -1.0])  # only the masked samples' advantages differ
    b = weights_after(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    flipped = adv.adv.clone()
    flipped[keep] = -flipped[keep]  # a kept sample's advantage does change it: the test can see a difference
    c = weights_after(flipped)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_zero_advantages_leave_the_adapters_in_place(grpo_step):
    module, roll, adv = grpo_step
    module.optimizers().optimizer.state.clear()  # no momentum left from other tests: only this gradient counts
    before = _lora(module)
    module.update(roll, _with_adv(adv, torch.zeros_like(adv.adv)))
    assert all(torch.equal(before[k], v) for k, v in _lora(module).items())


def test_a_non_finite_loss_skips_the_optimizer_step(grpo_step, monkeypatch):
    module, roll, adv = grpo_step
    before = _lora(module)
    real = module.micro_loss

    def nan_loss(*args, **kwargs):
        loss, stats, n = real(*args, **kwargs)
        return loss * float("nan"), stats, n

    monkeypatch.setattr(module, "micro_loss", nan_loss)
    skipped = module.skipped_nonfinite
    with pytest.warns(RuntimeWarning, match="optimizer step skipped"):
        metrics = module.update(roll, adv)
    assert all(torch.equal(before[k], v) for k, v in _lora(module).items())
    assert metrics["train/skipped_steps"] == 1.0 and module.skipped_nonfinite == skipped + 1
    assert all(p.grad is None for p in module.policy.trainable_parameters())  # nothing left for the next step
