"""Judges: turn an image (and its item) into per-sample metrics, keeping every raw answer.

A judge asks one or more *questions* per sample (a FIRM dimension, VIEScore's SC and PQ, a GenEval yes/no, ...);
each question's answer is a :class:`firm.bench.evaluate.Prediction` (parsed value or ``None`` with the reason, and
the raw text), which is what the score stage caches. :meth:`Judge.metrics` then combines one sample's answers into
its metrics; a metric whose inputs are missing is ``None`` (counted in the report, never a number).

Judges (``firm.registry.JUDGES``):

* ``firm_critic``: any critic backend of ``firm.registry.CRITICS`` on FIRM's rubrics: E / C / CME for edits,
  I / Q / QMA for generation, normalised to [0, 1] by the library's reward code (the shapes world's judge is this one
  with the rule critic);
* ``viescore``: GEdit-Bench's VIEScore-style SC 0-10 and PQ 0-10 from a VLM behind any chat backend;
* ``imgedit``: ImgEdit's three 1-5 criteria from a VLM;
* ``geneval_vqa``: yes/no questions derived from GenEval's metadata, answered by a VLM (not GenEval's detector).

The VLM judges' prompts are written here, in our own words, carrying each benchmark's rubric facts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from firm.bench.evaluate import Prediction
from firm.critics.types import (
    CONSISTENCY,
    EXECUTION,
    INSTRUCTION,
    QUALITY,
    CriticResult,
    EditRequest,
    GenRequest,
    check_score,
)
from firm.eval.items import EDIT, GEN, PromptItem


@dataclass
class Query:
    """One question to the judge about one sample."""

    sample_id: str  # "<policy label>/<item id>__s<seed>"
    qid: str  # the question's id within the sample
    item: PromptItem
    image: Image.Image

    @property
    def answer_id(self) -> str:
        return f"{self.sample_id}/{self.qid}"


class Judge:
    """Base class: ``questions`` per item, ``answer`` a batch of queries, ``metrics`` of one sample's answers."""

    kinds: tuple[str, ...] = (EDIT, GEN)  # prompt-set kinds this judge can score
    metric_names: tuple[str, ...] = ()  # per-sample metrics, the headline first
    overall: str = "samples"  # the overall row: mean over samples | mean of the category means (GenEval)
    scale: str = ""  # what the numbers are, for the report
    version: str = "1"  # bump when the prompts change: cached answers of older prompts are not reused

    def __init__(self, config: Any, kind: str) -> None:
        if kind not in self.kinds:
            raise ValueError(f"judge {config.name!r} scores {list(self.kinds)} prompt sets, not {kind!r}")
        self.config, self.kind = config, kind

    def questions(self, item: PromptItem) -> list[str]:
        raise NotImplementedError

    def answer(self, queries: list[Query]) -> list[Prediction]:
        raise NotImplementedError

    def metrics(self, item: PromptItem, answers: dict[str, Prediction]) -> dict[str, float | None]:
        raise NotImplementedError

    def metrics_batch(self, items: list[PromptItem], answers: list[dict[str, Prediction]]) -> list[dict[str, Any]]:
        return [self.metrics(it, a) for it, a in zip(items, answers, strict=True)]

    def close(self) -> None:
        close = getattr(getattr(self, "critic", None), "close", None)
        if callable(close):
            close()


# --------------------------------------------------------------------------------------------------------------------
# FIRM critic scores


