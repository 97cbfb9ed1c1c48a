"""The shared RL step: Flow-GRPO and DiffusionNFT train tiny models; on-policy ratio 1; missing scores; non-finite
losses; critic overlap; clear errors for bad settings."""

from __future__ import annotations

import json
import math
import threading
import time

import lightning as L
import pytest
import torch
from PIL import Image

import firm.algorithms.diffusion_nft as nft_mod
import firm.algorithms.flow_grpo as grpo_mod
import firm.policies.samplers as samplers_mod
from firm.algorithms.config import SamplerConfig
from firm.algorithms.diffusion_nft import DiffusionNFT as DiffusionNFTModule
from firm.algorithms.flow_grpo import FlowGRPO as FlowGRPOModule
from firm.algorithms.scoring import OverlappedScorer
from firm.critics.stats import ImageStatsCritic
from firm.data.prompts import PromptDataModule
from firm.registry import resolve
from firm.rewards.combiners import CMEReward, QMAReward
from firm.rewards.functions import RewardOutput
from tests.policies.conftest import tiny_policy_config

PROMPTS = ["a red circle", "a blue square top left", "green triangle", "a big yellow circle"]


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fit(module, data, steps, tmp_path) -> Recorder:
    rec = Recorder()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[rec],
    )
    trainer.fit(module, datamodule=data)
    return rec


def gen_data(batch_size=8, group_size=4) -> PromptDataModule:
    return PromptDataModule(PromptDataModule.Config(prompts=PROMPTS, group_size=group_size, batch_size=batch_size))


def edit_data(tmp_path, batch_size=8, group_size=4) -> PromptDataModule:
    recs = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 160, 0)]):
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"src{i}.png")
        recs.append({"prompt": f"make the square number {i} yellow", "image": f"src{i}.png", "key": f"e{i}"})
    (tmp_path / "edits.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return PromptDataModule(
        PromptDataModule.Config(
            task="edit", path=str(tmp_path / "edits.jsonl"), group_size=group_size, batch_size=batch_size
        )
    )


def grpo(**kw) -> FlowGRPOModule:
    sampler = kw.pop("sampler", SamplerConfig(num_steps=3, noise_level=0.7))
    critic = kw.pop("critic", ImageStatsCritic.Config())
    return FlowGRPOModule(
        FlowGRPOModule.Config(
            policy=tiny_policy_config("sd3"),
            sampler=sampler,
            critic=critic,
            reward=QMAReward.Config(),
            rollout_chunk=4,
            **kw,
        )
    )


def nft(**kw) -> DiffusionNFTModule:
    family = kw.pop("family", "sd3")
    critic = kw.pop("critic", ImageStatsCritic.Config())
    task = "edit" if resolve("families", family).task == "edit" else "gen"
    return DiffusionNFTModule(
        DiffusionNFTModule.Config(
            task=task,
            policy=tiny_policy_config(family),
            sampler=SamplerConfig(num_steps=3, method="dpm2", noise_level=0.0),
            critic=critic,
            reward=CMEReward.Config() if task == "edit" else QMAReward.Config(),
            rollout_chunk=4,
            **kw,
        )
    )


def snapshot(module):
    named = dict(module.policy.named_parameters())
    lora = {k: v.detach().clone() for k, v in named.items() if ".default." in k}
    base = {k: v.detach().clone() for k, v in named.items() if "lora_" not in k}
    return lora, base


def probe_velocities(module):
    policy = module.policy
    imgs = [Image.new("RGB", (16, 16), (255, 0, 0))] * 2 if policy.family.task == "edit" else None
    cond = policy.encode_prompts(["a red circle", "make it blue"], imgs)
    x = torch.randn(2, *policy.latent_shape(), generator=torch.Generator().manual_seed(0))
    s = torch.tensor([0.8, 0.4])
    with torch.no_grad():
        v = policy.velocity(x, s, cond)
        with policy.adapter(None):
            v_ref = policy.velocity(x, s, cond)
    return v, v_ref


def check_trained(module, before, rec):
    lora0, base0 = before
    lora1, base1 = snapshot(module)
    assert any(not torch.equal(lora0[k], lora1[k]) for k in lora0), "the adapter did not change"
    assert all(torch.equal(base0[k], base1[k]) for k in base0), "frozen base weights changed"
    assert all(torch.isfinite(v).all() for v in lora1.values())
    assert rec.rows and all(math.isfinite(r["reward/mean"]) for r in rec.rows)
    assert any(r["train/grad_norm"] > 0 for r in rec.rows) and any(r["adv/std"] > 0 for r in rec.rows)


