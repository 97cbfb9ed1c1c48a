"""The OCR scorer: Flow-GRPO's reward formula, GOT-OCR-2.0's model-card reading, and what each request gets.

Parity is pinned twice:

* the reward of given readings against a transcription of Flow-GRPO's ``OcrScorer`` (below, in our own words);
* the reading itself against the transformers model card's plain-text call, token for token, on a tiny random
  GOT-OCR-2.0 checkpoint (``tests/helpers/tiny_got_ocr.py``).

A random model reads garbage, so a copy of the checkpoint is also taught to read two sign images: on it a correct
reading scores 1, and wrong preprocessing visibly moves the reward.
"""

from __future__ import annotations

import functools
import math
import random
import shutil

import pytest
import torch
from PIL import Image, ImageDraw

from firm.critics.types import EditRequest, GenRequest
from firm.rewards.scorers.base import build_scorer
from firm.rewards.scorers.ocr import OCRScorer, join_lines, levenshtein, ocr_reward, quoted_text
from tests.helpers.tiny_got_ocr import build_tiny_got_ocr, teach_reading

MAX_NEW = 6  # tokens read per image in the tests (a tiny model's reading is short)


# Flow-GRPO's OCR reward, transcribed from github.com/yifan123/flow_grpo, flow_grpo/ocr.py (OcrScorer.__call__) at
# commit ac4c86e8cae021841f1fde853d340e0db67690dd (the file last changed in fc412d22). PaddleOCR's reading is replaced
# by the given text (its lines already joined, as that code joins PaddleOCR's lines), and Levenshtein.distance (the
# `Levenshtein` package is not installed here) by the textbook recursive definition below.
@functools.cache
def _textbook_distance(a: str, b: str) -> int:
    if not a or not b:
        return len(a) + len(b)
    if a[0] == b[0]:
        return _textbook_distance(a[1:], b[1:])
    return 1 + min(_textbook_distance(a[1:], b), _textbook_distance(a, b[1:]), _textbook_distance(a[1:], b[1:]))


def flow_grpo_rewards(readings: list[str], prompts: list[str]) -> list[float]:
    targets = [prompt.split('"')[1] for prompt in prompts]  # the text between the first two double quotes
    rewards = []
    for text, target in zip(readings, targets, strict=True):
        text = text.replace(" ", "").lower()
        target = target.replace(" ", "").lower()
        dist = 0 if target in text else _textbook_distance(text, target)
        dist = min(dist, len(target))  # too much unrelated text costs no more than reading nothing
        rewards.append(1 - dist / len(target))
    return rewards


def sign(text: str, colour: str) -> Image.Image:
    image = Image.new("RGB", (96, 64), colour)
    ImageDraw.Draw(image).text((4, 24), text, fill="black")
    return image


HELLO = sign("Hello World", "white")
OPEN = sign("OPEN 24", "yellow")


@pytest.fixture(scope="module")
def tiny_got(tmp_path_factory):
    return build_tiny_got_ocr(tmp_path_factory.mktemp("got") / "tiny-got-ocr")


@pytest.fixture(scope="module")
def taught_got(tiny_got, tmp_path_factory):
    path = tmp_path_factory.mktemp("got_taught") / "taught-got-ocr"
    shutil.copytree(tiny_got, path)
    return teach_reading(path, [(HELLO, "Hello World"), (OPEN, "OPEN 24 HOURS")], steps=30)


def scorer_for(path, **kw) -> OCRScorer:
    return OCRScorer(OCRScorer.Config(model=str(path), max_new_tokens=kw.pop("max_new_tokens", MAX_NEW), **kw))


# -- the distance and the formula -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [
        ("", "", 0),
        ("abc", "", 3),
        ("", "abc", 3),
        ("abc", "abc", 0),
        ("kitten", "sitting", 3),  # k->s, e->i, +g
        ("flaw", "lawn", 2),  # -f, +n
        ("intention", "execution", 5),
        ("gumbo", "gambol", 2),  # u->a, +l
        ("saturday", "sunday", 3),
        ("ab", "ba", 2),  # no transpositions
        ("straße", "strasse", 2),  # characters, not bytes
        ("a\tb", "ab", 1),
    ],
)
def test_levenshtein_hand_checked(a, b, d):
    assert levenshtein(a, b) == d
    assert levenshtein(b, a) == d
    assert _textbook_distance(a, b) == d  # the stand-in used in the transcription above


def test_levenshtein_matches_textbook_definition_on_random_strings():
    rng = random.Random(0)
    for _ in range(200):
        a, b = ("".join(rng.choices("abc ", k=rng.randint(0, 8))) for _ in range(2))
        assert levenshtein(a, b) == _textbook_distance(a, b), (a, b)


