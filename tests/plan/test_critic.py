"""`firm plan` on critic SFT experiments: the shipped Qwen3-VL-8B architecture, the per-GPU arithmetic, and the plan
of the tiny critic experiments against the peak memory of the same micro-step run for real on the CPU."""

from pathlib import Path

import pytest
import torch

from firm.config import load_experiment, to_object
from firm.plan.critic import (
    CriticFootprint,
    CriticSetting,
    build_critic_on_meta,
    critic_config,
    critic_config_path,
    critic_row,
    critic_shapes,
    measure_critic_micro_step,
    plan_critic,
)
from firm.plan.plan import GPUS, USABLE

REPO = Path(__file__).resolve().parents[2]
CRITIC = REPO / "experiments" / "critic"


def _cfg(name, *overrides):
    return to_object(load_experiment(CRITIC / name, list(overrides)))


def test_the_shipped_qwen3_vl_8b_has_its_published_size():
    cfg = _cfg("firm_edit_8b.yaml")
    assert critic_config_path(cfg.module.model).parent.name == "Qwen--Qwen3-VL-8B-Instruct"
    model = build_critic_on_meta(cfg.module, torch.float32)
    size = sum(p.numel() for p in model.parameters()) / 1e9
    assert abs(size - 8.77) < 0.05, size  # the model card: 8.77 B (vision tower 0.58 B)
    assert next(model.parameters()).device.type == "meta"


def test_lora_trains_only_the_adapters_of_its_targets():
    cfg = _cfg("firm_edit_8b.yaml", "module.finetune=lora", "module.lora_r=16", "module.lora_target_modules=[q_proj]")
    model = build_critic_on_meta(cfg.module, torch.float32)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "q_proj" in n for n, _ in trainable)
    # 36 decoder layers, q_proj 4096 -> 4096 at rank 16: A (16 x 4096) + B (4096 x 16); the vision tower has no q_proj
    assert sum(p.numel() for _, p in trainable) == 36 * 2 * 16 * 4096


def test_an_edit_example_holds_two_images_and_a_generation_example_one():
    edit, gen = _cfg("firm_edit_8b.yaml"), _cfg("firm_gen_8b.yaml")
    model = build_critic_on_meta(edit.module, torch.float32)
    se, sg = critic_shapes(edit, model), critic_shapes(gen, model)
    assert (se.images, sg.images) == (2, 1)
    assert se.tokens_per_image == 1024  # 1024 px square, 16 px patches merged 2 x 2
    assert (se.world, se.batch, se.seq, se.autocast, se.dtype) == (16, 5, 8192, "bfloat16", "float32")


FP = CriticFootprint(
    weights=1600, trainable=1600, root=400, root_trainable=400, largest_layer=100, largest_layer_trainable=100,
    params=400, trainable_params=400,
)  # fmt: skip


def test_fsdp2_divides_the_state_and_holds_the_gathered_layers_and_ddp_copies_the_gradients():
    act = {"on": 10, "off": 50}
    ddp = critic_row(CriticSetting("ddp", False), FP, act, world=4, reshard=True)
    assert ddp.parts["weights"] == 1600 and ddp.parts["optimizer"] == 3200 and ddp.parts["ddp_buckets"] == 1600
    assert ddp.peak == 1600 + 1600 + 3200 + 1600 + 50
    fsdp = critic_row(CriticSetting("fsdp2", True), FP, act, world=4, reshard=True)
    assert fsdp.parts["weights"] == 400 and fsdp.parts["gradients"] == 400 and fsdp.parts["optimizer"] == 800
    assert fsdp.parts["fsdp_gathered"] == (2 * 100 + 400) - (2 * 100 + 400) // 4  # whole, less this GPU's shard
    assert fsdp.parts["fsdp_unsharded_grads"] == 400 + 100
    assert fsdp.parts["ddp_buckets"] == 0 and fsdp.parts["activations"] == 10
    one = critic_row(CriticSetting("fsdp2", True), FP, act, world=1, reshard=True)
    assert one.parts["fsdp_gathered"] == 0 and one.parts["weights"] == 1600  # one GPU: nothing to shard
    assert fsdp.fits == {g: fsdp.peak <= USABLE * t for g, t in GPUS.items()}


def test_an_rl_experiment_is_not_a_critic_one():
    assert critic_config(REPO / "experiments" / "rl" / "tiny_qwen_edit_nft.yaml") is None
    assert critic_config(CRITIC / "tiny_edit_cpu.yaml") is not None


@pytest.fixture(scope="module")
def tiny_critic(tmp_path_factory):
    """The tiny critic of experiments/critic/prepare_tiny_cpu.sh (default sizes; a small tokenizer corpus)."""
    from firm.synthetic.tiny_critic import TinyCriticConfig, build_tiny_critic

    return build_tiny_critic(tmp_path_factory.mktemp("plan") / "tiny-critic", TinyCriticConfig(corpus_samples=20))


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("tiny_edit_cpu.yaml", []),
        ("tiny_gen_cpu.yaml", []),
        ("tiny_edit_cpu.yaml", ["module.gradient_checkpointing=true", "data.batch_size=4"]),
        ("tiny_edit_cpu.yaml", ["module.finetune=lora", "trainer.precision=bf16-mixed", "data.batch_size=4"]),
    ],
    ids=["edit", "gen", "edit-ckpt", "edit-lora-bf16"],
)
def test_the_plan_of_a_tiny_critic_is_within_25_percent_of_the_cpu_peak(tiny_critic, name, overrides):
    cfg = _cfg(name, f"module.model={tiny_critic}", *overrides)
    plan = plan_critic(CRITIC / name, cfg)
    check = measure_critic_micro_step(plan, cfg)
    assert 0.75 <= check.ratio <= 1.25, (check.predicted / 2**20, check.measured / 2**20)
    # The activations are most of the step: a plan that left them out would be far outside the tolerance.
    without = check.predicted - plan.row.parts["activations"]
    assert without < 0.75 * check.measured, (without / 2**20, check.measured / 2**20)
