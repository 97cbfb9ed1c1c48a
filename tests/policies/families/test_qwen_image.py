"""Qwen-Image (generation) against diffusers' ``QwenImagePipeline``: the tiny checkpoint and the calls that the family
contract (tests/policies/test_family_contract.py) checks: embeddings, sampling with true CFG off and on, decoding, and
the exported LoRA inside the pipeline after a 2-step RL run."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from firm.paths import experiments_root
from firm.policies.families.qwen_image import QWEN_IMAGE_TEMPLATE
from firm.policies.policy import FlowPolicy, LoRAConfig, PolicyConfig
from tests.policies.families import hub

RES = 64  # 8x8 latents with the 8x tiny VAE: 16 image tokens
STEPS = 3
PROMPT = "a small green triangle"


def build(root: Path) -> Path:
    """The hub layout of Qwen-Image, tiny and random."""
    root.mkdir(parents=True, exist_ok=True)
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


# What the family contract (tests/policies/test_family_contract.py) calls.


def embeddings(pipe, policy: FlowPolicy) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(FIRM's, the pipeline's) prompt embeddings."""
    ref, _ = pipe.encode_prompt(PROMPT, device=torch.device("cpu"))
    return [(policy.text_encoder.encode([PROMPT])[0].embeds, ref[0])]


def check_embeddings(pipe, policy: FlowPolicy, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The template's system turn (34 tokens) is dropped, as the pipeline drops it."""
    tokens = policy.text_encoder.tokenizer(QWEN_IMAGE_TEMPLATE.format(PROMPT)).input_ids
    assert pairs[0][1].shape[0] == len(tokens) - 34


def reference(pipe, noise: torch.Tensor, scale: float, decode: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pipeline's final latents and (``decode``) images from ``noise`` at ``true_cfg_scale`` ``scale``."""
    return pipeline_out(pipe, noise, scale), pipeline_out(pipe, noise, scale, output_type="pt") if decode else None


def sample(policy: FlowPolicy, noise: torch.Tensor, scale: float) -> torch.Tensor:
    return policy.sample_latents([PROMPT], noise, STEPS, guidance_scale=scale)


def check_sampling(pipe, policy: FlowPolicy, noise: torch.Tensor, scale: float, ref: torch.Tensor, ours) -> None:
    """The comparison can see a static instead of a dynamic shift (the scheduler's sigmas without mu)."""
    sched = copy.deepcopy(policy.scheduler)  # the policy is shared by the contract's tests
    sched.set_timesteps(STEPS, mu=0.0)
    assert diff(sched.sigmas, policy.sigmas(STEPS)) > 1e-3


def train_lora(checkpoint: Path, tmp_path: Path) -> tuple[FlowPolicy, Path]:
    return hub.trained_policy(
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
