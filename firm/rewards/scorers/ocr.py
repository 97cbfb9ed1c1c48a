"""Flow-GRPO's OCR reward, read by GOT-OCR-2.0; registry name ``ocr``.

Did the image render the text the prompt asks for? The text wanted is the part of the prompt between double quotes,
the text read is GOT-OCR-2.0's plain-text reading of the image, and the reward is one minus their edit distance over
the length of the wanted text. The rules are those of Flow-GRPO's ``OcrScorer`` (github.com/yifan123/flow_grpo,
``flow_grpo/ocr.py``, used by ``ocr_score`` in ``flow_grpo/rewards.py``; read at commit ac4c86e8):

* target: the text after the prompt's first ASCII double quote ``"`` up to the next one (``prompt.split('"')[1]``:
  curly quotes do not count, a second quoted span is ignored, an unclosed quote takes the rest of the prompt);
* both texts are lower-cased (``str.lower``) and lose their ASCII spaces (only ``" "``; other whitespace stays);
* distance 0 when the target occurs anywhere in the text read, else the Levenshtein distance (unit-cost insertions,
  deletions and substitutions of characters) between the text read and the target, capped at the target's length;
* reward = 1 - distance / len(target), in [0, 1]; an empty reading scores 0.

Flow-GRPO reads with PaddleOCR and joins the lines it finds with nothing in between (keeping lines whose confidence
is above 0); GOT-OCR-2.0 has no per-line confidence and returns one text whose lines are separated by line breaks, so
the reading's line breaks are dropped before the comparison (the same joining), and every line counts.

The reading is the transformers model card's plain-text OCR call of ``stepfun-ai/GOT-OCR-2.0-hf`` (Apache-2.0):
``processor(images, return_tensors="pt")`` (GOT's own prompt, the image resized to the checkpoint's square size with
bicubic resampling and CLIP's mean / std), ``generate(do_sample=False, stop_strings="<|im_end|>")`` and a decode that
skips special tokens. The image processor is transformers' PIL backend, whatever else is installed (GOT's original
preprocessing resized PIL images with PIL; transformers 5 picks a torchvision backend when torchvision is there).

A generation is read against its prompt; an edit's edited image against its instruction. Where Flow-GRPO's code
raises for the whole batch, only that request's score is missing here (NaN, with the reason): a prompt without a
double quote (``IndexError`` there) and a target with no characters left after removing spaces (``ZeroDivisionError``
there). Where Flow-GRPO's code scores an OCR failure 0, a failed model call here makes that batch's scores missing
(the scorer contract: a missing score is never a number)::

    rewards:
      ocr: {name: ocr, model: /ckpt/GOT-OCR-2.0-hf, device: cuda}
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from firm.rewards.scorers.base import Scorer, ScorerConfig, Scores, request_image, request_text, resolve_device

log = logging.getLogger(__name__)

STOP = "<|im_end|>"  # GOT's end of turn: the model card's stop string


def quoted_text(prompt: str) -> str:
    """The text the prompt asks to render: what follows its first ``"``, up to the next one (Flow-GRPO's rule)."""
    parts = prompt.split('"')
    if len(parts) < 2:
        raise ValueError('the prompt has no text in double quotes ("...") to read')
    return parts[1]


def normalise(text: str) -> str:
    """Flow-GRPO's normalisation: ASCII spaces removed, lower case."""
    return text.replace(" ", "").lower()


def join_lines(reading: str) -> str:
    """GOT's multi-line reading as one string, lines joined with nothing between (as Flow-GRPO joins PaddleOCR's)."""
    return "".join(reading.splitlines())


def levenshtein(a: str, b: str) -> int:
    """The edit distance between ``a`` and ``b``: fewest single-character insertions, deletions and substitutions."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, ca in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ca != cb))
    return row[-1]


def ocr_reward(target: str, reading: str) -> float:
    """Flow-GRPO's OCR reward of a (joined) reading for a target text, in [0, 1]."""
    target, reading = normalise(target), normalise(reading)
    if not target:
        raise ValueError("the quoted text is empty once spaces are removed: nothing to read")
    distance = 0 if target in reading else min(levenshtein(reading, target), len(target))
    return 1.0 - distance / len(target)


