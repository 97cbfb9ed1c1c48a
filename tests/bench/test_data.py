"""The local benchmark layout: loading, validation errors, selection, fingerprints."""

import json

import pytest
from PIL import Image

from firm.bench.data import BenchmarkError, load_benchmark
from tests.bench.helpers import make_bench

ITEMS = [
    {"id": "e1", "task": "edit-execution", "human_score": 4},
    {"id": "e2", "task": "edit-execution", "human_score": 2},
    {"id": "c1", "task": "edit-consistency", "human_score": 5},
    {"id": "g1", "task": "generation", "human_score": 3, "split": "hard", "checklist": ["a square"]},
    {"id": "g2", "task": "generation", "human_score": 1.5, "split": "easy", "meta": {"seed": 3}},
]


def test_load_benchmark(tmp_path):
    b = load_benchmark(make_bench(tmp_path / "b", ITEMS))
    assert b.name == "tiny-bench" and b.score_source == "rubric"
    assert [it.id for it in b.items] == ["e1", "e2", "c1", "g1", "g2"]
    assert b.task_counts() == {
        "edit-consistency": 1, "edit-execution": 2, "generation/easy": 1, "generation/hard": 1
    }  # fmt: skip
    g1 = b.items[3]
    assert g1.dimension == "instruction" and g1.checklist == ["a square"] and g1.image.is_file()
    assert b.items[0].dimension == "execution" and b.items[2].dimension == "consistency"
    assert b.items[4].human_score == 1.5 and b.items[4].meta == {"seed": 3}
    small = b.select(["edit-execution", "generation"], limit=1)
    assert [it.id for it in small.items] == ["e1", "g1"]
    with pytest.raises(BenchmarkError, match="unknown task"):
        b.select(["editing"])


@pytest.mark.parametrize(
    "change,message",
    [
        ({"task": "editing"}, "task 'editing' is not one of"),
        ({"human_score": 7}, "human_score must be a number in 1..5"),
        ({"human_score": True}, "human_score must be a number"),
        ({"instruction": ""}, "needs a non-empty 'instruction'"),
        ({"source": "images/missing.png"}, "image 'source' not found"),
        ({"split": "easy"}, "'split' applies to generation items only"),
        ({"colour": "red"}, "unknown field"),
    ],
)
def test_bad_edit_items_are_named(tmp_path, change, message):
    root = make_bench(tmp_path / "b", [dict(ITEMS[0], **change)])
    with pytest.raises(BenchmarkError, match=message) as e:
        load_benchmark(root)
    assert "items.jsonl:1" in str(e.value)


def test_other_layout_errors(tmp_path):
    with pytest.raises(BenchmarkError, match="no items.jsonl"):
        load_benchmark(tmp_path)
    root = make_bench(tmp_path / "g", [dict(ITEMS[3], split="medium")])
    with pytest.raises(BenchmarkError, match="split 'easy' or 'hard'"):
        load_benchmark(root)
    root = make_bench(tmp_path / "d", [ITEMS[0], ITEMS[0]])
    with pytest.raises(BenchmarkError, match="duplicate id 'e1'"):
        load_benchmark(root)
    (root / "items.jsonl").write_text('{"id": "x", "task": \n')
    with pytest.raises(BenchmarkError, match="items.jsonl:1: not valid JSON"):
        load_benchmark(root)
    released = tmp_path / "released" / "FIRM-Bench-Edit"
    released.mkdir(parents=True)
    (released / "bench_v1.jsonl").write_text("{}\n")
    with pytest.raises(BenchmarkError, match="bench-convert"):
        load_benchmark(tmp_path / "released")


def test_fingerprint_tracks_inputs_not_the_reference(tmp_path):
    root = make_bench(tmp_path / "b", ITEMS[:1])
    fp = load_benchmark(root).items[0].fingerprint()
    rec = json.loads((root / "items.jsonl").read_text())
    (root / "items.jsonl").write_text(json.dumps(dict(rec, human_score=1)) + "\n")
    assert load_benchmark(root).items[0].fingerprint() == fp  # relabelling keeps cached critic answers
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / rec["edited"])
    assert load_benchmark(root).items[0].fingerprint() != fp  # a new image invalidates them
