"""The CLIP score of an image and its text, computed by torchmetrics (registry name ``clip_score``).

The value is torchmetrics' ``clip_score`` (torchmetrics 1.9, ``functional/multimodal/clip_score.py``) for one pair:
``100 * max(cos(E_image, E_text), 0)`` with CLIP's projected embeddings, in [0, 100]. torchmetrics defaults to
``openai/clip-vit-large-patch14``; point ``model`` at a local copy of it (or of any ``CLIPModel``)::

    rewards:
      clip: {name: clip_score, model: /ckpt/clip-vit-large-patch14, scale: 0.01}

A generation is scored against its prompt; an edit, its edited image against the instruction.

How torchmetrics is used, and why not through its model-name argument:

* torchmetrics loads a model directory by name only when the path contains ``openai`` (otherwise it raises), so the
  scorer loads the model and processor itself and hands them to torchmetrics.
* With transformers 5, ``CLIPModel.get_image_features`` / ``get_text_features`` return a
  ``BaseModelOutputWithPooling`` (the embedding is its ``pooler_output``); torchmetrics 1.9 calls ``.norm`` on the
  result and fails (``'BaseModelOutputWithPooling' object has no attribute 'norm'``). :class:`ClipFeatures` is a thin
  wrapper whose feature methods return the embedding tensors.
* torchmetrics' public ``clip_score`` returns the batch mean; the RL reward needs one value per request, so the scorer
  calls the per-pair step that ``clip_score`` is built on (``_clip_score_update``) and clamps each value at 0 as
  ``clip_score`` clamps its mean. The test pins this to the public ``clip_score`` called on each pair alone.
* The image processor is pinned to transformers' PIL backend (:func:`load_clip_processor`), the preprocessing CLIP
  scores were published with.

Like torchmetrics, the text is not truncated by the tokenizer: a caption longer than the text model's positions (77)
is cut by torchmetrics, with a warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from firm.rewards.scorers.base import Scorer, ScorerConfig, Scores, request_image, request_text, resolve_device


def load_clip_processor(path: str) -> Any:
    """A ``CLIPProcessor`` from ``path`` whose image processor is transformers' PIL one.

    transformers 5 gives CLIP the torchvision image processor whenever torchvision is installed; its bicubic resize
    differs from PIL's, enough to move scores by percents on small images. CLIP, PickScore and torchmetrics' CLIP
    score were published with the PIL preprocessing, so the backend is requested explicitly and checked."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPProcessor
    from transformers.image_processing_backends import PilBackend

    image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    if not isinstance(image_processor, PilBackend):
        raise RuntimeError(
            f"{path}: the image processor loaded is {type(image_processor).__name__}, not a PIL-backend one"
        )
    return CLIPProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(path))


def load_clip_model(path: str, device: torch.device) -> Any:
    """A ``CLIPModel`` from ``path``, on ``device``, in eval mode, float32."""
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(path, dtype=torch.float32).to(device).eval()


def embedding(features: Any) -> torch.Tensor:
    """The projected embedding from a ``CLIPModel.get_*_features`` result: a tensor in transformers 4, the
    ``pooler_output`` of a ``BaseModelOutputWithPooling`` in transformers 5."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


class ClipFeatures(torch.nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return the projected embedding tensors,
    as torchmetrics 1.9 expects (see the module docstring). Everything else is the wrapped model's."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.clip = model

    @property
    def config(self) -> Any:  # torchmetrics reads text_config.max_position_embeddings
        return self.clip.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return embedding(self.clip.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return embedding(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def image_problem(image: Any) -> str | None:
    """Why ``image`` cannot be scored, or None."""
    if not isinstance(image, Image.Image):
        return f"the image is a {type(image).__name__}, not a PIL image"
    if image.width < 1 or image.height < 1:
        return f"the image is empty ({image.width}x{image.height})"
    return None


def text_problem(text: Any) -> str | None:
    """Why ``text`` cannot be scored, or None."""
    if not isinstance(text, str):
        return f"the text is a {type(text).__name__}, not a string"
    return None


def split_valid(requests: list[Any]) -> tuple[list[int], list[str | None]]:
    """The indices of the requests that can be scored, and per request why not (None where it can)."""
    errors: list[str | None] = []
    for r in requests:
        errors.append(image_problem(request_image(r)) or text_problem(request_text(r)))
    return [i for i, e in enumerate(errors) if e is None], errors


def uint8_chw(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as the (3, H, W) uint8 tensor torchmetrics takes (its processor rescales by 1/255)."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()


class CLIPScoreScorer(Scorer):
    """torchmetrics' CLIP score, one value per request (registry name ``clip_score``, output ``clip_score``)."""

    @dataclass
    class Config(ScorerConfig):
        name: str = "clip_score"
        model: str = ""  # a CLIPModel directory (torchmetrics' default: openai/clip-vit-large-patch14)
        processor: str = ""  # its processor directory ("": the model's)

    outputs = ("clip_score",)
    tasks = ("gen", "edit")

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        if not config.model:
            raise ValueError("scorer 'clip_score': set model: the path of a CLIPModel (e.g. clip-vit-large-patch14)")
        from torchmetrics.functional.multimodal.clip_score import _clip_score_update

        self._update = _clip_score_update
        self.device = resolve_device(config.device)
        self.processor = load_clip_processor(config.processor or config.model)
        self.model = ClipFeatures(load_clip_model(config.model, self.device)).eval()

    @torch.inference_mode()
    def score_batch(self, requests: list[Any]) -> Scores:
        ok, errors = split_valid(requests)
        values = torch.full((len(requests),), math.nan, dtype=torch.float32)
        if ok:
            # torchmetrics runs the model on the images' device: they go there so that the model stays put.
            images = [uint8_chw(request_image(requests[i])).to(self.device) for i in ok]
            texts = [request_text(requests[i]) for i in ok]
            per_pair, _ = self._update(images, texts, self.model, self.processor)
            values[ok] = per_pair.clamp(min=0).float().cpu()  # clip_score's max(score, 0), per pair
        return Scores({"clip_score": values}, errors, [None] * len(requests))
