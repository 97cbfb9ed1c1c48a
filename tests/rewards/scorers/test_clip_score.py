"""CLIP score scorer: parity with torchmetrics 1.9's clip_score, on a tiny random CLIP checkpoint.

Two references on the same checkpoint and inputs:

* torchmetrics' public ``torchmetrics.functional.multimodal.clip_score`` called on each (image, text) pair alone,
  with the model and processor loaded as torchmetrics loads an ``openai/...`` name (``CLIPModel`` /
  ``CLIPProcessor.from_pretrained``), passed as its ``(model, processor)`` callable;
* its formula transcribed from torchmetrics' ``functional/multimodal/clip_score.py`` (``_get_features`` and
  ``_clip_score_update``: text processed with ``padding=True`` and no truncation, embeddings divided by their L2 norm,
  ``100 * (image * text).sum(-1)``, then ``max(score, 0)``).
"""

from __future__ import annotations

import math

import pytest
import torch

from firm.critics.types import EditRequest, GenRequest
from firm.rewards.scorers.base import build_scorer
from firm.rewards.tiny import clip as tiny_clip
from tests.rewards.scorers._common import clip_requests, scores_with_image_processor, wrong_clip_preprocessing

ATOL = 1e-4  # on the 0..100 scale (float32: batch of pairs vs one pair at a time)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # Seed 4: among the test pairs some cosines are positive and some negative, so both sides of the clamp are seen.
    return tiny_clip.build(tmp_path_factory.mktemp("clip_score"), seed=4)


@pytest.fixture(scope="module")
def scorer(ckpt):
    return build_scorer({"name": "clip_score", "model": str(ckpt.model)})


@pytest.fixture(scope="module")
def requests_():
    return clip_requests(6, seed=4, edited=2, instruction="add a dog")


def pairs(requests):
    return [(r.edited, r.instruction) if isinstance(r, EditRequest) else (r.image, r.prompt) for r in requests]


def formula(ckpt, requests) -> tuple[torch.Tensor, torch.Tensor]:
    """torchmetrics' CLIP score written out: (clamped scores, raw 100 * cosines)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(ckpt.model).eval()
    processor = CLIPProcessor.from_pretrained(ckpt.model, backend="pil")
    images, texts = zip(*pairs(requests))
    with torch.no_grad():
        img = model.get_image_features(**processor(images=list(images), return_tensors="pt")).pooler_output
        txt = model.get_text_features(**processor(text=list(texts), padding=True, return_tensors="pt")).pooler_output
    raw = 100 * ((img / img.norm(p=2, dim=-1, keepdim=True)) * (txt / txt.norm(p=2, dim=-1, keepdim=True))).sum(-1)
    return torch.clamp(raw, min=0), raw


def test_matches_torchmetrics_clip_score_per_pair(scorer, ckpt, requests_):
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPModel, CLIPProcessor

    from firm.rewards.scorers.clip_score import ClipFeatures, uint8_chw

    # torchmetrics 1.9 cannot use transformers 5's CLIPModel as is (see clip_score.py): ClipFeatures adapts it.
    model = ClipFeatures(CLIPModel.from_pretrained(ckpt.model).eval())
    processor = CLIPProcessor.from_pretrained(ckpt.model)
    want = torch.stack([clip_score(uint8_chw(im), text, lambda: (model, processor)) for im, text in pairs(requests_)])
    out = scorer(requests_)
    assert scorer.outputs == ("clip_score",) and out.errors == [None] * len(requests_)
    torch.testing.assert_close(out.values["clip_score"], want.detach().float(), rtol=0, atol=ATOL)


def test_matches_the_formula_and_clamps_at_zero(scorer, ckpt, requests_):
    want, raw = formula(ckpt, requests_)
    got = scorer(requests_).values["clip_score"]
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    assert (raw < 0).any() and (raw > 1).sum() >= 3  # both sides of max(., 0) are exercised
    assert (got[raw < 0] == 0).all()
    assert got[raw > 0].unique().numel() == int((raw > 0).sum())  # per pair, not a batch mean


@wrong_clip_preprocessing
def test_wrong_preprocessing_is_seen(scorer, ckpt, requests_, wrong):
    moved = scores_with_image_processor(scorer, ckpt.model, requests_, "clip_score", wrong)
    assert (moved - scorer(requests_).values["clip_score"]).abs().max() > 100 * ATOL


def test_pil_backend_and_bad_requests(scorer, requests_):
    from transformers.image_processing_backends import PilBackend

    assert isinstance(scorer.processor.image_processor, PilBackend)
    good = requests_[:3]
    mixed = [good[0], GenRequest(image="photo.png", prompt="a cat"), good[1], good[2]]
    out = scorer(mixed)
    v = out.values["clip_score"]
    assert math.isnan(v[1]) and "not a PIL image" in out.errors[1]
    assert [out.errors[i] for i in (0, 2, 3)] == [None] * 3
    torch.testing.assert_close(v[[0, 2, 3]], scorer(good).values["clip_score"], rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="set model"):
        build_scorer({"name": "clip_score"})
