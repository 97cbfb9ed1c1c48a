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
official ``load_state_dict(strict=True)``, every tensor must be present, of the right shape, and nothing else
(:meth:`~firm.rewards.scorers.qwen_vl.RewardBackbone.load`, shared with HPSv3, whose release is read alike). (The
MiMo-VL release, ``TIGER-Lab/EditReward-MiMo-VL-7B-SFT-2508``, has the same architecture and layout with
``base_model`` ``XiaomiMiMo/MiMo-VL-7B-SFT-2508``, whose own chat template and processor are then used; the tests
cover the Qwen2.5-VL layout.)::

    rewards:
      editreward: {name: editreward, model: /ckpt/EditReward-Qwen2.5-VL-7B, base_model: /ckpt/Qwen2.5-VL-7B-Instruct,
                   device: cuda}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from firm.rewards.scorers.base import Scorer, ScorerConfig, Scores, resolve_device
from firm.rewards.scorers.qwen_vl import IMAGE_PAD, PIXELS, REWARD_TOKEN, RewardBackbone, fit_image, reward_head

# The rubric prompts of EditReward/dataset/prompts.py (INSTRUCTION_EDIT_FOLLOWING, INSTRUCTION_EDIT_QUALITY) and the
# reward-token suffix of EditReward/dataset/data_collator_qwen_edit.py (prompt_with_special_token), verbatim: the
# checkpoint was trained on exactly these texts. Both rubrics list the same inputs.
_INPUTS = (
    "\n"
    "**Inputs Provided:**  \n"
    "- Source Image (before editing)  \n"
    "- Edited Image (after applying the instruction)  \n"
    "- Text Instruction  \n"
    "\n"
    "**Sub-Dimensions to Evaluate:**\n"
    "\n"
)
FOLLOWING_PROMPT = (
    (
        "\n"
        "You are tasked with evaluating an edited image **in comparison with the original source image** "
        "based on **Instruction Following & Semantic Fidelity**, and assigning a score from 1 to 4, with 1 "
        "being the worst and 4 being the best.  \n"
        "This dimension focuses on how accurately, completely, and exclusively the model executed the given "
        "text instruction.\n"
    )
    + _INPUTS
    + (
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
)
QUALITY_PROMPT = (
    (
        "\n"
        "You are tasked with evaluating an edited image **in comparison with the original source image** "
        "based on **Visual Quality & Realism**, and assigning a score from 1 to 4, with 1 being the worst "
        "and 4 being the best.  \n"
        "This dimension focuses on how realistic, artifact-free, and aesthetically appealing the edited "
        "image is, while remaining consistent with the source image.\n"
    )
    + _INPUTS
    + (
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
)
REWARD_SUFFIX = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def release_file(directory: str) -> Path:
    """The weights file of an EditReward release directory: ``model.safetensors``, else ``model.pth``."""
    for name in ("model.safetensors", "model.pth"):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    raise FileNotFoundError(
        f"scorer 'editreward': {directory}: no model.safetensors or model.pth (the EditReward release's weights)"
    )


class EditRewardScorer(Scorer):
    """EditReward of each edit (registry name ``editreward``; outputs ``editreward``, ``editreward_log_sigma``)."""

    @dataclass
    class Config(ScorerConfig):
        name: str = "editreward"
        model: str = ""  # the EditReward release directory (model.safetensors), e.g. TIGER-Lab/EditReward-Qwen2.5-VL-7B
        base_model: str = ""  # its backbone, Qwen/Qwen2.5-VL-7B-Instruct ("": ``model`` holds config and processor)
        dtype: str = "bfloat16"  # the backbone's dtype (the official bf16); the heads always run in float32
        attn_implementation: str = "sdpa"  # or flash_attention_2 (the official default where installed)
        # image area bounds of the resize (EditReward-Qwen2.5-7B-VL.yaml: 256*28*28 both)
        min_pixels: int = PIXELS
        max_pixels: int = PIXELS

    outputs = ("editreward", "editreward_log_sigma")
    tasks = ("edit",)

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        from transformers import Qwen2_5_VLForConditionalGeneration

        if not config.model:
            raise ValueError(
                "scorer 'editreward': set model: the EditReward release (TIGER-Lab/EditReward-Qwen2.5-VL-7B)"
            )
        if config.dtype not in DTYPES:
            raise ValueError(f"scorer 'editreward': dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
        if not 0 < config.min_pixels <= config.max_pixels:
            raise ValueError("scorer 'editreward': need 0 < min_pixels <= max_pixels")
        self.device = resolve_device(config.device)
        self.backbone = RewardBackbone(
            "editreward",
            Qwen2_5_VLForConditionalGeneration,
            config.base_model or config.model,
            dtype=DTYPES[config.dtype],
            device=self.device,
            attn_implementation=config.attn_implementation,
        )
        # rm_heads.head_0 reads the instruction-following pass, head_1 the visual-quality one
        hidden = self.backbone.model.config.get_text_config().hidden_size
        self.heads = nn.ModuleList([reward_head(hidden) for _ in range(2)]).to(self.device, torch.float32)
        self.backbone.load(
            release_file(config.model), {f"rm_heads.head_{i}": head for i, head in enumerate(self.heads)}
        )
        self.heads.eval()

    @torch.inference_mode()
    def score_batch(self, requests: list[Any]) -> Scores:
        c, bb = self.config, self.backbone
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
            embeds, counts = bb.see(images)  # the official processor call, its own resize left on
            instructions = [requests[i].instruction for i in ok]
            per_head = []
            for prompt, head in zip((FOLLOWING_PROMPT, QUALITY_PROMPT), self.heads):
                texts = [bb.chat(prompt.format(text_prompt=t) + REWARD_SUFFIX, images=2) for t in instructions]
                per_head.append(head(bb.reward_states(texts, counts, embeds).float()).cpu())
            fused = (per_head[0] + per_head[1]) / 2
            mean[ok] = fused[:, 0]
            log_sigma[ok] = fused[:, 1]
            for j, i in enumerate(ok):
                details[i] = {
                    "following": [float(v) for v in per_head[0][j]],
                    "quality": [float(v) for v in per_head[1][j]],
                }
        return Scores({"editreward": mean, "editreward_log_sigma": log_sigma}, errors, details)
