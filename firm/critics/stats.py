"""A deterministic critic that scores images from pixel statistics: no model, no network, varied scores.

Random tiny policies make nearly grey images, which a rule critic of the shapes world scores 1 every time, so every
reward and every advantage is 0 and a smoke run never trains. This critic amplifies small differences instead, so
tiny runs (``experiments/rl/tiny_*.yaml``) and the RL tests see real, varied rewards and nonzero advantages:

* generation: Instruction = how red the image is, Quality = how close its mean brightness is to mid-grey;
* editing: Execution and Consistency = fractional parts of the amplified mean change from the source.

Each maps to an integer 1..5. It judges nothing real: it is a learning signal for plumbing, nothing more.
``missing_frac`` makes that fraction of requests (chosen by a hash of the image, so reproducible) come back with
every score missing, as an unparseable critic answer would; ``fail`` / ``fail_first`` simulate a dead or flaky
endpoint.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from firm.critics.types import (
    CONSISTENCY,
    EXECUTION,
    INSTRUCTION,
    QUALITY,
    CriticResult,
    EditRequest,
    ErrorKind,
    GenRequest,
)


def _arr(image, size=None) -> np.ndarray:
    if size is not None and image.size != size:
        image = image.resize(size)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _score(x: float) -> int:
    return int(1 + round(4 * min(max(x, 0.0), 1.0)))


class ImageStatsCritic:
    """Pixel-statistics critic (registry name ``image_stats``); see the module docstring."""

    @dataclass
    class Config:
        name: str = "image_stats"
        missing_frac: float = 0.0  # fraction of requests whose scores are all missing (by image hash)
        fail: bool = False  # raise on every call (a dead endpoint)
        fail_first: int = 0  # raise on the first N calls only (a flaky endpoint)

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()
        self.calls = 0

    def _missing(self, image) -> bool:
        if self.config.missing_frac <= 0:
            return False
        h = int.from_bytes(hashlib.sha1(image.tobytes()).digest()[:4], "little")
        return (h % 1000) < self.config.missing_frac * 1000

    def score(self, requests):
        self.calls += 1
        if self.config.fail or self.calls <= self.config.fail_first:
            raise ConnectionError("test critic: endpoint unreachable")
        out = []
        for r in requests:
            if isinstance(r, EditRequest):
                img = r.edited
                a, s = _arr(r.edited), _arr(r.source, r.edited.size)
                diff = float(np.abs(a - s).mean())
                # fractional parts of the amplified change: deterministic, and different for nearly equal images
                scores = {EXECUTION: _score((diff * 97.0) % 1.0), CONSISTENCY: _score((diff * 61.0 + 0.5) % 1.0)}
            elif isinstance(r, GenRequest):
                img = r.image
                a = _arr(r.image)
                red = 0.5 + 20 * float(a[..., 0].mean() - a.mean())  # amplified: tiny random images differ a little
                quality = 1 - 20 * abs(float(a.mean()) - 0.5)
                scores = {INSTRUCTION: _score(red), QUALITY: _score(quality)}
            else:
                raise TypeError(f"unknown request {type(r).__name__}")
            scores = {k: v for k, v in scores.items() if k in r.dimensions}
            if self._missing(img):
                why = "simulated unparseable output"
                out.append(CriticResult.failed(scores, ErrorKind.UNPARSEABLE, why, key=r.key))
            else:
                out.append(CriticResult(scores=scores, key=r.key))
        return out
