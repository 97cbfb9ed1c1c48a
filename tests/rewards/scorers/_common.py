"""Test code the scorer tests share: the CLIP scorers' (PickScore, CLIP score) and the Qwen-VL reward models'
(HPSv3, EditReward).

The transcriptions of official code here are references: they call transformers and torch, never FIRM's scorers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from firm.critics.types import EditRequest, GenRequest
from firm.rewards.tiny import clip as tiny_clip

# --- CLIP scorers -------------------------------------------------------------------------------------------------


def clip_requests(n: int, seed: int, edited: int, instruction: str) -> list:
    """``n`` generation requests (tiny CLIP's sample images and prompts), then one edit whose edited image is the
    ``edited``-th image (an edit is scored on its edited image against its instruction)."""
    images = tiny_clip.sample_images(n, seed=seed)
    reqs = [GenRequest(image=im, prompt=p) for im, p in zip(images, tiny_clip.PROMPTS)]
    reqs.append(EditRequest(source=images[0], edited=images[edited], instruction=instruction))
    return reqs


# Deliberately wrong CLIP image preprocessing, as image-processor overrides.
wrong_clip_preprocessing = pytest.mark.parametrize(
    "wrong",
    [
        {"resample": 2},  # bilinear instead of bicubic
        {"size": {"height": tiny_clip.IMAGE_SIZE, "width": tiny_clip.IMAGE_SIZE}},  # squash, no centre crop
        {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},  # ImageNet's normalisation
    ],
    ids=["bilinear", "no-crop", "imagenet-norm"],
)


def scores_with_image_processor(scorer, processor_dir, requests, output: str, wrong: dict) -> torch.Tensor:
    """``scorer``'s ``output`` on ``requests`` with its image processor swapped for the PIL one of ``processor_dir``
    with the ``wrong`` overrides (put back afterwards)."""
    from transformers import AutoImageProcessor, CLIPProcessor

    right = scorer.processor
    bad = AutoImageProcessor.from_pretrained(processor_dir, backend="pil", **wrong)
    try:
        scorer.processor = CLIPProcessor(image_processor=bad, tokenizer=right.tokenizer)
        return scorer(requests).values[output]
    finally:
        scorer.processor = right


# --- Qwen-VL reward models (HPSv3, EditReward) ----------------------------------------------------------------------


def noise_image(seed: int, size: tuple[int, int] = (56, 56)) -> Image.Image:
    """A uniform-noise RGB image of ``size`` = (width, height)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def official_head(hidden: int) -> nn.Sequential:
    """The ranknet head without rm_head_kwargs, output_dim 2: hpsv3/model/qwen2vl_trainer.py (MizzenAI/HPSv3) and
    EditReward/model/qwen2_5_vl_trainer.py (TIGER-AI-Lab/EditReward, one per head)."""
    return nn.Sequential(
        nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 2)
    )


def official_fetch_image(image: Image.Image, pixels: int, resample=Image.BICUBIC, factor: int = 28) -> Image.Image:
    """qwen-vl-utils' ``fetch_image`` for a PIL image with min_pixels = max_pixels = ``pixels`` (copied into both
    repositories' ``dataset/utils.py``): RGB, then ``smart_resize`` (sides multiples of ``factor``, the area brought
    into the bounds, floor when shrinking, ceil when growing) and a PIL resize."""
    image = image.convert("RGB")
    w, h = image.size
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > pixels:
        beta = math.sqrt(h * w / pixels)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < pixels:
        beta = math.sqrt(pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return image.resize((wb, hb), resample)


def official_load(model_class, base, vocab_size: int, state: dict, make_heads, prefix: str):
    """Both repositories' ``create_model_and_processor`` + checkpoint load: the backbone from ``base``, embeddings
    resized to the tokenizer with ``<|Reward|>``, the heads ``make_heads(hidden size)``, then the whole state dict,
    ``strict=True`` (the heads' entries under ``prefix``). Returns (model, heads) in eval mode."""
    model = model_class.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa")
    model.resize_token_embeddings(vocab_size)
    heads = make_heads(model.config.text_config.hidden_size)
    heads.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(prefix)}, strict=True)
    return model.eval(), heads.eval()


def official_inputs_embeds(model, input_ids, pixel_values, grid_thw) -> torch.Tensor:
    """The reward models' forward before the language model: the token embeddings with the vision tower's merged
    patches scattered into the image-pad slots."""
    embeds = model.get_input_embeddings()(input_ids)
    image_embeds = model.model.visual(pixel_values.type(model.model.visual.dtype), grid_thw=grid_thw).pooler_output
    slots = (input_ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(slots, image_embeds.to(embeds.dtype))


def official_pool(logits, input_ids, special_ids) -> torch.Tensor:
    """``_pool_logits`` with ``reward_token="special"``: the head outputs (B, L, 2) at the special token, (B, 2)."""
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for sid in special_ids:
        special |= input_ids == sid
    return logits[special, ...].view(input_ids.shape[0], -1)
