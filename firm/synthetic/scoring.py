"""Rubric scoring on *objects*: shared by the rule critic (objects seen in pixels) and the ground-truth scorer.

Both judges reduce an image to objects ``(cell, colour, shape)`` — the critic by perception, the ground-truth scorer
by reading the known scene — and then apply exactly the functions below, so they can only disagree where perception
is wrong. The 1..5 mappings:

**Edit Execution.** The instruction is split into checks of the state it asks for (each worth 1):

============  ==========================================================================================
recolour      the named object's cell holds an object of the new colour
remove        the named object's cell is empty
add           the cell holds an object; it has the asked colour; it has the asked shape
move          the old cell is empty; the new cell holds an object; of the same colour; of the same shape
replace       the cell holds the new colour (when it differs); the new shape
============  ==========================================================================================

A colour or shape check that fails but where the attribute *did* change away from the source earns 1/4 (an attempt
in the right direction). With ``f`` the earned fraction: 5 if ``f == 1``; 4 if ``f >= 3/4``; 3 if ``f >= 1/2``;
2 if ``f > 0``; 1 if nothing requested happened.

**Edit Consistency.** *Significant* unintended changes: outside the instruction's cells, every object added, removed,
recoloured or reshaped, with a removal and an addition of the same colour and shape counted once (a move); extra
objects crowded into any cell; and, for ``recolour``, the named object losing its shape or disappearing (the
instruction only allows its colour to change; ``replace``, ``move``, ``add``, ``remove`` own their objects fully).
*Minor* changes are counted from pixels by the critic (drift clusters; see ``critic.py``), 0 for known scenes.
The ARCHITECTURE rubric then reads: 1 if the image is almost entirely different (critic: most untouched pixels
changed; both: four or more significant changes leaving none of the other source objects intact); otherwise
5 if nothing changed; 4 if at most one significant and at most two minor; 3 if at most three significant and at most
four minor; 2 otherwise (four or more significant or five or more minor).

**Generation Instruction.** Each prompt object is matched to at most one seen object that agrees with it on colour or
shape (the assignment maximising the satisfied items). Checklist items: *present* (matched), *colour*,
*shape*, *position* (matched and equal), *nothing else* (no unmatched objects). With ``f`` the satisfied fraction:
1 if no prompt object is present (irrelevant image); 5 if ``f == 1``; 4 if all objects are present and
``f >= 3/4`` (one or two details off); 3 if ``f >= 1/2`` and at least half the objects are present (main subjects
there, several requirements missing); 2 otherwise (most subjects missing or wrong).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from firm.synthetic.language import ChecklistItem, Edit, GenSpec, article, object_phrase
from firm.synthetic.perception import SeenObject
from firm.synthetic.world import CELL_NAMES, Scene

ATTEMPT_CREDIT = 0.25  # credit for a colour/shape that changed, but not to what was asked


@dataclass
class Check:
    """One requirement and how well it was met (``credit`` in [0, 1])."""

    text: str
    credit: float

    @property
    def ok(self) -> bool:
        return self.credit >= 1.0


@dataclass
class Change:
    """An unintended change found by comparing source and output."""

    kind: str  # added | removed | recoloured | reshaped | moved | extra
    text: str
    objects: list[SeenObject] = field(default_factory=list)  # the objects involved (source and/or output)


def seen_from_scene(scene: Scene) -> list[SeenObject]:
    """The objects a perfect observer would see in a render of ``scene``."""
    return [SeenObject(o.cell, o.colour, o.shape) for o in scene.objects]


def _name(o: SeenObject | None) -> str:
    return "nothing" if o is None else o.describe()


# --------------------------------------------------------------------------------------------------------------------
# Edit Execution


def execution_checks(edit: Edit, src: dict[int, SeenObject], out: dict[int, SeenObject]) -> list[Check]:
    """The checks of :func:`execution_score` for ``edit``, given the source and output objects per cell."""
    checks: list[Check] = []

    def attr(cell: int, name: str, want: str, before: str | None) -> None:
        o = out.get(cell)
        got = None if o is None else getattr(o, name)
        if got == want:
            credit = 1.0
        elif before is not None and got is not None and got != before:
            credit = ATTEMPT_CREDIT
        else:
            credit = 0.0
        checks.append(Check(f"{name} @{CELL_NAMES[cell]} is {want} (found {got or 'none'})", credit))

    def empty(cell: int) -> None:
        o = out.get(cell)
        checks.append(Check(f"@{CELL_NAMES[cell]} is empty (found {_name(o)})", 1.0 if o is None else 0.0))

    def present(cell: int) -> None:
        o = out.get(cell)
        checks.append(Check(f"@{CELL_NAMES[cell]} holds an object (found {_name(o)})", 1.0 if o is not None else 0.0))

    o_, n_ = edit.old, edit.new
    if edit.kind == "recolour":
        before = src.get(o_.cell)
        attr(o_.cell, "colour", n_.colour, before.colour if before else o_.colour)
    elif edit.kind == "remove":
        empty(o_.cell)
    elif edit.kind == "add":
        present(n_.cell)
        attr(n_.cell, "colour", n_.colour, None)
        attr(n_.cell, "shape", n_.shape, None)
    elif edit.kind == "move":
        empty(o_.cell)
        present(n_.cell)
        attr(n_.cell, "colour", n_.colour, None)
        attr(n_.cell, "shape", n_.shape, None)
    else:  # replace
        before = src.get(o_.cell)
        if n_.colour != o_.colour:
            attr(o_.cell, "colour", n_.colour, before.colour if before else o_.colour)
        if n_.shape != o_.shape:
            attr(o_.cell, "shape", n_.shape, before.shape if before else o_.shape)
    return checks


def execution_score(checks: list[Check]) -> tuple[int, float]:
    """``(score 1..5, earned fraction)`` of execution ``checks`` (see the module docstring)."""
    f = sum(c.credit for c in checks) / max(len(checks), 1)
    if f >= 1.0:
        return 5, f
    if f >= 0.75:
        return 4, f
    if f >= 0.5:
        return 3, f
    if f > 0:
        return 2, f
    return 1, f


# --------------------------------------------------------------------------------------------------------------------
# Edit Consistency


def significant_changes(
    edit: Edit, src: dict[int, SeenObject], out: dict[int, SeenObject], out_extras: list[SeenObject]
) -> list[Change]:
    """Unintended object-level changes (see the module docstring)."""
    affected = set(edit.affected_cells)
    changes: list[Change] = []
    removed: list[SeenObject] = []
    added: list[SeenObject] = [*out_extras]
    for cell in range(len(CELL_NAMES)):
        if cell in affected:
            continue
        s, o = src.get(cell), out.get(cell)
        if s is not None and o is None:
            removed.append(s)
        elif s is None and o is not None:
            added.append(o)
        elif s is not None and o is not None:
            if s.colour != o.colour:
                changes.append(Change("recoloured", f"{_name(s)} recoloured to {o.colour or 'unknown'}", [s, o]))
            elif s.shape != o.shape:
                changes.append(Change("reshaped", f"{_name(s)} became a {o.shape or 'blob'}", [s, o]))
    # A removal and an addition of the same object is one change: a move.
    for r in list(removed):
        for a in added:
            if a.key() == r.key() and a.colour is not None:
                changes.append(Change("moved", f"{_name(r)} moved to @{CELL_NAMES[a.cell]}", [r, a]))
                removed.remove(r)
                added.remove(a)
                break
    changes += [Change("removed", f"{_name(r)} removed", [r]) for r in removed]
    changes += [Change("added", f"{_name(a)} added", [a]) for a in added]
    if edit.kind == "recolour":
        o = out.get(edit.old.cell)
        if o is None:
            changes.append(Change("removed", f"{edit.old.describe()} removed (only its colour was to change)", []))
        elif o.shape != edit.old.shape:
            why = f"{edit.old.describe()} became a {o.shape or 'blob'} (only its colour was to change)"
            changes.append(Change("reshaped", why, [o]))
    return changes


def nothing_else_left(edit: Edit, src: dict[int, SeenObject], changes: list[Change]) -> bool:
    """True when every source object outside the instruction's cells was changed (the scene was redrawn)."""
    others = [s for c, s in src.items() if c not in edit.affected_cells]
    touched = {id(o) for ch in changes for o in ch.objects}
    return bool(others) and all(id(s) in touched for s in others)


