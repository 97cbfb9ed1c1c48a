"""HPSv3, the Human Preference Score v3 (registry name ``hpsv3``; outputs ``hpsv3``, ``hpsv3_sigma``).

HPSv3 ("HPSv3: Towards Wide-Spectrum Human Preference Score", Ma, Shui et al., ICCV 2025; code MizzenAI/HPSv3 on
GitHub and the ``hpsv3`` 1.0.0 package on PyPI, MIT) is Qwen2-VL-7B-Instruct fine-tuned with a reward head. The model
reads one image and its prompt and predicts a Gaussian preference score: the mean ``mu`` is the reward (the
``hpsv3`` output) and ``sigma`` its uncertainty (``hpsv3_sigma``). A generation is scored against its prompt; an
edit, its edited image against the instruction.

What the official inference (``hpsv3/inference.py``: ``HPSv3RewardInferencer``; the model is
``Qwen2VLRewardModelBT`` in ``hpsv3/model/qwen2vl_trainer.py``, built by ``create_model_and_processor`` in
``hpsv3/train.py`` with ``hpsv3/config/HPSv3_7B.yaml``) does, and this scorer reproduces:

* **Checkpoint.** ``HPSv3.safetensors`` in the hub repo ``MizzenAI/HPSv3`` is the *whole* fine-tuned model's state
  dict (backbone, vision tower, ``lm_head`` and the head ``rm_head.*``; about 16.6 GB), loaded with ``strict=True``
  over ``Qwen2VLForConditionalGeneration.from_pretrained("Qwen/Qwen2-VL-7B-Instruct")`` after the tokenizer got the
  special token ``<|Reward|>`` and the embeddings were resized to the new tokenizer length. It was written by
  transformers 4.45/4.46, whose Qwen2-VL keys are flat (``model.layers.*``, ``model.embed_tokens.*``, ``visual.*``);
  transformers >= 4.52 nests them (``model.language_model.*``, ``model.visual.*``). Both layouts load here, tensor
  by tensor (safetensors, or ``torch.load(weights_only=True)`` for a ``.pt`` / ``.pth`` file), strictly: every weight
  of the model must come from the file, with its shape, and the file may hold nothing else
  (:meth:`~firm.rewards.scorers.qwen_vl.RewardBackbone.load`, shared with EditReward, whose release is read alike).
* **Head.** ``rm_head`` is ``Linear(hidden, 1024) -> ReLU -> Dropout(0.05) -> Linear(1024, 16) -> ReLU ->
  Linear(16, 2)`` (the ``ranknet`` head without ``rm_head_kwargs``), kept in float32 and run on float32 hidden states
  (the official forward runs it under a float32 autocast).
* **Which hidden state.** The head reads the last layer's output after the final RMSNorm (``outputs[0]`` of the
  language model) at the position of the ``<|Reward|>`` token (``reward_token: special``), one per sequence.
* **Outputs.** ``logits[:, 0]`` is ``mu`` (the score the inference example prints: "we select miu as the final
  output"); ``logits[:, 1]`` is ``log sigma`` (the training loss, ``loss_type: uncertainty``, uses
  ``sigma = exp(logits[:, 1])``), reported here as ``hpsv3_sigma = exp(logits[:, 1])``.
* **Positions.** The official forward embeds the tokens and the image itself and calls the language model without
  position ids, so every token, image tokens included, gets the plain 1D position ``0 .. L-1`` on all three
  multimodal-RoPE axes (not Qwen2-VL's 2D positions for image patches). The scorer passes those positions
  explicitly; the standard ``Qwen2VLForConditionalGeneration`` forward would give different scores.
* **Image.** RGB, resized (PIL bicubic) to the size qwen-vl-utils' ``smart_resize`` gives with factor 28 and
  ``min_pixels = max_pixels = 256 * 28 * 28 = 200704`` (about 448 x 448, 256 visual tokens, aspect ratio kept), then
  the Qwen2-VL image processor's rescale / normalise / patchify. The processor's own resize is then the identity
  (the size is already a multiple of 28 in its pixel range), so it is switched off, which keeps the result the same
  whatever image-processor backend transformers picks.
* **Text.** One user turn: the image, then the official instruction with the prompt filled in, followed by the
  ``<|Reward|>`` request (:data:`INSTRUCTION`, :data:`REWARD_REQUEST`), through the base model's chat template
  with the generation prompt (Qwen2-VL's template adds the "You are a helpful assistant." system turn). Batches
  are padded on the right with the tokenizer's pad token.

A request whose image or text cannot be scored (not a PIL image, an empty image, an aspect ratio above 200, a text
holding one of the tokenizer's control tokens such as ``<|Reward|>``) gets NaN and the reason; the others in its
batch are scored as usual.

Config::

    rewards:
      hps: {name: hpsv3, base: /ckpt/Qwen2-VL-7B-Instruct, checkpoint: /ckpt/HPSv3/HPSv3.safetensors, device: cuda}

The official model runs in bfloat16 (``dtype`` defaults to bfloat16 on a GPU and float32 on the CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from firm.rewards.scorers.base import Scorer, ScorerConfig, Scores, request_image, request_text, resolve_device
from firm.rewards.scorers.qwen_vl import (
    MAX_RATIO,
    PIXELS,
    REWARD_TOKEN,
    RewardBackbone,
    fit_image,
    reward_head,
)

# The model's input text, verbatim from hpsv3 1.0.0, hpsv3/dataset/data_collator_qwen.py (INSTRUCTION and
# prompt_with_special_token; inference.py joins them, the prompt replacing {text_prompt}). The model was trained on
# exactly these characters (trailing spaces included), so they are a constant of the checkpoint, not prose of ours.
INSTRUCTION = (
    "\n"
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall "
    "score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being "
    "the best. \n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements "
    "(e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. \n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align "
    "with the textual description. The subject should match the description in terms of number, appearance, and "
    "behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the "
    "image adheres to this style.\n"
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image "
    "logically fit the scenario described in the prompt. The environment should support and enhance the subject "
    "without contradictions.\n"
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, "
    "but critical attributes should be preserved.\n"
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the "
    "image. The generated content should not introduce elements that conflict with or distort the original "
    "description.\n"
    "Textual prompt - {text_prompt}\n"
    "\n"
    "\n"
)
REWARD_REQUEST = "\nPlease provide the overall ratings of this image: " + REWARD_TOKEN + "\n\nEND\n"


def hpsv3_text(prompt: str) -> str:
    """The user-turn text HPSv3 reads after the image for ``prompt``."""
    return INSTRUCTION.format(text_prompt=prompt) + REWARD_REQUEST


class HPSv3Scorer(Scorer):
    """HPSv3's preference score ``mu`` (``hpsv3``) and its uncertainty ``sigma`` (``hpsv3_sigma``) per request."""

    @dataclass
    class Config(ScorerConfig):
        name: str = "hpsv3"
        base: str = ""  # Qwen2-VL-7B-Instruct directory: config, tokenizer, chat template, image processor
        checkpoint: str = ""  # HPSv3.safetensors (MizzenAI/HPSv3): the fine-tuned model's whole state dict
        dtype: str = "auto"  # auto: bfloat16 on a GPU (the official), float32 on the CPU; or float32 | bfloat16
        # image size bounds of the resize (hpsv3 1.0.0 inference.py / config/HPSv3_7B.yaml: 256 * 28 * 28 both)
        min_pixels: int = PIXELS
        max_pixels: int = PIXELS
        batch_size: int = 8

    outputs = ("hpsv3", "hpsv3_sigma")
    tasks = ("gen", "edit")

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        if not config.base or not config.checkpoint:
            raise ValueError(
                "scorer 'hpsv3': set base (a Qwen2-VL-7B-Instruct directory) and checkpoint (HPSv3.safetensors)"
            )
        if not 0 < config.min_pixels <= config.max_pixels:
            raise ValueError(
                f"scorer 'hpsv3': need 0 < min_pixels <= max_pixels, got {config.min_pixels}, {config.max_pixels}"
            )
        from transformers import Qwen2VLForConditionalGeneration

        self.device = resolve_device(config.device)
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        if config.dtype == "auto":
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        elif config.dtype in dtypes:
            dtype = dtypes[config.dtype]
        else:
            raise ValueError(f"scorer 'hpsv3': dtype must be auto, float32 or bfloat16, got {config.dtype!r}")
        self.backbone = RewardBackbone(
            "hpsv3", Qwen2VLForConditionalGeneration, config.base, dtype=dtype, device=self.device
        )
        tokenizer = self.backbone.tokenizer
        # control tokens a prompt must not contain (they would change the sequence's structure)
        self.control = sorted(
            {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len, reverse=True
        )
        head = reward_head(self.backbone.model.config.get_text_config().hidden_size).to(self.device, torch.float32)
        self.backbone.load(config.checkpoint, {"rm_head": head})
        self.head = head.eval()

    def _problem(self, request: Any) -> str | None:
        image, text = request_image(request), request_text(request)
        if not isinstance(image, Image.Image):
            return f"the image is a {type(image).__name__}, not a PIL image"
        if image.width < 1 or image.height < 1:
            return f"the image is empty ({image.width}x{image.height})"
        if max(image.width, image.height) / min(image.width, image.height) > MAX_RATIO:
            return f"the image's aspect ratio is above {MAX_RATIO} ({image.width}x{image.height})"
        if not isinstance(text, str):
            return f"the text is a {type(text).__name__}, not a string"
        for token in self.control:
            if token in text:
                return f"the text contains the control token {token}"
        return None

    @torch.inference_mode()
    def logits(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """(B, 2) head outputs (mu, log sigma) at the ``<|Reward|>`` token of each (image, prompt) pair."""
        cfg, bb = self.config, self.backbone
        pics = [fit_image(im, cfg.min_pixels, cfg.max_pixels) for im in images]
        # the processor's own resize is the identity on these sizes: off, whatever backend transformers picks
        embeds, counts = bb.see(pics, do_resize=False)
        texts = [bb.chat(hpsv3_text(p), images=1) for p in prompts]
        return self.head(bb.reward_states(texts, counts, embeds).float())

    def score_batch(self, requests: list[Any]) -> Scores:
        errors = [self._problem(r) for r in requests]
        ok = [i for i, e in enumerate(errors) if e is None]
        mu = torch.full((len(requests),), math.nan, dtype=torch.float32)
        sigma = mu.clone()
        if ok:
            images, texts = [request_image(requests[i]) for i in ok], [request_text(requests[i]) for i in ok]
            logits = self.logits(images, texts).cpu()
            mu[ok] = logits[:, 0]
            sigma[ok] = logits[:, 1].exp()
        return Scores({"hpsv3": mu, "hpsv3_sigma": sigma}, errors, [None] * len(requests))
