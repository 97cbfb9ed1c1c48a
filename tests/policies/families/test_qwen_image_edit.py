"""Qwen-Image-Edit(-2509) against diffusers' ``QwenImageEditPlusPipeline`` / ``QwenImageEditPipeline``.

A tiny random checkpoint with the real classes and hub layout (Qwen2.5-VL text encoder and processor, Qwen-Image
transformer and VAE, the real scheduler config) is loaded by both; at the pipelines' default condition sizes (the
source VAE-encoded at ~1024^2 pixels of area, shown to the VL encoder at ~384^2 for 2509), with the same initial
latents and steps, FIRM's sampling equals the pipeline's, with true CFG off and on; the exported LoRA reproduces the
trained policy inside the pipeline. Those checks are the family contract's (tests/policies/test_family_contract.py), on
the functions at the end of this file; the first-release pipeline is checked here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from firm.paths import experiments_root
from firm.policies.families.qwen_image_edit import (
    CLASSIC,
    PLUS,
    QWEN_EDIT_TEMPLATE,
    QwenEditTextEncoder,
    load_qwen_vl_processor,
)
from firm.policies.policy import FlowPolicy, LoRAConfig, PolicyConfig
from tests.policies.families import hub

RES = 64  # output pixels: 8x8 latents, 16 target tokens
STEPS = 3
PROMPT = "turn the square blue"


def build(root: Path, pipeline: str = PLUS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    corpus = [QWEN_EDIT_TEMPLATE, "Picture 1: Picture 2:", *hub.PROMPTS]
    tok = hub.qwen_tokenizer(corpus)
    hub.qwen25_vl(tok).save_pretrained(root / "text_encoder")
    tok.save_pretrained(root / "tokenizer")
    hub.save_qwen_vl_processor(root / "processor", tok)
    hub.tiny_qwen_transformer().save_pretrained(root / "transformer")
    hub.tiny_qwen_image_vae().save_pretrained(root / "vae")
    hub.qwen_image_scheduler().save_pretrained(root / "scheduler")
    hub.write_model_index(
        root,
        pipeline,
        {
            "processor": ("transformers", "Qwen2VLProcessor"),
            "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
            "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration"),
            "tokenizer": ("transformers", "Qwen2Tokenizer"),
            "transformer": ("diffusers", "QwenImageTransformer2DModel"),
            "vae": ("diffusers", "AutoencoderKLQwenImage"),
        },
    )
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("qwen_edit_plus"), PLUS)


def source(w: int = 48, h: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def official(root: Path, variant: str = PLUS):
    """The official pipeline from the checkpoint's components (its processor via FIRM's torchvision-free loader when
    ``from_pretrained`` cannot build it)."""
    import diffusers

    cls = getattr(diffusers, variant)
    try:
        pipe = cls.from_pretrained(root)
    except ImportError:  # no torchvision: the processor's video part cannot be built
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        pipe = cls(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler"),
            vae=diffusers.AutoencoderKLQwenImage.from_pretrained(root, subfolder="vae"),
            text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(root, subfolder="text_encoder"),
            tokenizer=AutoTokenizer.from_pretrained(root, subfolder="tokenizer"),
            processor=load_qwen_vl_processor(str(root)),
            transformer=diffusers.QwenImageTransformer2DModel.from_pretrained(root, subfolder="transformer"),
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def policy_for(root: Path, **kw) -> FlowPolicy:
    cfg = PolicyConfig(family="qwen_image_edit", pretrained=str(root), resolution=RES, lora=LoRAConfig(rank=4, alpha=8))
    for k, v in kw.items():
        setattr(cfg, k, v)
    return FlowPolicy(cfg).eval()


def pipeline_latents(pipe, images, noise: torch.Tensor, scale: float, output_type: str = "latent", **kw):
    b, c, h, w = noise.shape
    out = pipe(
        image=images,
        prompt=PROMPT,
        negative_prompt="",
        true_cfg_scale=scale,
        height=RES,
        width=RES,
        num_inference_steps=STEPS,
        latents=pipe._pack_latents(noise, b, c, h, w),
        output_type=output_type,
        **kw,
    ).images
    if output_type == "latent":
        return pipe._unpack_latents(out, RES, RES, pipe.vae_scale_factor)[:, :, 0]  # (B, C, h, w)
    return out


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.slow  # a second pipeline class at ~1024^2 source pixels: seconds of VAE on a CPU
def test_the_first_release_pipeline_too(tmp_path, checkpoint):
    root = tmp_path / "classic"
    shutil.copytree(checkpoint, root)
    hub.write_model_index(
        root,
        CLASSIC,
        {
            "processor": ("transformers", "Qwen2VLProcessor"),
            "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
            "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration"),
            "tokenizer": ("transformers", "Qwen2Tokenizer"),
            "transformer": ("diffusers", "QwenImageTransformer2DModel"),
            "vae": ("diffusers", "AutoencoderKLQwenImage"),
        },
    )
    pipe, policy = official(root, CLASSIC), policy_for(root)
    assert isinstance(policy.text_encoder, QwenEditTextEncoder) and policy.text_encoder.variant == CLASSIC
    image = source(40, 40)
    noise = torch.randn(1, *policy.latent_shape(), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = pipeline_latents(pipe, image, noise, 4.0)
        ours = policy.sample_latents([PROMPT], noise, STEPS, images=[image], guidance_scale=4.0)
    d = diff(ours, ref)
    print(f"qwen_image_edit (QwenImageEditPipeline) sampling, true_cfg_scale 4: max abs diff {d:.2e}")
    assert d <= 1e-4


# What the family contract (tests/policies/test_family_contract.py) calls.


def condition_images(pipe) -> tuple[list[Image.Image], list[Image.Image]]:
    """Two source images (2509 takes several) and the same as the pipeline shows them to the VL encoder."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions

    images, shown = [source(48, 40, 0), source(32, 56, 1)], []
    for im in images:  # the pipeline's own resize of the condition images
        w, h = calculate_dimensions(CONDITION_IMAGE_SIZE, im.size[0] / im.size[1])
        shown.append(pipe.image_processor.resize(im, h, w))
    return images, shown