class FirmCriticJudge(Judge):
    """FIRM's critic rubrics through any critic backend: E / C / CME (edit) or I / Q / QMA (generation)."""

    @dataclass
    class Config:
        name: str = "firm_critic"
        critic: dict[str, Any] = field(default_factory=lambda: {"name": "http"})  # any CRITICS entry + its settings
        reward: dict[str, Any] | None = None  # the combiner (null: cme for edits, qma for generation)
        use_expected: bool = False  # use a critic's expected scores when it returns them

    def __init__(self, config: Config, kind: str, *, critic: Any = None) -> None:
        super().__init__(config, kind)
        from firm.critics.factory import build_critic
        from firm.rewards.combiners import CMEReward, QMAReward
        from firm.rewards.functions import FirmEditReward, FirmGenReward

        self.critic = critic if critic is not None else _LazyCritic(lambda: build_critic(dict(config.critic)))
        reward_cls, default = (FirmEditReward, CMEReward) if kind == EDIT else (FirmGenReward, QMAReward)
        combiner = dict(config.reward) if config.reward else default()
        self.reward = reward_cls(self.critic, combiner, use_expected=config.use_expected)
        self.dims = (EXECUTION, CONSISTENCY) if kind == EDIT else (INSTRUCTION, QUALITY)
        self.headline = str(config.reward["name"]) if config.reward else ("cme" if kind == EDIT else "qma")
        self.metric_names = (self.headline, *self.dims)
        self.scale = "FIRM critic scores 1..5 normalised to [0, 1] ((s - 1) / 4)"

    def questions(self, item: PromptItem) -> list[str]:
        return list(self.dims)

    def request(self, item: PromptItem, image: Image.Image, dims: tuple[str, ...]) -> Any:
        if self.kind == EDIT:
            return EditRequest(item.source_image(), image, item.prompt, key=item.id, dimensions=dims)
        checklist = item.meta.get("checklist")
        return GenRequest(image, item.prompt, list(checklist) if checklist else None, key=item.id, dimensions=dims)

    def answer(self, queries: list[Query]) -> list[Prediction]:
        groups: dict[str, list[Query]] = {}
        for q in queries:
            groups.setdefault(q.sample_id, []).append(q)
        reqs = [self.request(g[0].item, g[0].image, tuple(q.qid for q in g)) for g in groups.values()]
        results = self.critic.score(reqs)
        if len(results) != len(reqs):
            raise RuntimeError(f"critic returned {len(results)} results for {len(reqs)} requests")
        by_id: dict[str, Prediction] = {}
        for g, res in zip(groups.values(), results, strict=True):
            for q in g:
                by_id[q.answer_id] = _prediction(q.answer_id, q.qid, res)
        return [by_id[q.answer_id] for q in queries]

    def metrics_batch(self, items: list[PromptItem], answers: list[dict[str, Prediction]]) -> list[dict[str, Any]]:
        results = []
        for ans in answers:
            scores = {d: (ans[d].score if d in ans else None) for d in self.dims}
            expected = {d: ans[d].details.get("expected_score") for d in self.dims if d in ans}
            results.append(CriticResult(scores=scores, details={"expected_scores": expected}))
        out = self.reward.combine_results(results) if results else None
        rows = []
        for i in range(len(answers)):
            row = {self.headline: _num(out.rewards[i])}
            row.update({d: _num(out.components[d][i]) for d in self.dims})
            rows.append(row)
        return rows

    def metrics(self, item: PromptItem, answers: dict[str, Prediction]) -> dict[str, float | None]:
        return self.metrics_batch([item], [answers])[0]


class _LazyCritic:
    """Builds the critic on its first request (the report stage combines cached answers without one)."""

    def __init__(self, make: Any) -> None:
        self._make, self._critic = make, None

    def score(self, requests: list[Any]) -> list[CriticResult]:
        if self._critic is None:
            self._critic = self._make()
        return self._critic.score(requests)

    def close(self) -> None:
        close = getattr(self._critic, "close", None)
        if callable(close):
            close()


def _num(t: Any) -> float | None:
    v = float(t)
    return None if math.isnan(v) else v


def _prediction(answer_id: str, dim: str, res: CriticResult) -> Prediction:
    raw, reasoning = str(res.raw.get(dim, "")), str(res.reasoning.get(dim, ""))
    exp = (res.details.get("expected_scores") or {}).get(dim) if isinstance(res.details, dict) else None
    details = {"expected_score": exp} if isinstance(exp, (int, float)) else {}
    if dim not in res.scores:
        return Prediction(answer_id, None, f"critic returned no {dim!r} score", raw, reasoning, res.latency_s)
    value = res.scores[dim]
    score = check_score(value)
    if score is None:
        error = res.errors.get(dim) or ("no score parsed" if value is None else f"score {value!r} not in 1..5")
        return Prediction(answer_id, None, error, raw, reasoning, res.latency_s, details)
    return Prediction(answer_id, score, None, raw, reasoning, res.latency_s, details)


