"""The converter from the released FIRM-Bench files (field names assumed; see firm/bench/convert.py)."""

import json

import pytest
from PIL import Image

from firm.bench.convert import convert_firm_bench
from firm.bench.data import BenchmarkError, load_benchmark
from firm.cli import main


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 10, 10)).save(path)


@pytest.fixture
def released(tmp_path):
    edit, gen = tmp_path / "FIRM-Bench-Edit", tmp_path / "FIRM-Bench-Gen"
    for name in ("0_src", "0_out", "1_src", "1_out"):
        _img(edit / "imgs" / f"{name}.png")
    _jsonl(edit / "bench_v1.jsonl", [
        {"id": 0, "source_image": "imgs/0_src.png", "edited_image": "imgs/0_out.png", "instruction": "add a hat",
         "dimension": "Execution"},
        {"id": 1, "source_image": "imgs/1_src.png", "edited_image": "imgs/1_out.png", "instruction": "remove it",
         "dimension": "consistency"},
    ])  # fmt: skip
    _jsonl(edit / "result" / "human_bench_v1.jsonl", [{"id": 1, "score": 2}, {"id": 0, "score": 4}])
    _img(gen / "imgs" / "a.png")
    _img(gen / "imgs" / "b.png")
    _jsonl(gen / "bench_v1.jsonl", [
        {"id": "a", "image": "imgs/a.png", "prompt": "a red cube", "checklist": "- a cube\n- red",
         "difficulty": "Hard"},
        {"id": "b", "image": "imgs/b.png", "prompt": "two balls", "difficulty": "easy"},
    ])  # fmt: skip
    _jsonl(gen / "result" / "human_bench_v1.jsonl", [{"id": "a", "score": [3, 4]}, {"id": "b", "score": 5}])
    return edit, gen


def test_convert_released_layout(released, tmp_path):
    edit, gen = released
    out = convert_firm_bench(tmp_path / "local", edit_dir=edit, gen_dir=gen)
    b = load_benchmark(out)
    by_id = {it.id: it for it in b.items}
    assert by_id["edit-0-exec"].task == "edit-execution" and by_id["edit-0-exec"].human_score == 4
    assert by_id["edit-1-cons"].task == "edit-consistency" and by_id["edit-1-cons"].human_score == 2
    assert by_id["edit-0-exec"].instruction == "add a hat" and by_id["edit-0-exec"].source.is_file()
    a = by_id["gen-a"]
    assert (a.split, a.human_score, a.checklist) == ("hard", 3.5, ["a cube", "red"])
    assert by_id["gen-b"].split == "easy" and by_id["gen-b"].checklist is None
    meta = json.loads((out / "bench.json").read_text())
    assert meta["name"] == "FIRM-Bench"
    used = meta["conversion"]["fields_used"]
    assert used["edit"]["inputs"]["source"] == "source_image" and used["edit"]["inputs"]["dimension"] == "dimension"
    assert used["edit"]["human"] == {"id": "id", "score": "score"}
    assert used["generation"]["inputs"]["split"] == "difficulty"


def test_per_dimension_columns_and_field_overrides(tmp_path, capsys):
    edit = tmp_path / "FIRM-Bench-Edit"
    _img(edit / "x.png")
    _img(edit / "y.png")
    _jsonl(edit / "bench_v1.jsonl", [{"uid": "q", "images": ["x.png", "y.png"], "edit_text": "make it blue"}])
    _jsonl(edit / "result" / "human_bench_v1.jsonl", [{"uid": "q", "execution": 5, "consistency": 3}])
    with pytest.raises(BenchmarkError, match="cannot find the 'instruction' field") as e:
        convert_firm_bench(tmp_path / "o1", edit_dir=edit)
    assert "['edit_text', 'images', 'uid']" in str(e.value) and "--field instruction=KEY" in str(e.value)
    with pytest.raises(SystemExit):
        main(
            [
                "critic",
                "bench-convert",
                str(tmp_path / "o2"),
                "--edit-dir",
                str(edit),
                "--field",
                "instruction=edit_text",
            ]
        )
    b = load_benchmark(tmp_path / "o2")
    assert sorted((it.id, it.human_score) for it in b.items) == [("edit-q-cons", 3.0), ("edit-q-exec", 5.0)]
    assert "fields used" in capsys.readouterr().out
    with pytest.raises(BenchmarkError, match="unknown role"):
        convert_firm_bench(tmp_path / "o3", edit_dir=edit, field_map={"text": "edit_text"})
    with pytest.raises(BenchmarkError, match="--edit-dir and/or --gen-dir"):
        convert_firm_bench(tmp_path / "o4")