class OCRScorer(Scorer):
    """Flow-GRPO's OCR reward with GOT-OCR-2.0 reading (registry name ``ocr``, output ``ocr``).

    Details per request: ``{"target": the quoted text, "text": GOT's reading as decoded}`` (None for a request that
    has no target).
    """

    @dataclass
    class Config(ScorerConfig):
        name: str = "ocr"
        model: str = ""  # a GOT-OCR-2.0 checkpoint in the transformers layout (stepfun-ai/GOT-OCR-2.0-hf)
        max_new_tokens: int = 512  # the longest reading; the model card uses 4096 for whole document pages
        dtype: str = "auto"  # the weights' dtype: auto (the checkpoint's, as from_pretrained loads it) | float32 | ...

    outputs = ("ocr",)
    tasks = ("gen", "edit")

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        if not config.model:
            raise ValueError("scorer 'ocr': set model: the path of GOT-OCR-2.0 (stepfun-ai/GOT-OCR-2.0-hf)")
        if config.max_new_tokens < 1:
            raise ValueError(f"scorer 'ocr': max_new_tokens must be >= 1, got {config.max_new_tokens}")
        from transformers import AutoProcessor, GotOcr2ForConditionalGeneration
        from transformers.image_processing_backends import PilBackend

        self.device = resolve_device(config.device)
        self.processor = AutoProcessor.from_pretrained(config.model, backend="pil")
        if not isinstance(self.processor.image_processor, PilBackend):
            raise RuntimeError(
                f"{config.model}: the image processor loaded is {type(self.processor.image_processor).__name__}, "
                "not a PIL-backend one"
            )
        dtype = config.dtype if config.dtype == "auto" else getattr(torch, config.dtype, None)
        if not isinstance(dtype, (str, torch.dtype)):
            raise ValueError(f"scorer 'ocr': dtype must be auto or a torch dtype name, got {config.dtype!r}")
        self.model = GotOcr2ForConditionalGeneration.from_pretrained(config.model, dtype=dtype)
        self.model.to(self.device).eval()

    @torch.inference_mode()
    def generate(self, images: list[Any]) -> torch.Tensor:
        """GOT's greedy reading of ``images`` (one model call): the new token ids, (N, T), padded after the stop."""
        inputs = self.processor(images, return_tensors="pt").to(self.device)
        ids = self.model.generate(
            **inputs,
            do_sample=False,
            tokenizer=self.processor.tokenizer,
            stop_strings=STOP,
            max_new_tokens=self.config.max_new_tokens,
        )
        return ids[:, inputs["input_ids"].shape[1] :].cpu()

    def read(self, images: list[Any]) -> list[str]:
        """GOT's plain-text reading of each image, decoded as on the model card."""
        return self.processor.batch_decode(self.generate(images), skip_special_tokens=True)

    def score_batch(self, requests: list[Any]) -> Scores:
        n = len(requests)
        values = torch.full((n,), math.nan, dtype=torch.float32)
        errors: list[str | None] = [None] * n
        details: list[Any] = [None] * n
        targets: dict[int, str] = {}
        for i, r in enumerate(requests):
            try:
                image, text = request_image(r), request_text(r)
                if not isinstance(image, Image.Image) or image.width < 1 or image.height < 1:
                    raise ValueError(f"the image is not a non-empty PIL image ({type(image).__name__})")
                if not isinstance(text, str):
                    raise ValueError(f"the text is a {type(text).__name__}, not a string")
                target = quoted_text(text)
                if not normalise(target):
                    raise ValueError("the quoted text is empty once spaces are removed: nothing to read")
                targets[i] = target
            except ValueError as e:
                errors[i] = f"ocr: {e}"
        if targets:
            ok = list(targets)
            ids = self.generate([request_image(requests[i]) for i in ok])
            readings = self.processor.batch_decode(ids, skip_special_tokens=True)
            # a reading that used every new token without reaching the stop may be cut short: scored as read (as
            # Flow-GRPO scores whatever its reader returns), and flagged so that a too small max_new_tokens shows
            stop_id = self.processor.tokenizer.convert_tokens_to_ids(STOP)
            cut = [ids.shape[1] >= self.config.max_new_tokens and stop_id not in row.tolist() for row in ids]
            for i, reading, c in zip(ok, readings, cut, strict=True):
                values[i] = ocr_reward(targets[i], join_lines(reading))
                details[i] = {"target": targets[i], "text": reading, "truncated": bool(c)}
            if any(cut):
                log.warning(
                    "ocr: %d of %d readings hit max_new_tokens=%d", sum(cut), len(cut), self.config.max_new_tokens
                )
        return Scores({"ocr": values}, errors, details)
