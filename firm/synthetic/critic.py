"""The shapes world's rule critic, its ground-truth twin, and helpers that turn tasks into critic requests.

:class:`ShapesRuleCritic` is a :class:`~firm.critics.types.Critic` like the model critics: it gets images and text
only, parses the text back into what was asked (:mod:`firm.synthetic.language`), finds the objects in the pixels
(:mod:`firm.synthetic.perception`) and applies the rubric mappings of :mod:`firm.synthetic.scoring`.

Pixel-level parts that have no object-level counterpart:

- **Minor changes** (Consistency): pixels whose class (background / a palette colour / unexplained) differs between
  source and output, outside the instruction's cells and outside the boxes of objects already counted as
  significant changes, grouped into 8-connected clusters. A cluster is one minor change when it has at least
  ``min_drift_px`` pixels (at 32x32; scaled with the image area) and holds a 2x2 block (at 32x32; 4x4 at 64x64), so
  that the thin boundary flicker of a blurred or anti-aliased redraw is not counted — "small quality shifts" are not
  unintended changes). When more than ``different_fraction`` of the untouched pixels changed class, the image is
  "almost entirely different" (Consistency 1). A changed background colour counts as one significant change.
- **Quality** (Generation): four aspects, each 1..5, quality = their minimum —
  *background* (stray pixels outside objects, noise of the background),
  *edges* (soft pixels around objects per boundary pixel: 0 for a crisp render, about 1 for anti-aliasing),
  *colour* (distance of object interiors to their palette colour; objects of unknown colour),
  *structure* (how well shapes match their templates; unrecognisable blobs).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

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
from firm.synthetic.language import ParseError, checklist_items, parse_checklist, parse_instruction, parse_prompt
from firm.synthetic.perception import (
    BACKGROUND,
    Perception,
    PerceptionSettings,
    SeenObject,
    as_array,
    dilate,
    label_components,
    palette_distance,
    perceive,
    shift,
    split_by_cell,
)
from firm.synthetic.scoring import (
    Change,
    consistency_score,
    describe_edit,
    execution_checks,
    execution_score,
    generation_reasoning,
    judge_generation,
    nothing_else_left,
    seen_from_scene,
    significant_changes,
)
from firm.synthetic.tasks import EditTask, GenTask, Task
from firm.synthetic.world import Scene, WorldConfig, cell_box, render

# Quality thresholds: value at or below each entry gives 5, 4, 3, 2 (above the last: 1). Chosen so that clean renders
# (crisp or anti-aliased) score 5 and each degradation in tests/synthetic/test_critic_gen.py lowers the right aspect.
STRAY_FRACTION = (0.002, 0.01, 0.03, 0.08)  # share of canvas pixels that are junk (outside objects and their edges)
BACKGROUND_NOISE = (6.0, 12.0, 20.0, 30.0)  # mean RGB distance of background pixels from the background colour
SOFT_EDGE_RATIO = (1.3, 2.2, 3.2, 4.5)  # soft pixels near objects per object boundary pixel
COLOUR_ERROR = (10.0, 20.0, 30.0, 40.0)  # mean RGB distance of object interiors from their palette colour
STRUCTURE_IOU = (0.7, 0.62, 0.55, 0.45)  # mean template IoU of objects (higher is better: at or above)


def _grade(value: float, bounds: tuple[float, ...], higher_is_better: bool = False) -> int:
    for i, b in enumerate(bounds):
        if (value >= b) if higher_is_better else (value <= b):
            return 5 - i
    return 1


class ShapesRuleCritic:
    """Scores edits (Execution, Consistency) and generations (Instruction, Quality) of shapes-world images."""

    @dataclass
    class Config(PerceptionSettings):
        name: str = "shapes_rule"
        min_drift_px: int = 3  # a changed-pixel cluster of at least this many pixels (at 32x32) is a minor change
        different_fraction: float = 0.5  # share of untouched pixels changed above which Consistency is 1

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()

    # ----------------------------------------------------------------------------------------------------------------
    def score(self, requests: Sequence[CriticRequest]) -> list[CriticResult]:
        """One :class:`CriticResult` per request, in order; unparseable text or images give ``None`` scores."""
        results = []
        for req in requests:
            t0 = time.perf_counter()
            if isinstance(req, EditRequest):
                res, known = self._score_edit(req), EDIT_DIMENSIONS
            elif isinstance(req, GenRequest):
                res, known = self._score_gen(req), GEN_DIMENSIONS
            else:
                raise TypeError(f"ShapesRuleCritic scores EditRequest or GenRequest, got {type(req).__name__}")
            for dim in req.dimensions:
                if dim not in known:
                    why = f"{type(req).__name__} is judged on {', '.join(known)}, not {dim!r}"
                    res.fail(dim, ErrorKind.NOT_JUDGED, why)
            res.key = req.key
            res.latency_s = time.perf_counter() - t0
            results.append(res)
        return results

    def perceive(self, image: Image.Image | np.ndarray) -> Perception:
        return perceive(image, self.config)

    # ----------------------------------------------------------------------------------------------------------------
    # Editing

    def _score_edit(self, req: EditRequest) -> CriticResult:
        dims = tuple(req.dimensions)
        try:
            edit = parse_instruction(req.instruction)
            src_arr, out_arr = as_array(req.source), as_array(req.edited)
            if src_arr.shape != out_arr.shape:
                raise ValueError(f"edited image is {out_arr.shape[1]}px wide but the source is {src_arr.shape[1]}px")
        except (ParseError, ValueError) as e:
            return _failed(dims, str(e))
        ps, po = self.perceive(src_arr), self.perceive(out_arr)
        src, _ = ps.by_cell()
        out, extras = po.by_cell()
        result = CriticResult(scores={})
        result.details["edit"] = describe_edit(edit)
        result.details["source_objects"] = [o.describe() for o in ps.objects]
        result.details["edited_objects"] = [o.describe() for o in po.objects]
        named = src.get(edit.old.cell) if edit.old is not None else None
        if edit.old is not None and (named is None or named.key() != (edit.old.colour, edit.old.shape)):
            result.details["warning"] = f"the source shows {_describe(named)}, not {edit.old.describe()}"
        if EXECUTION in dims:
            checks = execution_checks(edit, src, out)
            score, frac = execution_score(checks)
            result.scores[EXECUTION] = score
            result.details["execution_checks"] = [(c.text, c.credit) for c in checks]
            done = "; ".join(f"{'ok' if c.ok else 'partly' if c.credit else 'no'}: {c.text}" for c in checks)
            result.reasoning[EXECUTION] = f"Requested: {describe_edit(edit)}. {done}. {frac:.0%} done. Score {score}."
        if CONSISTENCY in dims:
            changes = significant_changes(edit, src, out, extras)
            if np.linalg.norm(ps.background - po.background) > self.config.background_tolerance:
                changes.append(Change("background", f"background colour changed to {po.background.round().tolist()}"))
            minor, changed_frac = self.minor_changes(edit.affected_cells, ps, po, changes)
            everything = changed_frac > self.config.different_fraction or (
                len(changes) >= 4 and nothing_else_left(edit, src, changes)
            )
            score = consistency_score(len(changes), len(minor), everything)
            result.scores[CONSISTENCY] = score
            result.details.update(
                significant=[c.text for c in changes], minor_px=minor, changed_fraction=round(changed_frac, 4)
            )
            sig = "; ".join(c.text for c in changes) or "none"
            mnr = f"{len(minor)} drift region(s) ({', '.join(f'{n}px' for n in minor)})" if minor else "none"
            extra = " Image almost entirely different." if everything else ""
            why = f"Unintended significant changes: {sig}. Minor: {mnr}.{extra}"
            result.reasoning[CONSISTENCY] = f"{why} Score {score}."
        return result

    def minor_changes(
        self, affected: tuple[int, ...], ps: Perception, po: Perception, changes: list[Change]
    ) -> tuple[list[int], float]:
        """Sizes of the minor-change clusters, and the share of untouched pixels whose class changed."""
        size = ps.size
        region = np.ones((size, size), dtype=bool)
        for c in affected:
            x0, y0, x1, y1 = cell_box(c, size)
            region[y0:y1, x0:x1] = False
        changed = (ps.classes != po.classes) & region
        frac = float(changed.sum() / max(region.sum(), 1))
        exclude = np.zeros_like(region)
        for ch in changes:
            for o in ch.objects:
                if o.area:  # objects found in pixels carry their box
                    x0, y0, x1, y1 = o.bbox
                    exclude[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = True
        drift = changed & ~exclude
        # A pixel is "thick" when it starts a k x k block of changed pixels (k = 2 at 32x32, scaled with the size).
        k = max(2, round(2 * size / 32))
        thick = drift.copy()
        for dy in range(k):
            for dx in range(k):
                thick &= shift(drift, dy, dx, False)
        labels, n = label_components(drift.astype(np.int8))
        if n == 0:
            return [], frac
        sizes = np.bincount(labels[labels >= 0], minlength=n)
        has_thick = np.bincount(labels[thick], minlength=n) > 0
        min_px = max(2, round(self.config.min_drift_px * (size / 32) ** 2))
        return [int(s) for s, t in zip(sizes, has_thick) if s >= min_px and t], frac

    # ----------------------------------------------------------------------------------------------------------------
    # Generation

    def _score_gen(self, req: GenRequest) -> CriticResult:
        dims = tuple(req.dimensions)
        try:
            spec = parse_prompt(req.prompt)
            items = parse_checklist(list(req.checklist), spec) if req.checklist is not None else checklist_items(spec)
            arr = as_array(req.image)
        except (ParseError, ValueError) as e:
            return _failed(dims, str(e))
        p = self.perceive(arr)
        result = CriticResult(scores={})
        result.details["objects"] = [o.describe() for o in p.objects]
        if INSTRUCTION in dims:
            j = judge_generation(spec, items, p.objects)
            result.scores[INSTRUCTION] = j.score
            result.details["checklist"] = [(it.text, ok) for it, ok in j.satisfied]
            result.reasoning[INSTRUCTION] = generation_reasoning(spec, j)
        if QUALITY in dims:
            aspects, measures = self.quality_aspects(arr, p)
            score = min(aspects.values())
            result.scores[QUALITY] = score
            result.details["quality_aspects"] = aspects
            result.details["quality_measures"] = measures
            parts = ", ".join(f"{k} {v}" for k, v in aspects.items())
            m = measures
            result.reasoning[QUALITY] = (
                f"{parts} (stray {m['stray_fraction']:.1%}, background noise {m['background_noise']:.1f}, "
                f"soft edges {m['soft_edge_ratio']:.2f}/boundary px, colour error {m['colour_error']:.1f}, "
                f"shape fit {m['structure_iou']:.2f}). Quality = min = {score}."
            )
        return result

    def quality_aspects(self, arr: np.ndarray, p: Perception) -> tuple[dict[str, int], dict[str, float]]:
        """Background, edges, colour and structure grades (1..5) of one image, and the measures behind them."""
        x = arr.astype(np.float32)
        size = p.size
        bg_mask = p.classes == BACKGROUND
        bg_dist = np.linalg.norm(x - p.background, axis=-1)  # (H, W)
        noise = float(bg_dist[bg_mask].mean()) if bg_mask.any() else 255.0
        stray = p.junk_pixels / (size * size)

        obj = p.object_mask
        if obj.any():
            inner4 = obj & shift(obj, 0, 1, False) & shift(obj, 0, -1, False) & shift(obj, 1, 0, False)
            inner4 &= shift(obj, -1, 0, False)
            boundary = int((obj & ~inner4).sum())
            pure = palette_distance(x)  # (H, W)
            zone = dilate(obj, 2)
            soft = zone & (bg_dist > 20.0) & (pure > 30.0)
            soft_ratio = float(soft.sum() / max(boundary, 1))
            core = inner4 if inner4.sum() >= 0.25 * obj.sum() else obj
            coloured_core = core & (p.classes > 0)
            colour_err = float(p.nearest_dist[coloured_core].mean()) if coloured_core.any() else 0.0
            unknown = sum(o.colour is None for o in p.objects)
            ious = [o.iou if o.shape is not None else 0.0 for o in p.objects]
            fit = float(np.mean(ious))
        else:  # nothing drawn: no edges, colours or shapes to judge
            soft_ratio, colour_err, unknown, fit = 0.0, 0.0, 0, 1.0
        aspects = {
            "background": min(_grade(stray, STRAY_FRACTION), _grade(noise, BACKGROUND_NOISE)),
            "edges": _grade(soft_ratio, SOFT_EDGE_RATIO),
            "colour": max(1, _grade(colour_err, COLOUR_ERROR) - unknown),
            "structure": _grade(fit, STRUCTURE_IOU, higher_is_better=True),
        }
        measures = {
            "stray_fraction": stray,
            "background_noise": noise,
            "soft_edge_ratio": soft_ratio,
            "colour_error": colour_err,
            "unknown_colour_objects": float(unknown),
            "structure_iou": fit,
        }
        return aspects, measures


def _describe(o: SeenObject | None) -> str:
    return "nothing" if o is None else o.describe()


def _failed(dims: tuple[str, ...], why: str) -> CriticResult:
    return CriticResult.failed(dims, ErrorKind.OTHER, why)


# --------------------------------------------------------------------------------------------------------------------
# Ground truth


class GroundTruthScorer:
    """The same rubrics applied to known scenes instead of pixels (no perception errors, no pixel drift).

    Quality is 5 by definition: a known scene stands for its clean render.
    """

    def score_edit(self, task: EditTask, produced: Scene) -> dict[str, int]:
        src, _ = split_by_cell(seen_from_scene(task.source))
        out, extras = split_by_cell(seen_from_scene(produced))
        score, _ = execution_score(execution_checks(task.edit, src, out))
        changes = significant_changes(task.edit, src, out, extras)
        everything = len(changes) >= 4 and nothing_else_left(task.edit, src, changes)
        return {EXECUTION: score, CONSISTENCY: consistency_score(len(changes), 0, everything)}

    def score_gen(self, task: GenTask, produced: Scene) -> dict[str, int]:
        items = parse_checklist(list(task.checklist), task.spec)
        j = judge_generation(task.spec, items, seen_from_scene(produced))
        return {INSTRUCTION: j.score, QUALITY: 5}

    def score(self, task: Task, produced: Scene) -> dict[str, int]:
        return self.score_edit(task, produced) if isinstance(task, EditTask) else self.score_gen(task, produced)


# --------------------------------------------------------------------------------------------------------------------
# Requests


def task_request(task: Task, image: Image.Image, world: WorldConfig | None = None) -> CriticRequest:
    """The critic request judging ``image`` as the answer to ``task`` (edit sources are rendered with ``world``)."""
    if isinstance(task, EditTask):
        return EditRequest(source=render(task.source, world), edited=image, instruction=task.instruction, key=task.key)
    if isinstance(task, GenTask):
        return GenRequest(image=image, prompt=task.prompt, checklist=list(task.checklist), key=task.key)
    raise TypeError(f"expected an EditTask or GenTask, got {type(task).__name__}")


def tasks_to_requests(
    tasks: Sequence[Task], images: Sequence[Image.Image], world: WorldConfig | None = None
) -> list[CriticRequest]:
    """One request per (task, produced image) pair."""
    if len(tasks) != len(images):
        raise ValueError(f"got {len(tasks)} tasks but {len(images)} images")
    return [task_request(t, im, world) for t, im in zip(tasks, images)]


def scores_of(results: Sequence[CriticResult]) -> list[dict[str, Any]]:
    """Just the score dicts of ``results``."""
    return [dict(r.scores) for r in results]