# --------------------------------------------------------------------------------------------------------------------
# VLM judges over a chat backend


class ChatJudge(Judge):
    """A judge that asks a VLM free-form questions through a critic backend's chat interface (HTTP / local)."""

    def __init__(self, config: Any, kind: str) -> None:
        super().__init__(config, kind)
        self.backend: Any = None  # built on the first question (the report stage needs none)

    def _chat(self, conversations: list[list[dict[str, Any]]]) -> list[str]:
        from firm.critics.factory import build_critic

        if self.backend is None:
            self.backend = build_critic(dict(self.config.backend))
        chat = getattr(self.backend, "complete", None) or getattr(self.backend, "generate_texts", None)
        if chat is None:
            raise ValueError(
                f"judge {self.config.name}: backend {self.config.backend.get('name')!r} cannot answer free-form "
                "questions (use `http` or `local`)"
            )
        return chat(conversations)

    def conversation(self, query: Query) -> list[dict[str, Any]]:
        raise NotImplementedError

    def parse(self, qid: str, text: str) -> tuple[float | None, str | None, dict[str, Any]]:
        raise NotImplementedError

    def answer(self, queries: list[Query]) -> list[Prediction]:
        texts = self._chat([self.conversation(q) for q in queries])
        if len(texts) != len(queries):
            raise RuntimeError(f"backend returned {len(texts)} answers for {len(queries)} questions")
        out = []
        for q, text in zip(queries, texts, strict=True):
            if not text:
                out.append(Prediction(q.answer_id, None, "no reply", ""))
                continue
            value, error, details = self.parse(q.qid, text)
            out.append(Prediction(q.answer_id, value, error, text, "", 0.0, details))
        return out

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if callable(close):
            close()


def _user(images: list[Image.Image], text: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [*({"type": "image", "image": im} for im in images), {"type": "text", "text": text}],
        }
    ]


def parse_score_list(text: str, n: int, lo: float, hi: float) -> tuple[list[float] | None, str | None]:
    """The last JSON object of ``text`` with a ``score`` list of ``n`` numbers in ``[lo, hi]``."""
    for m in reversed(list(re.finditer(r"\{[^{}]*\}", text, flags=re.S))):
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        s = obj.get("score") if isinstance(obj, dict) else None
        if (
            isinstance(s, list)
            and len(s) == n
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in s)
        ):
            if all(lo <= v <= hi for v in s):
                return [float(v) for v in s], None
            return None, f"scores {s} outside {lo:g}..{hi:g}"
    return None, f'no JSON object with "score": [{n} numbers] in the answer'


VIESCORE_CONTEXT = """You rate the work of an AI image editor. All images, people included, are AI-generated.
Keep the reasoning short, and answer with one JSON object only:
{"score": [number, number], "reasoning": "..."}"""

VIESCORE_SC = """Two images follow: first the original, then the result of editing it with this instruction:
"{instruction}"

Give two integer scores from 0 to 10.
First score, editing success: 0 means the edited image does not follow the instruction at all; 10 means the requested
change is carried out completely and exactly.
Second score, over-editing: 0 means the edited image no longer resembles the original; 10 means nothing was changed
beyond what the instruction asks for.
Judge only what the instruction asks; ignore small differences in sharpness or colour noise."""

VIESCORE_PQ = """One AI-generated image follows. Rate its perceptual quality with two integer scores from 0 to 10.
First score, naturalness: 0 means the scene looks clearly unnatural (wrong lighting, impossible shadows, wrong sense
of distance or scale); 10 means it looks like a natural photograph or a deliberate artwork.
Second score, artifacts: 0 means heavy artifacts (distortion, blur, smeared or broken objects, malformed hands or faces,
watermarks); 10 means no visible artifacts.
Do not judge the content of the image, only how well it is made."""


