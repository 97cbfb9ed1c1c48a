"""bf16 as the references run it: the policy's forwards in bfloat16, while the log-probs, the advantages, the ratio,
the KL and the NFT loss stay float32 (Flow-GRPO and DiffusionNFT compute these in float32 under mixed precision).

Each case trains a tiny SD3 policy for two RL steps under Lightning's ``bf16-mixed`` or ``bf16-true`` precision with
``policy.dtype: bfloat16``, records the dtype of every input and output of the fused ops the step calls, and of the
transformer's inputs, and checks that the losses are finite and the policy really moved.
"""

from __future__ import annotations

import math
from collections import defaultdict

import lightning as L
import pytest
import torch

from firm import kernels
from firm.algorithms.config import SamplerConfig
from firm.algorithms.diffusion_nft import DiffusionNFT
from firm.algorithms.flow_grpo import FlowGRPO
from firm.critics.stats import ImageStatsCritic
from firm.data.prompts import PromptDataModule
from firm.rewards.combiners import QMAReward
from tests.policies.conftest import tiny_policy_config

PROMPTS = ["a red circle", "a blue square top left", "green triangle", "a big yellow circle"]
FP32_OPS = ("group_advantages", "step_log_prob", "clipped_surrogate", "nft_loss")


class Rows(L.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    if hasattr(x, "__dataclass_fields__"):
        return [t for v in vars(x).values() for t in _tensors(v)]
    return []


def _spy(monkeypatch, seen: dict[str, set]) -> None:
    for name in FP32_OPS:
        real = getattr(kernels, name)

        def wrapped(*args, _real=real, _name=name, **kwargs):
            out = _real(*args, **kwargs)
            for t in _tensors(list(args)) + _tensors(kwargs) + _tensors(out):
                if t.is_floating_point():
                    seen[_name].add(t.dtype)
            return out

        monkeypatch.setattr(kernels, name, wrapped)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("cls", [FlowGRPO, DiffusionNFT])
def test_bf16_forwards_with_float32_log_probs_advantages_and_losses(cls, precision, tmp_path, monkeypatch):
    torch.manual_seed(0)
    policy = tiny_policy_config("sd3")
    policy.dtype = "bfloat16"
    sampler = (
        SamplerConfig(num_steps=3, noise_level=0.7)
        if cls is FlowGRPO
        else SamplerConfig(num_steps=3, method="dpm2", noise_level=0.0)
    )
    module = cls(
        cls.Config(
            policy=policy,
            sampler=sampler,
            critic=ImageStatsCritic.Config(),
            reward=QMAReward.Config(),
            rollout_chunk=4,
            kl_beta=1e-2,  # the reference forward and the KL term run too
            weight_decay=0.0,  # so that adapters that move were moved by the gradient
        )
    )
    seen: dict[str, set] = defaultdict(set)
    _spy(monkeypatch, seen)
    forward_dtypes: dict[str, set] = defaultdict(set)

    def record(mod, args, kwargs):
        for key, value in kwargs.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                forward_dtypes[key].add(value.dtype)

    module.policy.transformer.register_forward_pre_hook(record, with_kwargs=True)
    before = {k: v.detach().float().clone() for k, v in module.policy.named_adapter_parameters("default").items()}
    rows = Rows()
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[rows],
    )
    data = PromptDataModule(PromptDataModule.Config(prompts=PROMPTS, group_size=4, batch_size=8))
    trainer.fit(module, datamodule=data)

    # the transformer ran on bfloat16 latents and text states (the timestep stays float32, as diffusers' SD3 pipeline
    # passes the scheduler's float32 timesteps)
    assert forward_dtypes["hidden_states"] == {torch.bfloat16}, dict(forward_dtypes)
    assert forward_dtypes["encoder_hidden_states"] == {torch.bfloat16}, dict(forward_dtypes)
    # every fused op of the step saw and returned float32 only
    used = {"group_advantages", "nft_loss"} if cls is DiffusionNFT else {"group_advantages", "step_log_prob"}
    assert used <= set(seen), dict(seen)
    for name, dtypes in seen.items():
        assert dtypes == {torch.float32}, f"{name} saw {dtypes} under {precision}"
    losses = [v for r in rows.rows for k, v in r.items() if k.startswith("train/")]
    assert losses and all(math.isfinite(v) for v in losses), rows.rows
    after = {k: v.detach().float() for k, v in module.policy.named_adapter_parameters("default").items()}
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the step really trained
    assert rows.rows[-1]["train/grad_norm"] > 0
    assert all(r["adv/abs_mean"] > 0.1 for r in rows.rows)  # a learning signal in every step, not zero advantages


def test_adapters_are_float32_on_a_bfloat16_base():
    """peft would create them in bf16 next to bf16 weights; the references (peft's get_peft_model with
    autocast_adapter_dtype) and FIRM train float32 adapters: the optimizer, its states and the EMA follow them."""
    from firm.policies.config import PolicyConfig
    from firm.policies.policy import FlowPolicy

    policy = FlowPolicy(PolicyConfig(resolution=16, dtype="bfloat16"), old_adapter=True)
    lora = {p.dtype for n, p in policy.transformer.named_parameters() if "lora_" in n}
    frozen = {p.dtype for n, p in policy.transformer.named_parameters() if "lora_" not in n}
    assert lora == {torch.float32} and frozen == {torch.bfloat16}
    assert {p.dtype for p in policy.trainable_parameters()} == {torch.float32}
