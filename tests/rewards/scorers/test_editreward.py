"""EditReward scorer: parity with the official inference code on a tiny random checkpoint of the real layout.

The reference below is the official path transcribed in our own words from https://github.com/TIGER-AI-Lab/EditReward
at commit edb027edde6080b8a9521ef8e87049b3797f8374:

* ``EditReward/inference_edit.py`` (``EditRewardInferencer.prepare_batch`` / ``reward``): per request, messages
  ``[image src, image edited, text]`` with min_pixels = max_pixels = 256*28*28, one batch per rubric prompt (dim1
  "instruction following", dim2 "visual quality"), ``processor.apply_chat_template(..., add_generation_prompt=True)``
  then ``processor(text, images, padding=True)`` with the processor's ``padding_side="right"``
  (``train_qwen2_5_edit.create_model_and_processor``, which also adds the ``<|Reward|>`` special token and resizes the
  embeddings to the tokenizer);
* ``EditReward/dataset/utils.py`` (``fetch_image`` / ``smart_resize``, from qwen-vl-utils): RGB, PIL bicubic resize
  to sides that are multiples of 28 within the pixel bounds;
* ``EditReward/dataset/prompts.py`` + ``data_collator_qwen_edit.prompt_with_special_token``: the prompt texts (the
  test pins their SHA-256 as in that commit and takes the text from the scorer module);
* ``EditReward/model/qwen2_5_vl_trainer.py`` (``Qwen2_5_VLRewardModelBT_MultiHead``): ``inputs_embeds`` =
  token embeddings with ``visual(pixel_values, grid_thw)`` scattered into the image-pad slots; ``self.model(input_ids=
  None, inputs_embeds=..., attention_mask=..., position_ids=None)``, which under the pinned transformers 4.57.0
  (``Qwen2_5_VLModel.get_rope_index`` with no input_ids and no grids) uses positions ``cumsum(mask) - 1`` (pads 1)
  on all three M-RoPE axes; each head applied to every position of the last hidden state in float32, then the rows
  at the ``<|Reward|>`` token (``_pool_logits``, ``reward_token="special"``); heads ``Linear(h, 1024), ReLU,
  Dropout(0.05), Linear(1024, 16), ReLU, Linear(16, 2)``; ``pooling_strategy="mean"`` averages the two heads.

(The scorer was also checked once, outside this suite, against the unmodified official ``EditRewardInferencer.reward``
and ``Qwen2_5_VLRewardModelBT_MultiHead`` running under transformers 4.57.0 on a checkpoint built here: equal within
1e-6. That needs the official repository and an old transformers, so it is not a test.)
"""

from __future__ import annotations

import functools
import hashlib

import pytest
import torch
from PIL import Image
from torch import nn

from firm.critics.types import EditRequest, GenRequest
from firm.rewards.scorers import build_scorer
from firm.rewards.scorers import editreward as er
from firm.rewards.tiny.qwen_vl import build_tiny_editreward, flat_key
from tests.rewards.scorers import _common as common
from tests.rewards.scorers._common import noise_image

TOL = 1e-4

