"""A critic whose generation scores spread over 1..5 even for images that differ in the last bits.

The tiny random checkpoints of the family parity tests decode to nearly uniform grey images, which every pixel rule
(including ``image_stats``) scores alike: the advantages are 0 and a 2-step run would not move the adapter. This one
scores the fractional parts of the amplified mean colour, as ``image_stats`` does for edits, so that the short RL runs
of the LoRA round-trip tests really train. Registered as ``spread`` when an experiment names this module in
``imports:``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from firm.critics.stats import ImageStatsCritic
from firm.critics.types import INSTRUCTION, QUALITY, CriticResult, GenRequest
from firm.registry import register


def _score(x: float) -> int:
    return int(1 + round(4 * (x % 1.0)))


class SpreadCritic(ImageStatsCritic):
    @dataclass
    class Config(ImageStatsCritic.Config):
        name: str = "spread"

    def score(self, requests):
        out = []
        for r in requests:
            if not isinstance(r, GenRequest):
                out.extend(super().score([r]))
                continue
            a = np.asarray(r.image.convert("RGB"), dtype=np.float32) / 255.0
            scores = {INSTRUCTION: _score(float(a[..., 0].mean()) * 997.0), QUALITY: _score(float(a.mean()) * 613.0)}
            out.append(CriticResult(scores={k: v for k, v in scores.items() if k in r.dimensions}, key=r.key))
        return out


register("critics", "spread", SpreadCritic, overwrite=True)
