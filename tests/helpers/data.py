"""Synthetic samples for data tests: small random images, deterministic per key."""

from __future__ import annotations

import numpy as np
from PIL import Image


def random_image(seed: int, size: int = 16, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (size, size + 3, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)


def edit_sample(i: int, size: int = 16) -> dict:
    return {
        "key": f"edit-{i:05d}",
        "source": random_image(2 * i, size),
        "edited": random_image(2 * i + 1, size),
        "instruction": f"turn shape {i} into a ünïcode star ★",
        "difference_report": {"obvious": [f"shape {i} changed"], "detailed": {"quantity": ["one more star"]}},
        "execution": 1 + i % 5,
        "execution_reasoning": "the star is there",
        "consistency": None if i % 7 == 0 else 1 + (i // 5) % 5,
        "consistency_reasoning": None,
        "provenance": {"source": "test", "index": i, "ratio": 0.25},
    }


def generation_sample(i: int, size: int = 16) -> dict:
    return {
        "key": f"gen-{i:05d}",
        "image": random_image(1000 + i, size, "RGBA" if i % 2 else "RGB"),
        "prompt": f"a red circle number {i}",
        "checklist": [
            {"category": "main_subject", "text": "a circle"},
            {"category": "negative_constraints", "text": "no squares"},
        ],
        "instruction": 1 + i % 5,
        "instruction_reasoning": "1. circle: yes\n2. no squares: yes",
        "quality": 3,  # min of the aspects
        "quality_aspects": {"aesthetics": 4, "technical": 3, "structure": 5},
        "quality_reasoning": "fine",
        "provenance": {"generator": "test"},
    }


def rl_prompt_sample(i: int, size: int = 16) -> dict:
    edit = i % 2 == 0
    return {
        "key": f"prompt-{i:05d}",
        "prompt": f"prompt {i}",
        "task": "edit" if edit else "generation",
        "source": random_image(5000 + i, size) if edit else None,
        "checklist": None if edit else [f"object {i} is present", "there is nothing else"],
        "meta": {"i": i},
    }


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)