def embeddings(pipe, policy: FlowPolicy) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(FIRM's, the pipeline's) embeddings of the prompt with two condition images."""
    images, shown = condition_images(pipe)
    ref, _ = pipe.encode_prompt(prompt=PROMPT, image=shown, device=torch.device("cpu"))
    return [(policy.text_encoder.encode([PROMPT], [images])[0].embeds, ref[0])]


def check_embeddings(pipe, policy: FlowPolicy, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The comparison can see a bug: bicubic instead of lanczos for the VL condition images."""
    images, shown = condition_images(pipe)
    enc = policy.text_encoder
    wrong = [im.resize(s.size, Image.BICUBIC) for im, s in zip(images, shown)]
    states = enc.model(
        **enc.processor(text=[enc.text(PROMPT, 2)], images=wrong, return_tensors="pt"), output_hidden_states=True
    ).hidden_states[-1][0, 64:]
    assert diff(states, pairs[0][1]) > 1e-3


def reference(pipe, noise: torch.Tensor, scale: float, decode: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's final latents (B, C, h, w) and decoded images at its default condition sizes, in one call (the
    source is VAE-encoded at ~1024^2 pixels: the expensive part)."""
    final = {}

    def keep_latents(_pipe, _i, _t, tensors):  # the pipeline's per-step hook: the packed latents after each step
        final["latents"] = tensors["latents"]
        return {}

    images = pipeline_latents(pipe, [source(48, 40)], noise, scale, output_type="pt", callback_on_step_end=keep_latents)
    return pipe._unpack_latents(final["latents"], RES, RES, pipe.vae_scale_factor)[:, :, 0], images


def sample(policy: FlowPolicy, noise: torch.Tensor, scale: float) -> torch.Tensor:
    return policy.sample_latents([PROMPT], noise, STEPS, images=[source(48, 40)], guidance_scale=scale)


def check_sampling(pipe, policy: FlowPolicy, noise: torch.Tensor, scale: float, ref: torch.Tensor, ours) -> None:
    """The source at the pipeline's ~1024^2 area; with true CFG, the comparison can see a missing norm rescale."""
    image = source(48, 40)
    if scale == 1.0:
        tokens = policy.encode_prompts([PROMPT], [image]).image_latents[0].shape
        assert tokens[-2:] == (116, 140)  # 48x40 -> 1120x928 px (the pipeline's ~1024^2 area) -> 8x VAE
        return
    from firm.policies.families import qwen_image

    orig = qwen_image.true_cfg
    qwen_image.true_cfg = lambda v_u, v_c, s: v_u + s * (v_c - v_u)
    try:
        plain = policy.sample_latents([PROMPT], noise, STEPS, images=[image], guidance_scale=scale)
    finally:
        qwen_image.true_cfg = orig
    assert diff(plain, ref) > 2e-4


def train_lora(checkpoint: Path, tmp_path: Path) -> tuple[FlowPolicy, Path]:
    return hub.trained_policy(
        str(experiments_root() / "rl/tiny_qwen_edit_nft.yaml"),
        checkpoint,
        tmp_path,
        [
            f"module.policy.resolution={RES}",
            "module.policy.condition_area=65536",  # train with small sources (cheap); compare at the defaults
            "module.lr=0.01",
            "trainer.max_steps=2",
            "module.sampler.num_steps=2",
            "data.group_size=2",
            "data.batch_size=2",
            "module.rollout_chunk=2",
            "module.ema_decay=null",
        ],
    )
