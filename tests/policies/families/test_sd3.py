"""SD3 / SD3.5 against diffusers' ``StableDiffusion3Pipeline``.

The tiny checkpoint (two CLIPs with projections, T5, SD3 transformer, AutoencoderKL, the scheduler) has the hub's
layout and ``model_index.json``; its tokenizers are word-level ``PreTrainedTokenizerFast`` stand-ins (a CLIP BPE
vocabulary cannot be built offline), declared as such, so that FIRM's ``AutoTokenizer`` and the pipeline load the
same tokenizer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from firm.paths import experiments_root
from firm.policies.policy import FlowPolicy, LoRAConfig, PolicyConfig
from tests.policies.families import hub

RES = 16  # 8x8 latents with the 2x tiny VAE
STEPS = 3
PROMPT = "a red circle at the top"


@pytest.fixture(scope="module")
def checkpoint(tiny_sd3_checkpoint, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sd3_hub") / "sd3"
    shutil.copytree(tiny_sd3_checkpoint, root)
    tok = ("transformers", "PreTrainedTokenizerFast")
    hub.write_model_index(
        root,
        "StableDiffusion3Pipeline",
        {
            "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
            "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
            "text_encoder_3": ("transformers", "T5EncoderModel"),
            "tokenizer": tok,
            "tokenizer_2": tok,
            "tokenizer_3": tok,
            "transformer": ("diffusers", "SD3Transformer2DModel"),
            "vae": ("diffusers", "AutoencoderKL"),
            "image_encoder": None,
            "feature_extractor": None,
        },
    )
    return root


def official(root: Path):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def policy_for(root: Path) -> FlowPolicy:
    cfg = PolicyConfig(family="sd3", pretrained=str(root), resolution=RES, lora=LoRAConfig(rank=4, alpha=8))
    return FlowPolicy(cfg).eval()


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def pipeline_out(pipe, noise: torch.Tensor, scale: float, output_type: str = "latent") -> torch.Tensor:
    return pipe(
        prompt=PROMPT,
        guidance_scale=scale,
        height=RES,
        width=RES,
        num_inference_steps=STEPS,
        latents=noise,
        output_type=output_type,
    ).images


def test_embeddings_equal_encode_prompt(checkpoint):
    pipe, policy = official(checkpoint), policy_for(checkpoint)
    with torch.no_grad():
        ref, _, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False)
    ours = policy.text_encoder.encode([PROMPT])[0]
    d, dp = diff(ours.embeds, ref[0]), diff(ours.pooled, pooled[0])
    print(f"sd3 embeddings: {ref.shape[1]} tokens, max abs diff {d:.2e}; pooled {dp:.2e}")
    assert ours.embeds.shape == ref[0].shape and d == 0.0 and dp == 0.0


@pytest.mark.parametrize("scale", [1.0, 4.5])
def test_sampling_equals_the_pipeline(checkpoint, scale):
    pipe, policy = official(checkpoint), policy_for(checkpoint)
    noise = torch.randn(1, *policy.latent_shape(), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = pipeline_out(pipe, noise, scale)
        ours = policy.sample_latents([PROMPT], noise, STEPS, guidance_scale=scale)
        img = pipeline_out(pipe, noise, scale, output_type="pt")
    d, di = diff(ours, ref), diff(policy.decode(ours), img)
    print(f"sd3 sampling, guidance_scale {scale}: latents max abs diff {d:.2e}, decoded images {di:.2e}")
    assert d <= 1e-4 and di <= 1e-4
    if scale > 1:  # the comparison can see a wrong guidance formula (guidance on the conditional side only)
        with torch.no_grad():
            wrong = policy.sample_latents([PROMPT], noise, STEPS, guidance_scale=scale - 1.0)
        assert diff(wrong, ref) > 1e-3


def test_exported_lora_reproduces_the_trained_policy_in_the_pipeline(tmp_path, checkpoint, monkeypatch):
    monkeypatch.delenv("FIRM_RUN_DIR", raising=False)
    policy, lora_dir = hub.trained_policy(
        str(experiments_root() / "rl/tiny_sd3_nft.yaml"),
        checkpoint,
        tmp_path,
        [
            f"module.policy.resolution={RES}",
            "module.lr=0.01",
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
        base = pipeline_out(pipe, noise, 4.5)
        ours = policy.sample_latents([PROMPT], noise, STEPS, guidance_scale=4.5)
        pipe.load_lora_weights(str(lora_dir))
        theirs = pipeline_out(pipe, noise, 4.5)
    d, effect = diff(ours, theirs), diff(theirs, base)
    print(f"sd3 LoRA round trip (CFG 4.5): max abs diff {d:.2e}; the adapter moves the output by {effect:.2e}")
    assert d <= 1e-4 and effect > 1e-3
