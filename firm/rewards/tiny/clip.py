"""A tiny random CLIP checkpoint in the hub's layout, for the CLIP-based scorer tests (PickScore, CLIP score).

:func:`build` writes two directories with ``save_pretrained``, as the real checkpoints ship them:

* ``model/``: a :class:`~transformers.CLIPModel` (``config.json`` + ``model.safetensors``) and, as
  ``yuvalkirstain/PickScore_v1`` and ``openai/clip-vit-large-patch14`` do, its processor files beside it;
* ``processor/``: the processor (and the model's ``config.json``), as ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``
  (the processor PickScore's model card loads): tokenizer files and a ``preprocessor_config.json`` in the old
  ``CLIPFeatureExtractor`` format (integer ``size`` = shortest edge, integer ``crop_size``, ``resample`` 3 = bicubic,
  the OpenAI CLIP mean / std).

The tokenizer is CLIP's byte-level BPE over a small vocabulary (the 256 byte symbols, each also with the ``</w>``
word end, merges that spell :data:`WORDS`), with the start / end tokens last, so that, as in CLIP's real vocabulary
(49406 / 49407), the end token has the highest id. Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "car", "on", "the", "make", "sky", "green", "tree", "add")

# OpenAI CLIP's normalisation (transformers.image_utils.OPENAI_CLIP_MEAN / _STD; laion's preprocessor_config.json).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

IMAGE_SIZE = 32  # the tiny vision tower's input (224 for ViT-L/14 and ViT-H/14)


@dataclass
class TinyClip:
    model: Path  # CLIPModel + its processor files (the PickScore_v1 / openai layout)
    processor: Path  # processor files only (the laion layout)


def clip_tokenizer():
    """CLIP's byte-level BPE tokenizer over :data:`WORDS`; the pad token is the end token, as in OpenAI's CLIP."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            parts = [pair[0] + pair[1]] + parts[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = 77
    return tok


def laion_preprocessor_config(size: int = IMAGE_SIZE) -> dict:
    """The image preprocessing of laion/CLIP-ViT-H-14-laion2B-s32B-b79K's ``preprocessor_config.json`` (old
    ``CLIPFeatureExtractor`` keys), at ``size`` pixels instead of 224."""
    return {
        "crop_size": size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
        "size": size,
    }


def build(root: Path, *, seed: int = 0, logit_scale: float | None = None) -> TinyClip:
    """Save a random tiny CLIPModel and its processor under ``root`` (see the module docstring).

    ``logit_scale`` sets the model's learned log temperature (CLIP's initial value ln(1/0.07) by default; PickScore_v1
    has a larger one)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    tok = clip_tokenizer()
    bos, eos = tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(logit_scale)

    root = Path(root)
    out = TinyClip(model=root / "model", processor=root / "processor")
    model.save_pretrained(out.model)
    # The laion repo is a whole model repo: its config.json is what tells AutoProcessor that this is a CLIPProcessor.
    config.save_pretrained(out.processor)
    for d in (out.model, out.processor):
        d.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(d)
        # The hub's old feature-extractor format, written as the file is (save_pretrained would write the new keys).
        (d / "preprocessor_config.json").write_text(json.dumps(laion_preprocessor_config(), indent=2))
    return out


PROMPTS = ("a photo of a cat", "red car", "the blue sky", "dog on the tree", "make the sky green", "add a dog")


def sample_images(n: int = 6, seed: int = 0) -> list:
    """``n`` RGB test images of different, non-square sizes (larger than the model's input, so that the resize and the
    centre crop both matter): colour ramps with noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    images = []
    for i in range(n):
        h, w = 40 + 6 * i, 56 - 4 * i
        y, x = np.mgrid[0:h, 0:w]
        ramps = [x * rng.uniform(2, 8) + y * rng.uniform(1, 5), y * rng.uniform(2, 8), (x - y) * rng.uniform(1, 4)]
        pixels = np.stack(ramps, -1) % 256 + rng.randint(0, 60, (h, w, 3))
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images