# (prompt, joined reading) pairs that exercise every rule of the official code.
FORMULA_CASES = [
    ('A shop sign that says "Hello World"', "HELLO WORLD"),  # case and spaces do not count
    ('"Hello World" in neon', "Hello Wrld"),  # one deletion
    ('The word "Nice" printed twice', "xx NICE xx"),  # contained: distance 0
    ('a poster "OPEN 24 HOURS" on a door', "open 24 hour5"),
    ('"abc"', ""),  # nothing read: 0
    ('"abc"', "xyzxyzxyzxyz"),  # distance capped at the target's length: 0, not negative
    ('say "Coffee" and "Tea"', "coffee"),  # the first quoted span only
    ('say "Coffee" and "Tea"', "tea"),
    ('An unclosed "quote here', "QUOTE HERE"),  # an unclosed quote takes the rest of the prompt
    ('" Spaced  Out "', "spacedout"),
    ('"Straße"', "STRASSE"),
    ('"a b"', "a\tb"),  # only ASCII spaces are removed
    ('"kitten"', "sitting"),
    ('\u201ccurly\u201d and "straight"', "straight"),  # curly quotes are not quotes
]


def test_reward_formula_matches_flow_grpo():
    prompts, readings = zip(*FORMULA_CASES, strict=True)
    ours = [ocr_reward(quoted_text(p), r) for p, r in FORMULA_CASES]
    assert ours == flow_grpo_rewards(list(readings), list(prompts))
    assert ours[:3] == [1.0, 0.9, 1.0] and ours[4:6] == [0.0, 0.0]
    assert ours[6:8] == [1.0, 1 - 5 / 6]  # tea -> coffee: 2 substitutions, 3 insertions
    assert all(0.0 <= v <= 1.0 for v in ours)


def test_wrong_text_preprocessing_changes_the_reward():
    target, reading = "Hello World", "HELLO\nWORLD"  # GOT puts line breaks between lines
    assert ocr_reward(target, join_lines(reading)) == 1.0
    assert ocr_reward(target, reading) == pytest.approx(0.9)  # lines not joined
    no_lower = 1 - min(levenshtein("HELLOWORLD", "helloworld"), 10) / 10  # case kept
    no_spaces_removed = 1 - levenshtein("helloworld", "hello world") / 11  # spaces kept in the target
    assert no_lower == 0.0 and no_spaces_removed == pytest.approx(1 - 1 / 11)


def test_prompts_without_a_target_are_refused():
    with pytest.raises(ValueError, match="double quotes"):
        quoted_text("a sign with no quoted text")
    with pytest.raises(ValueError, match="empty"):
        ocr_reward(quoted_text('an empty sign ""'), "anything")
    with pytest.raises(ValueError, match="empty"):
        ocr_reward(quoted_text('a blank sign "   "'), "anything")


# -- the reading: the model card's call ----------------------------------------------------------------------------


