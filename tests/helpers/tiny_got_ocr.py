"""``teach_reading(dir, examples)`` fine-tunes the tiny GOT-OCR-2.0 checkpoint (:mod:`firm.rewards.tiny.got_ocr`) for
a few steps to read given images as given texts, so that a test can also see a correct reading score 1."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from firm.rewards.tiny.got_ocr import build_tiny_got_ocr  # noqa: F401 - the tests import it from here


def teach_reading(path: str | Path, examples: list[tuple[Image.Image, str]], steps: int = 40) -> Path:
    """Fine-tune the checkpoint at ``path`` (in place) to read each image as its text, ending with ``<|im_end|>``."""
    from transformers import AutoProcessor, GotOcr2ForConditionalGeneration

    path = Path(path)
    processor = AutoProcessor.from_pretrained(path)
    model = GotOcr2ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    tok = processor.tokenizer
    images, texts = zip(*examples, strict=True)
    enc = processor(list(images), return_tensors="pt")  # same prompt length for every image: no padding
    answers = [tok(t + "<|im_end|>", add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(a) for a in answers)
    ans = torch.tensor([a + [tok.pad_token_id] * (width - len(a)) for a in answers])
    labels = torch.cat([torch.full_like(enc["input_ids"], -100), ans.masked_fill(ans == tok.pad_token_id, -100)], 1)
    input_ids = torch.cat([enc["input_ids"], ans], 1)
    attention = torch.cat([enc["attention_mask"], torch.ones_like(ans)], 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(
            input_ids=input_ids, attention_mask=attention, pixel_values=enc["pixel_values"], labels=labels
        ).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(path)
    return path
