"""`firm plan`: the shipped architectures, the per-GPU arithmetic, and the plan of tiny experiments against the peak
memory measured on the CPU for the same forward and backward."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from firm.config import ConfigError, load_experiment, to_object
from firm.plan.check import measure_micro_step
from firm.plan.checkpoints import build_on_meta, checkpoint_dir, read_components, shipped_checkpoints
from firm.plan.inputs import FULL_SIZE_INPUTS
from firm.plan.measure import PeakCounter
from firm.plan.plan import GIB, GPUS, USABLE, Footprint, Measured, Plan, Setting, per_gpu, plan_experiment, suggest
from firm.registry import FAMILIES

REPO = Path(__file__).resolve().parents[2]
RL = REPO / "experiments" / "rl"
FULL_SIZE = sorted(RL.glob("firm_*.yaml"))


def test_every_family_has_an_input_rule():
    assert sorted(FULL_SIZE_INPUTS) == sorted(FAMILIES)


@pytest.mark.parametrize("path", FULL_SIZE, ids=lambda p: p.stem)
def test_every_full_size_experiment_has_the_architecture_of_its_checkpoint(path):
    cfg = to_object(load_experiment(path))
    pc = cfg.module.policy
    parts = read_components(checkpoint_dir(pc.pretrained))
    from firm.policies.policy import get_family

    assert parts["transformer"].class_name == get_family(pc).transformer_class().__name__
    assert any(p.is_text_encoder for p in parts.values())


# Published sizes (billions of parameters; the model cards' rounded figures) against the meta-built models: a wrong
# layer count or width in a shipped config.json is far outside the tolerance.
PUBLISHED = {
    "stabilityai/stable-diffusion-3.5-medium": {"transformer": 2.5, "text_encoder_3": 4.7, "text_encoder_2": 0.69},
    "Qwen/Qwen-Image": {"transformer": 20.0, "text_encoder": 8.29},
    "Qwen/Qwen-Image-Edit-2509": {"transformer": 20.0, "text_encoder": 8.29},
    "Qwen/Qwen-Image-Edit-2511": {"transformer": 20.0, "text_encoder": 8.29},
    "black-forest-labs/FLUX.1-Kontext-dev": {"transformer": 12.0, "text_encoder_2": 4.7, "text_encoder": 0.123},
    "black-forest-labs/FLUX.2-klein-base-4B": {"transformer": 4.0, "text_encoder": 4.0},
    "Tongyi-MAI/Z-Image-Turbo": {"transformer": 6.0, "text_encoder": 4.0},
}


def test_the_shipped_checkpoints_are_the_published_ones():
    assert shipped_checkpoints() == sorted(PUBLISHED)


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED))
def test_a_shipped_architecture_has_its_published_size(hub_id):
    parts = read_components(checkpoint_dir(hub_id))
    for name, billions in PUBLISHED[hub_id].items():
        model = build_on_meta(parts[name], torch.bfloat16)
        size = sum(p.numel() for p in model.parameters()) / 1e9
        assert abs(size - billions) <= 0.12 * billions, (hub_id, name, size)
        assert next(model.parameters()).device.type == "meta"


def test_an_unknown_checkpoint_names_the_shipped_ones(tmp_path):
    with pytest.raises(FileNotFoundError, match="Qwen/Qwen-Image-Edit-2509"):
        checkpoint_dir("someone/unknown-model")
    local = tmp_path / "ckpt"
    (local / "transformer").mkdir(parents=True)
    (local / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "SD3Transformer2DModel"]}))
    (local / "transformer" / "config.json").write_text(json.dumps({"num_layers": 2}))
    assert checkpoint_dir(str(local)) == local  # a local diffusers-layout folder: only its configs are read
    assert read_components(local)["transformer"].config == {"num_layers": 2}


# --------------------------------------------------------------------------------------------------------------------
# Per-GPU arithmetic

FP = Footprint(
    transformer=8000,
    transformer_root=800,
    largest_block=300,
    largest_block_lora=10,
    lora=80,
    lora_old=80,
    ema=80,
    vae=50,
    text_encoders={"text_encoder": 4000},
    encoder_largest_layer={"text_encoder": 200},
)
MEAS = Measured(update={"off": 9000, "on": 1000}, rollout_forward=400, vae_decode=600, vae_encode=0, encode={})


def test_fsdp2_divides_what_it_shards_and_holds_the_gathered_blocks():
    ddp = per_gpu(Setting("ddp", True, "kept"), FP, MEAS, buffers=5, world=8, reshard=True)
    fsdp = per_gpu(Setting("fsdp2", True, "kept"), FP, MEAS, buffers=5, world=8, reshard=True)
    assert ddp.parts["transformer"] == 8000 and fsdp.parts["transformer"] == 1000
    for key in ("lora", "lora_old", "ema", "gradients"):
        assert (ddp.parts[key], fsdp.parts[key]) == (80, 10), key
    assert (ddp.parts["optimizer"], fsdp.parts["optimizer"]) == (160, 20)  # AdamW: two states per trained parameter
    assert (ddp.parts["ddp_buckets"], fsdp.parts["ddp_buckets"]) == (80, 0)
    assert fsdp.parts["fsdp_gathered"] == 2 * 300 + 800 - 100  # two blocks and the root, whole, minus the root's shard
    assert ddp.parts["text_encoder"] == fsdp.parts["text_encoder"] == 4000  # kept: whole everywhere
    assert ddp.parts["activations"] == fsdp.parts["activations"] == 1000  # data parallel: the same micro-batch
    assert ddp.phases["update"] == 8000 + 4000 + 50 + 80 + 80 + 80 + 160 + 80 + 80 + 5 + 1000
    assert ddp.peak == max(ddp.phases.values())
    # SHARD_GRAD_OP keeps every block gathered from its forward to its backward
    grad_op = per_gpu(Setting("fsdp2", True, "kept"), FP, MEAS, buffers=5, world=8, reshard=False)
    assert grad_op.parts["fsdp_gathered"] == 8000 + 80 + 80 - 1000


def test_text_encoder_placements():
    sharded = per_gpu(Setting("fsdp2", False, "sharded"), FP, MEAS, buffers=0, world=4, reshard=True)
    freed = per_gpu(Setting("fsdp2", False, "freed"), FP, MEAS, buffers=0, world=4, reshard=True)
    ddp_sharded = per_gpu(Setting("ddp", False, "sharded"), FP, MEAS, buffers=0, world=4, reshard=True)
    assert sharded.parts["text_encoder"] == 1000 and freed.parts["text_encoder"] == 0
    assert "start" in freed.phases and freed.phases["start"] >= 4000  # whole while it fills the cache
    assert ddp_sharded.parts["text_encoder"] == 4000 and ddp_sharded.notes  # DDP cannot shard it: counted as kept
    assert per_gpu(Setting("fsdp2", False, "kept"), FP, MEAS, 0, 1, True).parts["transformer"] == 8000  # one GPU


def _plan_with(rows):
    from firm.plan.plan import Shapes

    shapes = Shapes(8, 16, 16, 1, 8, 1, 1024, 0, 333, (16, 64, 64), "bfloat16", 2)
    return Plan("x.yaml", "x", "ckpt", "sd3", "diffusion_nft", rows[0].setting, shapes, FP, MEAS, 0, rows, "80GB")


def test_a_setting_that_does_not_fit_gets_the_smallest_change_that_does():
    big, small = int(USABLE * GPUS["80GB"]) + 1, GIB
    own = Setting("ddp", False, "kept")
    rows = [
        per_gpu(own, FP, MEAS, 0, 8, True),
        per_gpu(Setting("fsdp2", True, "freed"), FP, MEAS, 0, 8, True),
        per_gpu(Setting("ddp", True, "kept"), FP, MEAS, 0, 8, True),
    ]
    for row, peak in zip(rows, (big, small // 2, small)):
        row.peak, row.fits = peak, {g: peak <= USABLE * t for g, t in GPUS.items()}
    plan = _plan_with(rows)
    assert not plan.fits
    assert suggest(plan) == "set module.policy.gradient_checkpointing=true (peak 1.0 GiB)"  # one change, not two
    for row in rows:
        row.peak, row.fits = big, {g: False for g in GPUS}
    assert "no setting fits 80GB" in suggest(plan) and "micro_batch_size" in suggest(plan)


def test_firm_plan_refuses_an_experiment_that_is_not_rl():
    with pytest.raises(ConfigError, match="is not an RL experiment"):
        plan_experiment(REPO / "experiments" / "critic" / "tiny_edit_cpu.yaml")


# --------------------------------------------------------------------------------------------------------------------
# Measurement


def test_the_counter_counts_like_memtracker():
    """On a module MemTracker can track (all parameters trained), both give the same peak of a forward + backward."""
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 256, batch_first=True)
    x = torch.randn(8, 32, 64)

    def step():
        layer(x).pow(2).mean().backward()
        layer.zero_grad(set_to_none=True)

    step()  # warm up (lazy buffers)
    mt = MemTracker()
    mt.track_external(layer, x)
    with mt:
        step()
    tracked = mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    counter = PeakCounter()
    counter.add(layer, x)
    with counter:
        step()
    assert counter.peak == tracked


FAST_TINY = ["tiny_sd3_nft", "tiny_sd3_grpo", "tiny_qwen_edit_nft"]
# The reward twins (docs/rewards.md) train tiny_sd3_grpo's / tiny_sd3_nft's policy at their batch: only the reward
# differs, and the plan counts the policy, so their plans are those two's.
REWARD_TWINS = {
    "tiny_sd3_grpo_pickscore",
    "tiny_sd3_grpo_ocr",
    "tiny_sd3_nft_multi_reward",
    "tiny_sd3_nft_critic_pickscore",
}
SLOW_TINY = sorted({p.stem for p in RL.glob("tiny_*.yaml")} - set(FAST_TINY) - REWARD_TWINS)


@pytest.mark.parametrize("name", FAST_TINY + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW_TINY])
def test_the_plan_of_a_tiny_experiment_is_within_25_percent_of_the_cpu_peak(name):
    """The plan (fake tensors, meta-built model) against torch.profiler's peak of the same micro-step run for real:
    the real policy, AdamW's states, the EMA, the trained micro-batch's forwards and backward."""
    path = RL / f"{name}.yaml"
    plan = plan_experiment(path)
    check = measure_micro_step(plan, path)
    assert abs(check.predicted - check.measured) <= 0.25 * check.measured, (check.predicted, check.measured)
    # the check can fail: a plan that left out the activations would be far outside the 25%
    without = check.predicted - plan.row.parts["activations"]
    assert abs(without - check.measured) > 0.25 * check.measured


def test_checkpointing_lowers_the_activations_of_a_deep_model():
    """Measured, not assumed: with 6 blocks, recomputing them in backward keeps less than storing every block's."""
    plan = plan_experiment(RL / "tiny_sd3_nft.yaml", ["module.policy.tiny.num_layers=6"])
    assert plan.measured.update["on"] < 0.7 * plan.measured.update["off"]


