"""PickScore scorer: parity with the PickScore_v1 model card's scoring code, on a tiny random CLIP checkpoint.

The reference (:func:`model_card_scores`) is the "How to Get Started with the Model" snippet of
https://huggingface.co/yuvalkirstain/PickScore_v1 (README.md), transcribed: AutoProcessor from the laion processor
directory, AutoModel from the PickScore directory, the images and the prompt through the processor (padding, truncation,
max_length 77), both embeddings divided by their L2 norm, ``logit_scale.exp() * text_embs @ image_embs.T``. The one
change is transformers 5's: ``get_*_features`` return an output object whose ``pooler_output`` is the embedding.
"""

from __future__ import annotations

import math

import pytest
import torch

from firm.critics.types import EditRequest, GenRequest
from firm.rewards.scorers.base import build_scorer
from firm.rewards.tiny import clip as tiny_clip
from tests.rewards.scorers._common import clip_requests, scores_with_image_processor, wrong_clip_preprocessing

TOL = 1e-5  # relative and absolute


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # A logit scale of ln(100), CLIP's cap (PickScore_v1 is a fine-tuned CLIP-H).
    return tiny_clip.build(tmp_path_factory.mktemp("pickscore"), seed=0, logit_scale=math.log(100.0))


@pytest.fixture(scope="module")
def scorer(ckpt):
    return build_scorer({"name": "pickscore", "model": str(ckpt.model), "processor": str(ckpt.processor)})


@pytest.fixture(scope="module")
def requests_():
    return clip_requests(7, seed=1, edited=6, instruction="make the sky green")


def model_card(processor_dir, model_dir):
    """The model card's loading and its calc_probs up to the softmax: ``scores(prompt, images)``."""
    from transformers import AutoModel, AutoProcessor

    # backend="pil": the card predates transformers' torchvision image processors; its processor is the PIL one.
    processor = AutoProcessor.from_pretrained(processor_dir, backend="pil")
    model = AutoModel.from_pretrained(model_dir).eval()

    def scores(prompt, images) -> torch.Tensor:
        image_inputs = processor(images=images, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            image_embs = model.get_image_features(**image_inputs).pooler_output
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = model.get_text_features(**text_inputs).pooler_output
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            return model.logit_scale.exp() * (text_embs @ image_embs.T)[0]

    return scores


def test_matches_model_card(scorer, ckpt, requests_):
    out = scorer(requests_)
    assert scorer.outputs == ("pickscore",) and out.errors == [None] * len(requests_)
    got = out.values["pickscore"]
    scores = model_card(ckpt.processor, ckpt.model)
    want = torch.stack(
        [
            scores(r.instruction, [r.edited])[0] if isinstance(r, EditRequest) else scores(r.prompt, [r.image])[0]
            for r in requests_
        ]
    )
    # float32: our batch of pairs vs the card's one pair at a time differ by ~1e-6 relative (scores here are ~10).
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
    assert got.unique().numel() == len(requests_)  # one score per pair, not a shared or averaged one


def test_processor_defaults_to_the_model_dir(ckpt, scorer, requests_):
    alone = build_scorer({"name": "pickscore", "model": str(ckpt.model)})
    torch.testing.assert_close(alone(requests_[:3]).values["pickscore"], scorer(requests_[:3]).values["pickscore"])
    with pytest.raises(ValueError, match="set model"):
        build_scorer({"name": "pickscore"})


def test_laion_processor_is_read_as_published_with_the_pil_backend(scorer, ckpt, monkeypatch):
    from transformers.image_processing_backends import PilBackend
    from transformers.image_utils import PILImageResampling
    from transformers.models.auto import image_processing_auto

    from firm.rewards.scorers.clip_score import load_clip_processor

    ip = scorer.processor.image_processor
    assert isinstance(ip, PilBackend) and type(ip).__name__ == "CLIPImageProcessorPil"
    assert ip.size.shortest_edge == tiny_clip.IMAGE_SIZE and not ip.size.height  # laion's integer size
    assert (ip.crop_size.height, ip.crop_size.width) == (tiny_clip.IMAGE_SIZE, tiny_clip.IMAGE_SIZE)
    assert ip.do_center_crop and ip.resample == PILImageResampling.BICUBIC
    assert list(ip.image_mean) == tiny_clip.CLIP_MEAN and list(ip.image_std) == tiny_clip.CLIP_STD

    # Where torchvision is installed, transformers 5 would pick its image processor; the scorer still asks for PIL.
    resolve = image_processing_auto._resolve_backend
    asked = []

    def spy(*args):
        asked.append(resolve(*args))
        return asked[-1]

    monkeypatch.setattr(image_processing_auto, "is_torchvision_available", lambda: True)
    assert resolve(None, None, "CLIPImageProcessor") == "torchvision"  # what an unpinned load would use
    monkeypatch.setattr(image_processing_auto, "_resolve_backend", spy)
    assert isinstance(load_clip_processor(str(ckpt.processor)).image_processor, PilBackend)
    assert asked == ["pil"]


@wrong_clip_preprocessing
def test_wrong_preprocessing_is_seen(scorer, ckpt, requests_, wrong):
    moved = scores_with_image_processor(scorer, ckpt.processor, requests_, "pickscore", wrong)
    right_scores = scorer(requests_).values["pickscore"]
    assert ((moved - right_scores).abs() / right_scores.abs().clamp(min=1)).max() > 100 * TOL


def test_bad_request_is_nan_alone(scorer, requests_):
    good = requests_[:2]
    mixed = [good[0], GenRequest(image=None, prompt="a cat"), good[1], GenRequest(image=good[0].image, prompt=3)]
    out = scorer(mixed)
    v = out.values["pickscore"]
    assert math.isnan(v[1]) and "not a PIL image" in out.errors[1]
    assert math.isnan(v[3]) and "not a string" in out.errors[3]
    assert out.errors[0] is None and out.errors[2] is None
    torch.testing.assert_close(v[[0, 2]], scorer(good).values["pickscore"], rtol=TOL, atol=TOL)
