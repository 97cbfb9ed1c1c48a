"""Convert the released FIRM-Bench files into the local benchmark layout (:mod:`firm.bench.data`).

What we know about the release (from the FIRM-Reward README; the files themselves could not be inspected when this
was written): the dataset holds ``FIRM-Bench-Edit/`` and ``FIRM-Bench-Gen/``, each with ``bench_v1.jsonl`` (the
inputs; image paths relative to that folder) and ``result/human_bench_v1.jsonl`` (the human scores).

What we do NOT know are the exact field names. The converter therefore looks for each *role* (id, source image,
edited image, instruction, dimension, score, ...) under a list of plausible keys (:data:`CANDIDATES`), joins the
human file to the inputs by id (or by line order when neither has an id and both have the same length), and records
the keys it used in ``bench.json``. When a role cannot be found it stops and lists the keys the file does have; name
the right one with ``--field ROLE=KEY`` (``field_map``). Check the first converted items by eye before trusting it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from firm.bench.data import (
    EDIT_CONSISTENCY,
    EDIT_EXECUTION,
    GENERATION,
    BenchItem,
    BenchmarkError,
    write_benchmark,
)

log = logging.getLogger(__name__)

INPUTS_FILE = "bench_v1.jsonl"
HUMAN_FILE = "result/human_bench_v1.jsonl"

# Keys tried for each role, in order. Override with field_map / --field ROLE=KEY.
CANDIDATES: dict[str, tuple[str, ...]] = {
    "id": ("id", "idx", "key", "uid", "item_id", "index", "sample_id"),
    "source": ("source_image", "src_image", "input_image", "original_image", "ori_image", "image_src", "source"),
    "edited": ("edited_image", "edit_image", "output_image", "result_image", "target_image", "edited", "output"),
    "images": ("images", "image"),  # edit: a [source, edited] pair under one key
    "instruction": ("instruction", "edit_instruction", "edit_prompt", "prompt", "text"),
    "dimension": ("dimension", "aspect", "task", "type", "category", "metric", "criterion"),
    "score": ("human_score", "score", "gt_score", "gt", "rating", "label", "mos"),
    "execution": ("execution", "execution_score", "exec_score", "exec"),
    "consistency": ("consistency", "consistency_score", "cons_score", "cons"),
    "image": ("image", "image_path", "img", "img_path", "generated_image", "output_image", "path"),
    "prompt": ("prompt", "caption", "text", "instruction"),
    "checklist": ("checklist", "plan", "requirements", "questions", "check_list"),
    "split": ("difficulty", "split", "level", "hard"),
}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise BenchmarkError(f"expected file not found: {path}")
    text = path.read_text(encoding="utf-8").strip()
    if text.startswith("["):  # a JSON array instead of JSONL
        data = json.loads(text)
    else:
        data = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BenchmarkError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    if not all(isinstance(r, dict) for r in data):
        raise BenchmarkError(f"{path}: expected one JSON object per line")
    return data


class _Fields:
    """Finds the key used for each role in a list of records, honouring explicit overrides."""

    def __init__(self, records: list[dict[str, Any]], field_map: dict[str, str], where: Path) -> None:
        self.keys: set[str] = set().union(*(r.keys() for r in records)) if records else set()
        self.field_map, self.where = field_map, where
        self.used: dict[str, str] = {}

    def key(self, role: str, *, required: bool = True) -> str | None:
        if role in self.field_map:
            k = self.field_map[role]
            if k not in self.keys:
                raise BenchmarkError(f"{self.where}: --field {role}={k}: no such key; keys: {sorted(self.keys)}")
            self.used[role] = k
            return k
        for k in CANDIDATES[role]:
            if k in self.keys:
                self.used[role] = k
                return k
        if required:
            raise BenchmarkError(
                f"{self.where}: cannot find the {role!r} field (tried {list(CANDIDATES[role])}); the records have "
                f"keys {sorted(self.keys)}. Name it with --field {role}=KEY."
            )
        return None


def _join(inputs: list[dict], human: list[dict], fi: _Fields, fh: _Fields, where: Path) -> list[tuple[dict, dict]]:
    id_in, id_h = fi.key("id", required=False), fh.key("id", required=False)
    if id_in and id_h:
        by_id = {str(r[id_h]): r for r in human if id_h in r}
        pairs = [(r, by_id[str(r[id_in])]) for r in inputs if str(r.get(id_in)) in by_id]
        if len(pairs) < len(inputs):
            log.warning("%s: %d input item(s) have no human score and are skipped", where, len(inputs) - len(pairs))
        return pairs
    if len(inputs) != len(human):
        raise BenchmarkError(
            f"{where}: no shared id field and {len(inputs)} inputs vs {len(human)} human scores; "
            "name the id field with --field id=KEY"
        )
    log.warning("%s: no id field found; joining inputs and human scores by line order", where)
    return list(zip(inputs, human, strict=True))


def _place_image(src_root: Path, rel: str, out: Path, subdir: str, link: bool) -> Path:
    src = (src_root / rel).resolve()
    if not src.is_file():
        raise BenchmarkError(f"image not found: {src} (paths are taken relative to {src_root})")
    dst = out / "images" / subdir / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        if link:
            os.symlink(src, dst)
        else:
            shutil.copy2(src, dst)
    return dst


def _score_value(v: Any, where: str) -> float:
    if isinstance(v, dict):  # e.g. {"score": 4}
        v = next((v[k] for k in ("score", "human_score", "mean") if k in v), None)
    if isinstance(v, list) and v and all(isinstance(x, int | float) for x in v):  # several raters
        v = sum(v) / len(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise BenchmarkError(f"{where}: human score {v!r} is not a number") from None
    if not 1 <= f <= 5:
        raise BenchmarkError(f"{where}: human score {f} outside 1..5")
    return f


def _dimension_of(value: Any) -> str | None:
    s = str(value).lower()
    if "exec" in s or "instruction" in s or "follow" in s:
        return EDIT_EXECUTION
    if "consist" in s or "preserv" in s:
        return EDIT_CONSISTENCY
    return None


def convert_edit(src: Path, out: Path, field_map: dict[str, str], link: bool) -> tuple[list[BenchItem], dict]:
    inputs = _read_jsonl(src / INPUTS_FILE)
    human = _read_jsonl(src / HUMAN_FILE)
    fi, fh = _Fields(inputs, field_map, src / INPUTS_FILE), _Fields(human, field_map, src / HUMAN_FILE)
    pairs = _join(inputs, human, fi, fh, src)
    k_src, k_edit = fi.key("source", required=False), fi.key("edited", required=False)
    k_pair = None if (k_src and k_edit) else fi.key("images")
    k_instr = fi.key("instruction")
    # Either per-dimension score columns (execution / consistency), or one score plus a dimension field that may sit
    # in either file.
    k_exec, k_cons = fh.key("execution", required=False), fh.key("consistency", required=False)
    k_dim = k_score = None
    if not (k_exec or k_cons) or "dimension" in field_map:
        k_dim = fh.key("dimension", required=False) or fi.key("dimension")
        k_score = fh.key("score")
    items: list[BenchItem] = []
    for n, (ri, rh) in enumerate(pairs):
        rid = str(ri.get(fi.used.get("id", ""), n))
        where = f"{src.name} item {rid}"
        if k_pair:
            pair = ri[k_pair]
            if isinstance(pair, str) and k_edit:  # `image` holds the source, the edited image has its own key
                pair = [pair, ri[k_edit]]
            if not (isinstance(pair, list) and len(pair) == 2):
                raise BenchmarkError(f"{where}: '{k_pair}' should be [source, edited]; name them with --field")
            s_rel, e_rel = pair
        else:
            s_rel, e_rel = ri[k_src], ri[k_edit]
        source = _place_image(src, s_rel, out, "edit", link)
        edited = _place_image(src, e_rel, out, "edit", link)
        scores: dict[str, float] = {}
        if k_dim and k_score:
            dim = _dimension_of((rh if k_dim in rh else ri).get(k_dim))
            if dim is None:
                raise BenchmarkError(f"{where}: cannot tell execution from consistency in {k_dim}={rh.get(k_dim)!r}")
            scores[dim] = _score_value(rh[k_score], where)
        else:
            for dim, k in ((EDIT_EXECUTION, k_exec), (EDIT_CONSISTENCY, k_cons)):
                if k and rh.get(k) is not None:
                    scores[dim] = _score_value(rh[k], where)
        for dim, score in scores.items():
            suffix = "exec" if dim == EDIT_EXECUTION else "cons"
            items.append(BenchItem(f"edit-{rid}-{suffix}", dim, score, str(ri[k_instr]), source=source, edited=edited))
    return items, {"inputs": fi.used, "human": fh.used}


def convert_gen(src: Path, out: Path, field_map: dict[str, str], link: bool) -> tuple[list[BenchItem], dict]:
    inputs = _read_jsonl(src / INPUTS_FILE)
    human = _read_jsonl(src / HUMAN_FILE)
    fi, fh = _Fields(inputs, field_map, src / INPUTS_FILE), _Fields(human, field_map, src / HUMAN_FILE)
    pairs = _join(inputs, human, fi, fh, src)
    k_img, k_prompt = fi.key("image"), fi.key("prompt")
    k_check = fi.key("checklist", required=False)
    k_split = fi.key("split", required=False) or fh.key("split", required=False)
    k_score = fh.key("score")
    if k_split is None:
        raise BenchmarkError(
            f"{src}: cannot find the easy/hard field (tried {list(CANDIDATES['split'])}); "
            "name it with --field split=KEY"
        )
    items: list[BenchItem] = []
    for n, (ri, rh) in enumerate(pairs):
        rid = str(ri.get(fi.used.get("id", ""), n))
        where = f"{src.name} item {rid}"
        raw_split = ri.get(k_split, rh.get(k_split))
        split = "hard" if raw_split is True or str(raw_split).lower() in ("hard", "1", "true") else None
        split = split or ("easy" if raw_split is False or str(raw_split).lower() in ("easy", "0", "false") else None)
        if split is None:
            raise BenchmarkError(f"{where}: split value {raw_split!r} is neither easy nor hard")
        checklist = ri.get(k_check) if k_check else None
        if isinstance(checklist, str):
            checklist = [c.strip(" -*\t") for c in checklist.splitlines() if c.strip(" -*\t")]
        if isinstance(checklist, dict):
            checklist = [str(v) for v in checklist.values()]
        image = _place_image(src, ri[k_img], out, "gen", link)
        items.append(
            BenchItem(
                f"gen-{rid}", GENERATION, _score_value(rh[k_score], where), prompt=str(ri[k_prompt]), image=image,
                checklist=checklist or None, split=split,
            )
        )  # fmt: skip
    return items, {"inputs": fi.used, "human": fh.used}


def convert_firm_bench(
    out: str | Path,
    *,
    edit_dir: str | Path | None = None,
    gen_dir: str | Path | None = None,
    field_map: dict[str, str] | None = None,
    link_images: bool = True,
) -> Path:
    """Write a local benchmark directory from the released FIRM-Bench folders.

    Args:
        out: output directory (``items.jsonl``, ``bench.json``, ``images/``).
        edit_dir: the ``FIRM-Bench-Edit`` folder (optional).
        gen_dir: the ``FIRM-Bench-Gen`` folder (optional).
        field_map: role -> key overrides, e.g. ``{"score": "avg_score"}`` (roles: see :data:`CANDIDATES`).
        link_images: symlink images instead of copying them.

    Raises:
        BenchmarkError: a missing file, or a role whose key cannot be found (the message lists the keys present).
    """
    if edit_dir is None and gen_dir is None:
        raise BenchmarkError("give --edit-dir and/or --gen-dir (the FIRM-Bench-Edit / FIRM-Bench-Gen folders)")
    out = Path(out).resolve()
    field_map = dict(field_map or {})
    unknown = sorted(set(field_map) - set(CANDIDATES))
    if unknown:
        raise BenchmarkError(f"unknown role(s) {unknown} in --field; roles: {', '.join(CANDIDATES)}")
    items: list[BenchItem] = []
    used: dict[str, Any] = {}
    if edit_dir is not None:
        edit_items, used["edit"] = convert_edit(Path(edit_dir).resolve(), out, field_map, link_images)
        items += edit_items
    if gen_dir is not None:
        gen_items, used["generation"] = convert_gen(Path(gen_dir).resolve(), out, field_map, link_images)
        items += gen_items
    write_benchmark(
        out, items, name="FIRM-Bench", description="FIRM-Bench (converted from the released files)",
        score_source="human",
    )  # fmt: skip
    meta_path = out / "bench.json"
    meta = json.loads(meta_path.read_text())
    meta["conversion"] = {"fields_used": used, "edit_dir": str(edit_dir), "gen_dir": str(gen_dir)}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    counts: dict[str, int] = {}
    for it in items:
        counts[it.group] = counts.get(it.group, 0) + 1
    log.info("converted %d items: %s (fields: %s)", len(items), counts, used)
    print(f"[firm critic bench-convert] {len(items)} items {counts}; fields used: {json.dumps(used)}")
    return out