def model_card_reading(path, images):
    """transformers' GOT-OCR2 model card, "Plain text inference batched" (docs/source/en/model_doc/got_ocr2.md)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    inputs = processor(images, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(
            **inputs, do_sample=False, tokenizer=processor.tokenizer, stop_strings="<|im_end|>", max_new_tokens=MAX_NEW
        )
    new = ids[:, inputs["input_ids"].shape[1] :]
    return new, processor.batch_decode(new, skip_special_tokens=True)


IMAGES = [HELLO, OPEN, sign("Coffee", "lightblue").convert("L"), sign("Sale", "pink").resize((40, 120))]


def test_reading_matches_the_model_card_call(tiny_got):
    ids, texts = model_card_reading(tiny_got, IMAGES)
    assert len({tuple(row) for row in ids.tolist()}) > 1  # the reading depends on the image
    scorer = scorer_for(tiny_got, batch_size=len(IMAGES))
    assert torch.equal(scorer.generate(IMAGES), ids)
    prompts = [f'a sign that says "{t}"' for t in ("Hello World", "OPEN 24 HOURS", "Coffee", "Sale")]
    out = scorer([GenRequest(image=im, prompt=p) for im, p in zip(IMAGES, prompts, strict=True)])
    assert [d["text"] for d in out.details] == texts
    assert [d["target"] for d in out.details] == ["Hello World", "OPEN 24 HOURS", "Coffee", "Sale"]
    stop = scorer.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")  # a reading without its stop was cut
    cut = [ids.shape[1] >= scorer.config.max_new_tokens and stop not in row for row in ids.tolist()]
    assert [d["truncated"] for d in out.details] == cut
    assert out.values["ocr"].tolist() == pytest.approx(flow_grpo_rewards([join_lines(t) for t in texts], prompts))
    assert out.errors == [None] * len(IMAGES)


@pytest.mark.parametrize(
    "wrong",
    [
        {"do_normalize": False},  # pixels in [0, 1] instead of CLIP-normalised
        {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},  # ImageNet's statistics
        {"format": True},  # GOT's "OCR with format" prompt instead of plain OCR
        {"input_size": 32},  # the image handed over at a lower resolution (32 px, then resized up to 64 by GOT)
    ],
)
def test_wrong_preprocessing_changes_the_reading(tiny_got, wrong, monkeypatch):
    """Each of these mistakes changes the tokens read, so the token-exact parity test above would catch it. (Bilinear
    instead of bicubic resampling moves the tiny model's pixels too little to change its 6 greedy tokens.)"""
    ids, _ = model_card_reading(tiny_got, IMAGES)
    scorer = scorer_for(tiny_got, batch_size=len(IMAGES))
    images = IMAGES
    for key, value in wrong.items():
        if key == "input_size":
            images = [im.resize((value, value), Image.Resampling.BICUBIC) for im in IMAGES]
        else:
            target = scorer.processor if key == "format" else scorer.processor.image_processor
            monkeypatch.setattr(target, key, value, raising=False)
    assert not torch.equal(scorer.generate(images), ids)


# -- what each request gets, on a model taught to read ---------------------------------------------------------------


def test_taught_model_reads_and_scores_per_request(taught_got):
    scorer = build_scorer({"name": "ocr", "model": str(taught_got), "max_new_tokens": 12, "batch_size": 2})
    requests = [
        GenRequest(image=HELLO, prompt='A shop sign that reads "hello world"'),
        GenRequest(image=OPEN, prompt='a door with "Open 24 hours" on it'),
        GenRequest(image=HELLO, prompt='a door with "Open 24 hours" on it'),  # the wrong text in the image
        GenRequest(image=OPEN, prompt="a door with no quoted text"),
        GenRequest(image=OPEN, prompt='an empty sign ""'),
        GenRequest(image=None, prompt='a sign "Hello"'),
    ]
    out = scorer(requests)
    v = out.values["ocr"].tolist()
    assert v[:2] == [1.0, 1.0]
    assert out.details[0]["text"] == "Hello World" and out.details[1]["text"] == "OPEN 24 HOURS"
    assert v[2] == pytest.approx(flow_grpo_rewards([out.details[2]["text"]], [requests[2].prompt])[0]) and v[2] < 0.5
    assert all(math.isnan(x) for x in v[3:])
    assert out.errors[:3] == [None] * 3
    assert "double quotes" in out.errors[3] and "empty" in out.errors[4] and "PIL image" in out.errors[5]
    assert scorer.calls == 3  # batch_size 2


def test_edit_reads_the_edited_image_against_the_instruction(taught_got):
    scorer = scorer_for(taught_got, max_new_tokens=12)
    instruction = 'Replace the text on the sign with "Hello World"'
    out = scorer([EditRequest(source=OPEN, edited=HELLO, instruction=instruction)])
    assert out.values["ocr"].tolist() == [1.0] and out.details[0]["target"] == "Hello World"
    out = scorer([EditRequest(source=HELLO, edited=OPEN, instruction=instruction)])
    assert out.values["ocr"].item() < 0.5


def test_wrong_prompt_template_moves_the_taught_reward(taught_got, monkeypatch):
    """GOT's "OCR with format" query instead of the plain "OCR" one: the reward itself moves well past any tolerance.
    (The taught model learned its two images by little more than their colours, so pixel-level mistakes do not
    reliably move its reward; the token-exact test on the random model covers those.)"""
    scorer = scorer_for(taught_got, max_new_tokens=12)
    requests = [GenRequest(image=HELLO, prompt='"Hello World"'), GenRequest(image=OPEN, prompt='"OPEN 24 HOURS"')]
    assert scorer(requests).values["ocr"].tolist() == [1.0, 1.0]
    monkeypatch.setattr(scorer.processor, "format", True, raising=False)
    assert scorer(requests).values["ocr"].mean().item() < 0.9


def test_config_errors(tiny_got):
    with pytest.raises(ValueError, match="set model"):
        OCRScorer(OCRScorer.Config())
    with pytest.raises(ValueError, match="max_new_tokens"):
        scorer_for(tiny_got, max_new_tokens=0)