@pytest.mark.slow
def test_flow_grpo_trains_a_tiny_model(tmp_path):
    module = grpo(inner_epochs=2, train_batch_size=4, lr=1e-2, sampler=SamplerConfig(num_steps=3, guidance_scale=2.0))
    before = snapshot(module)
    v0, ref0 = probe_velocities(module)
    rec = fit(module, gen_data(), 8, tmp_path)  # 2 RL steps x 4 optimizer steps
    check_trained(module, before, rec)
    assert module.rl_step == 2 and module.global_step == 8
    v1, ref1 = probe_velocities(module)
    torch.testing.assert_close(ref1, ref0)  # the reference policy is unchanged
    assert not torch.allclose(v1, v0)
    last = rec.rows[-1]
    for key in ("train/policy_loss", "train/kl", "train/clip_frac", "train/approx_kl", "adv/std", "perf/images_per_s"):
        assert math.isfinite(last[key]), key
    assert last["perf/critic_wait_s"] >= 0 and "reward/instruction" in last and "reward/quality" in last


@pytest.mark.slow
def test_diffusion_nft_trains_a_tiny_editing_model(tmp_path):
    module = nft(family="qwen_image_edit", lr=1e-2, log_images_every=1)
    before = snapshot(module)
    old0 = {k: v.clone() for k, v in module.policy.named_adapter_parameters("old").items()}
    _, ref0 = probe_velocities(module)
    rec = fit(module, edit_data(tmp_path), 3, tmp_path)
    check_trained(module, before, rec)
    _, ref1 = probe_velocities(module)
    torch.testing.assert_close(ref1, ref0)
    old1 = module.policy.named_adapter_parameters("old")
    assert any(not torch.equal(old0[k], old1[k]) for k in old0)  # the old policy followed
    new = module.policy.named_adapter_parameters("default")
    assert any(not torch.equal(old1[k], new[k.replace(".old.", ".default.")]) for k in old1)  # by decay, not a copy
    last = rec.rows[-1]
    for key in ("train/policy", "train/loss_pos", "reward/execution", "reward/consistency", "reward/lazy_editor_frac"):
        assert math.isfinite(last[key]), key
    assert last["train/old_decay"] == pytest.approx(0.003)
    assert (tmp_path / "samples" / "step000003.png").is_file()  # source | output grid


@pytest.mark.slow
def test_first_inner_step_ratio_is_exactly_one(tmp_path, monkeypatch):
    calls = []
    real = grpo_mod.kernels.clipped_surrogate

    def spy(log_prob, old, adv, clip_range):
        calls.append((log_prob.detach().clone(), old.clone()))
        return real(log_prob, old, adv, clip_range)

    monkeypatch.setattr(grpo_mod.kernels, "clipped_surrogate", spy)
    module = grpo(inner_epochs=2, train_batch_size=4, lr=1e-2)
    gaps = []
    real_lp = samplers_mod.kernels.step_log_prob

    def lp_spy(*a, **k):
        out = real_lp(*a, **k)
        gaps.append(out[0].detach())
        return out

    monkeypatch.setattr(samplers_mod.kernels, "step_log_prob", lp_spy)
    fit(module, gen_data(), 4, tmp_path)  # one RL step: 2 epochs x 2 minibatches
    n_t = 3  # stochastic steps per sample (all 3 with the default window)
    first = calls[:n_t]  # the first optimizer step's micro-steps
    for lp, old in first:
        assert torch.equal(torch.exp(lp - old), torch.ones_like(lp))
    # after the first optimizer step the rollout's log-probs are the old ones, and the ratio moves off 1
    later = calls[n_t:]
    assert later and any(not torch.equal(lp, old) for lp, old in later)


def test_training_recomputes_the_rollout_log_probs(tmp_path):
    module = grpo(inner_epochs=1)
    rec = fit(module, gen_data(), 1, tmp_path)
    assert rec.rows[-1]["train/logp_rollout_gap"] < 1e-4  # same inputs, same math, same numbers