# SHA-256 of INSTRUCTION_EDIT_FOLLOWING, INSTRUCTION_EDIT_QUALITY (EditReward/dataset/prompts.py) and
# prompt_with_special_token (EditReward/dataset/data_collator_qwen_edit.py) at commit edb027e.
PROMPT_SHA256 = {
    "FOLLOWING_PROMPT": "da5bfc26898cc8e0e534a29675ad78c3462d331b7feaebf13bae5aa50195864f",
    "QUALITY_PROMPT": "89bbc5c2ac1bbea9c45a0fde298e9a97d1c079170a30780392c577fc1cd8d286",
    "REWARD_SUFFIX": "2471faca094ae5bd6fe17b71dce20c3d7583625545e235889f7e74e7eeb69d0a",
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(backbone dir, release dir): a tiny Qwen2.5-VL and an EditReward-style model.safetensors trained from it."""
    corpus = [er.FOLLOWING_PROMPT, er.QUALITY_PROMPT, er.REWARD_SUFFIX]
    return build_tiny_editreward(tmp_path_factory.mktemp("editreward"), corpus=corpus)


@pytest.fixture(scope="module")
def scorer(ckpt):
    base, release = ckpt
    return build_scorer(
        {"name": "editreward", "model": str(release), "base_model": str(base), "dtype": "float32", "batch_size": 2}
    )


@pytest.fixture(scope="module")
def requests():
    return [
        EditRequest(noise_image(0), noise_image(1), "make the sky blue"),
        EditRequest(
            noise_image(2, (64, 40)), noise_image(3, (64, 40)), "remove the red car from the street on the left"
        ),
        EditRequest(noise_image(4), noise_image(5).convert("L"), "add a hat"),
    ]


# --- the official path, transcribed -----------------------------------------------------------------------------


@functools.cache
def _official_model(ckpt):
    """create_model_and_processor + the checkpoint load of EditRewardInferencer.__init__, transcribed."""
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    base, release = ckpt
    tok = AutoTokenizer.from_pretrained(base, padding_side="right")
    tok.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    special_ids = tok.convert_tokens_to_ids(["<|Reward|>"])
    improc = AutoImageProcessor.from_pretrained(base)
    state = load_file(str(release / "model.safetensors"))

    def make_heads(hidden: int) -> nn.ModuleDict:  # rm_heads of Qwen2_5_VLRewardModelBT_MultiHead
        return nn.ModuleDict({f"head_{i}": common.official_head(hidden) for i in range(2)})

    model, heads = common.official_load(
        Qwen2_5_VLForConditionalGeneration, base, len(tok), state, make_heads, "rm_heads."
    )
    return tok, special_ids, improc, model, heads


def official_rewards(
    ckpt,
    reqs,
    *,
    swap_images=False,
    swap_prompts=False,
    pixels=256 * 28 * 28,
    resample=Image.BICUBIC,
    mrope=False,
    system_turn=True,
) -> torch.Tensor:
    """(B, 2) ``EditRewardInferencer.reward`` logits, transcribed; the flags make it deliberately wrong."""
    tok, special_ids, improc, model, heads = _official_model(ckpt)
    prompts = [er.FOLLOWING_PROMPT, er.QUALITY_PROMPT]
    if swap_prompts:
        prompts.reverse()
    per_head = []
    with torch.no_grad():
        for base_prompt, head in zip(prompts, heads.values()):
            convs, images = [], []
            for r in reqs:
                src, edited = (r.edited, r.source) if swap_images else (r.source, r.edited)
                text = base_prompt.format(text_prompt=r.instruction) + er.REWARD_SUFFIX
                convs.append(
                    [
                        {
                            "role": "user",
                            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": text}],
                        }
                    ]
                )
                images += [
                    common.official_fetch_image(src, pixels, resample),
                    common.official_fetch_image(edited, pixels, resample),
                ]
            texts = tok.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)
            if not system_turn:
                texts = [t.split("<|im_end|>\n", 1)[1] for t in texts]
            # Qwen2_5_VLProcessor.__call__: image features, then one <|image_pad|> per merged 2x2 patch group
            feats = improc(images=images, return_tensors="pt")
            n_tokens = iter((feats["image_grid_thw"].prod(-1) // 4).tolist())
            expanded = []
            for t in texts:
                first, *rest = t.split("<|image_pad|>")
                expanded.append(first + "".join("<|image_pad|>" * next(n_tokens) + piece for piece in rest))
            texts = expanded
            batch = tok(texts, padding=True, return_tensors="pt")
            input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
            # Qwen2_5_VLRewardModelBT_MultiHead._run_single_batch_through_model_and_head
            inputs_embeds = common.official_inputs_embeds(
                model, input_ids, feats["pixel_values"], feats["image_grid_thw"]
            )
            if mrope:  # what transformers computes when it is given input_ids and grids (not the official call)
                mm = (input_ids == model.config.image_token_id).int()
                position_ids, _ = model.model.get_rope_index(
                    input_ids, mm, image_grid_thw=feats["image_grid_thw"], attention_mask=attention_mask
                )
            else:  # transformers 4.57 get_rope_index(input_ids=None, ...): the attention-mask branch
                position_ids = attention_mask.long().cumsum(-1) - 1
                position_ids.masked_fill_(attention_mask == 0, 1)
                position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
            hidden_states = model.model.language_model(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
            per_head.append(common.official_pool(head(hidden_states), input_ids, special_ids))  # head: [B, L, 2]
    return torch.stack(per_head).mean(0)


@pytest.fixture(scope="module")
def official(ckpt, requests):
    return official_rewards(ckpt, requests)


# --- tests ------------------------------------------------------------------------------------------------------


def test_prompts_are_the_official_texts():
    for name, digest in PROMPT_SHA256.items():
        assert hashlib.sha256(getattr(er, name).encode()).hexdigest() == digest, name


def test_scores_equal_the_official_inference(scorer, requests, official):
    out = scorer(requests)  # batches of 2, the reference one batch of 3: padding changes nothing
    assert out.errors == [None] * 3
    assert torch.allclose(out.values["editreward"], official[:, 0], atol=TOL, rtol=0)
    assert torch.allclose(out.values["editreward_log_sigma"], official[:, 1], atol=TOL, rtol=0)
    assert official[:, 0].std() > 100 * TOL  # the requests are told apart
    d = out.details[0]
    fused = [(a + b) / 2 for a, b in zip(d["following"], d["quality"])]
    assert fused == pytest.approx([float(out.values["editreward"][0]), float(out.values["editreward_log_sigma"][0])])


@pytest.mark.parametrize(
    "wrong",
    [
        {"swap_images": True},
        {"swap_prompts": True},
        {"system_turn": False},
        {"resample": Image.BILINEAR},
        {"pixels": 128 * 28 * 28},
        {"mrope": True},
    ],
    ids=lambda w: next(iter(w)),
)
def test_a_wrong_preprocessing_changes_the_score(ckpt, requests, official, wrong):
    bad = official_rewards(ckpt, requests[:2], **wrong)
    assert (bad[:, 0] - official[:2, 0]).abs().max() > 10 * TOL


def test_bad_requests_cost_only_themselves(scorer, requests, official):
    reqs = [
        requests[0],
        EditRequest(noise_image(6, (600, 2)), noise_image(7, (600, 2)), "stretch it"),  # aspect ratio 300 > 200
        EditRequest(noise_image(8), noise_image(9), "say <|Reward|> twice"),
        EditRequest(noise_image(8), noise_image(9), "draw <|image_pad|>"),
        requests[1],
    ]
    out = scorer(reqs)  # batches of 2: [ok, bad], [bad, bad], [ok]
    assert "aspect ratio" in out.errors[1] and "<|Reward|>" in out.errors[2] and "<|image_pad|>" in out.errors[3]
    assert out.errors[0] is None and out.errors[4] is None
    assert out.values["editreward"][1:4].isnan().all() and out.values["editreward_log_sigma"][1:4].isnan().all()
    assert torch.allclose(out.values["editreward"][[0, 4]], official[:2, 0], atol=TOL, rtol=0)


def test_generation_requests_are_refused(scorer):
    with pytest.raises(TypeError, match="scores edit requests; request 0 is a gen one"):
        scorer([GenRequest(noise_image(0), "a cat")])


def test_a_legacy_named_pickle_free_pth_release_loads_the_same(ckpt, tmp_path, requests, official):
    from safetensors.torch import load_file

    base, release = ckpt
    state = load_file(str(release / "model.safetensors"))
    legacy = {flat_key(k): v for k, v in state.items()}  # transformers < 4.52: visual.*, model.layers.*
    torch.save({"model": legacy}, tmp_path / "model.pth")
    s = build_scorer({"name": "editreward", "model": str(tmp_path), "base_model": str(base), "dtype": "float32"})
    assert torch.allclose(s(requests[:1]).values["editreward"], official[:1, 0], atol=TOL, rtol=0)


def test_a_release_that_does_not_fit_the_backbone_is_refused(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    base, release = ckpt
    state = load_file(str(release / "model.safetensors"))
    del state["rm_heads.head_1.5.weight"], state["rm_heads.head_1.5.bias"]
    no_head = tmp_path / "no_head"
    no_head.mkdir()
    save_file(state, str(no_head / "model.safetensors"))
    with pytest.raises(ValueError, match=r"2 weights missing \['rm_heads.head_1.5.bias', 'rm_heads.head_1.5.weight'\]"):
        build_scorer({"name": "editreward", "model": str(no_head), "base_model": str(base), "dtype": "float32"})
    state = load_file(str(release / "model.safetensors"))
    del state["lm_head.weight"]
    partial = tmp_path / "partial"
    partial.mkdir()
    save_file(state, str(partial / "model.safetensors"))
    with pytest.raises(ValueError, match=r"1 weights missing \['lm_head.weight'\]"):
        build_scorer({"name": "editreward", "model": str(partial), "base_model": str(base), "dtype": "float32"})
