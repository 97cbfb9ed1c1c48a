"""EditReward (Wu et al., "EditReward: A Human-Aligned Reward Model for Instruction-Guided Image Editing", ICLR 2026),
registry name ``editreward``.

EditReward is a Qwen2.5-VL-7B-Instruct fine-tuned (backbone, vision tower and two small heads) on 200K human
preference pairs of edits. It scores an edit (source image, edited image, instruction); it has no generation mode,
so a text-to-image request is refused by :meth:`Scorer.check`. What follows is the official inference path,
``EditRewardInferencer.reward`` of https://github.com/TIGER-AI-Lab/EditReward (``EditReward/inference_edit.py``,
``EditReward/model/qwen2_5_vl_trainer.py``, ``EditReward/dataset/{prompts,utils,data_collator_qwen_edit}.py`` at
commit edb027e), with its released configuration ``EditReward/config/EditReward-Qwen2.5-7B-VL.yaml``
(``rm_head_type: ranknet_multi_head``, ``pooling_strategy: mean``, ``reward_token: special``, ``output_dim: 2``,
``loss_type: uncertainty``, 256*28*28 image pixels, bfloat16):

* **images**: each is made RGB and resized (PIL bicubic) to the qwen-vl-utils ``smart_resize`` size for
  ``min_pixels = max_pixels = 256*28*28``: sides multiples of 28, area about 200704 px (448x448 for a square), aspect
  ratio kept (at most 200:1). The checkpoint's Qwen2-VL image processor then normalises (CLIP mean / std) and cuts
  14 px patches (merged 2x2: 256 image tokens per square image).
* **prompt**: one user turn of the backbone's chat template, ``[source image, edited image, text]``, with the
  generation prompt; the text is one of two rubric prompts (verbatim below: "Instruction Following & Semantic
  Fidelity" and "Visual Quality & Realism", each ending ``Text instruction - {instruction}``) followed by
  ``"\\nPlease provide the overall ratings of this image: <|Reward|>\\n\\nEND\\n"``. ``<|Reward|>`` is a special
  token added to the tokenizer (id = the tokenizer's length before it); the embeddings were resized to include it.
  Sequences are right-padded.
* **model**: the token embeddings, with the vision tower's merged patch embeddings in the image-pad slots, go through
  the language model with plain 1-D positions (``cumsum(attention_mask) - 1`` on all three M-RoPE axes: the official
  forward calls the decoder with ``inputs_embeds`` and no ``input_ids`` / grids, so transformers 4.57's
  ``get_rope_index`` takes its text-only branch; 3-D image positions are not used).
* **heads**: the final (normed) hidden state at the ``<|Reward|>`` token goes, in float32, through
  ``Linear(hidden, 1024) -> ReLU -> Dropout -> Linear(1024, 16) -> ReLU -> Linear(16, 2)``: ``head_0`` on the
  instruction-following prompt's pass, ``head_1`` on the visual-quality prompt's pass. The two (mean, log sigma)
  pairs are averaged (``pooling_strategy: mean``).

Outputs: ``editreward`` = the averaged mean (the number the official README reports, ``reward[0]``), and
``editreward_log_sigma`` = the averaged log standard deviation (the uncertainty loss trains a Gaussian
N(mean, exp(log_sigma)^2) per image). ``details`` holds each head's own (mean, log_sigma).

Checkpoint layout (the official loader's): ``base_model`` is the backbone it was trained from,
``Qwen/Qwen2.5-VL-7B-Instruct`` (config, tokenizer, chat template, image processor, loaded with
``from_pretrained``); ``model`` is the EditReward release directory, e.g. ``TIGER-Lab/EditReward-Qwen2.5-VL-7B``,
whose ``model.safetensors`` (or ``model.pth``, read with ``weights_only=True``) is the full state dict of the reward
model: every backbone weight (embedding rows resized for ``<|Reward|>``) plus ``rm_heads.head_{0,1}.*``. Like the
official loader, every backbone tensor must be present and of the right shape. (The MiMo-VL release,
``TIGER-Lab/EditReward-MiMo-VL-7B-SFT-2508``, has the same architecture and layout with ``base_model``
``XiaomiMiMo/MiMo-VL-7B-SFT-2508``, whose own chat template and processor are then used; the tests cover the
Qwen2.5-VL layout.)::

    rewards:
      editreward: {name: editreward, model: /ckpt/EditReward-Qwen2.5-VL-7B, base_model: /ckpt/Qwen2.5-VL-7B-Instruct,
                   device: cuda}
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
from torch import nn

from firm.rewards.scorers.base import Scorer, ScorerConfig, Scores, resolve_device

REWARD_TOKEN = "<|Reward|>"
IMAGE_PAD = "<|image_pad|>"
PATCH_FACTOR = 28  # qwen-vl-utils IMAGE_FACTOR: 14 px patches merged 2x2
IMAGE_PIXELS = 256 * 28 * 28  # the official min_pixels = max_pixels
MAX_ASPECT = 200  # qwen-vl-utils MAX_RATIO

# The rubric prompts of EditReward/dataset/prompts.py (INSTRUCTION_EDIT_FOLLOWING, INSTRUCTION_EDIT_QUALITY) and the
# reward-token suffix of EditReward/dataset/data_collator_qwen_edit.py (prompt_with_special_token), verbatim: the
# checkpoint was trained on exactly these texts.
FOLLOWING_PROMPT = (
    "\n"
    "You are tasked with evaluating an edited image **in comparison with the original source image** "
    "based on **Instruction Following & Semantic Fidelity**, and assigning a score from 1 to 4, with 1 "
    "being the worst and 4 being the best.  \n"
    "This dimension focuses on how accurately, completely, and exclusively the model executed the given "
    "text instruction.\n"
    "\n"
    "**Inputs Provided:**  \n"
    "- Source Image (before editing)  \n"
    "- Edited Image (after applying the instruction)  \n"
    "- Text Instruction  \n"
    "\n"
    "**Sub-Dimensions to Evaluate:**\n"
    "\n"
    "- **Semantic Accuracy:**  \n"
    "  Assess whether the edited content accurately captures the semantics of the instruction. The "
    "edited result should precisely match the intended meaning. For example, if the instruction is "
    '"replace apples with oranges," the object must clearly be oranges, not other fruits.\n'
    "\n"
    "- **Completeness of Editing:**  \n"
    "  Check whether **all parts** of the instruction are fully executed. For multi-step edits (e.g., "
    '"replace a red car with a blue bicycle"), both the color change and the object replacement must be '
    "done without omissions.\n"
    "\n"
    "- **Exclusivity of Edit (No Over-Editing):**  \n"
    "  Ensure that only the requested parts are changed. The rest of the image (as seen in the source) "
    "should remain unaltered. For example, if the instruction only involves replacing an object, the "
    "background, lighting, and unrelated objects should not be unnecessarily modified.\n"
    "\n"
    "**Scoring Criteria:**\n"
    "- **4 (Very Good):** Perfectly accurate, complete, and exclusive execution of the instruction.  \n"
    "- **3 (Relatively Good):** Largely correct, but with minor omissions or slight over-editing.  \n"
    "- **2 (Relatively Poor):** Major misinterpretation, incomplete edits, or noticeable unintended "
    "changes.  \n"
    "- **1 (Very Poor):** Instruction ignored or completely wrong execution.\n"
    "\n"
    "Text instruction - {text_prompt}\n"
)
QUALITY_PROMPT = (
    "\n"
    "You are tasked with evaluating an edited image **in comparison with the original source image** "
    "based on **Visual Quality & Realism**, and assigning a score from 1 to 4, with 1 being the worst "
    "and 4 being the best.  \n"
    "This dimension focuses on how realistic, artifact-free, and aesthetically appealing the edited "
    "image is, while remaining consistent with the source image.\n"
    "\n"
    "**Inputs Provided:**  \n"
    "- Source Image (before editing)  \n"
    "- Edited Image (after applying the instruction)  \n"
    "- Text Instruction  \n"
    "\n"
    "**Sub-Dimensions to Evaluate:**\n"
    "\n"
    "- **Plausibility & Physical Consistency:**  \n"
    "  Check whether the edit aligns with the laws of physics and the scene context. Lighting, shadows, "
    "reflections, perspective, size, and interactions with the environment should all appear natural "
    "compared to the source image.\n"
    "\n"
    "- **Artifact-Free Quality:**  \n"
    "  Look for technical flaws such as blur, distortions, pixel misalignment, unnatural textures, or "
    "seams around edited regions. High-quality results should be free from such visible artifacts.\n"
    "\n"
    "- **Aesthetic Quality:**  \n"
    "  Evaluate the overall harmony and visual appeal. The image should look natural, balanced, and "
    "pleasant. Colors, composition, and atmosphere should enhance the image rather than degrade it.\n"
    "\n"
    "**Scoring Criteria:**\n"
    "- **4 (Very Good):** Perfectly realistic, artifact-free, seamless, and aesthetically pleasing.  \n"
    "- **3 (Relatively Good):** Mostly realistic and clean, with only minor flaws that do not "
    "significantly distract.  \n"
    "- **2 (Relatively Poor):** Noticeable physical inconsistencies or visible artifacts that make the "
    "edit unnatural.  \n"
    "- **1 (Very Poor):** Severe artifacts, incoherent composition, or visually unusable result.\n"
    "\n"
    "Text instruction - {text_prompt}\n"
)
REWARD_SUFFIX = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = PATCH_FACTOR) -> tuple:
    """qwen-vl-utils' target size: sides rounded to multiples of ``factor``, area brought into [min, max] pixels
    keeping the aspect ratio (floor when shrinking, ceil when growing)."""
    if min(height, width) < 1:
        raise ValueError(f"empty image ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is over {MAX_ASPECT}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def fit_image(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """An image as the official ``fetch_image`` hands it to the processor: RGB, bicubic-resized to ``smart_resize``."""
    image = image.convert("RGB")
    h, w = smart_resize(image.height, image.width, min_pixels, max_pixels)
    return image.resize((w, h), Image.BICUBIC)


def _head(weights: dict[str, torch.Tensor], prefix: str) -> nn.Sequential:
    """One reward head from its tensors (``{prefix}{i}.weight`` / ``.bias``): the Linear layers at the indices the
    official ``nn.Sequential`` has them, a ReLU right after each but the last, Dropout (identity here) elsewhere."""
    linears = sorted({int(k[len(prefix) :].split(".")[0]) for k in weights if k.startswith(prefix)})
    if not linears:
        raise ValueError(f"no {prefix}* tensors in the checkpoint")
    layers: list[nn.Module] = []
    for n, i in enumerate(linears):
        while len(layers) < i:
            layers.append(nn.ReLU() if layers and isinstance(layers[-1], nn.Linear) else nn.Identity())
        w = weights[f"{prefix}{i}.weight"]
        b = weights.get(f"{prefix}{i}.bias")
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        layers.append(lin)
        if n > 0 and layers[linears[n - 1]].out_features != w.shape[1]:
            raise ValueError(f"{prefix}{i}: input width {w.shape[1]} does not follow the previous layer")
    if layers[-1].out_features != 2:
        raise ValueError(f"{prefix}*: the head gives {layers[-1].out_features} numbers, expected 2 (mean, log sigma)")
    return nn.Sequential(*layers).float().eval()


def _legacy_name(key: str) -> str:
    """Parameter names of transformers < 4.52 (``visual.*``, ``model.layers.*``) in today's layout."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + key[len("model.") :]
    return key


