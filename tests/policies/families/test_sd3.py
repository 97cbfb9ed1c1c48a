"""SD3 / SD3.5 against diffusers' ``StableDiffusion3Pipeline``.

The tiny checkpoint (two CLIPs with projections, T5, SD3 transformer, AutoencoderKL, the scheduler) has the hub's
layout and ``model_index.json``; its tokenizers are word-level ``PreTrainedTokenizerFast`` stand-ins (a CLIP BPE
vocabulary cannot be built offline), declared as such, so that FIRM's ``AutoTokenizer`` and the pipeline load the
same tokenizer. The checks (embeddings, sampling, the LoRA round trip) are the family contract's
(tests/policies/test_family_contract.py), on the functions at the end of this file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from firm.paths import experiments_root
from firm.policies.policy import FlowPolicy, LoRAConfig, PolicyConfig
from tests.policies.families import hub

RES = 16  # 8x8 latents with the 2x tiny VAE
STEPS = 3
PROMPT = "a red circle at the top"


def build(root: Path, tiny_sd3_checkpoint: Path) -> Path:
    """The hub layout of SD3 around the tiny random components of ``tiny_sd3_checkpoint`` (tests/policies/conftest)."""
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


# What the family contract (tests/policies/test_family_contract.py) calls.


def embeddings(pipe, policy: FlowPolicy) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(FIRM's, the pipeline's) joint CLIP + T5 embeddings and pooled CLIP embeddings of the prompt."""
    ref, _, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False)
    ours = policy.text_encoder.encode([PROMPT])[0]
    return [(ours.embeds, ref[0]), (ours.pooled, pooled[0])]


def reference(pipe, noise: torch.Tensor, scale: float, decode: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pipeline's final latents and (``decode``) images from ``noise`` at guidance ``scale``."""
    return pipeline_out(pipe, noise, scale), pipeline_out(pipe, noise, scale, output_type="pt") if decode else None


def sample(policy: FlowPolicy, noise: torch.Tensor, scale: float) -> torch.Tensor:
    return policy.sample_latents([PROMPT], noise, STEPS, guidance_scale=scale)


def check_sampling(pipe, policy: FlowPolicy, noise: torch.Tensor, scale: float, ref: torch.Tensor, ours) -> None:
    """The comparison can see a wrong guidance formula (guidance on the conditional side only)."""
    if scale > 1:
        wrong = policy.sample_latents([PROMPT], noise, STEPS, guidance_scale=scale - 1.0)
        assert diff(wrong, ref) > 1e-3


def train_lora(checkpoint: Path, tmp_path: Path) -> tuple[FlowPolicy, Path]:
    return hub.trained_policy(
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
