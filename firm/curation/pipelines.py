"""The two curation pipelines: difference-first (editing) and plan-then-score (generation).

Both take a chunk of input samples and return one :class:`Outcome` per sample: a finished sample of the output
schema, or the reason it could not be made. Teacher calls are batched per stage (one ``generate`` call per stage
and chunk); a teacher's transport failure raises and stops the run, an unreadable answer is a failed sample (or a
missing score when only one judgement of a sample could not be read) -- never a default score.

**difference-first** (``edit`` samples):

1. *reporter* (an MLLM) compares source and edited image and writes a structured difference report: obvious
   differences first, then detailed ones per aspect (quantity, shape & form, color, texture & surface, position &
   layout, size & scale, text & symbols, background, other). It is not shown the instruction, so the report is
   evidence about the images alone (and is reused when an instruction is rewritten).
2. *evaluator* reads the instruction and the report (and the images, unless ``evaluator_sees_images`` is off) and
   scores Execution and Consistency with reasons.

**plan-then-score** (``generation`` samples):

1. *planner* (an LLM) expands the prompt into a checklist: main subject, attributes / actions, style /
   composition, negative constraints.
2. *scorer* (an MLLM) checks the image against the checklist item by item and gives the Instruction score.
3. optionally the scorer also rates Quality (aesthetics, technical quality, structure & texture; Quality = min)
   with the critic's own quality prompt.

Rewriting (for balancing): the *rewriter* gets a finished sample and writes a new instruction (or prompt) that the
image does not satisfy; the rewritten sample keeps the images (and, for edits, the difference report) and is
evaluated again.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from firm.critics.prompts import PromptSet
from firm.curation.parsing import (
    parse_checklist_score,
    parse_difference_report,
    parse_edit_evaluation,
    parse_plan,
    parse_rewrite,
)
from firm.curation.prompts import (
    CurationPrompts,
    format_checklist,
    format_report,
    format_verdicts,
    template_hash,
)
from firm.curation.teachers import Teacher, TeacherRequest

log = logging.getLogger(__name__)

REWRITE_SUFFIX = "--rw"


@dataclass
class Outcome:
    """The result for one input sample."""

    key: str
    sample: dict | None = None  # the finished sample (output schema), None when it failed
    error: str | None = None  # why it failed
    notes: list[str] = field(default_factory=list)  # problems that left a score missing but kept the sample


def _prov(sample: dict) -> dict:
    return dict(sample.get("provenance") or {})


class Pipeline:
    """Shared parts: teachers by role, prompts, counters."""

    name = ""
    schema = ""
    roles: tuple[str, ...] = ()
    text_field = ""  # the field a rewrite replaces
    balance_default = ""  # the score dimension balanced by default

    def __init__(self, teachers: dict[str, Teacher], prompts: CurationPrompts) -> None:
        missing = [r for r in self.roles if r not in teachers]
        if missing:
            raise ValueError(f"{self.name}: no teacher for role(s) {missing}")
        self.teachers = teachers
        self.prompts = prompts
        self.stats: Counter[str] = Counter()

    def teacher_ids(self) -> dict[str, str]:
        return {role: self.teachers[role].teacher_id for role in self.roles}

    def template_hashes(self) -> dict[str, str]:
        raise NotImplementedError

    def _ask(self, role: str, requests: list[TeacherRequest]) -> list[str]:
        if not requests:
            return []
        answers = self.teachers[role].generate(requests)
        if len(answers) != len(requests):
            raise RuntimeError(
                f"teacher {self.teachers[role].teacher_id!r} ({role}) returned {len(answers)} answers for "
                f"{len(requests)} requests"
            )
        self.stats[f"calls.{role}"] += 1
        self.stats[f"requests.{role}"] += len(requests)
        return answers

    def _stamp(self, sample: dict, extra: dict | None = None) -> dict:
        prov = _prov(sample)
        prov["curation"] = {
            "pipeline": self.name,
            "teachers": self.teacher_ids(),
            "templates": self.template_hashes(),
            **(extra or {}),
        }
        sample["provenance"] = prov
        return sample

    def scores(self, sample: dict) -> dict[str, int | None]:
        raise NotImplementedError

    def process(self, items: Sequence[dict]) -> list[Outcome]:
        raise NotImplementedError

    def rewrite(self, samples: Sequence[dict], attempt: int = 0) -> list[Outcome]:
        """New samples (key ``<key>--rw``) whose text the image does not satisfy, evaluated again."""
        raise NotImplementedError

    def _rewritten_item(self, sample: dict, new_text: str) -> dict:
        item = {k: v for k, v in sample.items() if not k.startswith("__")}
        prov = _prov(sample)
        prov.pop("curation", None)
        prov.update(rewritten=True, original_key=sample["key"], original_text=sample[self.text_field])
        item.update(key=sample["key"] + REWRITE_SUFFIX, provenance=prov)
        item[self.text_field] = new_text
        return item


# --------------------------------------------------------------------------------------------------------------------


class DifferenceFirst(Pipeline):
    """Editing: difference report (reporter) -> Execution and Consistency from the evidence (evaluator)."""

    name = "difference_first"
    schema = "edit"
    roles = ("reporter", "evaluator")
    text_field = "instruction"
    balance_default = "execution"

    def __init__(self, teachers: dict[str, Teacher], prompts: CurationPrompts, evaluator_sees_images: bool = True):
        super().__init__(teachers, prompts)
        self.evaluator_sees_images = evaluator_sees_images

    def template_hashes(self) -> dict[str, str]:
        h = self.prompts.hashes()
        out = {k: h[k] for k in ("difference_report", "edit_evaluation")}
        if "rewriter" in self.teachers:
            out["rewrite_instruction"] = h["rewrite_instruction"]
        return out

    def scores(self, sample: dict) -> dict[str, int | None]:
        return {"execution": sample.get("execution"), "consistency": sample.get("consistency")}

    def process(self, items: Sequence[dict], extra: dict | None = None) -> list[Outcome]:
        outcomes = {it["key"]: Outcome(it["key"]) for it in items}
        reports: dict[str, Any] = {}
        need = [it for it in items if not it.get("difference_report")]
        for it in items:
            if it.get("difference_report"):
                reports[it["key"]] = it["difference_report"]
        requests = [
            TeacherRequest(
                "difference_report",
                self.prompts.render("difference_report", [it["source"], it["edited"]]),
                [it["source"], it["edited"]],
                {},
                it["key"],
            )
            for it in need
        ]
        for it, text in zip(need, self._ask("reporter", requests)):
            report, why = parse_difference_report(text)
            if report is None:
                outcomes[it["key"]].error = f"difference report unreadable: {why}"
                self.stats["failed.report"] += 1
            else:
                reports[it["key"]] = report
        ready = [it for it in items if it["key"] in reports]
        requests = []
        for it in ready:
            report_text = format_report(reports[it["key"]])
            images = [it["source"], it["edited"]]
            shown = images if self.evaluator_sees_images else []
            msgs = self.prompts.render("edit_evaluation", shown, instruction=it["instruction"], report=report_text)
            fields = {"instruction": it["instruction"], "report": report_text}
            requests.append(TeacherRequest("edit_evaluation", msgs, images, fields, it["key"]))
        for it, text in zip(ready, self._ask("evaluator", requests)):
            out = outcomes[it["key"]]
            judged, why = parse_edit_evaluation(text)
            if judged is None:
                out.error = f"evaluation unreadable: {why}"
                self.stats["failed.evaluation"] += 1
                continue
            sample = {k: v for k, v in it.items() if not k.startswith("__")}
            sample["difference_report"] = reports[it["key"]]
            for dim, (score, reasoning, problem) in judged.items():
                sample[dim] = score
                sample[f"{dim}_reasoning"] = reasoning or None
                if problem:
                    out.notes.append(problem)
                    self.stats[f"missing.{dim}"] += 1
            out.sample = self._stamp(sample, extra)
        return [outcomes[it["key"]] for it in items]

    def rewrite(self, samples: Sequence[dict], attempt: int = 0) -> list[Outcome]:
        if "rewriter" not in self.teachers:
            raise ValueError("difference_first: rewriting needs a 'rewriter' teacher")
        requests = []
        for s in samples:
            report_text = format_report(s.get("difference_report"))
            msgs = self.prompts.render(
                "rewrite_instruction", [s["source"]], instruction=s["instruction"], report=report_text
            )
            fields = {"instruction": s["instruction"], "report": report_text, "attempt": attempt}
            requests.append(TeacherRequest("rewrite_instruction", msgs, [s["source"], s["edited"]], fields, s["key"]))
        items, failed = [], {}
        for s, text in zip(samples, self._ask("rewriter", requests)):
            new, why = parse_rewrite(text, "instruction")
            if new is None or new.strip().lower() == s["instruction"].strip().lower():
                failed[s["key"] + REWRITE_SUFFIX] = f"rewrite unusable: {why or 'same instruction as before'}"
                self.stats["failed.rewrite"] += 1
                continue
            items.append(self._rewritten_item(s, new))
        done = {o.key: o for o in self.process(items, {"rewriter": self.teachers["rewriter"].teacher_id})}
        return [
            done.get(s["key"] + REWRITE_SUFFIX)
            or Outcome(s["key"] + REWRITE_SUFFIX, error=failed[s["key"] + REWRITE_SUFFIX])
            for s in samples
        ]


# --------------------------------------------------------------------------------------------------------------------


class PlanThenScore(Pipeline):
    """Generation: checklist (planner) -> item-by-item Instruction score (scorer) [-> Quality (scorer)]."""

    name = "plan_then_score"
    schema = "generation"
    roles = ("planner", "scorer")
    text_field = "prompt"
    balance_default = "instruction"

    def __init__(self, teachers: dict[str, Teacher], prompts: CurationPrompts, quality: bool = True) -> None:
        super().__init__(teachers, prompts)
        self.quality = quality
        self.critic_prompts = PromptSet()

    def template_hashes(self) -> dict[str, str]:
        h = self.prompts.hashes()
        out = {k: h[k] for k in ("plan", "checklist_score")}
        if self.quality:
            out["quality (critic gen_quality)"] = template_hash(self.critic_prompts.templates["gen_quality"])
        if "rewriter" in self.teachers:
            out["rewrite_prompt"] = h["rewrite_prompt"]
        return out

    def scores(self, sample: dict) -> dict[str, int | None]:
        return {"instruction": sample.get("instruction"), "quality": sample.get("quality")}

    def process(
        self, items: Sequence[dict], extra: dict | None = None, *, rate_quality: bool | None = None
    ) -> list[Outcome]:
        from firm.critics.parsing import explain_quality_scores

        rate_quality = self.quality if rate_quality is None else rate_quality
        outcomes = {it["key"]: Outcome(it["key"]) for it in items}
        plans: dict[str, list[dict]] = {it["key"]: it["checklist"] for it in items if it.get("checklist")}
        need = [it for it in items if not it.get("checklist")]
        requests = [
            TeacherRequest(
                "plan", self.prompts.render("plan", [], prompt=it["prompt"]), [], {"prompt": it["prompt"]}, it["key"]
            )
            for it in need
        ]
        for it, text in zip(need, self._ask("planner", requests)):
            plan, why = parse_plan(text)
            if plan is None:
                outcomes[it["key"]].error = f"plan unreadable: {why}"
                self.stats["failed.plan"] += 1
            else:
                plans[it["key"]] = plan
        ready = [it for it in items if it["key"] in plans]
        requests = []
        for it in ready:
            checklist = plans[it["key"]]
            msgs = self.prompts.render(
                "checklist_score", [it["image"]], prompt=it["prompt"], checklist=format_checklist(checklist)
            )
            fields = {"prompt": it["prompt"], "checklist": checklist}
            requests.append(TeacherRequest("checklist_score", msgs, [it["image"]], fields, it["key"]))
        judged: dict[str, dict] = {}
        for it, text in zip(ready, self._ask("scorer", requests)):
            result, why = parse_checklist_score(text, len(plans[it["key"]]))
            if result is None:
                outcomes[it["key"]].error = f"checklist scoring unreadable: {why}"
                self.stats["failed.checklist_score"] += 1
            else:
                judged[it["key"]] = result
        scored = [it for it in ready if it["key"] in judged]
        quality: dict[str, tuple[Any, str | None]] = {}
        if rate_quality:
            requests = [
                TeacherRequest(
                    "quality",
                    self.critic_prompts.messages("gen_quality", [it["image"]], prompt=it["prompt"]),
                    [it["image"]],
                    {"prompt": it["prompt"]},
                    it["key"],
                )
                for it in scored
            ]
            for it, text in zip(scored, self._ask("scorer", requests)):
                parsed = explain_quality_scores(text)
                quality[it["key"]] = (parsed.value, parsed.reason, parsed.reasoning)
        for it in scored:
            out = outcomes[it["key"]]
            j = judged[it["key"]]
            sample = {k: v for k, v in it.items() if not k.startswith("__")}
            sample.update(
                checklist=plans[it["key"]], instruction=j["score"], instruction_reasoning=j["reasoning"] or None
            )
            if not j["complete"]:
                out.notes.append("the scorer did not give a verdict for every checklist item")
            if rate_quality:
                aspects, why, reasoning = quality[it["key"]]
                if aspects is None:
                    sample.update(quality=None, quality_aspects=None, quality_reasoning=None)
                    out.notes.append(f"quality: {why}")
                    self.stats["missing.quality"] += 1
                else:
                    sample.update(
                        quality=min(aspects.values()),
                        quality_aspects=dict(aspects),
                        quality_reasoning=reasoning or None,
                    )
            # the per-item verdicts travel with the sample (provenance.curation.verdicts): the rewriter reads them
            out.sample = self._stamp(sample, {**(extra or {}), "verdicts": j["items"]})
        return [outcomes[it["key"]] for it in items]

    def rewrite(self, samples: Sequence[dict], attempt: int = 0) -> list[Outcome]:
        if "rewriter" not in self.teachers:
            raise ValueError("plan_then_score: rewriting needs a 'rewriter' teacher")
        requests = []
        for s in samples:
            checklist = s.get("checklist") or []
            judged = _prov(s).get("curation", {}).get("verdicts")
            verdicts = format_verdicts(checklist, judged) if checklist else "(no checklist)"
            msgs = self.prompts.render("rewrite_prompt", [], prompt=s["prompt"], verdicts=verdicts)
            fields = {"prompt": s["prompt"], "verdicts": verdicts, "attempt": attempt}
            requests.append(TeacherRequest("rewrite_prompt", msgs, [s["image"]], fields, s["key"]))
        items, failed = [], {}
        for s, text in zip(samples, self._ask("rewriter", requests)):
            new, why = parse_rewrite(text, "prompt")
            if new is None or new.strip().lower() == s["prompt"].strip().lower():
                failed[s["key"] + REWRITE_SUFFIX] = f"rewrite unusable: {why or 'same prompt as before'}"
                self.stats["failed.rewrite"] += 1
                continue
            item = self._rewritten_item(s, new)
            item["checklist"] = None  # the new prompt gets its own plan
            items.append(item)
        # quality does not depend on the prompt: keep the original's
        done = {
            o.key: o
            for o in self.process(items, {"rewriter": self.teachers["rewriter"].teacher_id}, rate_quality=False)
        }
        for s in samples:
            o = done.get(s["key"] + REWRITE_SUFFIX)
            if o is not None and o.sample is not None:
                for k in ("quality", "quality_aspects", "quality_reasoning"):
                    o.sample[k] = s.get(k)
        return [
            done.get(s["key"] + REWRITE_SUFFIX)
            or Outcome(s["key"] + REWRITE_SUFFIX, error=failed[s["key"] + REWRITE_SUFFIX])
            for s in samples
        ]


PIPELINES = {"difference_first": DifferenceFirst, "plan_then_score": PlanThenScore}