def consistency_score(n_significant: int, n_minor: int, almost_all_different: bool = False) -> int:
    """The ARCHITECTURE consistency rubric on counts of unintended changes."""
    if almost_all_different:
        return 1
    if n_significant == 0 and n_minor == 0:
        return 5
    if n_significant <= 1 and n_minor <= 2:
        return 4
    if n_significant <= 3 and n_minor <= 4:
        return 3
    return 2


# --------------------------------------------------------------------------------------------------------------------
# Generation Instruction


def max_weight_assignment(weights: list[list[float]]) -> list[int | None]:
    """For each row, its column in a maximum-weight assignment of rows to distinct columns (None: unassigned).

    Hungarian algorithm (O(n^3), potentials form) on the square matrix padded with zeros; pairs of weight <= 0 are
    left unassigned.
    """
    rows = len(weights)
    cols = len(weights[0]) if rows else 0
    n = max(rows, cols)
    if n == 0:
        return []
    cost = [[-(weights[i][j] if i < rows and j < cols else 0.0) for j in range(n)] for i in range(n)]
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)
    match_col = [0] * (n + 1)  # match_col[j]: the row (1-based) assigned to column j (1-based); 0 = none
    way = [0] * (n + 1)
    for i in range(1, n + 1):
        match_col[0] = i
        j0 = 0
        minv = [inf] * (n + 1)
        used = [False] * (n + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = match_col[j0], inf, 0
            for j in range(1, n + 1):
                if not used[j]:
                    cur = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(n + 1):
                if used[j]:
                    u[match_col[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if match_col[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match_col[j0] = match_col[j1]
            j0 = j1
    out: list[int | None] = [None] * rows
    for j in range(1, n + 1):
        i = match_col[j] - 1
        if i < rows and j - 1 < cols and weights[i][j - 1] > 0:
            out[i] = j - 1
    return out


def match_objects(wanted: tuple, seen: list[SeenObject]) -> list[int | None]:
    """For each wanted object, the index of its matched seen object (or None).

    A pair may match when it agrees on colour or shape (its identity; the right place alone is not enough); the
    assignment maximises the number of checklist items it satisfies (one for presence plus one per agreeing
    attribute).
    """

    def gain(w, s) -> int:
        if w.colour != s.colour and w.shape != s.shape:
            return 0  # a different object in the right place is not the asked one
        return 1 + int(w.colour == s.colour) + int(w.shape == s.shape) + int(w.cell == s.cell)

    return max_weight_assignment([[gain(w, s) for s in seen] for w in wanted])


@dataclass
class GenJudgement:
    score: int
    fraction: float
    satisfied: list[tuple[ChecklistItem, bool]]
    matches: list[SeenObject | None]
    unmatched: list[SeenObject]


def judge_generation(spec: GenSpec, items: list[ChecklistItem], seen: list[SeenObject]) -> GenJudgement:
    """Evaluate checklist ``items`` of ``spec`` on the ``seen`` objects and map to 1..5 (module docstring)."""
    idx = match_objects(spec.objects, seen)
    matches = [None if j is None else seen[j] for j in idx]
    used = {j for j in idx if j is not None}
    unmatched = [s for j, s in enumerate(seen) if j not in used]
    satisfied = []
    for it in items:
        if it.kind == "nothing_else":
            ok = not unmatched
        else:
            m, w = matches[it.index], spec.objects[it.index]
            ok = m is not None and (
                it.kind == "presence"
                or (it.kind == "colour" and m.colour == w.colour)
                or (it.kind == "shape" and m.shape == w.shape)
                or (it.kind == "position" and m.cell == w.cell)
            )
        satisfied.append((it, ok))
    f = sum(ok for _, ok in satisfied) / max(len(satisfied), 1)
    named = sorted({it.index for it in items if it.index is not None})
    n_present = sum(matches[i] is not None for i in named)
    p = n_present / len(named) if named else 1.0
    if named and n_present == 0:
        score = 1
    elif f >= 1.0:
        score = 5
    elif p == 1.0 and f >= 0.75:
        score = 4
    elif f >= 0.5 and p >= 0.5:
        score = 3
    elif f > 0 or named:
        score = 2
    else:
        score = 1
    return GenJudgement(score, f, satisfied, matches, unmatched)


def generation_reasoning(spec: GenSpec, j: GenJudgement) -> str:
    found, wrong, missing = [], [], []
    for w, m in zip(spec.objects, j.matches):
        want = f"{w.colour} {w.shape} @{w.position}"
        if m is None:
            missing.append(want)
        elif (m.colour, m.shape, m.cell) == (w.colour, w.shape, w.cell):
            found.append(want)
        else:
            wrong.append(f"{want} -> saw {m.describe()}")
    parts = [f"found: {'; '.join(found) or 'none'}"]
    if wrong:
        parts.append(f"wrong: {'; '.join(wrong)}")
    if missing:
        parts.append(f"missing: {'; '.join(missing)}")
    if j.unmatched:
        parts.append(f"also present: {'; '.join(o.describe() for o in j.unmatched)}")
    failed = [it.text for it, ok in j.satisfied if not ok]
    n_ok = sum(ok for _, ok in j.satisfied)
    tally = f"{n_ok}/{len(j.satisfied)} checklist items satisfied"
    parts.append(tally + (f" (failed: {'; '.join(failed)})" if failed else ""))
    return ". ".join(parts) + f". Score {j.score}."


def describe_edit(edit: Edit) -> str:
    o, n = edit.old, edit.new
    if edit.kind == "add":
        return f"add {object_phrase(n)}"
    if edit.kind == "remove":
        return f"remove {o.describe()}"
    if edit.kind == "move":
        return f"move {o.describe()} to @{n.position}"
    if edit.kind == "recolour":
        return f"recolour {o.describe()} to {n.colour}"
    return f"replace {o.describe()} with {article(n.colour)} {n.colour} {n.shape}"
