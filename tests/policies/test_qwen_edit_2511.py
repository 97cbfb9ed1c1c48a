"""Qwen-Image-Edit-2511 against diffusers' ``QwenImageEditPlusPipeline``.

2511 ships in 2509's hub layout and runs in 2509's pipeline; what differs is one option of its transformer's
``config.json``, ``zero_cond_t: true`` (diffusers #12839, first released in 0.37). With it the transformer modulates
the target tokens with the step's timestep and every source image's tokens with timestep 0, and tells them apart by
the per-image ``img_shapes`` entries the caller passes (the first entry is the target). It adds no parameters.

The checkpoint here is the 2509 parity test's tiny one (tests/policies/families/test_qwen_image_edit.py) with its
transformer saved again with ``zero_cond_t=True``, as the 2511 repository holds it. FIRM loads it unchanged, and:

* its sampling equals the pipeline's with true CFG off and on (latents and decoded images), and would not with the
  option ignored;
* a batch of rows at different noise levels, guided (one transformer call over 2B rows, so 4B timesteps inside the
  transformer), gives each row the velocity it gets alone: the training path the pipeline never takes;
* a LoRA trained by a 2-step RL run on it and exported reproduces the trained policy inside the pipeline (slow).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from firm.policies.families.qwen_image_edit import PLUS
from firm.policies.policy import FlowPolicy
from tests.policies.families import test_qwen_image_edit as edit

TOL = 1e-4  # max abs difference in fp32, as in the family contract (tests/policies/test_family_contract.py)


def build(root: Path) -> Path:
    """2509's tiny hub checkpoint, its transformer re-saved with 2511's ``zero_cond_t`` (same weights)."""
    from diffusers import QwenImageTransformer2DModel

    edit.build(root, PLUS)
    transformer = QwenImageTransformer2DModel.from_pretrained(root / "transformer", zero_cond_t=True)
    transformer.save_pretrained(root / "transformer")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("qwen_edit_2511"))


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return edit.official(checkpoint), edit.policy_for(checkpoint)


@contextmanager
def zero_cond_t(model: torch.nn.Module, on: bool) -> Iterator[None]:
    """Switch the option on the transformer and its blocks (they keep their own copy) for the duration."""
    parts = [m for m in model.modules() if hasattr(m, "zero_cond_t")]
    before = [m.zero_cond_t for m in parts]
    for m in parts:
        m.zero_cond_t = on
    try:
        yield
    finally:
        for m, b in zip(parts, before):
            m.zero_cond_t = b


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_the_checkpoint_is_2511s_layout(checkpoint, loaded):
    pipe, policy = loaded
    config = json.loads((checkpoint / "transformer" / "config.json").read_text())
    index = json.loads((checkpoint / "model_index.json").read_text())
    assert config["zero_cond_t"] is True and index["_class_name"] == PLUS
    assert pipe.transformer.zero_cond_t
    flags = {m.zero_cond_t for m in policy.transformer.modules() if hasattr(m, "zero_cond_t")}
    assert flags == {True}  # FIRM's transformer and every block read the option from the config
    assert policy.text_encoder.variant == PLUS


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_sampling_equals_the_plus_pipeline(loaded, scale):
    pipe, policy = loaded
    noise = torch.randn(1, *policy.latent_shape(), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ref_images = edit.reference(pipe, noise, scale)
        ours = edit.sample(policy, noise, scale)
        images = policy.decode(ours)
        with zero_cond_t(policy.transformer, False):  # what a loader that dropped the option would compute
            ignored = edit.sample(policy, noise, scale)
    d, di = diff(ours, ref), diff(images, ref_images)
    ds = diff(policy.sigmas(edit.STEPS), pipe.scheduler.sigmas)
    effect = diff(ignored, ref)
    print(
        f"qwen_image_edit 2511 sampling, true_cfg_scale {scale}: sigmas {ds:.1e}, latents {d:.2e}, decoded images "
        f"{di:.2e}; with zero_cond_t ignored {effect:.2e}"
    )
    assert ref_images.shape == images.shape == (1, 3, edit.RES, edit.RES)
    assert ds <= 1e-7 and d <= TOL and di <= TOL
    assert effect > 10 * TOL  # the comparison sees the option (measured: 6.3e-3)


def test_a_guided_batch_at_mixed_noise_levels_equals_its_rows_alone(loaded):
    _, policy = loaded
    prompts = [edit.PROMPT, "add a yellow star"]
    images = [edit.source(48, 40, 0), edit.source(48, 40, 1)]  # one aspect ratio: one source size for the batch
    with torch.no_grad():
        cond = policy.encode_prompts(prompts, images)
        uncond = policy.encode_negative(cond, images)
        x = torch.randn(2, *policy.latent_shape(), generator=torch.Generator().manual_seed(5))
        sigma = torch.tensor([0.9, 0.3])
        both = policy.velocity(x, sigma, cond, guidance_scale=4.0, uncond=uncond)  # (2, C, h, w)
        rows = [
            policy.velocity(x[[i]], sigma[[i]], cond.index([i]), guidance_scale=4.0, uncond=uncond.index([i]))
            for i in range(2)
        ]
        with zero_cond_t(policy.transformer, False):
            ignored = policy.velocity(x, sigma, cond, guidance_scale=4.0, uncond=uncond)
    d = max(diff(both[[i]], rows[i]) for i in range(2))
    print(f"qwen_image_edit 2511 guided batch vs rows alone: {d:.2e}; zero_cond_t ignored {diff(ignored, both):.2e}")
    assert d <= TOL and diff(ignored, both) > 10 * TOL


@pytest.mark.slow  # a 2-step RL run (a full Lightning fit)
def test_exported_lora_reproduces_the_trained_policy_in_the_pipeline(checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("FIRM_RUN_DIR", raising=False)
    policy, lora_dir = edit.train_lora(checkpoint, tmp_path)
    assert isinstance(policy, FlowPolicy)
    assert {m.zero_cond_t for m in policy.transformer.modules() if hasattr(m, "zero_cond_t")} == {True}
    noise = torch.randn(1, *policy.latent_shape(), generator=torch.Generator().manual_seed(3))
    pipe = edit.official(checkpoint)
    with torch.no_grad():
        base = edit.reference(pipe, noise, 1.0, decode=False)[0]
        ours = edit.sample(policy, noise, 1.0)
        pipe.load_lora_weights(str(lora_dir))
        theirs = edit.reference(pipe, noise, 1.0, decode=False)[0]
    d, effect = diff(ours, theirs), diff(theirs, base)
    print(f"qwen_image_edit 2511 LoRA round trip: max abs diff {d:.2e}; the adapter moves it {effect:.2e}")
    assert d <= TOL and effect > 1e-3