@pytest.mark.slow
def test_missing_scores_are_excluded_and_counted(tmp_path):
    module = nft(critic=ImageStatsCritic.Config(missing_frac=0.4))
    rec = fit(module, gen_data(), 2, tmp_path)
    missing = [r["reward/missing_frac"] for r in rec.rows]
    assert any(m > 0 for m in missing) and all(m < 1 for m in missing)
    assert all(math.isfinite(r["train/policy"]) for r in rec.rows)
    # advantages: NaN rewards get 0 and are left out of the loss
    r = torch.tensor([0.1, float("nan"), 0.5, 0.9, 0.3, 0.3, float("nan"), 0.3])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    out = module.advantages(r, g)
    assert out.adv[1] == 0 and out.adv[6] == 0
    assert out.keep.tolist() == [True, False, True, True, True, True, False, True]
    module.config.drop_zero_std_groups = True
    out = module.advantages(r, g)  # group 1's valid rewards are all 0.3: dropped
    assert out.keep.tolist() == [True, False, True, True, False, False, False, False]


@pytest.mark.slow
def test_critic_failures_raise_or_count_as_missing(tmp_path):
    # the first RL step's two chunks fail: counted as missing, no update; the second step trains
    module = nft(critic=ImageStatsCritic.Config(fail_first=2), critic_failure="missing")
    before = snapshot(module)
    rec = fit(module, gen_data(), 1, tmp_path)
    first, second = rec.rows
    assert first["reward/missing_frac"] == 1.0 and first["reward/critic_failures"] == 2.0  # two chunks of 4
    assert first["train/skipped_no_valid"] == 1.0
    assert second["reward/missing_frac"] == 0.0 and module.rl_step == 2 and module.global_step == 1
    assert snapshot(module)[1].keys() == before[1].keys()
    with pytest.raises(RuntimeError, match="reward failed on rollout chunk 0"):
        fit(nft(critic=ImageStatsCritic.Config(fail=True)), gen_data(), 1, tmp_path)
    # a critic that never answers stops the run instead of spinning without optimizer steps
    dead = nft(critic=ImageStatsCritic.Config(fail=True), critic_failure="missing", max_idle_rl_steps=2)
    with pytest.raises(RuntimeError, match="2 RL steps in a row made no optimizer step"):
        fit(dead, gen_data(), 1, tmp_path)


@pytest.mark.slow
def test_non_finite_loss_skips_the_step_and_keeps_weights(tmp_path, monkeypatch):
    real = nft_mod.kernels.nft_loss
    state = {"n": 0}

    def nan_once(*a, **k):
        loss, stats = real(*a, **k)
        state["n"] += 1
        return (loss * float("nan"), stats) if state["n"] == 1 else (loss, stats)

    monkeypatch.setattr(nft_mod.kernels, "nft_loss", nan_once)
    module = nft(lr=1e-2)
    lora0, _ = snapshot(module)
    after_first = {}

    class Snap(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                after_first.update(snapshot(pl_module)[0])

    rec = Recorder()
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[rec, Snap()],
    )
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        trainer.fit(module, datamodule=gen_data())
    # RL step 1: NaN loss, no optimizer step, weights untouched; RL step 2 makes the run's one optimizer step
    assert module.skipped_nonfinite == 1 and rec.rows[0]["train/skipped_steps"] == 1.0
    assert module.rl_step == 2 and module.global_step == 1
    assert all(torch.equal(lora0[k], v) for k, v in after_first.items())
    assert any(not torch.equal(lora0[k], v) for k, v in snapshot(module)[0].items())


def test_scorer_overlaps_critic_with_sampling_and_keeps_order():
    events, lock = [], threading.Lock()

    def reward_fn(reqs):
        with lock:
            events.append(("critic_start", reqs[0], time.perf_counter()))
        time.sleep(0.05)
        n = len(reqs)
        return RewardOutput(torch.tensor(reqs, dtype=torch.float32), {"x": torch.zeros(n)}, {"x": 0})

    scorer = OverlappedScorer(reward_fn, ["x"], max_pending=2)
    sample_end = {}
    for k in range(3):
        time.sleep(0.03)  # "sampling" chunk k
        sample_end[k] = time.perf_counter()
        scorer.submit([10 * k, 10 * k + 1])
    out = scorer.collect()
    assert out.rewards.tolist() == [0, 1, 10, 11, 20, 21]
    start0 = next(t for e, first, t in events if first == 0)
    assert start0 < sample_end[1]  # chunk 0 was being scored while chunk 1 was sampled
    assert scorer.wait_s > 0


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="stochastic rollouts"):
        grpo(sampler=SamplerConfig(method="dpm2"))
    with pytest.raises(ValueError, match="editing policy"):
        FlowGRPOModule(
            FlowGRPOModule.Config(
                task="edit",
                policy=tiny_policy_config("sd3"),
                critic=ImageStatsCritic.Config(),
                reward=CMEReward.Config(),
            )
        )
    with pytest.raises(ValueError, match="timestep_fraction"):
        grpo(timestep_fraction=0.0)