def test_a_classifier_free_guided_update_counts_two_passes():
    nft = plan_experiment(RL / "tiny_sd3_nft.yaml")
    grpo = plan_experiment(RL / "tiny_sd3_grpo.yaml")  # Flow-GRPO trains at guidance 2: both halves in one batch
    assert (nft.shapes.update_passes, grpo.shapes.update_passes) == (1, 2)
    assert (nft.shapes.no_grad_forwards, grpo.shapes.no_grad_forwards) == (2, 1)  # old + reference; reference


# --------------------------------------------------------------------------------------------------------------------
# The command


def test_firm_plan_prints_its_tables_and_writes_json(tmp_path, capsys):
    from firm.cli import main

    out = tmp_path / "plan.json"
    with pytest.raises(SystemExit) as e:
        main(["plan", str(RL / "tiny_qwen_edit_nft.yaml"), "data.batch_size=8", "--out", str(out), "--check"])
    assert e.value.code == 0
    captured = capsys.readouterr()
    for text in ("per GPU", "activations", "update phase", "every setting", "fits 80GB", "fits 141GB", "sharded"):
        assert text in captured.out, text
    assert "[firm plan]" in captured.err  # the progress lines
    res = json.loads(out.read_text())
    assert res["fits"] is True and res["shapes"]["local_batch"] == 8 and len(res["rows"]) == 10
    assert res["rows"][0]["setting"] == {"strategy": "ddp", "checkpointing": False, "text_encoder": "kept"}
    assert set(res["rows"][0]["parts"]) >= {"transformer", "lora", "optimizer", "gradients", "activations"}
