"""CriticSFTModule: answer-only loss and label masking, prompt extraction for validation generation, the schedule."""

import math

import pytest
import torch

from firm.critics.sft import (
    IGNORE_INDEX,
    answer_only_loss,
    answer_positions,
    kept_answer_loss,
    prompt_batch,
    warmup_cosine,
)


def _batch():
    # Row 0: right-padded, prompt 4 tokens, answer 3; row 1: left-padded, prompt 3 tokens, answer 2.
    input_ids = torch.tensor([[11, 12, 13, 14, 21, 22, 23, 0], [0, 0, 0, 15, 16, 17, 24, 25]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1, 1]])
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, 4:7] = input_ids[0, 4:7]
    labels[1, 6:8] = input_ids[1, 6:8]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def test_answer_positions_are_shifted_by_one():
    keep = answer_positions(_batch()["labels"])
    assert keep[0].nonzero().flatten().tolist() == [3, 4, 5]  # positions 3..5 predict answer tokens 4..6
    assert keep[1].nonzero().flatten().tolist() == [5, 6]


def test_answer_only_loss_counts_only_answer_tokens():
    torch.manual_seed(0)
    b = _batch()
    logits = torch.randn(2, 8, 30, requires_grad=True)
    loss, n = answer_only_loss(logits, b["labels"])
    assert n == 5
    # By hand: mean of -log softmax at the 5 (position, target) pairs.
    logp = logits.log_softmax(-1)
    pairs = [(0, 3, 21), (0, 4, 22), (0, 5, 23), (1, 5, 24), (1, 6, 25)]
    manual = -sum(logp[r, t, y] for r, t, y in pairs) / 5
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    # Label masking: prompt, image and padding positions get no gradient at all.
    loss.backward()
    touched = logits.grad.abs().sum(-1) > 0  # (B, L)
    assert touched.nonzero().tolist() == [[r, t] for r, t, _ in pairs]
    # Logits computed only at the kept positions give the same loss.
    keep = answer_positions(b["labels"])
    kept, n2 = kept_answer_loss(logits.detach()[keep], b["labels"], keep)
    assert n2 == 5 and kept.item() == pytest.approx(loss.item(), rel=1e-6)


def test_prompt_batch_left_pads_the_prompt_part():
    b = _batch()
    b["mm_token_type_ids"] = torch.tensor([[0, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0]])
    b["pixel_values"] = torch.ones(3, 4)
    inputs, starts = prompt_batch(b, pad_id=0)
    assert starts == [4, 6]
    assert inputs["input_ids"].tolist() == [[11, 12, 13, 14], [0, 15, 16, 17]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert inputs["mm_token_type_ids"].tolist() == [[0, 1, 1, 0], [0, 0, 1, 0]]
    assert inputs["pixel_values"] is b["pixel_values"]


def test_warmup_cosine():
    f = warmup_cosine(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    g = warmup_cosine(total_steps=10, warmup_steps=0, min_ratio=0.1)
    assert g(0) == pytest.approx(1.0) and g(10) == pytest.approx(0.1)
    assert all(0 <= f(s) <= 1 for s in range(120)) and not math.isnan(f(1000))
