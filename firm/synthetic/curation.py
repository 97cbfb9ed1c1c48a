"""The shapes world in curation: a rule-based teacher and sources of simulated edits / generations (CPU only).

:class:`ShapesRuleTeacher` answers every curation prompt from the pixels and the structured request fields, using
the world's perception and rule critic (:mod:`firm.synthetic`), in the same JSON formats a model teacher is asked
for. It makes the whole pipeline (difference report -> evaluation, plan -> checklist scoring, rule-driven
rewriting of instructions and prompts) runnable and checkable end to end without a model:

- *difference report*: objects perceived in both images, compared cell by cell (removed / added / moved ->
  quantity or position_layout, colour -> color, shape -> shape_form), a changed background, and pixel drift outside
  changed cells (-> other). It does not read the instruction.
- *edit evaluation*: the rule critic's Execution and Consistency, with its reasoning.
- *plan*: the world's own checklist of the prompt, with categories (presence -> main_subject, colour and shape ->
  attributes_actions, position -> style_composition, "nothing else" -> negative_constraints).
- *checklist score*: the rule critic's item-by-item judgement and Instruction score.
- *quality*: the rule critic's four pixel aspects mapped onto the critic's three: aesthetics = colour,
  technical = min(background, edges), structure = structure (so the minimum is unchanged).
- *rewrite instruction*: a different edit of the perceived source scene that the edited image does not carry out
  (checked with the rule critic: Execution <= 2 when possible). *Rewrite prompt*: objects of the prompt get
  another colour, shape and/or position (one object up to all of them), so that the image fails it (down to a
  randomly drawn Instruction score of 1..3 when possible).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from firm.critics.types import CONSISTENCY, EXECUTION, INSTRUCTION, QUALITY, EditRequest, GenRequest
from firm.curation.teachers import TeacherRequest

CHECKLIST_CATEGORY = {
    "presence": "main_subject",
    "colour": "attributes_actions",
    "shape": "attributes_actions",
    "position": "style_composition",
    "nothing_else": "negative_constraints",
}


def _seeded(*parts: Any) -> random.Random:
    return random.Random("firm.curation:" + ":".join(str(p) for p in parts))


class ShapesRuleTeacher:
    """Rule-based teacher for shapes-world images (see the module docstring)."""

    @dataclass
    class Config:
        name: str = "shapes_rule"
        min_drift_px: int = 3  # a pixel-drift cluster of at least this many pixels (at 32 px) is reported
        rewrite_tries: int = 12  # candidate rewrites tried to find one the edited image does not carry out

    teacher_id = "shapes_rule"

    def __init__(self, config: Config | None = None) -> None:
        from firm.synthetic.critic import ShapesRuleCritic

        self.config = config or self.Config()
        self.critic = ShapesRuleCritic(ShapesRuleCritic.Config(min_drift_px=self.config.min_drift_px))
        self.judge: Any = self.critic  # who gives the scores (edit evaluation, checklist score)

    def generate(self, requests: Sequence[TeacherRequest]) -> list[str]:
        handlers = {
            "difference_report": self._report,
            "edit_evaluation": self._evaluate,
            "plan": self._plan,
            "checklist_score": self._checklist_score,
            "quality": self._quality,
            "rewrite_instruction": self._rewrite_instruction,
            "rewrite_prompt": self._rewrite_prompt,
        }
        out = []
        for r in requests:
            if r.task not in handlers:
                raise ValueError(f"shapes_rule teacher cannot answer task {r.task!r}")
            out.append(handlers[r.task](r))
        return out

    # ---- editing

    def _report(self, r: TeacherRequest) -> str:
        from firm.synthetic.language import POSITION_PHRASES
        from firm.synthetic.world import CELL_NAMES

        def at(cell: int) -> str:
            return POSITION_PHRASES[CELL_NAMES[cell]]

        src_img, out_img = r.images[0], r.images[1]
        ps, po = self.critic.perceive(src_img), self.critic.perceive(out_img)
        src, _ = ps.by_cell()
        out, extras = po.by_cell()
        detailed: dict[str, list[str]] = {}
        changed_cells: set[int] = set()

        def name(o: Any) -> str:
            return f"{o.colour or 'oddly coloured'} {o.shape or 'blob'}"

        def note(aspect: str, text: str, *cells: int) -> None:
            detailed.setdefault(aspect, []).append(text)
            changed_cells.update(cells)

        gone = {c: o for c, o in src.items() if c not in out}
        new = {c: o for c, o in out.items() if c not in src}
        for c, o in list(gone.items()):
            match = next((c2 for c2, o2 in new.items() if o2.key() == o.key()), None)
            if match is not None:
                note(
                    "position_layout",
                    f"the {name(o)} moved from {at(c)[3:]} to {at(match)[3:]}",
                    c,
                    match,
                )
                del gone[c], new[match]
        for c, o in gone.items():
            note("quantity", f"the {name(o)} {at(c)} is gone", c)
        for c, o in new.items():
            note("quantity", f"a {name(o)} appeared {at(c)}", c)
        for c in sorted(set(src) & set(out)):
            a, b = src[c], out[c]
            if a.colour != b.colour:
                note("color", f"the {a.shape or 'object'} {at(c)} turned from {a.colour} to {b.colour}", c)
            if a.shape != b.shape:
                what = f"the {b.colour} object" if b.colour else "the object"
                note("shape_form", f"{what} {at(c)} changed from a {a.shape} to a {b.shape}", c)
        for o in extras:
            note("quantity", f"an extra {name(o)} is crowded {at(o.cell)}", o.cell)
        obvious = [
            x for aspect in ("quantity", "position_layout", "color", "shape_form") for x in detailed.get(aspect, [])
        ]
        if float(((ps.background - po.background) ** 2).sum() ** 0.5) > self.critic.config.background_tolerance:
            note("background", "the background colour changed")
            obvious.append("the background colour changed")
        minor, _ = self.critic.minor_changes(tuple(sorted(changed_cells)), ps, po, [])
        for n in minor:
            note("other", f"a small patch of about {n} pixels changed outside the objects that changed")
        summary = f"{len(obvious)} clearly visible difference(s)" + (f" and {len(minor)} small one(s)" if minor else "")
        if not obvious and not minor:
            summary = "the two images look the same"
        return json.dumps({"obvious": obvious, "detailed": detailed, "summary": summary})

    def _evaluate(self, r: TeacherRequest) -> str:
        (res,) = self.judge.score([EditRequest(r.images[0], r.images[1], r.fields["instruction"])])
        if not res.complete:
            return f"I cannot evaluate this edit: {'; '.join(res.errors.values())}"
        return json.dumps(
            {d: {"reasoning": res.reasoning.get(d, ""), "score": res.scores[d]} for d in (EXECUTION, CONSISTENCY)}
        )

    def _rewrite_instruction(self, r: TeacherRequest) -> str:
        from firm.synthetic.language import EDIT_KINDS, format_instruction
        from firm.synthetic.tasks import sample_edit
        from firm.synthetic.world import Scene, ShapeObject, WorldConfig

        src_img, out_img = r.images[0], r.images[1]
        seen = self.critic.perceive(src_img)
        objs, cells = [], set()
        for o in seen.objects:
            if o.colour and o.shape and o.cell not in cells:
                objs.append(ShapeObject(o.cell, o.colour, o.shape))
                cells.add(o.cell)
        scene = Scene(tuple(objs))
        world = WorldConfig(size=src_img.width)
        rng = _seeded("rewrite", r.key, r.fields.get("attempt", 0))
        original = r.fields["instruction"].strip().lower()
        fallback = None
        for _ in range(self.config.rewrite_tries):
            kinds = [k for k in EDIT_KINDS if (k != "add" and k != "move") or scene.free_cells()]
            kinds = [k for k in kinds if k == "add" or scene.objects]
            if not kinds:
                break
            try:
                text = format_instruction(sample_edit(rng, scene, rng.choice(kinds), world))
            except ValueError:
                continue
            if text.lower() == original:
                continue
            (res,) = self.critic.score([EditRequest(src_img, out_img, text, dimensions=(EXECUTION,))])
            fallback = fallback or text
            if res.scores.get(EXECUTION) is not None and res.scores[EXECUTION] <= 2:
                return json.dumps({"instruction": text})
        if fallback is None:
            return "I found no other edit that fits this picture."
        return json.dumps({"instruction": fallback})

    # ---- generation

    def _plan(self, r: TeacherRequest) -> str:
        from firm.synthetic.language import ParseError, checklist_items, parse_prompt

        try:
            spec = parse_prompt(r.fields["prompt"])
        except ParseError as e:
            return f"I cannot plan this prompt: {e}"
        items = [{"category": CHECKLIST_CATEGORY[it.kind], "text": it.text} for it in checklist_items(spec)]
        return json.dumps(items)

    def _checklist_score(self, r: TeacherRequest) -> str:
        texts = [c["text"] if isinstance(c, dict) else c for c in r.fields["checklist"]]
        (res,) = self.judge.score([GenRequest(r.images[0], r.fields["prompt"], texts, dimensions=(INSTRUCTION,))])
        if not res.complete:
            return f"I cannot judge this image: {'; '.join(res.errors.values())}"
        verdicts = dict(res.details.get("checklist", []))
        items = [{"item": i, "verdict": "yes" if verdicts.get(t) else "no", "note": ""} for i, t in enumerate(texts, 1)]
        return json.dumps(
            {"items": items, "reasoning": res.reasoning.get(INSTRUCTION, ""), "score": res.scores[INSTRUCTION]}
        )

    def _quality(self, r: TeacherRequest) -> str:
        (res,) = self.critic.score([GenRequest(r.images[0], r.fields["prompt"], None, dimensions=(QUALITY,))])
        if not res.complete:
            return f"I cannot judge this image: {'; '.join(res.errors.values())}"
        a = res.details["quality_aspects"]
        return json.dumps(
            {
                "reasoning": res.reasoning.get(QUALITY, ""),
                "aesthetics": a["colour"],
                "technical_quality": min(a["background"], a["edges"]),
                "structure_texture": a["structure"],
            }
        )

    def _rewrite_prompt(self, r: TeacherRequest) -> str:
        from firm.synthetic.language import GenSpec, ParseError, format_prompt, parse_prompt
        from firm.synthetic.world import PALETTE, SHAPES, ShapeObject

        try:
            spec = parse_prompt(r.fields["prompt"])
        except ParseError as e:
            return f"I cannot rewrite this prompt: {e}"
        goal = _seeded("rewrite-goal", r.key, r.fields.get("attempt", 0)).choice((1, 2, 3))  # spread the new scores
        best: tuple[int, str] | None = None
        for attempt in range(self.config.rewrite_tries):
            rng = _seeded("rewrite-prompt", r.key, r.fields.get("attempt", 0), attempt)
            objs = list(spec.objects)
            # alter 1..all objects (colour, shape, position or all three): mild to severe mismatches
            for i in rng.sample(range(len(objs)), rng.randint(1, len(objs))):
                o, what = objs[i], rng.choice(("colour", "shape", "position", "all"))
                colour = rng.choice([c for c in PALETTE if c != o.colour]) if what in ("colour", "all") else o.colour
                shape = rng.choice([s for s in SHAPES if s != o.shape]) if what in ("shape", "all") else o.shape
                free = [c for c in range(9) if c not in {x.cell for x in objs}]
                cell = rng.choice(free) if what in ("position", "all") and free else o.cell
                objs[i] = ShapeObject(cell, colour, shape)
            text = format_prompt(GenSpec(tuple(objs), spec.exclusive))
            (res,) = self.critic.score([GenRequest(r.images[0], text, None, dimensions=(INSTRUCTION,))])
            score = res.scores.get(INSTRUCTION) or 5
            if best is None or score < best[0]:
                best = (score, text)
            if score <= goal:
                break
        return json.dumps({"prompt": best[1]}) if best else "I found no rewrite."


# --------------------------------------------------------------------------------------------------------------------
# Sources: simulated model outputs to curate


class ShapesGeneralTeacher(ShapesRuleTeacher):
    """The uncurated arm's teacher: a *general* judge that scores directly, with a general VLM's failure modes.

    The FIRM paper's comparison is a critic fine-tuned on curated data against one fine-tuned on a general VLM's raw
    judgements. This teacher stands in for the general VLM: its Execution, Consistency and Instruction scores are
    those of :class:`firm.synthetic.hallucinating.ShapesHallucinatingCritic` (the rule critic's scores with missed
    unrequested changes, lenient Execution and +-1 noise, deterministic per request), and its reasoning says so. The
    difference report, the plan and the rewrites stay the rule teacher's; an uncurated run simply does not balance
    (``balance.enabled: false``), so nothing is rewritten.
    """

    @dataclass
    class Config(ShapesRuleTeacher.Config):
        name: str = "shapes_general"
        judge: dict[str, Any] = field(default_factory=dict)  # ShapesHallucinatingCritic.Config fields (noise model)

    teacher_id = "shapes_general"

    def __init__(self, config: Config | None = None) -> None:
        from firm.synthetic.hallucinating import ShapesHallucinatingCritic

        config = config or self.Config()
        super().__init__(config)
        self.judge = ShapesHallucinatingCritic(ShapesHallucinatingCritic.Config(**config.judge))


class ShapesEditSource:
    """Editing tasks of the shapes world with simulated editor outputs (a mix of failure modes)."""

    @dataclass
    class Config:
        name: str = "shapes_edit"
        count: int = 64  # samples (one per task)
        start: int = 0  # first task seed
        split: str | None = None  # train | test | None (all tasks)
        size: int = 32  # image side in pixels
        modes: list[str] = field(
            default_factory=lambda: [
                "perfect",
                "perfect",
                "copy",
                "partial",
                "wrong_object",
                "overedit_1",
                "overedit_n",
            ]
        )  # simulated editor behaviours, drawn uniformly per task (repeat one to weight it)
        degrade_prob: float = 0.0  # share of outputs given pixel noise / blur / speckle (the rubrics ignore them)

    def __init__(self, config: Config | None = None) -> None:
        from firm.synthetic.simulate import EDIT_MODES

        self.config = config or self.Config()
        if not 0.0 <= self.config.degrade_prob <= 1.0:
            raise ValueError(f"shapes_edit: degrade_prob must be in [0, 1], got {self.config.degrade_prob}")
        bad = [m for m in self.config.modes if m not in EDIT_MODES]
        if bad or not self.config.modes:
            raise ValueError(f"shapes_edit: unknown mode(s) {bad or '(none)'}; known: {', '.join(EDIT_MODES)}")
        self.total = self.config.count
        self.source_id = f"shapes_edit(count={self.config.count}, start={self.config.start}, size={self.config.size})"

    def __iter__(self) -> Iterator[dict]:
        from firm.synthetic.data import _maybe_degrade
        from firm.synthetic.simulate import simulate_edit
        from firm.synthetic.tasks import edit_tasks
        from firm.synthetic.world import WorldConfig, render

        c = self.config
        world = WorldConfig(size=c.size)
        for task in edit_tasks(c.split, world=world, start=c.start, limit=c.count):
            rng = _seeded("edit-mode", task.seed)
            mode = rng.choice(c.modes)
            produced = simulate_edit(task, mode, rng, world)
            edited, how = _maybe_degrade(render(produced, world), rng, c.degrade_prob)
            yield {
                "key": f"shapes-edit-{task.seed}",
                "source": render(task.source, world),
                "edited": edited,
                "instruction": task.instruction,
                "provenance": {
                    "source": "shapes_edit",
                    "task_seed": task.seed,
                    "mode": mode,
                    "size": c.size,
                    "degradation": how,
                },  # fmt: skip
            }


class ShapesGenSource:
    """Generation tasks of the shapes world with simulated generator outputs."""

    @dataclass
    class Config:
        name: str = "shapes_gen"
        count: int = 64  # samples (one per task)
        start: int = 0  # first task seed
        split: str | None = None  # train | test | None
        size: int = 32  # image side in pixels
        modes: list[str] = field(
            default_factory=lambda: ["perfect", "perfect", "missing", "wrong_colour", "wrong_shape", "extra", "random"]
        )  # simulated generator behaviours, drawn uniformly per task
        degrade_prob: float = 0.0  # share of outputs given pixel noise / blur / speckle (the rubrics ignore them)

    def __init__(self, config: Config | None = None) -> None:
        from firm.synthetic.simulate import GEN_MODES

        self.config = config or self.Config()
        if not 0.0 <= self.config.degrade_prob <= 1.0:
            raise ValueError(f"shapes_gen: degrade_prob must be in [0, 1], got {self.config.degrade_prob}")
        bad = [m for m in self.config.modes if m not in GEN_MODES]
        if bad or not self.config.modes:
            raise ValueError(f"shapes_gen: unknown mode(s) {bad or '(none)'}; known: {', '.join(GEN_MODES)}")
        self.total = self.config.count
        self.source_id = f"shapes_gen(count={self.config.count}, start={self.config.start}, size={self.config.size})"

    def __iter__(self) -> Iterator[dict]:
        from firm.synthetic.data import _maybe_degrade
        from firm.synthetic.simulate import simulate_generation
        from firm.synthetic.tasks import gen_tasks
        from firm.synthetic.world import WorldConfig, render

        c = self.config
        world = WorldConfig(size=c.size)
        for task in gen_tasks(c.split, world=world, start=c.start, limit=c.count):
            rng = _seeded("gen-mode", task.seed)
            mode = rng.choice(c.modes)
            image, how = _maybe_degrade(render(simulate_generation(task, mode, rng, world), world), rng, c.degrade_prob)
            yield {
                "key": f"shapes-gen-{task.seed}",
                "image": image,
                "prompt": task.prompt,
                "provenance": {
                    "source": "shapes_gen",
                    "task_seed": task.seed,
                    "mode": mode,
                    "size": c.size,
                    "degradation": how,
                },  # fmt: skip
            }