class VIEScoreJudge(ChatJudge):
    """GEdit-Bench's scoring: SC = min(editing success, over-editing), PQ = min(naturalness, artifacts), 0-10 each;
    overall = sqrt(SC * PQ) per sample, averaged."""

    @dataclass
    class Config:
        name: str = "viescore"
        backend: dict[str, Any] = field(default_factory=lambda: {"name": "http"})  # chat backend (http: GPT-4.1, ...)

    kinds = (EDIT,)
    metric_names = ("overall", "sc", "pq")
    scale = "VIEScore-style 0-10 (GEdit-Bench): SC, PQ, overall = sqrt(SC * PQ)"

    def questions(self, item: PromptItem) -> list[str]:
        return ["sc", "pq"]

    def conversation(self, query: Query) -> list[dict[str, Any]]:
        if query.qid == "sc":
            text = VIESCORE_CONTEXT + "\n\n" + VIESCORE_SC.format(instruction=query.item.prompt)
            return _user([query.item.source_image(), query.image], text)
        return _user([query.image], VIESCORE_CONTEXT + "\n\n" + VIESCORE_PQ)

    def parse(self, qid: str, text: str) -> tuple[float | None, str | None, dict[str, Any]]:
        scores, error = parse_score_list(text, 2, 0, 10)
        if scores is None:
            return None, error, {}
        return min(scores), None, {"scores": scores}

    def metrics(self, item: PromptItem, answers: dict[str, Prediction]) -> dict[str, float | None]:
        sc, pq = answers["sc"].score, answers["pq"].score
        overall = math.sqrt(sc * pq) if sc is not None and pq is not None else None
        return {"overall": overall, "sc": sc, "pq": pq}


IMGEDIT_FOCUS = {
    "add": "the requested object is present, placed plausibly, with matching lighting and scale",
    "remove": "the object is gone and the area behind it is filled in believably, with no leftover traces",
    "replace": "the named object is replaced by the requested one, in the same place and pose, the rest unchanged",
    "adjust": "the requested attribute (colour, material, size, ...) of the object changed as asked, nothing else",
    "extract": "only the requested object is kept, cleanly cut out, on a plain background",
    "style": "the whole image takes the requested style while its content and layout stay recognisable",
    "background": "the background is replaced as asked while the foreground subject is kept intact",
    "compose": "every one of the several requested changes is carried out",
    "action": "the subject performs the requested action or pose, keeping its identity",
}

IMGEDIT_PROMPT = """Two images follow: an original, then the result of an AI edit with this instruction:
"{instruction}"
Edit type: {edit_type}. For this type, check that {focus}.

Give three integer scores from 1 (very poor) to 5 (excellent):
Prompt Compliance: how completely and precisely the instruction is carried out.
Visual Naturalness: whether the edited region blends in seamlessly (no visible seams, lighting or perspective breaks).
Physical & Detail Integrity: whether objects, textures and physics stay plausible and detailed, with no artifacts.

Answer in exactly this format, then stop:
Prompt Compliance: N
Visual Naturalness: N
Physical & Detail Integrity: N"""

IMGEDIT_FIELDS = ("Prompt Compliance", "Visual Naturalness", "Physical & Detail Integrity")


