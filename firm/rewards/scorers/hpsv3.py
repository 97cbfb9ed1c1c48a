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
  of the model must come from the file, with its shape, and the file may hold nothing else.
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

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from firm.rewards.scorers.base import Scorer, ScorerConfig, Scores, request_image, request_text, resolve_device

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
REWARD_TOKEN = "<|Reward|>"
REWARD_REQUEST = "\nPlease provide the overall ratings of this image: " + REWARD_TOKEN + "\n\nEND\n"

# hpsv3 1.0.0, hpsv3/inference.py (prepare_batch) and config/HPSv3_7B.yaml: 256 * 28 * 28 pixels, both bounds.
PIXELS = 256 * 28 * 28
# qwen-vl-utils' smart_resize (copied into hpsv3/dataset/utils.py): sides are multiples of 28 (14 px patches merged
# 2x2), and images more elongated than 1:200 are refused.
FACTOR = 28
MAX_RATIO = 200
HEAD_WIDTHS = (1024, 16)  # rm_head's hidden widths (qwen2vl_trainer.py, ranknet head without rm_head_kwargs)


def hpsv3_text(prompt: str) -> str:
    """The user-turn text HPSv3 reads after the image for ``prompt``."""
    return INSTRUCTION.format(text_prompt=prompt) + REWARD_REQUEST


def smart_size(height: int, width: int, min_pixels: int = PIXELS, max_pixels: int = PIXELS) -> tuple[int, int]:
    """(height, width) an image is resized to: multiples of 28, close to the aspect ratio, with a pixel count in
    [min_pixels, max_pixels] (qwen-vl-utils' ``smart_resize``, the rule HPSv3's preprocessing applies).

    Raises:
        ValueError: the aspect ratio is above 200.
    """
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is above {MAX_RATIO}")
    h = max(FACTOR, round(height / FACTOR) * FACTOR)
    w = max(FACTOR, round(width / FACTOR) * FACTOR)
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = math.floor(height / shrink / FACTOR) * FACTOR
        w = math.floor(width / shrink / FACTOR) * FACTOR
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / FACTOR) * FACTOR
        w = math.ceil(width * grow / FACTOR) * FACTOR
    return h, w


def hpsv3_image(image: Image.Image, min_pixels: int = PIXELS, max_pixels: int = PIXELS) -> Image.Image:
    """``image`` as HPSv3 sees it before the image processor: RGB, bicubic-resized to :func:`smart_size`."""
    image = image.convert("RGB")
    h, w = smart_size(image.height, image.width, min_pixels, max_pixels)
    return image.resize((w, h), Image.Resampling.BICUBIC)


def reward_head(hidden_size: int, widths: tuple[int, int] = HEAD_WIDTHS, outputs: int = 2) -> torch.nn.Sequential:
    """HPSv3's ``rm_head``, with the module indices (0, 3, 5 hold the weights) of the official checkpoint's keys."""
    return torch.nn.Sequential(
        torch.nn.Linear(hidden_size, widths[0]),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.05),
        torch.nn.Linear(widths[0], widths[1]),
        torch.nn.ReLU(),
        torch.nn.Linear(widths[1], outputs),
    )


