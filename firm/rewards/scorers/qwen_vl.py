"""What the reward models built on a Qwen-VL backbone share: HPSv3 (:mod:`~firm.rewards.scorers.hpsv3`, Qwen2-VL) and
EditReward (:mod:`~firm.rewards.scorers.editreward`, Qwen2.5-VL).

EditReward's training code (github.com/TIGER-AI-Lab/EditReward) grew out of HPSv3's (github.com/MizzenAI/HPSv3), so
the two released models are read the same way; what differs (the backbone class, the prompts, how many images and
heads, the processor's resize) stays in their modules. Shared here:

* **image size** (:func:`smart_resize`, :func:`fit_image`): qwen-vl-utils' ``smart_resize`` (copied into both
  repositories' ``dataset/utils.py``): sides multiples of 28 (14 px patches merged 2x2), the area brought into
  ``[min_pixels, max_pixels]`` keeping the aspect ratio (floor when shrinking, ceil when growing), aspect ratios above
  200 refused; ``fetch_image`` then resizes the RGB image with PIL bicubic. Both releases use 256 * 28 * 28 pixels for
  both bounds (about 448 x 448, 256 visual tokens).
* **head** (:func:`reward_head`): ``Linear(hidden, 1024) -> ReLU -> Dropout(0.05) -> Linear(1024, 16) -> ReLU ->
  Linear(16, 2)`` (the ``ranknet`` head without ``rm_head_kwargs``; EditReward has two of them), in float32.
* **checkpoint** (:meth:`RewardBackbone.load`): the release is the *whole* fine-tuned model's state dict (backbone,
  vision tower, ``lm_head``, heads), loaded with ``strict=True`` over ``from_pretrained(base)`` after ``<|Reward|>``
  was added to the tokenizer and the embeddings resized to it. Files written by transformers <= 4.51 spell Qwen-VL
  weights flat (``model.layers.*``, ``visual.*``), later ones nested (``model.language_model.*``, ``model.visual.*``);
  both load, tensor by tensor (safetensors, or ``torch.load(weights_only=True)``), strictly: every weight of the
  model comes from the file, with its shape, and the file holds nothing else (a tied ``lm_head`` may be left out).
* **forward** (:meth:`RewardBackbone.reward_states`): both official forwards embed the tokens, scatter the vision
  tower's merged patches into the ``<|image_pad|>`` slots and call the language model without image positions, so
  every token gets the 1-D position ``0 .. n-1`` on all three multimodal-RoPE axes (not Qwen-VL's 2-D image
  positions); the head reads the final normed hidden state at the ``<|Reward|>`` token, one per sequence.
* **text**: one user turn through the backbone's chat template with the generation prompt, each image placeholder
  expanded to the image's visual-token count (what ``AutoProcessor`` does; it is not used, as it needs torchvision),
  right-padded.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

REWARD_TOKEN = "<|Reward|>"
IMAGE_PAD = "<|image_pad|>"
FACTOR = 28  # qwen-vl-utils IMAGE_FACTOR: 14 px patches merged 2x2
PIXELS = 256 * 28 * 28  # both releases' min_pixels = max_pixels
MAX_RATIO = 200  # qwen-vl-utils MAX_RATIO
HEAD_WIDTHS = (1024, 16)  # the ranknet head's hidden widths


def smart_resize(
    height: int, width: int, min_pixels: int = PIXELS, max_pixels: int = PIXELS, factor: int = FACTOR
) -> tuple[int, int]:
    """qwen-vl-utils' target (height, width): sides rounded to multiples of ``factor``, the area brought into
    ``[min_pixels, max_pixels]`` keeping the aspect ratio (floor when shrinking, ceil when growing).

    Raises:
        ValueError: an empty image, or an aspect ratio above 200.
    """
    if min(height, width) < 1:
        raise ValueError(f"empty image ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is above {MAX_RATIO}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = math.floor(height / shrink / factor) * factor
        w = math.floor(width / shrink / factor) * factor
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return h, w


def fit_image(image: Image.Image, min_pixels: int = PIXELS, max_pixels: int = PIXELS) -> Image.Image:
    """``image`` as the official ``fetch_image`` hands it to the processor: RGB, bicubic-resized to
    :func:`smart_resize`."""
    image = image.convert("RGB")
    h, w = smart_resize(image.height, image.width, min_pixels, max_pixels)
    return image.resize((w, h), Image.Resampling.BICUBIC)


def reward_head(hidden_size: int, widths: tuple[int, int] = HEAD_WIDTHS, outputs: int = 2) -> nn.Sequential:
    """The ranknet reward head, with the module indices of the released keys (0, 3 and 5 hold the weights)."""
    return nn.Sequential(
        nn.Linear(hidden_size, widths[0]),
        nn.ReLU(),
        nn.Dropout(0.05),
        nn.Linear(widths[0], widths[1]),
        nn.ReLU(),
        nn.Linear(widths[1], outputs),
    )


def current_key(key: str) -> str:
    """A Qwen-VL weight name as transformers >= 4.52 spells it (``model.language_model.*``, ``model.visual.*``), from
    either that layout or the flat one of transformers <= 4.51 (``model.*``, ``visual.*``). Other names (``lm_head.*``,
    the heads') are unchanged."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not re.match(r"model\.(language_model|visual)\.", key):
        return "model.language_model." + key[len("model.") :]
    return key


class CheckpointReader:
    """Tensors of a checkpoint file, one at a time: safetensors (memory-mapped), or a ``torch.save`` file loaded with
    ``weights_only=True`` (a dict of tensors, possibly under a ``"model"`` key, as the official loaders accept)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._st: Any = None
        self._dict: dict[str, torch.Tensor] | None = None
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint {self.path!r} is not a file")
        if self.path.endswith(".safetensors"):
            from safetensors import safe_open

            self._st = safe_open(self.path, framework="pt", device="cpu")
        else:
            sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
                sd = sd["model"]
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise ValueError(f"{self.path} does not hold a state dict of tensors")
            self._dict = sd

    def keys(self) -> list[str]:
        return list(self._st.keys()) if self._st is not None else list(self._dict)

    def get(self, key: str) -> torch.Tensor:
        return self._st.get_tensor(key) if self._st is not None else self._dict[key]


def read_chat_template(base: str, tokenizer: Any) -> str:
    """The backbone's chat template: the tokenizer's, else the processor's file (``chat_template.jinja`` or the
    ``chat_template`` of ``chat_template.json``, where Qwen2-VL-7B-Instruct keeps it)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    root = Path(base)
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text()
    if (root / "chat_template.json").is_file():
        return json.loads((root / "chat_template.json").read_text())["chat_template"]
    raise ValueError(f"{base}: no chat template found (tokenizer, chat_template.jinja or .json)")


