"""Qwen-Image-Edit, -2509 and -2511, pinned to diffusers' ``QwenImageEditPlusPipeline`` (2509 and 2511, one or several
source images) and ``QwenImageEditPipeline`` (the first release), chosen by the checkpoint's ``model_index.json``.

2511 is 2509's layout and pipeline with one transformer option, ``zero_cond_t: true`` in ``transformer/config.json``
(diffusers #12839, read since diffusers 0.37): the transformer then modulates the source images' tokens with timestep 0
and the target's with the step's. It finds the target by the first ``img_shapes`` entry of each row, which is how
:func:`~firm.policies.families.qwen_image.qwen_forward` lays the tokens out for every checkpoint, so the family loads
2511 unchanged (tests/policies/test_qwen_edit_2511.py).

What the pipelines do, and so what this family does:

* Source images for the VAE: each resized (lanczos, ``VaeImageProcessor``) to about 1024 x 1024 pixels of area with
  its aspect ratio kept (sides rounded to multiples of 32; ``policy.condition_area`` changes the area; tiny models
  built with ``pretrained: null`` or on pixel latents default to the output's area), encoded
  (the distribution's mode), normalised per channel, packed and appended to the target tokens; each source image
  adds its own (frame, h, w) entry to the RoPE shapes.
* Prompt: Qwen2.5-VL's last hidden states over the edit template with the first 64 tokens dropped. 2509 shows the
  VL encoder each source image at about 384 x 384 pixels of area, announced as ``Picture i:``; the first release
  shows it the 1024 x 1024-area image itself, inline.
* Guidance: true CFG with the per-token norm rescale (:func:`~firm.policies.families.qwen_image.true_cfg`); the
  negative prompt is encoded with the same source images.

FIRM's tiny CPU editors (the shapes world) may instead take the source along the channels (``tiny.source_conditioning:
channels``: the transformer has twice the input width); the source is then encoded at the output size. No diffusers
pipeline has this mode; it exists so that a tiny editor can learn to copy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from firm.images import to_tensor
from firm.policies.encoders import Conditioning, PromptEmbedding
from firm.policies.families.base import PixelCodec, fit_area, rows_as_lists, vae_preprocess
from firm.policies.families.qwen_image import QwenImage, masked_rows, qwen_forward
from firm.vocab import Task

log = logging.getLogger(__name__)

# The edit pipelines' prompt template; its first 64 tokens are dropped from the hidden states.
QWEN_EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
QWEN_EDIT_DROP_TOKENS = 64
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
PLUS_CONDITION_AREA = 384 * 384  # 2509: pixels of each source image shown to the VL encoder
VAE_AREA = 1024 * 1024  # pixels of each source image given to the VAE (both pipelines)
PLUS, CLASSIC = "QwenImageEditPlusPipeline", "QwenImageEditPipeline"


class QwenImageEdit(QwenImage):
    name = "qwen_image_edit"
    task = Task.EDIT
    pipeline = PLUS
    lora_loader = "QwenImageLoraLoaderMixin"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.channel_conditioning = config.tiny.source_conditioning == "channels"

    def load_text_encoder(self, root: Path, transformer: nn.Module, dtype: torch.dtype) -> nn.Module:
        return QwenEditTextEncoder.from_pretrained(str(root), dtype=dtype, variant=pipeline_variant(root))

    def transformer_in_channels(self, codec_channels: int) -> tuple[int, ...]:
        return (4 * codec_channels, 8 * codec_channels)

    def check(self, components: dict[str, Any]) -> None:
        super().check(components)
        width = components["transformer"].config.in_channels
        self.channel_conditioning = width == 8 * components["codec"].channels  # the source rides along the channels

    def tiny_transformer(self, latent_size: int, channels: int, in_factor: int = 1) -> nn.Module:
        mode = self.config.tiny.source_conditioning
        if mode not in ("sequence", "channels"):
            raise ValueError(f"tiny.source_conditioning must be sequence or channels, got {mode!r}")
        return super().tiny_transformer(latent_size, channels, in_factor=2 if mode == "channels" else 1)

    def encode_sources(self, codec: nn.Module, images: list[Any], device: torch.device) -> tuple[torch.Tensor, ...]:
        """One (B, C, h_i, w_i) latent per source image position (rows must agree on the number and sizes)."""
        rows = rows_as_lists(images)
        if self.channel_conditioning:
            if any(len(r) != 1 for r in rows):
                raise ValueError("a channel-conditioned editor takes exactly one source image per prompt")
            return (codec.encode(to_tensor([r[0] for r in rows], self.config.resolution).to(device)).float(),)
        c = self.config
        # null: the pipeline's 1024^2 for a checkpoint with a real VAE; tiny models (built with pretrained: null, or
        # pixel latents, which no pipeline runs) take the output's area, or a 32 px source would be a million tokens
        tiny = c.pretrained is None or isinstance(codec, PixelCodec)
        area = c.condition_area or (c.resolution**2 if tiny else VAE_AREA)
        if len({len(r) for r in rows}) != 1:
            raise ValueError(
                f"every prompt of a batch needs the same number of source images, got {[len(r) for r in rows]}"
            )
        out = []
        for k in range(len(rows[0])):
            sizes = [fit_area(*r[k].size, area) for r in rows]
            if len(set(sizes)) != 1:
                raise ValueError(
                    f"source image {k + 1} resizes to different sizes across the batch {sorted(set(sizes))} "
                    "(different aspect ratios); batch prompts whose source images share an aspect ratio, or set "
                    "policy.condition_area and pre-crop the sources"
                )
            w, h = sizes[0]
            pixels = vae_preprocess([r[k] for r in rows], w, h).to(device)  # (B, 3, h, w) in [0, 1]
            out.append(codec.encode(pixels).float())
        return tuple(out)

    def forward(self, transformer: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        src = cond.image_latents
        sources = () if src is None else (tuple(src) if isinstance(src, (tuple, list)) else (src,))
        if transformer.config.in_channels == 2 * 4 * x.shape[1]:
            # Channel conditioning (tiny CPU editors): each target token carries the source token of the same place.
            if len(sources) != 1:
                raise ValueError("this editing transformer takes one source image along channels: give image_latents")
            return qwen_forward(transformer, torch.cat([x, sources[0].to(x.dtype)], dim=1), sigma, cond, ())
        return qwen_forward(transformer, x, sigma, cond, sources)


def pipeline_variant(root: Path) -> str:
    """Which edit pipeline a checkpoint declares (``model_index.json``'s ``_class_name``); 2509's by default."""
    index = root / "model_index.json"
    if index.is_file():
        try:
            name = json.loads(index.read_text()).get("_class_name")
        except (OSError, ValueError):
            name = None
        if name in (PLUS, CLASSIC):
            return name
    return PLUS


def load_qwen_vl_processor(path: str, subfolder: str = "processor") -> Any:
    """The checkpoint's Qwen2.5-VL processor; without torchvision (which its video processor needs), the same
    processor assembled from the saved tokenizer and image processor, with no video processor."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, subfolder=subfolder)
    except ImportError as e:
        log.info("AutoProcessor of %s/%s unavailable (%s); building it without a video processor", path, subfolder, e)
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
        """Qwen2.5-VL's processor without a video processor (images and text only, the same outputs)."""

        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    image_processor = AutoImageProcessor.from_pretrained(path, subfolder=subfolder)
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder=subfolder)
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)


