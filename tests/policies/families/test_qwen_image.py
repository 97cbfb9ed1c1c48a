"""Qwen-Image (generation) against diffusers' ``QwenImagePipeline``: embeddings, sampling with true CFG off and on,
decoding, and the exported LoRA inside the pipeline after a 2-step RL run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from firm.paths import experiments_root
from firm.policies.families.qwen_image import QWEN_IMAGE_TEMPLATE
from firm.policies.policy import FlowPolicy, LoRAConfig, PolicyConfig
from tests.policies.families import hub

RES = 64  # 8x8 latents with the 8x tiny VAE: 16 image tokens
STEPS = 3
PROMPT = "a small green triangle"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qwen_image")
    torch.manual_seed(0)
    tok = hub.qwen_tokenizer([QWEN_IMAGE_TEMPLATE, *hub.PROMPTS])
    hub.qwen25_vl(tok).save_pretrained(root / "text_encoder")
    tok.save_pretrained(root / "tokenizer")
    hub.tiny_qwen_transformer().save_pretrained(root / "transformer")
    hub.tiny_qwen_image_vae().save_pretrained(root / "vae")
    hub.qwen_image_scheduler().save_pretrained(root / "scheduler")
    hub.write_model_index(
        root,
        "QwenImagePipeline",
        {
            "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
            "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration"),
            "tokenizer": ("transformers", "Qwen2Tokenizer"),
            "transformer": ("diffusers", "QwenImageTransformer2DModel"),
            "vae": ("diffusers", "AutoencoderKLQwenImage"),
        },
    )
    return root


def official(root: Path):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def policy_for(root: Path) -> FlowPolicy:
    cfg = PolicyConfig(family="qwen_image", pretrained=str(root), resolution=RES, lora=LoRAConfig(rank=4, alpha=8))
    return FlowPolicy(cfg).eval()


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def pipeline_out(pipe, noise: torch.Tensor, scale: float, output_type: str = "latent") -> torch.Tensor:
    b, c, h, w = noise.shape
    out = pipe(
        prompt=PROMPT,
        negative_prompt="",
        true_cfg_scale=scale,
        height=RES,
        width=RES,
        num_inference_steps=STEPS,
        latents=pipe._pack_latents(noise, b, c, h, w),
        output_type=output_type,
    ).images
    if output_type == "latent":
        return pipe._unpack_latents(out, RES, RES, pipe.vae_scale_factor)[:, :, 0]
    return out


def test_embeddings_equal_encode_prompt(checkpoint):
    pipe, policy = official(checkpoint), policy_for(checkpoint)
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(PROMPT, device=torch.device("cpu"))
    ours = policy.text_encoder.encode([PROMPT])[0]
    d = diff(ours.embeds, ref[0])
    print(f"qwen_image embeddings: {ref.shape[1]} tokens, max abs diff {d:.2e}")
    assert ours.embeds.shape == ref[0].shape and d <= 1e-5
    tokens = policy.text_encoder.tokenizer(QWEN_IMAGE_TEMPLATE.format(PROMPT)).input_ids
    assert ref.shape[1] == len(tokens) - 34  # the template's system turn is dropped


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_sampling_equals_the_pipeline(checkpoint, scale):
    pipe, policy = official(checkpoint), policy_for(checkpoint)
    noise = torch.randn(1, *policy.latent_shape(), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = pipeline_out(pipe, noise, scale)
        ours = policy.sample_latents([PROMPT], noise, STEPS, guidance_scale=scale)
        img = pipeline_out(pipe, noise, scale, output_type="pt")
    d, di = diff(ours, ref), diff(policy.decode(ours), img)
    print(f"qwen_image sampling, true_cfg_scale {scale}: latents max abs diff {d:.2e}, decoded images {di:.2e}")
    assert d <= 1e-4 and di <= 1e-4
    # the comparison can see a static instead of a dynamic shift (the sigmas of the scheduler without mu)
    sched = policy.scheduler
    sched.set_timesteps(STEPS, mu=0.0)
    assert diff(sched.sigmas, policy.sigmas(STEPS)) > 1e-3


def test_exported_lora_reproduces_the_trained_policy_in_the_pipeline(tmp_path, checkpoint, monkeypatch):
    monkeypatch.delenv("FIRM_RUN_DIR", raising=False)
    policy, lora_dir = hub.trained_policy(
        str(experiments_root() / "rl/tiny_qwen_image_nft.yaml"),
        checkpoint,
        tmp_path,
        [
            f"module.policy.resolution={RES}",
            "module.lr=0.01",
            "imports=[tests.helpers.spread_critic]",
            "module.critic.name=spread",  # the random model's grey images tie under image_stats: no update
            "trainer.max_steps=2",
            "module.sampler.num_steps=2",
            "data.group_size=2",
            "data.batch_size=4",
            "module.ema_decay=null",
        ],
    )
    noise = torch.randn(1, *policy.latent_shape(), generator=torch.Generator().manual_seed(3))
    pipe = official(checkpoint)
    with torch.no_grad():
        base = pipeline_out(pipe, noise, 4.0)
        ours = policy.sample_latents([PROMPT], noise, STEPS, guidance_scale=4.0)
        pipe.load_lora_weights(str(lora_dir))
        theirs = pipeline_out(pipe, noise, 4.0)
    d, effect = diff(ours, theirs), diff(theirs, base)
    print(
        f"qwen_image LoRA round trip (true CFG 4): max abs diff {d:.2e}; the adapter moves the output by {effect:.2e}"
    )
    assert d <= 1e-4 and effect > 1e-3
