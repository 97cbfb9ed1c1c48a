"""PickScore v1 (Kirstain et al., "Pick-a-Pic", 2023), registry name ``pickscore``.

PickScore is CLIP-H (ViT-H/14) fine-tuned on human preferences between generated images. The score of an image and
its text follows the model card of ``yuvalkirstain/PickScore_v1`` ("How to Get Started with the Model"):

* the processor is ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s (resize the shortest edge to 224 with PIL bicubic,
  centre crop 224, OpenAI CLIP mean / std); text is tokenized with ``padding=True, truncation=True, max_length=77``;
* the image and text embeddings (``get_image_features`` / ``get_text_features``) are L2-normalised;
* score = ``logit_scale.exp() * <text, image>``, for each request's own pair (the entry of the card's
  ``text @ image.T`` for that prompt and image).

A generation is scored against its prompt; an edit, its edited image against the instruction.

The reward scale is the YAML's business, not the scorer's: Flow-GRPO's PickScore reward divides the score by 26
("norm to 0-1"), which is ``scale: 0.0385`` (1/26) here; the scorer always returns the model card's raw score::

    rewards:
      pickscore: {name: pickscore, model: /ckpt/PickScore_v1, processor: /ckpt/CLIP-ViT-H-14-laion2B-s32B-b79K,
                  scale: 0.0385}

The image processor is pinned to transformers' PIL backend, the preprocessing PickScore was published with
(:func:`~firm.rewards.scorers.clip_score.load_clip_processor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from firm.rewards.scorers.base import Scorer, ScorerConfig, Scores, request_image, request_text, resolve_device
from firm.rewards.scorers.clip_score import embedding, load_clip_model, load_clip_processor, split_valid

MAX_TEXT_TOKENS = 77  # the model card's max_length (CLIP's text positions)


class PickScoreScorer(Scorer):
    """PickScore of each request's image and text (registry name ``pickscore``, output ``pickscore``)."""

    @dataclass
    class Config(ScorerConfig):
        name: str = "pickscore"
        model: str = ""  # the yuvalkirstain/PickScore_v1 CLIPModel directory
        processor: str = ""  # the laion/CLIP-ViT-H-14-laion2B-s32B-b79K processor directory ("": the model's)

    outputs = ("pickscore",)
    tasks = ("gen", "edit")

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        if not config.model:
            raise ValueError("scorer 'pickscore': set model: the path of PickScore_v1 (yuvalkirstain/PickScore_v1)")
        self.device = resolve_device(config.device)
        self.processor = load_clip_processor(config.processor or config.model)
        self.model = load_clip_model(config.model, self.device)

    @torch.inference_mode()
    def score_batch(self, requests: list[Any]) -> Scores:
        ok, errors = split_valid(requests)
        values = torch.full((len(requests),), math.nan, dtype=torch.float32)
        if ok:
            images = [request_image(requests[i]) for i in ok]
            texts = [request_text(requests[i]) for i in ok]
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
            tokens = self.processor(
                text=texts, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
            ).to(self.device)
            image_emb = embedding(self.model.get_image_features(pixel_values=pixels))
            text_emb = embedding(
                self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            )
            image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
            text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
            values[ok] = (self.model.logit_scale.exp() * (text_emb * image_emb).sum(-1)).float().cpu()
        return Scores({"pickscore": values}, errors, [None] * len(requests))