def flat_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(3, B, L) positions ``0 .. n-1`` of each sequence's tokens on all three M-RoPE axes (pads: 1, never read)."""
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    return positions.unsqueeze(0).expand(3, -1, -1)


def expand_image_pads(text: str, counts: list[int]) -> str:
    """``text`` with its k-th ``<|image_pad|>`` repeated ``counts[k]`` times (one per merged patch group)."""
    pieces = text.split(IMAGE_PAD)
    if len(pieces) != len(counts) + 1:
        raise RuntimeError(f"the chat template wrote {len(pieces) - 1} image placeholders, expected {len(counts)}")
    return pieces[0] + "".join(IMAGE_PAD * n + piece for n, piece in zip(counts, pieces[1:]))


class RewardBackbone:
    """A Qwen-VL backbone as the HPSv3 / EditReward loaders set it up: the tokenizer (right padding) with
    ``<|Reward|>`` added, the chat template, the image processor, and the model (``model_class.from_pretrained(base)``,
    embeddings resized to the tokenizer) in eval mode."""

    def __init__(
        self,
        scorer: str,
        model_class: Any,
        base: str,
        *,
        dtype: torch.dtype,
        device: torch.device,
        attn_implementation: str = "sdpa",
    ) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer

        self.scorer = scorer
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(base, padding_side="right")
        # the official create_model_and_processor: add the token, then resize the embeddings to the tokenizer
        self.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        self.reward_id = self.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        try:
            self.template = read_chat_template(base, self.tokenizer)
        except ValueError as e:
            raise ValueError(f"scorer {scorer!r}: {e}") from None
        self.image_processor = AutoImageProcessor.from_pretrained(base)
        patch, self.merge = self.image_processor.patch_size, self.image_processor.merge_size
        if patch * self.merge != FACTOR:
            raise ValueError(f"scorer {scorer!r}: {base}: patch {patch} x merge {self.merge} is not {FACTOR}")
        model = model_class.from_pretrained(
            base, dtype=dtype, attn_implementation=attn_implementation, device_map=str(device)
        )
        if model.config.image_token_id != self.image_id:
            raise ValueError(f"scorer {scorer!r}: {base}: the tokenizer's {IMAGE_PAD} is not the model's image token")
        model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        self.model = model.eval()

    def load(self, path: str | Path, heads: dict[str, nn.Module]) -> None:
        """Copy every tensor of the checkpoint file at ``path`` into the model and ``heads`` (key prefix -> head),
        strictly: the file must give each of their weights, with its shape, and nothing else."""
        reader = CheckpointReader(path)
        targets = dict(self.model.state_dict())
        for prefix, head in heads.items():
            targets.update({f"{prefix}.{k}": v for k, v in head.state_dict().items()})
        names = {current_key(k): k for k in reader.keys()}
        # a tied lm_head is the embedding matrix: a file may hold it or not
        tied = {"lm_head.weight"} if self.model.config.get_text_config().tie_word_embeddings else set()
        missing = sorted(set(targets) - set(names) - tied)
        unexpected = sorted(names[k] for k in set(names) - set(targets) - tied)
        if missing or unexpected:
            raise ValueError(
                f"scorer {self.scorer!r}: {path} does not match the model: {len(missing)} weights missing "
                f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}"
            )
        with torch.no_grad():
            for name, key in names.items():
                if name not in targets:
                    continue  # a tied lm_head the model does not list
                tensor, target = reader.get(key), targets[name]
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(
                        f"scorer {self.scorer!r}: {path}: {key} has shape {tuple(tensor.shape)}, the model "
                        f"{tuple(target.shape)} (is the base the backbone this release was trained from?)"
                    )
                target.copy_(tensor.to(target.dtype))

    def chat(self, text: str, images: int) -> str:
        """One user turn (``images`` images, then ``text``) through the chat template, with the generation prompt."""
        turn = [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]
        return self.tokenizer.apply_chat_template(
            turn, chat_template=self.template, tokenize=False, add_generation_prompt=True
        )

    def see(self, images: list[Image.Image], **processor_kwargs: Any) -> tuple[torch.Tensor, list[int]]:
        """(the merged patch embeddings of all ``images``, each image's visual-token count)."""
        feats = self.image_processor(images=images, return_tensors="pt", **processor_kwargs)
        visual, grid = self.model.model.visual, feats["image_grid_thw"]
        out = visual(feats["pixel_values"].to(self.device, visual.dtype), grid_thw=grid.to(self.device))
        embeds = getattr(out, "pooler_output", out)  # merged patches (transformers 5 returns an output object)
        return embeds, (grid.prod(-1) // self.merge**2).tolist()

    def reward_states(self, texts: list[str], counts: list[int], image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, hidden) final hidden states at the ``<|Reward|>`` token of each chat text; the texts' image
        placeholders take, in order, the images of ``counts`` and ``image_embeds``."""
        rows, k = [], 0
        for text in texts:
            n = text.count(IMAGE_PAD)
            text, k = expand_image_pads(text, counts[k : k + n]), k + n
            rows.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows], device=self.device)
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], device=self.device)
        at = ids == self.reward_id
        if not bool((at.sum(-1) == 1).all()):
            raise RuntimeError(f"each sequence needs one {REWARD_TOKEN} token, found {at.sum(-1).tolist()}")
        if k != len(counts) or int((ids == self.image_id).sum()) != image_embeds.shape[0]:
            raise RuntimeError("the texts' image tokens do not match the images")
        lm = self.model.model.language_model
        embeds = lm.embed_tokens(ids)
        slots = (ids == self.image_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(slots, image_embeds.to(embeds.dtype))
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=flat_positions(mask), use_cache=False)
        return out.last_hidden_state[at]  # in batch order: one reward token per row