class ImgEditJudge(ChatJudge):
    """ImgEdit's judging: three 1-5 criteria per edit; the sample's score is their mean."""

    @dataclass
    class Config:
        name: str = "imgedit"
        backend: dict[str, Any] = field(default_factory=lambda: {"name": "http"})  # chat backend (http: GPT-4.1, ...)

    kinds = (EDIT,)
    metric_names = ("score", "compliance", "naturalness", "integrity")
    scale = "ImgEdit-style 1-5 (mean of the three criteria)"

    def questions(self, item: PromptItem) -> list[str]:
        return ["score"]

    def conversation(self, query: Query) -> list[dict[str, Any]]:
        et = query.item.category
        text = IMGEDIT_PROMPT.format(
            instruction=query.item.prompt, edit_type=et, focus=IMGEDIT_FOCUS.get(et, "the edit is done")
        )
        return _user([query.item.source_image(), query.image], text)

    def parse(self, qid: str, text: str) -> tuple[float | None, str | None, dict[str, Any]]:
        vals = []
        for f in IMGEDIT_FIELDS:
            m = re.findall(rf"{re.escape(f)}\s*[:：]\s*\**\s*([0-9]+(?:\.[0-9]+)?)", text, flags=re.I)
            if not m:
                return None, f"no '{f}: N' line in the answer", {}
            v = float(m[-1])
            if not 1 <= v <= 5:
                return None, f"{f} {v:g} outside 1..5", {}
            vals.append(v)
        return sum(vals) / 3, None, {"scores": vals}

    def metrics(self, item: PromptItem, answers: dict[str, Prediction]) -> dict[str, float | None]:
        a = answers["score"]
        sub = a.details.get("scores") if a.score is not None else None
        return {
            "score": a.score,
            **{k: (sub[i] if sub else None) for i, k in enumerate(("compliance", "naturalness", "integrity"))},
        }


def _plural(name: str, n: int) -> str:
    return name if n == 1 else (name + "es" if name.endswith(("s", "sh", "ch", "x")) else name + "s")


def geneval_questions(meta: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """``(qid, question, expected yes)`` for one GenEval prompt's metadata."""
    qs: list[tuple[str, str, bool]] = []
    inc = meta["include"]
    for i, obj in enumerate(inc):
        cls, n = obj["class"], int(obj.get("count", 1))
        if n == 1:
            qs.append((f"inc{i}", f"Is there at least one {cls} in the image?", True))
        else:
            qs.append((f"inc{i}", f"Are there exactly {n} {_plural(cls, n)} in the image?", True))
        if obj.get("color"):
            qs.append((f"col{i}", f"Is the {cls} in the image {obj['color']}?", True))
        if obj.get("position"):
            rel, j = obj["position"]
            qs.append((f"pos{i}", f"Is the {cls} {rel} the {inc[int(j)]['class']} in the image?", True))
    for i, obj in enumerate(meta.get("exclude", [])):
        cls, n = obj["class"], int(obj.get("count", 1))
        qs.append((f"exc{i}", f"Are there {n} or more {_plural(cls, n)} in the image?", False))
    return qs


class GenEvalVQAJudge(ChatJudge):
    """GenEval-style: a VLM answers yes/no questions derived from each prompt's metadata; a sample is correct when
    every answer is the expected one. **Not GenEval's detector (Mask2Former) numbers.**"""

    @dataclass
    class Config:
        name: str = "geneval_vqa"
        backend: dict[str, Any] = field(default_factory=lambda: {"name": "http"})  # chat backend (a VLM)

    kinds = (GEN,)
    metric_names = ("correct",)
    note = "GenEval-style, VLM-judged yes/no questions: these are NOT GenEval's detector (Mask2Former) numbers"
    overall = "categories"
    scale = "share of prompts with every yes/no answer as expected (VLM-judged; NOT GenEval's detector numbers)"

    def questions(self, item: PromptItem) -> list[str]:
        return [q for q, _, _ in geneval_questions(item.meta)]

    def conversation(self, query: Query) -> list[dict[str, Any]]:
        text = dict((q, t) for q, t, _ in geneval_questions(query.item.meta))[query.qid]
        return _user([query.image], f"{text}\nAnswer with one word, yes or no.")

    def parse(self, qid: str, text: str) -> tuple[float | None, str | None, dict[str, Any]]:
        m = re.match(r"\W*(yes|no)\b", text.strip(), flags=re.I)
        if not m:
            return None, "the answer does not start with yes or no", {}
        return (1.0 if m.group(1).lower() == "yes" else 0.0), None, {}

    def metrics(self, item: PromptItem, answers: dict[str, Prediction]) -> dict[str, float | None]:
        expected = {q: e for q, _, e in geneval_questions(item.meta)}
        vals = [answers[q].score for q in expected]
        if any(v is None for v in vals):
            return {"correct": None}
        return {"correct": float(all((v == 1.0) == expected[q] for q, v in zip(expected, vals)))}


def judge_config_dict(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
