"""Text of the shapes world: prompts, edit instructions and checklists, and their parsers.

Every text the world writes follows a fixed template, and every template has a strict parser, so that the rule
critic (which, like a model critic, only gets images and text) can recover exactly what was asked. Parsers are
case-insensitive, ignore a final full stop and accept "center" for "centre"; text that the grammar below does not
fully explain raises :class:`ParseError` (the critic turns that into a missing score).

Grammar (``C`` a colour, ``S`` a shape, ``P`` a position phrase such as "in the top-left" or "at the top")::

    object      := ("a" | "an") C S P
    prompt      := object ("," object)* [" and " object] [", and nothing else"]
    instruction := "make the C S P C"                      (recolour)
                 | "remove the C S P"                      (remove)
                 | "add a C S P"                           (add)
                 | "move the C S from the CELL to the CELL"  (move; CELL such as "top-left", "centre")
                 | "replace the C S P with a C S"          (replace; same position)
    checklist item := "object N (a C S P) is present" | "object N is C" | "object N is a S"
                    | "object N is P" | "there is nothing else"
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from firm.synthetic.world import CELL_NAMES, PALETTE, SHAPES, ShapeObject

EDIT_KINDS: tuple[str, ...] = ("recolour", "remove", "add", "move", "replace")

# How each cell is said after an object ("a red circle in the top-left", "a blue square at the top").
POSITION_PHRASES: dict[str, str] = {
    "top-left": "in the top-left",
    "top": "at the top",
    "top-right": "in the top-right",
    "left": "on the left",
    "centre": "in the centre",
    "right": "on the right",
    "bottom-left": "in the bottom-left",
    "bottom": "at the bottom",
    "bottom-right": "in the bottom-right",
}
NOTHING_ELSE = "and nothing else"


class ParseError(ValueError):
    """A prompt, instruction or checklist item that the shapes grammar does not describe."""


# --------------------------------------------------------------------------------------------------------------------
# Structured meaning


@dataclass(frozen=True)
class Edit:
    """What an instruction asks for.

    ``old`` is the object the instruction names in the source (None for ``add``); ``new`` is what must be in the
    image afterwards (None for ``remove``). ``recolour`` keeps cell and shape, ``move`` keeps colour and shape,
    ``replace`` keeps the cell.
    """

    kind: str
    old: ShapeObject | None = None
    new: ShapeObject | None = None

    def __post_init__(self) -> None:
        k, o, n = self.kind, self.old, self.new
        if k not in EDIT_KINDS:
            raise ValueError(f"unknown edit kind {k!r}; known: {', '.join(EDIT_KINDS)}")
        need_old, need_new = k != "add", k != "remove"
        if (o is not None) != need_old or (n is not None) != need_new:
            want = f"old={'an object' if need_old else 'None'}, new={'an object' if need_new else 'None'}"
            raise ValueError(f"{k}: needs {want}")
        if k == "recolour" and not (o.cell == n.cell and o.shape == n.shape and o.colour != n.colour):
            raise ValueError(f"recolour must keep cell and shape and change the colour: {o} -> {n}")
        if k == "move" and not (o.colour == n.colour and o.shape == n.shape and o.cell != n.cell):
            raise ValueError(f"move must keep colour and shape and change the cell: {o} -> {n}")
        if k == "replace" and not (o.cell == n.cell and (o.colour, o.shape) != (n.colour, n.shape)):
            raise ValueError(f"replace must keep the cell and change the object: {o} -> {n}")

    @property
    def affected_cells(self) -> tuple[int, ...]:
        """Cells whose content the instruction is about (changes there are judged by Execution, not Consistency)."""
        cells = []
        for obj in (self.old, self.new):
            if obj is not None and obj.cell not in cells:
                cells.append(obj.cell)
        return tuple(cells)


@dataclass(frozen=True)
class GenSpec:
    """What a generation prompt asks for: these objects (at most one per cell) and, if ``exclusive``, nothing else."""

    objects: tuple[ShapeObject, ...]
    exclusive: bool = False

    def __post_init__(self) -> None:
        if not self.objects:
            raise ValueError("a generation prompt names at least one object")
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"a generation prompt names at most one object per position, got {cells}")


@dataclass(frozen=True)
class ChecklistItem:
    """One requirement of a generation prompt. ``index`` is the 0-based object index (None for nothing-else)."""

    kind: str  # presence | colour | shape | position | nothing_else
    index: int | None
    text: str


# --------------------------------------------------------------------------------------------------------------------
# Writing


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(obj: ShapeObject, definite: bool = False, with_position: bool = True) -> str:
    """ "a red circle in the top-left" (or "the red circle ..."; without the position when asked)."""
    det = "the" if definite else article(obj.colour)
    words = f"{det} {obj.colour} {obj.shape}"
    return f"{words} {POSITION_PHRASES[obj.position]}" if with_position else words


def format_prompt(spec: GenSpec) -> str:
    """The prompt for ``spec``, e.g. "a red circle in the top-left and a blue square in the centre"."""
    parts = [object_phrase(o) for o in spec.objects]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{text}, {NOTHING_ELSE}" if spec.exclusive else text


def format_instruction(edit: Edit) -> str:
    """The instruction for ``edit``, e.g. "make the red circle in the top-left blue"."""
    o, n = edit.old, edit.new
    if edit.kind == "recolour":
        return f"make {object_phrase(o, definite=True)} {n.colour}"
    if edit.kind == "remove":
        return f"remove {object_phrase(o, definite=True)}"
    if edit.kind == "add":
        return f"add {object_phrase(n)}"
    if edit.kind == "move":
        return f"move {object_phrase(o, definite=True, with_position=False)} from the {o.position} to the {n.position}"
    return f"replace {object_phrase(o, definite=True)} with {object_phrase(n, with_position=False)}"


def checklist_items(spec: GenSpec) -> list[ChecklistItem]:
    """The plan for ``spec``: per object presence, colour, shape and position; then the negative constraint."""
    items: list[ChecklistItem] = []
    for i, o in enumerate(spec.objects):
        n = i + 1
        items += [
            ChecklistItem("presence", i, f"object {n} ({object_phrase(o)}) is present"),
            ChecklistItem("colour", i, f"object {n} is {o.colour}"),
            ChecklistItem("shape", i, f"object {n} is {article(o.shape)} {o.shape}"),
            ChecklistItem("position", i, f"object {n} is {POSITION_PHRASES[o.position]}"),
        ]
    if spec.exclusive:
        items.append(ChecklistItem("nothing_else", None, "there is nothing else"))
    return items


def format_checklist(spec: GenSpec) -> list[str]:
    return [it.text for it in checklist_items(spec)]


# --------------------------------------------------------------------------------------------------------------------
# Parsing

_C = "(" + "|".join(PALETTE) + ")"
_S = "(" + "|".join(SHAPES) + ")"
_CELL = "(" + "|".join(sorted(CELL_NAMES, key=len, reverse=True)) + ")"
_PHRASE_TO_CELL = {phrase: CELL_NAMES.index(cell) for cell, phrase in POSITION_PHRASES.items()}
_P = "(" + "|".join(sorted(_PHRASE_TO_CELL, key=len, reverse=True)) + ")"
_OBJECT = re.compile(rf"\b(?:a|an) {_C} {_S} {_P}\b")

_INSTRUCTIONS = {
    "recolour": re.compile(rf"make the {_C} {_S} {_P} {_C}"),
    "remove": re.compile(rf"remove the {_C} {_S} {_P}"),
    "add": re.compile(rf"add (?:a|an) {_C} {_S} {_P}"),
    "move": re.compile(rf"move the {_C} {_S} from the {_CELL} to the {_CELL}"),
    "replace": re.compile(rf"replace the {_C} {_S} {_P} with (?:a|an) {_C} {_S}"),
}
_ITEMS = {
    "presence": re.compile(rf"object (\d+) \((?:a|an) {_C} {_S} {_P}\) is present"),
    "colour": re.compile(rf"object (\d+) is {_C}"),
    "shape": re.compile(rf"object (\d+) is (?:a|an) {_S}"),
    "position": re.compile(rf"object (\d+) is {_P}"),
    "nothing_else": re.compile(r"there is nothing else"),
}


def normalize(text: str) -> str:
    """Lower-case, British "centre", single spaces, no trailing full stop."""
    if not isinstance(text, str):
        raise ParseError(f"expected text, got {type(text).__name__}")
    t = " ".join(text.lower().replace("center", "centre").split())
    return t.rstrip(" .!")


def _cell_of_phrase(phrase: str) -> int:
    return _PHRASE_TO_CELL[phrase]


def parse_instruction(text: str) -> Edit:
    """The :class:`Edit` an instruction asks for.

    Raises:
        ParseError: when ``text`` does not follow one of the instruction templates, or asks for a no-op.
    """
    t = normalize(text)
    for kind, pattern in _INSTRUCTIONS.items():
        m = pattern.fullmatch(t)
        if not m:
            continue
        g = m.groups()
        try:
            if kind == "recolour":
                cell = _cell_of_phrase(g[2])
                return Edit(kind, ShapeObject(cell, g[0], g[1]), ShapeObject(cell, g[3], g[1]))
            if kind == "remove":
                return Edit(kind, old=ShapeObject(_cell_of_phrase(g[2]), g[0], g[1]))
            if kind == "add":
                return Edit(kind, new=ShapeObject(_cell_of_phrase(g[2]), g[0], g[1]))
            if kind == "move":
                a, b = CELL_NAMES.index(g[2]), CELL_NAMES.index(g[3])
                return Edit(kind, ShapeObject(a, g[0], g[1]), ShapeObject(b, g[0], g[1]))
            cell = _cell_of_phrase(g[2])
            return Edit(kind, ShapeObject(cell, g[0], g[1]), ShapeObject(cell, g[3], g[4]))
        except ValueError as e:  # e.g. "make the red circle ... red": a no-op
            raise ParseError(f"instruction {text!r} is not a valid {kind}: {e}") from None
    raise ParseError(
        f"cannot parse instruction {text!r}: expected one of the shapes-world templates "
        "('make the red circle in the top-left blue', 'remove ...', 'add a ...', 'move the red circle from the "
        "top-left to the centre', 'replace the ... with a ...')"
    )


def parse_prompt(text: str) -> GenSpec:
    """The :class:`GenSpec` of a generation prompt.

    Raises:
        ParseError: when some words of ``text`` are not object phrases, separators or the nothing-else clause, when
            no object is named, or when two objects share a position.
    """
    t = normalize(text)
    exclusive = False
    for suffix in (f", {NOTHING_ELSE}", f" {NOTHING_ELSE}"):
        if t.endswith(suffix):
            t, exclusive = t[: -len(suffix)], True
            break
    objects, pos = [], 0
    for m in _OBJECT.finditer(t):
        gap = t[pos : m.start()].strip()
        if (not objects and gap) or (objects and gap not in (",", "and", ", and")):
            raise ParseError(f"cannot parse prompt {text!r}: unexpected {gap or 'missing separator'!r} before {m[0]!r}")
        objects.append(ShapeObject(_cell_of_phrase(m[3]), m[1], m[2]))
        pos = m.end()
    if not objects or t[pos:].strip():
        rest = t[pos:].strip() or t
        raise ParseError(
            f"cannot parse prompt {text!r} near {rest!r}: expected phrases like 'a red circle in the top-left', "
            "joined by ',' / 'and', optionally ending in ', and nothing else'"
        )
    try:
        return GenSpec(tuple(objects), exclusive)
    except ValueError as e:
        raise ParseError(f"prompt {text!r}: {e}") from None


def parse_checklist(items: list[str], spec: GenSpec) -> list[ChecklistItem]:
    """Parse checklist items written by :func:`format_checklist` and check them against ``spec``.

    Raises:
        ParseError: for an item outside the grammar, or one that contradicts the prompt (wrong object number,
            colour, shape or position).
    """
    out = []
    for raw in items:
        t = normalize(raw)
        for kind, pattern in _ITEMS.items():
            m = pattern.fullmatch(t)
            if m:
                break
        else:
            raise ParseError(f"cannot parse checklist item {raw!r}; expected items like 'object 1 is red'")
        if kind == "nothing_else":
            if not spec.exclusive:
                raise ParseError(f"checklist item {raw!r}: the prompt does not say 'nothing else'")
            out.append(ChecklistItem(kind, None, raw))
            continue
        idx = int(m[1]) - 1
        if not 0 <= idx < len(spec.objects):
            raise ParseError(f"checklist item {raw!r}: the prompt names {len(spec.objects)} object(s)")
        o = spec.objects[idx]
        expected = {
            "presence": (o.colour, o.shape, POSITION_PHRASES[o.position]),
            "colour": (o.colour,),
            "shape": (o.shape,),
            "position": (POSITION_PHRASES[o.position],),
        }[kind]
        if tuple(m.groups()[1:]) != expected:
            raise ParseError(f"checklist item {raw!r} contradicts the prompt's object {idx + 1} ({object_phrase(o)})")
        out.append(ChecklistItem(kind, idx, raw))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Vocabulary (for tiny word-level text encoders)


def tokenize(text: str) -> list[str]:
    """Words and commas of a normalised text: ``"A red circle, and"`` -> ``["a", "red", "circle", ",", "and"]``."""
    return normalize(text).replace(",", " , ").split()


def vocabulary() -> list[str]:
    """Every token :func:`tokenize` can produce on texts this module writes, sorted (a closed vocabulary)."""
    words = set(PALETTE) | set(SHAPES) | {",", "a", "an", "the", "and", "nothing", "else"}
    words |= {"make", "remove", "add", "move", "from", "to", "replace", "with"}
    for phrase in (*POSITION_PHRASES.values(), *CELL_NAMES):
        words |= set(phrase.split())
    return sorted(words)
