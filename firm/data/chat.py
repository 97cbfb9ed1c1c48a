"""Chat encoding shared by critic training and inference: neutral chat messages -> token ids + image tensors.

One implementation for both sides, so that a prompt the critic is trained on (:mod:`firm.critics.sft_data`) and
the same prompt at inference (:mod:`firm.critics.local`) become the very same tokens:

1. images are prepared the same way (RGB, downscaled to at most ``max_image_pixels`` keeping the aspect ratio);
2. the conversation goes through the checkpoint's chat template with the generation prompt appended;
3. the text and images are encoded by the checkpoint's ``AutoProcessor``, or, when it cannot be built (e.g.
   torchvision, needed by Qwen-VL video processors, is not installed), by its tokenizer and image processor with
   the image placeholders expanded here (one ``<|image_pad|>`` per merged patch) and ``mm_token_type_ids`` (0 text,
   1 image, needed by Qwen-VL's multimodal RoPE) added. Special tokens come from the template only
   (``add_special_tokens=False``).

Messages use the neutral format of the critics: ``[{"role": ..., "content": [{"type": "image", "image": PIL.Image}
| {"type": "text", "text": ...}]}]`` (a plain string content is one text part). This module imports nothing from
``firm``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from firm.images import fit_pixels

log = logging.getLogger(__name__)

DEFAULT_IMAGE_TOKEN = "<|image_pad|>"


def _parts(content: Any) -> list[dict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def prepare_messages(messages: list[dict], max_pixels: int | None = None) -> list[dict]:
    """The same messages with every image prepared by :func:`prepare_image` (text parts unchanged)."""
    return [
        {
            "role": m["role"],
            "content": [
                {"type": "image", "image": fit_pixels(p["image"], max_pixels)} if p["type"] == "image" else p
                for p in _parts(m["content"])
            ],
        }
        for m in messages
    ]


def split_images(messages: list[dict], max_pixels: int | None = None) -> tuple[list[dict], list[Image.Image]]:
    """Neutral messages -> (messages with ``{"type": "image"}`` placeholders for the chat template, the prepared
    images in order)."""
    out, images = [], []
    for m in messages:
        parts = []
        for c in _parts(m["content"]):
            if c["type"] == "image":
                images.append(fit_pixels(c["image"], max_pixels))
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": c["text"]})
        out.append({"role": m["role"], "content": parts})
    return out, images


class ChatProcessor:
    """A vision-language checkpoint's chat template, tokenizer and image processor.

    Args:
        path: checkpoint directory (``save_pretrained`` layout: tokenizer with chat template, image processor).
        max_image_pixels: downscale larger images (keeping the aspect ratio) before encoding.

    Attributes:
        processor: the ``AutoProcessor``, or None when the tokenizer and image processor are used separately.
        tokenizer, image_processor, image_token, eos_token.
    """

    def __init__(self, path: str | Path, max_image_pixels: int | None = None) -> None:
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

        self.path = str(path)
        self.max_image_pixels = max_image_pixels
        self.processor: Any = None
        try:
            proc = AutoProcessor.from_pretrained(path)
            if hasattr(proc, "image_processor") and hasattr(proc, "tokenizer"):
                self.processor = proc
        except (ImportError, ValueError, OSError, TypeError, AttributeError, KeyError) as e:
            log.info("AutoProcessor unavailable for %s (%s); using tokenizer + image processor", path, e)
        if self.processor is not None:
            self.tokenizer = self.processor.tokenizer
            self.image_processor = self.processor.image_processor
            self._template_owner: Any = self.processor
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.image_processor = AutoImageProcessor.from_pretrained(path)
            self._template_owner = self.tokenizer
        if not getattr(self._template_owner, "chat_template", None):
            raise ValueError(f"{path}: no chat template found (expected chat_template.jinja or one in the tokenizer)")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.image_token = getattr(self.tokenizer, "image_token", None) or DEFAULT_IMAGE_TOKEN
        self.eos_token = self.tokenizer.eos_token

    def split(self, messages: list[dict]) -> tuple[list[dict], list[Image.Image]]:
        """:func:`split_images` with this processor's ``max_image_pixels``."""
        return split_images(messages, self.max_image_pixels)

    def render(self, template_messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The chat template's text of messages already split by :meth:`split` (image placeholders, no images)."""
        return self._template_owner.apply_chat_template(
            template_messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def prompt(self, messages: list[dict]) -> tuple[str, list[Image.Image]]:
        """(prompt text with the generation prompt, prepared images) of one conversation."""
        msgs, images = self.split(messages)
        return self.render(msgs), images

    def encode(self, texts: list[str], images: list[Image.Image], *, padding: bool = False) -> dict[str, torch.Tensor]:
        """Token ids (B, T), attention mask, image tensors (and ``mm_token_type_ids`` without a processor) of
        rendered ``texts`` whose image placeholders take ``images`` in order."""
        if self.processor is not None:
            enc = self.processor(
                text=texts, images=images or None, padding=padding, return_tensors="pt", add_special_tokens=False
            )
            return dict(enc)
        feats: dict[str, torch.Tensor] = {}
        if images:
            feats = dict(self.image_processor(images=images, return_tensors="pt"))
            merge = getattr(self.image_processor, "merge_size", 1) ** 2
            counts = (feats["image_grid_thw"].prod(-1) // merge).tolist()  # placeholder tokens per image
            k, expanded = 0, []
            for t in texts:
                pieces = t.split(self.image_token)
                s = pieces[0]
                for p in pieces[1:]:
                    if k >= len(counts):
                        raise ValueError(f"the chat template wrote more image placeholders than {len(images)} images")
                    s += self.image_token * counts[k] + p
                    k += 1
                expanded.append(s)
            if k != len(images):
                raise ValueError(f"the chat template wrote {k} image placeholders for {len(images)} images")
            texts = expanded
        enc = dict(self.tokenizer(texts, padding=padding, return_tensors="pt", add_special_tokens=False))
        if images:  # modality of each token (0 text, 1 image), needed by Qwen-VL's multimodal RoPE
            image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
            enc["mm_token_type_ids"] = (enc["input_ids"] == image_id).long()
        return {**enc, **feats}


class ChatEncoder(ChatProcessor):
    """Inference: batches of conversations -> left-padded model inputs (generation appends on the right)."""

    def __init__(self, path: str | Path, max_image_pixels: int | None = None) -> None:
        super().__init__(path, max_image_pixels)
        self.tokenizer.padding_side = "left"

    def texts(self, conversations: Sequence[list[dict]]) -> tuple[list[str], list[Image.Image]]:
        """(prompt texts, all prepared images in order) of the conversations."""
        texts, images = [], []
        for conv in conversations:
            text, ims = self.prompt(conv)
            texts.append(text)
            images.extend(ims)
        return texts, images

    def __call__(self, conversations: Sequence[list[dict]]) -> dict[str, torch.Tensor]:
        texts, images = self.texts(conversations)
        return self.encode(texts, images, padding=True)
