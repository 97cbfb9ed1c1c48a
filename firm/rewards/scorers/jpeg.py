"""JPEG compressibility: the size of the image as a quality-95 JPEG (the compressibility reward of DDPO / Flow-GRPO).

Flow-GRPO's ``jpeg_incompressibility`` (flow_grpo/rewards.py, yifan123/flow_grpo@ac4c86e) saves each image as a JPEG
at quality 95 and reads its size in kB (bytes / 1000); ``jpeg_compressibility`` rewards ``-size / 500``. Outputs:
``jpeg_compressibility`` (primary) and ``jpeg_kb``. No model: the smallest complete scorer, and the example of
docs/rewards.md ("Adding a scorer").
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch

from firm.rewards.scorers.base import Scorer, ScorerConfig, Scores, request_image


class JPEGCompressibilityScorer(Scorer):
    """``-kB / 500`` of each image saved as a quality-95 JPEG (registry name ``jpeg_compressibility``)."""

    @dataclass
    class Config(ScorerConfig):
        name: str = "jpeg_compressibility"
        quality: int = 95  # JPEG quality (Flow-GRPO: 95)

    outputs = ("jpeg_compressibility", "jpeg_kb")
    tasks = ("gen", "edit")  # an edit is scored on its edited image

    def score_batch(self, requests: list) -> Scores:
        kb = []
        for r in requests:
            buf = io.BytesIO()
            request_image(r).convert("RGB").save(buf, format="JPEG", quality=self.config.quality)
            kb.append(buf.tell() / 1000)
        kb_t = torch.tensor(kb, dtype=torch.float32)
        return Scores({"jpeg_compressibility": -kb_t / 500, "jpeg_kb": kb_t})
