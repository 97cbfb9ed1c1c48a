"""The part every prompted critic backend shares: requests -> judgement jobs -> parsed completions -> results.

A request is judged on one or more dimensions; each judgement is one *job* (one chat conversation sent to the
model). A generation request without a checklist first gets a *planner* job whose answer becomes the checklist.
Backends only differ in how they turn a list of jobs into completions (a batched local ``generate``, or concurrent
HTTP calls); the rest lives here so that all backends build the same prompts and read answers the same way.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from firm.critics.parsing import (
    ParseResult,
    explain_boxed_score,
    explain_checklist,
    explain_json_score,
    explain_quality_scores,
)
from firm.critics.prompts import PromptSet
from firm.critics.types import (
    CONSISTENCY,
    EDIT_DIMENSIONS,
    EXECUTION,
    GEN_DIMENSIONS,
    INSTRUCTION,
    QUALITY,
    CriticRequest,
    CriticResult,
    EditRequest,
    ErrorKind,
    GenRequest,
)
from firm.images import fit_pixels  # shared with the SFT data (firm.data.chat): same image preparation

log = logging.getLogger(__name__)

PLAN = "plan"  # pseudo-dimension of planner jobs

# Template and parser for each dimension.
TEMPLATE_OF = {
    EXECUTION: "edit_execution",
    CONSISTENCY: "edit_consistency",
    INSTRUCTION: "gen_instruction",
    QUALITY: "gen_quality",
    PLAN: "planner",
}
PARSER_OF: dict[str, Callable[[str | None], ParseResult]] = {
    EXECUTION: explain_json_score,
    CONSISTENCY: explain_json_score,
    INSTRUCTION: explain_boxed_score,
    QUALITY: explain_quality_scores,
    PLAN: explain_checklist,
}


@dataclass
class Job:
    """One conversation to send to the model."""

    index: int  # which request it belongs to
    dimension: str  # execution | consistency | instruction | quality | plan
    messages: list[dict]

    @property
    def parser(self) -> Callable[[str | None], ParseResult]:
        return PARSER_OF[self.dimension]


@dataclass
class Completion:
    """The model's answer to a job, parsed (after any parse retries)."""

    text: str | None
    parsed: ParseResult
    attempts: int = 1  # generations made (1 + parse retries used)
    start: float = 0.0  # time.perf_counter() when the first attempt started
    end: float = 0.0  # ... when the last attempt finished
    expected: dict[str, float] = field(default_factory=dict)  # expected-score mode: span key -> expected score
    notes: list[str] = field(default_factory=list)  # non-fatal problems (e.g. no expected score)