def _open_checkpoint(directory: str) -> tuple[list[str], Any]:
    """(tensor names, name -> tensor) of the release's ``model.safetensors`` or ``model.pth`` (never unpickled)."""
    d = Path(directory)
    if (d / "model.safetensors").is_file():
        from safetensors import safe_open

        handle = safe_open(str(d / "model.safetensors"), framework="pt", device="cpu")
        return list(handle.keys()), handle.get_tensor
    if (d / "model.pth").is_file():
        state = torch.load(d / "model.pth", map_location="cpu", weights_only=True)
        state = state.get("model", state)
        return list(state), state.__getitem__
    raise FileNotFoundError(f"{directory}: no model.safetensors or model.pth (the EditReward release's weights)")


def _chat_template(tokenizer: Any, base: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    for name in ("chat_template.jinja", "chat_template.json"):  # a processor-level template
        path = Path(base) / name
        if path.is_file():
            text = path.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    raise ValueError(f"{base}: no chat template (the backbone's tokenizer or chat_template.json)")


class EditRewardScorer(Scorer):
    """EditReward of each edit (registry name ``editreward``; outputs ``editreward``, ``editreward_log_sigma``)."""

    @dataclass
    class Config(ScorerConfig):
        name: str = "editreward"
        model: str = ""  # the EditReward release directory (model.safetensors), e.g. TIGER-Lab/EditReward-Qwen2.5-VL-7B
        base_model: str = ""  # its backbone, Qwen/Qwen2.5-VL-7B-Instruct ("": ``model`` holds config and processor)
        dtype: str = "bfloat16"  # the backbone's dtype (the official bf16); the heads always run in float32
        attn_implementation: str = "sdpa"  # or flash_attention_2 (the official default where installed)
        min_pixels: int = IMAGE_PIXELS  # image area bounds of the resize (the official 256*28*28 both)
        max_pixels: int = IMAGE_PIXELS

    outputs = ("editreward", "editreward_log_sigma")
    tasks = ("edit",)

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        if not config.model:
            raise ValueError(
                "scorer 'editreward': set model: the EditReward release (TIGER-Lab/EditReward-Qwen2.5-VL-7B)"
            )
        if config.dtype not in DTYPES:
            raise ValueError(f"scorer 'editreward': dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
        if not 0 < config.min_pixels <= config.max_pixels:
            raise ValueError("scorer 'editreward': need 0 < min_pixels <= max_pixels")
        self.device = resolve_device(config.device)
        base = config.base_model or config.model
        self.tokenizer = AutoTokenizer.from_pretrained(base, padding_side="right")
        self.template = _chat_template(self.tokenizer, base)
        self.image_processor = AutoImageProcessor.from_pretrained(base)
        # The official create_model_and_processor adds the token, then resizes the embeddings to the tokenizer.
        self.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        self.reward_id = self.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            base, dtype=DTYPES[config.dtype], attn_implementation=config.attn_implementation, device_map=self.device
        )
        self.model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        self.heads = self._load_weights(config.model)
        self.model.eval()
        self.image_id = self.model.config.image_token_id
        self.merge = self.model.config.vision_config.spatial_merge_size**2

    def _load_weights(self, directory: str) -> nn.ModuleList:
        """Copy the release's backbone tensors into the model (every one present, of the right shape, as the
        official ``load_state_dict(strict=True)``) and build ``rm_heads.head_0`` / ``head_1``."""
        names, get = _open_checkpoint(directory)
        params = dict(self.model.state_dict())
        heads: dict[str, torch.Tensor] = {}
        seen = set()
        for name in names:
            if name.startswith("rm_heads."):
                heads[name] = get(name)
                continue
            key = _legacy_name(name)
            if (
                key == "lm_head.weight"
                and key not in params
                and self.model.config.get_text_config().tie_word_embeddings
            ):
                continue  # tied to the embeddings, which the checkpoint also holds
            if key not in params:
                raise ValueError(f"{directory}: tensor {name!r} is not a Qwen2.5-VL parameter")
            tensor = get(name)
            if tuple(tensor.shape) != tuple(params[key].shape):
                raise ValueError(
                    f"{directory}: {name} has shape {tuple(tensor.shape)}, the model {tuple(params[key].shape)}"
                    " (is base_model the backbone this release was trained from?)"
                )
            with torch.no_grad():
                params[key].copy_(tensor)
            seen.add(key)
        tied = {"lm_head.weight"} if self.model.config.get_text_config().tie_word_embeddings else set()
        missing = sorted(set(params) - seen - tied)
        if missing:
            raise ValueError(f"{directory}: {len(missing)} backbone tensors missing, e.g. {missing[:3]}")
        if any(re.match(r"rm_heads\.head_[2-9]", k) for k in heads):
            raise ValueError(f"{directory}: more than two reward heads; EditReward has two (following, quality)")
        return nn.ModuleList([_head(heads, f"rm_heads.head_{i}.") for i in (0, 1)]).to(self.device)

    def _text(self, prompt: str, instruction: str) -> str:
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "image"},
                    {"type": "text", "text": prompt.format(text_prompt=instruction) + REWARD_SUFFIX},
                ],
            }
        ]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=True
        )

    def _pass(self, texts: list[str], counts: list[int], image_embeds: torch.Tensor, head: nn.Module) -> torch.Tensor:
        """(B, 2) head outputs at the ``<|Reward|>`` token of each text (image pads expanded to ``counts``)."""
        rows, k = [], 0
        for t in texts:
            pieces = t.split(IMAGE_PAD)
            if len(pieces) != 3:
                raise RuntimeError(f"the chat template rendered {len(pieces) - 1} image slots, expected 2")
            expanded = pieces[0] + IMAGE_PAD * counts[k] + pieces[1] + IMAGE_PAD * counts[k + 1] + pieces[2]
            k += 2
            rows.append(self.tokenizer(expanded, add_special_tokens=False)["input_ids"])
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows], device=self.device)
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], device=self.device)
        at = ids == self.reward_id
        if not bool((at.sum(1) == 1).all()) or int((ids == self.image_id).sum()) != image_embeds.shape[0]:
            raise RuntimeError("tokenized prompts do not hold one reward token and the image tokens each")
        lm = self.model.model.language_model
        embeds = lm.embed_tokens(ids)
        slots = (ids == self.image_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(slots, image_embeds.to(embeds.dtype))
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        positions = positions.unsqueeze(0).expand(3, -1, -1)
        hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
        hidden = hidden.last_hidden_state[at]  # (B, hidden): one reward token per row
        return head(hidden.float())

    @torch.inference_mode()
    def score_batch(self, requests: list[Any]) -> Scores:
        c = self.config
        n = len(requests)
        errors: list[str | None] = [None] * n
        details: list[Any] = [None] * n
        images, ok = [], []
        for i, r in enumerate(requests):
            reserved = [t for t in (REWARD_TOKEN, IMAGE_PAD) if t in r.instruction]
            if reserved:  # it would add a reward / image slot to the prompt
                errors[i] = f"editreward: the instruction contains the reserved token {reserved[0]}"
                continue
            try:
                pair = [
                    fit_image(r.source, c.min_pixels, c.max_pixels),
                    fit_image(r.edited, c.min_pixels, c.max_pixels),
                ]
            except (ValueError, OSError) as e:
                errors[i] = f"editreward: bad image: {e}"
                continue
            images += pair
            ok.append(i)
        mean = torch.full((n,), math.nan)
        log_sigma = torch.full((n,), math.nan)
        if ok:
            feats = self.image_processor(images=images, return_tensors="pt")
            grid = feats["image_grid_thw"].to(self.device)
            visual = self.model.model.visual
            out = visual(feats["pixel_values"].to(self.device, visual.dtype), grid_thw=grid)
            image_embeds = getattr(out, "pooler_output", out)  # merged patches (transformers 5 returns an output)
            counts = (feats["image_grid_thw"].prod(-1) // self.merge).tolist()
            instructions = [requests[i].instruction for i in ok]
            per_head = [
                self._pass([self._text(p, t) for t in instructions], counts, image_embeds, head).cpu()
                for p, head in zip((FOLLOWING_PROMPT, QUALITY_PROMPT), self.heads)
            ]
            fused = (per_head[0] + per_head[1]) / 2
            mean[ok] = fused[:, 0]
            log_sigma[ok] = fused[:, 1]
            for j, i in enumerate(ok):
                details[i] = {
                    "following": [float(v) for v in per_head[0][j]],
                    "quality": [float(v) for v in per_head[1][j]],
                }
        return Scores({"editreward": mean, "editreward_log_sigma": log_sigma}, errors, details)
