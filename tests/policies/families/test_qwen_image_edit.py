"""Qwen-Image-Edit(-2509) against diffusers' ``QwenImageEditPlusPipeline`` / ``QwenImageEditPipeline``.

A tiny random checkpoint with the real classes and hub layout (Qwen2.5-VL text encoder and processor, Qwen-Image
transformer and VAE, the real scheduler config) is loaded by both; at the pipelines' default condition sizes (the
source VAE-encoded at ~1024^2 pixels of area, shown to the VL encoder at ~384^2 for 2509), with the same initial
latents and steps, FIRM's sampling equals the pipeline's, with true CFG off and on; the exported LoRA reproduces the
trained policy inside the pipeline.
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


def build(root: Path, pipeline: str) -> Path:
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


def pipeline_latents(pipe, images, noise: torch.Tensor, scale: float, output_type: str = "latent") -> torch.Tensor:
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
    ).images
    if output_type == "latent":
        return pipe._unpack_latents(out, RES, RES, pipe.vae_scale_factor)[:, :, 0]  # (B, C, h, w)
    return out


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_embeddings_equal_encode_prompt(checkpoint):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
        CONDITION_IMAGE_SIZE,
        calculate_dimensions,
    )

    pipe, policy = official(checkpoint), policy_for(checkpoint)
    images = [source(48, 40, 0), source(32, 56, 1)]  # 2509 takes several source images
    shown = []
    for im in images:  # the pipeline's own resize of the condition images
        w, h = calculate_dimensions(CONDITION_IMAGE_SIZE, im.size[0] / im.size[1])
        shown.append(pipe.image_processor.resize(im, h, w))
    with torch.no_grad():
        ref, mask = pipe.encode_prompt(prompt=PROMPT, image=shown, device=torch.device("cpu"))
    ours = policy.text_encoder.encode([PROMPT], [images])[0]
    d = diff(ours.embeds, ref[0])
    print(f"qwen_image_edit embeddings: {ref.shape[1]} tokens, max abs diff {d:.2e}")
    assert ours.embeds.shape == ref[0].shape and d <= 1e-5
    # the diff can see a bug: bicubic instead of lanczos for the VL condition images
    enc = policy.text_encoder
    wrong = [im.resize(s.size, Image.BICUBIC) for im, s in zip(images, shown)]
    states = enc.model(
        **enc.processor(text=[enc.text(PROMPT, 2)], images=wrong, return_tensors="pt"), output_hidden_states=True
    ).hidden_states[-1][0, 64:]
    assert diff(states, ref[0]) > 1e-3


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_sampling_equals_the_pipeline_at_its_default_sizes(checkpoint, scale):
    pipe, policy = official(checkpoint), policy_for(checkpoint)
    image = source(48, 40)
    noise = torch.randn(1, *policy.latent_shape(), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = pipeline_latents(pipe, [image], noise, scale)
        ours = policy.sample_latents([PROMPT], noise, STEPS, images=[image], guidance_scale=scale)
        tokens = policy.encode_prompts([PROMPT], [image]).image_latents[0].shape
    d = diff(ours, ref)
    print(f"qwen_image_edit sampling, true_cfg_scale {scale}: source latents {tuple(tokens)}, max abs diff {d:.2e}")
    assert tokens[-2:] == (116, 140)  # 48x40 -> 1120x928 px (the pipeline's ~1024^2 area) -> 8x VAE
    assert d <= 1e-4
    if scale > 1:  # decoded images agree too
        with torch.no_grad():
            img_ref = pipeline_latents(pipe, [image], noise, scale, output_type="pt")
        di = diff(policy.decode(ours), img_ref)
        print(f"qwen_image_edit decoded image max abs diff {di:.2e}")
        assert di <= 1e-4
        # the comparison can see a missing norm rescale
        from firm.policies.families import qwen_image

        orig = qwen_image.true_cfg
        qwen_image.true_cfg = lambda v_u, v_c, s: v_u + s * (v_c - v_u)
        try:
            with torch.no_grad():
                plain = policy.sample_latents([PROMPT], noise, STEPS, images=[image], guidance_scale=scale)
        finally:
            qwen_image.true_cfg = orig
        assert diff(plain, ref) > 2e-4


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


def test_exported_lora_reproduces_the_trained_policy_in_the_pipeline(tmp_path, checkpoint, monkeypatch):
    monkeypatch.delenv("FIRM_RUN_DIR", raising=False)
    policy, lora_dir = hub.trained_policy(
        str(experiments_root() / "rl/tiny_qwen_edit_nft.yaml"),
        checkpoint,
        tmp_path,
        [
            f"module.policy.resolution={RES}",
            "module.policy.condition_area=65536",  # train with small sources (cheap); compare at the defaults below
            "module.lr=0.01",
            "trainer.max_steps=2",
            "module.sampler.num_steps=2",
            "data.group_size=2",
            "data.batch_size=2",
            "module.rollout_chunk=2",
            "module.ema_decay=null",
        ],
    )
    image = source(48, 40)
    noise = torch.randn(1, *policy.latent_shape(), generator=torch.Generator().manual_seed(3))
    pipe = official(checkpoint)
    with torch.no_grad():
        base = pipeline_latents(pipe, [image], noise, 1.0)
        ours = policy.sample_latents([PROMPT], noise, STEPS, images=[image])
        pipe.load_lora_weights(str(lora_dir))
        theirs = pipeline_latents(pipe, [image], noise, 1.0)
    d, effect = diff(ours, theirs), diff(theirs, base)
    print(f"qwen_image_edit LoRA round trip: max abs diff {d:.2e}; the adapter moves the output by {effect:.2e}")
    assert d <= 1e-4 and effect > 1e-3
