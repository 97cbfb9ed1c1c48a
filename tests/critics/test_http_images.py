"""Image encoding of the HTTP client: each conversation carries its own images."""

from __future__ import annotations

import numpy as np
from PIL import Image

from firm.critics.http import to_openai_messages
from firm.data.chat import prepare_messages


def test_a_shared_encoding_cache_never_hands_out_another_images_url():
    # HTTPCritic.complete prepares each conversation (here: RGBA -> RGB copies) and encodes it with one cache; the
    # prepared copies are freed one conversation at a time, so an id() can be reused by the next copy.
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (4, 4, 4), dtype=np.uint8), "RGBA") for _ in range(200)]
    convs = [
        [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": "?"}]}] for im in images
    ]
    cache: dict = {}
    urls = [
        to_openai_messages(prepare_messages(c, None), "png", 95, cache)[0]["content"][0]["image_url"]["url"]
        for c in convs
    ]
    assert len(set(urls)) == len(images)