class PromptedCritic:
    """Shared logic of critics that prompt a vision-language model; subclasses implement the transport.

    Attributes:
        prompts: the templates in use.
        stats: running counts: ``requests``, ``jobs``, ``generations``, ``parse_failures`` (jobs left without a
            score after all retries), ``parse_retries``, ``plan_failures``, and in expected-score mode
            ``expected_fallbacks`` (judgements whose expected score is the parsed integer: no score token found).
    """

    def __init__(self, prompts: PromptSet, max_image_pixels: int | None = None, expected_score: bool = False) -> None:
        self.prompts = prompts
        self.max_image_pixels = max_image_pixels
        self.expected_score = expected_score  # expected-score mode (see firm.critics.expected)
        self.stats: Counter[str] = Counter()

    # ---- building jobs

    def _check(self, requests: Sequence[CriticRequest]) -> None:
        for i, r in enumerate(requests):
            who = f"request {i}" + (f" (key {r.key!r})" if getattr(r, "key", None) is not None else "")
            if isinstance(r, EditRequest):
                allowed, text = EDIT_DIMENSIONS, r.instruction
                what = "instruction"
            elif isinstance(r, GenRequest):
                allowed, text = GEN_DIMENSIONS, r.prompt
                what = "prompt"
                if r.checklist is not None and (
                    not isinstance(r.checklist, (list, tuple)) or not all(isinstance(x, str) for x in r.checklist)
                ):
                    raise TypeError(f"{who}: checklist must be a list of strings or None")
            else:
                raise TypeError(f"{who}: expected EditRequest or GenRequest, got {type(r).__name__}")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{who}: the {what} is empty")
            bad = [d for d in r.dimensions if d not in allowed]
            if bad or not r.dimensions:
                raise ValueError(f"{who}: cannot judge dimension(s) {bad or '(none)'}; choose from {list(allowed)}")

    def plan_jobs(self, requests: Sequence[CriticRequest]) -> list[Job]:
        """Planner jobs for generation requests judged on Instruction that have no checklist."""
        self._check(requests)
        return [
            Job(i, PLAN, self.prompts.messages("planner", [], prompt=r.prompt))
            for i, r in enumerate(requests)
            if isinstance(r, GenRequest) and r.checklist is None and INSTRUCTION in r.dimensions
        ]

    def judgement_jobs(
        self, requests: Sequence[CriticRequest], plans: dict[int, Completion] | None = None
    ) -> list[Job]:
        """One job per (request, dimension); Instruction jobs whose plan failed are left out."""
        plans = plans or {}
        jobs: list[Job] = []
        for i, r in enumerate(requests):
            if isinstance(r, EditRequest):
                src = fit_pixels(r.source, self.max_image_pixels, f"request {i}: source")
                out = fit_pixels(r.edited, self.max_image_pixels, f"request {i}: edited")
                for d in r.dimensions:
                    jobs.append(Job(i, d, self.prompts.messages(TEMPLATE_OF[d], [src, out], instruction=r.instruction)))
                continue
            img = fit_pixels(r.image, self.max_image_pixels, f"request {i}: image")
            for d in r.dimensions:
                if d == INSTRUCTION:
                    checklist = r.checklist
                    if checklist is None:
                        plan = plans.get(i)
                        if plan is None or not plan.parsed.ok:
                            continue
                        checklist = plan.parsed.value
                    msgs = self.prompts.messages(TEMPLATE_OF[d], [img], prompt=r.prompt, checklist=list(checklist))
                else:
                    msgs = self.prompts.messages(TEMPLATE_OF[d], [img], prompt=r.prompt)
                jobs.append(Job(i, d, msgs))
        return jobs

    # ---- assembling results

    def assemble(
        self,
        requests: Sequence[CriticRequest],
        jobs: Sequence[Job],
        completions: Sequence[Completion],
        plans: dict[int, Completion] | None = None,
    ) -> list[CriticResult]:
        """One :class:`CriticResult` per request from the completed jobs (and plans)."""
        plans = plans or {}
        by_request: dict[int, dict[str, Completion]] = {}
        for job, comp in zip(jobs, completions, strict=True):
            by_request.setdefault(job.index, {})[job.dimension] = comp
        results = []
        for i, r in enumerate(requests):
            done = by_request.get(i, {})
            res = CriticResult(scores={}, key=r.key)
            attempts, expected, notes = {}, {}, {}
            fallbacks: list[str] = []
            for d in r.dimensions:
                comp = done.get(d)
                if comp is None:  # an Instruction judgement whose planner failed
                    plan = plans.get(i)
                    why = plan.parsed.reason if plan is not None else "no plan"
                    res.fail(d, ErrorKind.NO_PLAN, f"planner output unusable, no checklist to judge against: {why}")
                    if plan is not None and plan.text is not None:
                        res.raw[PLAN] = plan.text
                    continue
                res.raw[d] = comp.text or ""
                attempts[d] = comp.attempts
                if comp.notes:
                    notes[d] = "; ".join(comp.notes)
                if not comp.parsed.ok:
                    tries = f" (after {comp.attempts} attempts)" if comp.attempts > 1 else ""
                    if comp.text is None:  # no text: the endpoint or model failed
                        res.fail(d, ErrorKind.NO_REPLY, f"no reply{tries}: {comp.parsed.reason}")
                    else:
                        res.fail(d, ErrorKind.UNPARSEABLE, f"unparseable output{tries}: {comp.parsed.reason}")
                    continue
                res.reasoning[d] = comp.parsed.reasoning
                if d == QUALITY:
                    aspects = comp.parsed.value
                    res.scores[d] = min(aspects.values())
                    res.details["quality_aspects"] = dict(aspects)
                    if comp.expected and all(a in comp.expected for a in aspects):
                        expected[d] = min(comp.expected[a] for a in aspects)
                else:
                    res.scores[d] = comp.parsed.value
                    if "score" in comp.expected:
                        expected[d] = comp.expected["score"]
                if self.expected_score and d not in expected:
                    # No expected score (the score token was not found): the parsed integer stands in, counted.
                    expected[d] = float(res.scores[d])
                    fallbacks.append(d)
            plan = plans.get(i)
            if plan is not None and plan.parsed.ok:
                res.details["checklist"] = list(plan.parsed.value)
                res.raw[PLAN] = plan.text or ""
            elif isinstance(r, GenRequest) and r.checklist is not None:
                res.details["checklist"] = list(r.checklist)
            res.details["attempts"] = attempts
            if expected:
                res.details["expected_scores"] = expected
            if fallbacks:
                res.details["expected_fallbacks"] = fallbacks  # dimensions whose expected score is the integer
                self.stats["expected_fallbacks"] += len(fallbacks)
            if notes:
                res.details["notes"] = notes
            spans = [(c.start, c.end) for c in [*done.values(), *([plan] if plan is not None else [])]]
            res.latency_s = (max(e for _, e in spans) - min(s for s, _ in spans)) if spans else 0.0
            results.append(res)
        self._count(results)
        return results

    def _count(self, results: list[CriticResult]) -> None:
        self.stats["requests"] += len(results)
        failed = [(r.key, d, r.errors.get(d, "")) for r in results for d in r.missing()]
        kinds = [r.error_kinds.get(d) for r in results for d in r.missing()]
        self.stats["parse_failures"] += kinds.count(ErrorKind.UNPARSEABLE)
        self.stats["plan_failures"] += kinds.count(ErrorKind.NO_PLAN)
        if failed:
            first = failed[0]
            log.warning(
                "%s: %d of %d judgements gave no score (first: key=%s %s: %s)",
                type(self).__name__,
                len(failed),
                sum(len(r.scores) for r in results),
                first[0],
                first[1],
                first[2][:200],
            )


def now() -> float:
    return time.perf_counter()
