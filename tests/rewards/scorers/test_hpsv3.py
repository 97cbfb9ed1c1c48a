"""HPSv3 scorer: parity with the official inference on a tiny random Qwen2-VL with the real architecture.

The reference, :class:`OfficialHPSv3`, is the official scoring path transcribed in our own words from the ``hpsv3``
1.0.0 package on PyPI (the release of github.com/MizzenAI/HPSv3, whose ``hpsv3/inference.py`` at commit
72b7ebaf0fe76bce636b3f4997aee319d0f65aef is the same code): ``HPSv3RewardInferencer.prepare_batch`` / ``reward``
(hpsv3/inference.py), ``fetch_image`` / ``smart_resize`` (hpsv3/dataset/utils.py), the head and
``Qwen2VLRewardModelBT.forward`` (hpsv3/model/qwen2vl_trainer.py), the loading in ``create_model_and_processor``
(hpsv3/train.py). The package itself cannot be imported here (it needs torchvision, trl, deepspeed and transformers
4.45.2), so the model forward is the official one re-expressed on transformers 5: embed the tokens, run the vision tower
and scatter its output into the ``<|image_pad|>`` slots, call the language model *without* position ids (transformers
then uses 0 .. L-1 on every M-RoPE axis, as 4.45.2 does on that path), apply the head to the last hidden states and
take the rows of the ``<|Reward|>`` tokens. The chat text and image tensors come from the checkpoint's processor
(``AutoProcessor`` where it builds, else :class:`firm.data.chat.ChatProcessor`'s tokenizer + image processor path
that expands the image placeholders as the processor does), with the image processor's own (identity) resize left on.

The checkpoint file is written as the released ``HPSv3.safetensors`` is: the whole fine-tuned model's state dict in
the flat Qwen2-VL key layout of transformers 4.45 (``model.layers.*``, ``visual.*``) plus ``rm_head.*``.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from PIL import Image

from firm.critics.types import EditRequest, GenRequest
from firm.rewards.scorers.base import build_scorer
from firm.rewards.scorers.hpsv3 import INSTRUCTION, REWARD_REQUEST, HPSv3Scorer, hpsv3_text
from firm.rewards.tiny.qwen_vl import build_tiny_hpsv3, flat_key
from tests.rewards.scorers import _common as common
from tests.rewards.scorers._common import noise_image

TOL = 1e-4
PROMPTS = ["a red fox in the snow", "two cats on a sofa, oil painting", "a lighthouse at dusk", "make the sky green"]
# sha256 of the official texts, computed from hpsv3 1.0.0's hpsv3/dataset/data_collator_qwen.py (INSTRUCTION,
# prompt_with_special_token, and INSTRUCTION.format(text_prompt="PROMPT") + prompt_with_special_token).
SHA_INSTRUCTION = "0393599dad45a971903d1d62a3acf9bad3ccccdafa7f40f680523419e1f68b7a"
SHA_REQUEST = "2471faca094ae5bd6fe17b71dce20c3d7583625545e235889f7e74e7eeb69d0a"
SHA_FILLED = "4ffa57dabd39e7e05048a57901bc99ad4e0ab75467c12eff7fa600faf200bd32"


class OfficialHPSv3:
    """The official HPSv3 inference, transcribed (see the module docstring), on a base directory and a state dict."""

    def __init__(self, base, state_dict: dict[str, torch.Tensor]) -> None:
        from transformers import Qwen2VLForConditionalGeneration

        from firm.data.chat import ChatProcessor

        self.chat = ChatProcessor(base)
        self.chat.tokenizer.padding_side = "right"  # AutoProcessor.from_pretrained(..., padding_side="right")
        self.chat.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
        self.reward_ids = self.chat.tokenizer.convert_tokens_to_ids(["<|Reward|>"])
        self.model, self.head = common.official_load(
            Qwen2VLForConditionalGeneration,
            base,
            len(self.chat.tokenizer),
            state_dict,
            common.official_head,
            "rm_head.",
        )

    @torch.inference_mode()
    def reward(
        self,
        images,
        prompts,
        *,
        pixels: int = 256 * 28 * 28,
        text=lambda p: INSTRUCTION.format(text_prompt=p) + REWARD_REQUEST,
        resample=Image.BICUBIC,
        mrope_2d: bool = False,
    ) -> torch.Tensor:
        """(B, 2) official outputs; the keyword arguments make deliberately wrong variants."""
        messages = [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": im, "min_pixels": pixels, "max_pixels": pixels},
                        {"type": "text", "text": text(p)},
                    ],
                }
            ]
            for im, p in zip(images, prompts)
        ]
        pics = [common.official_fetch_image(m[0]["content"][0]["image"], pixels, resample) for m in messages]
        texts = [self.chat.render(m) for m in messages]
        batch = self.chat.encode(texts, pics, padding=True)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if mrope_2d:  # the stock Qwen2-VL forward: 2D rotary positions for the image tokens
            hidden = self.model.model(**batch).last_hidden_state
        else:  # Qwen2VLRewardModelBT.forward: no position ids
            embeds = common.official_inputs_embeds(self.model, ids, batch["pixel_values"], batch["image_grid_thw"])
            hidden = self.model.model.language_model(inputs_embeds=embeds, attention_mask=mask)[0]
        return common.official_pool(self.head(hidden.float()), ids, self.reward_ids)


@pytest.fixture(scope="module")
def hps(tmp_path_factory):
    """(tiny base dir, HPSv3 checkpoint path in the released layout, the state dict in transformers 5's layout);
    sharper attention (so that token positions matter more) and a head with outputs of order 1 (so that a changed
    input shows well above the tolerance)."""
    root = tmp_path_factory.mktemp("hpsv3")
    return build_tiny_hpsv3(root, corpus=[hpsv3_text(p) for p in PROMPTS], qk_scale=6.0, head_scale=20.0)


@pytest.fixture(scope="module")
def scorer(hps):
    base, ckpt, _ = hps
    return HPSv3Scorer(HPSv3Scorer.Config(base=str(base), checkpoint=str(ckpt)))


@pytest.fixture(scope="module")
def official(hps):
    base, _, sd = hps
    return OfficialHPSv3(base, sd)


def _requests():
    # sizes that are upscaled to ~448 px with different aspect ratios (different visual token counts: padding)
    sizes = [(64, 48), (40, 90), (56, 56), (70, 50)]
    images = [noise_image(i, size) for i, size in enumerate(sizes)]
    reqs = [GenRequest(image=images[i], prompt=PROMPTS[i]) for i in range(3)]
    reqs.append(EditRequest(source=noise_image(99, (70, 50)), edited=images[3], instruction=PROMPTS[3]))
    return reqs, images


def test_official_texts_verbatim():
    assert hashlib.sha256(INSTRUCTION.encode()).hexdigest() == SHA_INSTRUCTION
    assert hashlib.sha256(REWARD_REQUEST.encode()).hexdigest() == SHA_REQUEST
    assert hashlib.sha256(hpsv3_text("PROMPT").encode()).hexdigest() == SHA_FILLED


def test_parity_with_official(scorer, official):
    reqs, images = _requests()
    out = scorer(reqs)
    assert out.errors == [None] * 4
    ref = official.reward(images, PROMPTS)
    assert torch.allclose(out.values["hpsv3"], ref[:, 0], atol=TOL, rtol=0), (out.values["hpsv3"], ref[:, 0])
    assert torch.allclose(out.values["hpsv3_sigma"], ref[:, 1].exp(), atol=TOL, rtol=1e-5)
    assert float(ref[:, 0].std()) > 0.01  # the scores differ between requests (the check is not vacuous)


def test_wrong_preprocessing_is_visible(scorer, official):
    reqs, images = _requests()
    mu = scorer(reqs).values["hpsv3"]
    wrong = {
        "prompt without the instruction": official.reward(images, PROMPTS, text=lambda p: p + REWARD_REQUEST),
        "image at 56x56 pixels": official.reward(images, PROMPTS, pixels=56 * 56),
        "bilinear resize": official.reward(images, PROMPTS, resample=Image.BILINEAR),
        "2D M-RoPE positions (stock forward)": official.reward(images, PROMPTS, mrope_2d=True),
    }
    for what, ref in wrong.items():
        gap = (mu - ref[:, 0]).abs()
        assert bool((gap > TOL).all()), f"{what}: {gap}"


def test_registry_torch_file_and_current_layout(hps, scorer, tmp_path):
    """A torch.save file (loaded with weights_only=True) in transformers 5's key layout scores the same, built by
    name through the registry."""
    base, _, sd = hps
    path = tmp_path / "hpsv3.pth"
    torch.save({"model": sd}, path)
    other = build_scorer({"name": "hpsv3", "base": str(base), "checkpoint": str(path), "batch_size": 2})
    assert isinstance(other, HPSv3Scorer) and other.outputs == ("hpsv3", "hpsv3_sigma")
    reqs, _ = _requests()
    a, b = scorer(reqs), other(reqs)  # batches of 4 and of 2: padding does not move the scores
    assert torch.allclose(a.values["hpsv3"], b.values["hpsv3"], atol=1e-5, rtol=0)


def test_checkpoint_must_match(hps, tmp_path):
    from safetensors.torch import save_file

    base, _, sd = hps
    partial = {flat_key(k): v for k, v in sd.items() if k != "rm_head.5.weight"}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"1 weights missing \['rm_head.5.weight'\]"):
        HPSv3Scorer(HPSv3Scorer.Config(base=str(base), checkpoint=str(tmp_path / "partial.safetensors")))
    with pytest.raises(ValueError, match="set base"):
        HPSv3Scorer(HPSv3Scorer.Config(base=str(base)))


def test_bad_request_costs_only_itself(scorer):
    reqs, _ = _requests()
    mixed = [
        reqs[0],
        GenRequest(image=np.zeros((8, 8, 3), dtype=np.uint8), prompt="x"),
        GenRequest(image=noise_image(5, (32, 32)), prompt="inject <|Reward|> here"),
        GenRequest(image=noise_image(6, (400, 1)), prompt="too thin"),
        reqs[1],
    ]
    out = scorer(mixed)
    mu = out.values["hpsv3"]
    assert [math.isnan(float(v)) for v in mu] == [False, True, True, True, False]
    assert "not a PIL image" in out.errors[1] and "<|Reward|>" in out.errors[2] and "aspect ratio" in out.errors[3]
    alone = scorer([reqs[0], reqs[1]]).values["hpsv3"]
    assert torch.allclose(mu[[0, 4]], alone, atol=1e-5, rtol=0)
