"""Teach a tiny critic checkpoint answers, so that tests (and `make test-vllm`) can serve a critic whose answers parse.

:func:`teach` fine-tunes a ``save_pretrained`` directory in place on ``(conversation, answer)`` pairs (the answer
tokens only are trained). Two answers for the same conversation (e.g. scores 4 and 5) teach the model to split its
probability between them, which makes its expected score a real mean (about 4.5), not an integer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from firm.critics.prompts import PromptSet


def teach(path: str | Path, examples: list[tuple[list[dict], str]], steps: int = 40, lr: float = 3e-2) -> Path:
    """Fine-tune the checkpoint at ``path`` (in place) to answer each conversation with its answer."""
    from transformers import AutoModelForImageTextToText

    from firm.critics.local import ChatEncoder

    path = Path(path)
    encoder = ChatEncoder(path)
    tok = encoder.tokenizer
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    enc = encoder([conv for conv, _ in examples])  # left-padded prompts
    answers = [tok(a + tok.eos_token, add_special_tokens=False)["input_ids"] for _, a in examples]
    n, p = enc["input_ids"].shape
    width = max(len(a) for a in answers)
    pad = tok.pad_token_id
    ans = torch.full((n, width), pad, dtype=torch.long)  # (N, A), right-padded answers
    labels = torch.full((n, p + width), -100, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, a in enumerate(answers):
        ans[i, : len(a)] = torch.tensor(a)
        labels[i, p : p + len(a)] = torch.tensor(a)
        mask[i, : len(a)] = 1
    input_ids = torch.cat([enc["input_ids"], ans], dim=1)  # (N, P + A)
    attention = torch.cat([enc["attention_mask"], mask], dim=1)
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in extra:  # answer tokens are text
        extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros_like(ans)], dim=1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels, **extra).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(path)
    return path


def noise_pairs(n: int, size: int = 32, seed: int = 0) -> list[tuple[Image.Image, Image.Image]]:
    """``n`` (source, edited) pairs of random images, so that a taught answer does not hang on one picture."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a, b = (torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8) for _ in range(2))
        out.append((Image.fromarray(a.numpy()), Image.fromarray(b.numpy())))
    return out


def edit_examples(prompts: PromptSet, pairs, instructions: list[str], exec_scores=(4, 5), cons_score=5) -> list:
    """Execution answers split between ``exec_scores``; Consistency always ``cons_score`` (built-in answer format)."""
    out = []
    for (src, dst), text in zip(pairs, instructions):
        for s in exec_scores:
            msgs = prompts.messages("edit_execution", [src, dst], instruction=text)
            out.append((msgs, f'{{"reasoning": "ok", "score": {s}}}'))
        msgs = prompts.messages("edit_consistency", [src, dst], instruction=text)
        out.append((msgs, f'{{"reasoning": "ok", "score": {cons_score}}}'))
    return out


def gen_examples(prompts: PromptSet, images, texts: list[str]) -> list:
    """Planner, Instruction (boxed) and Quality answers in the built-in formats."""
    out = []
    for img, text in zip(images, texts):
        out.append((prompts.messages("planner", [], prompt=text), f"1. {text}"))
        msgs = prompts.messages("gen_instruction", [img], prompt=text, checklist=[text])
        out.append((msgs, f"1. {text}: yes\n\\boxed{{4}}"))
        msgs = prompts.messages("gen_quality", [img], prompt=text)
        out.append((msgs, '{"reasoning": "clean", "aesthetics": 4, "technical_quality": 3, "structure_texture": 5}'))
    return out