def current_key(key: str) -> str:
    """A Qwen2-VL weight name as transformers >= 4.52 spells it (``model.language_model.*``, ``model.visual.*``), from
    either that layout or the flat one of transformers <= 4.51 (``model.*``, ``visual.*``) that HPSv3.safetensors uses.
    Other names (``lm_head.*``, ``rm_head.*``) are unchanged."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not re.match(r"model\.(language_model|visual)\.", key):
        return "model.language_model." + key[len("model.") :]
    return key


class CheckpointReader:
    """Tensors of an HPSv3 checkpoint file, one at a time: safetensors (memory-mapped), or a ``torch.save`` file
    loaded with ``weights_only=True`` (a dict of tensors, possibly under a ``"model"`` key, as the official loader
    accepts)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._st: Any = None
        self._dict: dict[str, torch.Tensor] | None = None
        if not Path(path).is_file():
            raise FileNotFoundError(f"scorer 'hpsv3': checkpoint {path!r} is not a file")
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            self._st = safe_open(path, framework="pt", device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
                sd = sd["model"]
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise ValueError(f"scorer 'hpsv3': {path} does not hold a state dict of tensors")
            self._dict = sd

    def keys(self) -> list[str]:
        return list(self._st.keys()) if self._st is not None else list(self._dict)

    def get(self, key: str) -> torch.Tensor:
        return self._st.get_tensor(key) if self._st is not None else self._dict[key]


def load_checkpoint(model: torch.nn.Module, head: torch.nn.Module, path: str) -> None:
    """Copy every tensor of the checkpoint at ``path`` into ``model`` (a ``Qwen2VLForConditionalGeneration``) and
    ``head`` (the ``rm_head``), strictly: the file must give each of their weights, with its shape, and nothing else."""
    reader = CheckpointReader(path)
    targets = {k: v for k, v in model.state_dict().items()}
    targets.update({f"rm_head.{k}": v for k, v in head.state_dict().items()})
    names = {current_key(k): k for k in reader.keys()}
    missing = sorted(set(targets) - set(names))
    unexpected = sorted(names[k] for k in set(names) - set(targets))
    if missing or unexpected:
        raise ValueError(
            f"scorer 'hpsv3': {path} does not match the model: {len(missing)} weights missing {missing[:5]}, "
            f"{len(unexpected)} unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, key in names.items():
            tensor, target = reader.get(key), targets[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(
                    f"scorer 'hpsv3': {path}: {key} has shape {tuple(tensor.shape)}, the model {tuple(target.shape)}"
                )
            target.copy_(tensor.to(target.dtype))


def read_chat_template(base: str, tokenizer: Any) -> str:
    """The base model's chat template: the tokenizer's, else the processor's file (``chat_template.jinja`` or the
    ``chat_template`` of ``chat_template.json``, where Qwen2-VL-7B-Instruct keeps it)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    root = Path(base)
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text()
    if (root / "chat_template.json").is_file():
        return json.loads((root / "chat_template.json").read_text())["chat_template"]
    raise ValueError(f"scorer 'hpsv3': {base}: no chat template found (tokenizer, chat_template.jinja or .json)")


class HPSv3Scorer(Scorer):
    """HPSv3's preference score ``mu`` (``hpsv3``) and its uncertainty ``sigma`` (``hpsv3_sigma``) per request."""

    @dataclass
    class Config(ScorerConfig):
        name: str = "hpsv3"
        base: str = ""  # Qwen2-VL-7B-Instruct directory: config, tokenizer, chat template, image processor
        checkpoint: str = ""  # HPSv3.safetensors (MizzenAI/HPSv3): the fine-tuned model's whole state dict
        dtype: str = "auto"  # auto: bfloat16 on a GPU (the official), float32 on the CPU; or float32 | bfloat16
        min_pixels: int = PIXELS  # image size bounds of the resize (official: 256 * 28 * 28 both)
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
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

        self.device = resolve_device(config.device)
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        if config.dtype == "auto":
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        elif config.dtype in dtypes:
            dtype = dtypes[config.dtype]
        else:
            raise ValueError(f"scorer 'hpsv3': dtype must be auto, float32 or bfloat16, got {config.dtype!r}")

        self.tokenizer = AutoTokenizer.from_pretrained(config.base)
        self.tokenizer.padding_side = "right"  # the official processor is loaded with padding_side="right"
        if REWARD_TOKEN not in self.tokenizer.get_vocab():
            self.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        self.reward_id = self.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.chat_template = read_chat_template(config.base, self.tokenizer)
        self.image_processor = AutoImageProcessor.from_pretrained(config.base)
        patch, merge = self.image_processor.patch_size, self.image_processor.merge_size
        if patch * merge != FACTOR:
            raise ValueError(f"scorer 'hpsv3': {config.base}: patch {patch} x merge {merge} is not HPSv3's {FACTOR}")
        self.merge = merge
        self.image_token = "<|image_pad|>"
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        # control tokens a prompt must not contain (they would change the sequence's structure)
        self.control = sorted(
            {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}, key=len, reverse=True
        )

        model = Qwen2VLForConditionalGeneration.from_pretrained(
            config.base, dtype=dtype, attn_implementation="sdpa", device_map=str(self.device)
        )
        if model.config.image_token_id != self.image_token_id:
            raise ValueError(f"scorer 'hpsv3': {config.base}: the tokenizer's {self.image_token} is not the model's")
        model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        head = reward_head(model.config.get_text_config().hidden_size).to(self.device, torch.float32)
        load_checkpoint(model, head, config.checkpoint)
        self.model = model.eval()
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

    def encode(self, images: list[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
        """Model inputs of (image, prompt) pairs: right-padded token ids with each image's placeholder expanded to
        its visual tokens, attention mask, pixel patches and their grids."""
        cfg = self.config
        pics = [hpsv3_image(im, cfg.min_pixels, cfg.max_pixels) for im in images]
        feats = self.image_processor(images=pics, do_resize=False, return_tensors="pt")
        counts = (feats["image_grid_thw"].prod(-1) // self.merge**2).tolist()
        texts = []
        for prompt, n in zip(prompts, counts, strict=True):
            turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": hpsv3_text(prompt)}]}]
            text = self.tokenizer.apply_chat_template(
                turn, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
            )
            if text.count(self.image_token) != 1:
                raise RuntimeError(f"the chat template wrote {text.count(self.image_token)} image placeholders")
            texts.append(text.replace(self.image_token, self.image_token * n))
        enc = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "pixel_values": feats["pixel_values"],
            "image_grid_thw": feats["image_grid_thw"],
        }

    @torch.inference_mode()
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 2) head outputs (mu, log sigma) at each sequence's ``<|Reward|>`` token."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        ids = batch["input_ids"]
        n, length = ids.shape
        reward_at = ids == self.reward_id
        if not bool((reward_at.sum(-1) == 1).all()):
            raise RuntimeError(f"each sequence needs one {REWARD_TOKEN} token, found {reward_at.sum(-1).tolist()}")
        # HPSv3's positions: 0 .. L-1 on all three M-RoPE axes (see the module docstring)
        positions = torch.arange(length, device=self.device).view(1, 1, -1).expand(3, n, -1)
        out = self.model.model(
            input_ids=ids,
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            position_ids=positions,
            use_cache=False,
        )
        hidden = out.last_hidden_state[reward_at]  # (B, D), in batch order: one reward token per row
        return self.head(hidden.float())

    def score_batch(self, requests: list[Any]) -> Scores:
        errors = [self._problem(r) for r in requests]
        ok = [i for i, e in enumerate(errors) if e is None]
        mu = torch.full((len(requests),), math.nan, dtype=torch.float32)
        sigma = mu.clone()
        if ok:
            batch = self.encode([request_image(requests[i]) for i in ok], [request_text(requests[i]) for i in ok])
            logits = self.forward(batch).cpu()
            mu[ok] = logits[:, 0]
            sigma[ok] = logits[:, 1].exp()
        return Scores({"hpsv3": mu, "hpsv3_sigma": sigma}, errors, [None] * len(requests))