class QwenEditTextEncoder(nn.Module):
    """Qwen2.5-VL over the edit instruction and its source images (subfolders ``text_encoder`` and ``processor``)."""

    def __init__(self, model: nn.Module, processor: Any, *, variant: str = PLUS) -> None:
        super().__init__()
        if variant not in (PLUS, CLASSIC):
            raise ValueError(f"variant must be {PLUS} or {CLASSIC}, got {variant!r}")
        self.model = model
        self.processor = processor
        self.variant = variant

    @classmethod
    def from_pretrained(
        cls, path: str, *, dtype: torch.dtype = torch.float32, variant: str = PLUS
    ) -> QwenEditTextEncoder:
        from transformers import Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        return cls(model, load_qwen_vl_processor(path), variant=variant)

    def condition_images(self, images: list[Any]) -> list[Any]:
        """The source images as the pipeline shows them to the VL encoder (lanczos, aspect ratio kept)."""
        from diffusers.image_processor import VaeImageProcessor

        area = PLUS_CONDITION_AREA if self.variant == PLUS else VAE_AREA
        resize = VaeImageProcessor().resize
        out = []
        for im in images:
            w, h = fit_area(*im.size, area)
            out.append(resize(im.convert("RGB"), h, w))
        return out

    def text(self, prompt: str, n_images: int) -> str:
        if self.variant == PLUS:
            return QWEN_EDIT_TEMPLATE.format("".join(f"Picture {i + 1}: {VISION}" for i in range(n_images)) + prompt)
        return QWEN_EDIT_TEMPLATE.format(VISION * n_images + prompt)

    @torch.no_grad()
    def encode(self, prompts: list[str], images: list[Any] | None = None) -> list[PromptEmbedding]:
        out = []
        rows = rows_as_lists(images) if images is not None else [[] for _ in prompts]
        for prompt, row in zip(prompts, rows):  # one at a time: each prompt has its own images and sizes
            kwargs: dict[str, Any] = {"text": [self.text(prompt, len(row))], "padding": True, "return_tensors": "pt"}
            if row:
                kwargs["images"] = self.condition_images(row)
            inputs = self.processor(**kwargs).to(self.model.device)
            hidden = self.model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                pixel_values=inputs.get("pixel_values"),
                image_grid_thw=inputs.get("image_grid_thw"),
                output_hidden_states=True,
            ).hidden_states[-1]  # (1, L, D)
            states = masked_rows(hidden, inputs["attention_mask"], QWEN_EDIT_DROP_TOKENS)[0]
            out.append(PromptEmbedding(states, torch.ones(states.shape[0], dtype=torch.long, device=states.device)))
        return out
