"""`firm data import` from JSONL and folders, and `firm data inspect`."""

import json

import numpy as np
import pytest

from firm.cli import main
from firm.data.importers import DataImportError, folder_samples, import_samples
from firm.data.inspect import histogram, inspect_shards
from firm.data.reader import iter_samples
from firm.data.writer import write_shards
from tests.helpers.data import edit_sample, generation_sample, pixels, random_image


def _jsonl_layout(root, n=5):
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        src, out = random_image(i), random_image(100 + i)
        src.save(root / "img" / f"{i}_src.png")
        out.save(root / "img" / f"{i}_out.png")
        rows.append({"source": f"img/{i}_src.png", "edited": f"img/{i}_out.png", "instruction": f"do {i}"})
        if i % 2:
            rows[-1].update(key=f"row{i}", execution=i % 5 + 1)
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return rows


def test_import_jsonl_then_read_back(tmp_path):
    _jsonl_layout(tmp_path)
    rep = import_samples(tmp_path / "data.jsonl", tmp_path / "out" / "e", "edit", max_count=2, progress=False)
    assert rep.imported == 5 and rep.skipped == 0 and len(rep.shards) == 3
    got = list(iter_samples(tmp_path / "out", "edit"))
    assert [s["key"] for s in got] == ["data-00000001", "row1", "data-00000003", "row3", "data-00000005"]
    assert got[1]["execution"] == 2 and got[0]["execution"] is None
    assert np.array_equal(pixels(got[2]["edited"]), pixels(random_image(102)))


def test_import_errors_name_the_line_or_skip(tmp_path):
    rows = _jsonl_layout(tmp_path)
    rows[2]["edited"] = "img/missing.png"
    rows[3]["consistency"] = 9
    rows.append({"instruction": "x", "source": "img/0_src.png", "edited": "img/0_out.png", "colour": "red"})
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataImportError, match=r"data.jsonl:3: image file not found"):
        import_samples(tmp_path / "data.jsonl", tmp_path / "o1" / "e", "edit", progress=False)
    rep = import_samples(tmp_path / "data.jsonl", tmp_path / "o2" / "e", "edit", on_error="skip", progress=False)
    assert rep.imported == 3 and rep.skipped == 3
    assert any("'consistency'" in p and "outside 1..5" in p for p in rep.problems)
    assert any("--extra-to-bag" in p for p in rep.problems)
    rep = import_samples(
        tmp_path / "data.jsonl", tmp_path / "o3" / "e", "edit", on_error="skip", extra_to_bag=True, progress=False
    )
    assert rep.imported == 4
    last = list(iter_samples(tmp_path / "o3", "edit"))[-1]
    assert last["provenance"] == {"colour": "red"}


def test_import_folder_generation_and_prompts(tmp_path):
    g = tmp_path / "gen"
    g.mkdir()
    for i in range(3):
        random_image(i).save(g / f"img{i}.png")
        (g / f"img{i}.txt").write_text(f"a picture {i}\n")
    (g / "img1.json").write_text(json.dumps({"instruction": 4}))
    (g / "README").write_text("not a sample")
    got = list(folder_samples(g, "generation"))
    assert [s["key"] for s in got] == ["img0", "img1", "img2"]
    assert got[1]["prompt"] == "a picture 1" and got[1]["instruction"] == 4

    p = tmp_path / "prompts"
    p.mkdir()
    (p / "a.txt").write_text("make it blue")
    random_image(0).save(p / "a.source.png")
    (p / "b.txt").write_text("a blue cat")
    rep = import_samples(p, tmp_path / "out" / "p", "rl_prompt", progress=False)
    assert rep.imported == 2
    got = {s["key"]: s for s in iter_samples(tmp_path / "out", "rl_prompt")}
    assert got["a"]["task"] == "edit" and got["b"]["task"] == "generation" and got["b"]["source"] is None


def test_histogram_counts_missing():
    assert histogram([1, 5, None, 5]) == {"1": 1, "2": 0, "3": 0, "4": 0, "5": 2, "missing": 1}


def test_inspect_report_and_cli(tmp_path, capsys):
    write_shards([edit_sample(i) for i in range(9)], tmp_path / "s" / "e", "edit", max_count=4)
    write_shards([generation_sample(i) for i in range(3)], tmp_path / "s" / "g", "generation")
    rep = inspect_shards(tmp_path / "s", tmp_path / "insp", num_render=2, progress=False)
    assert rep.samples == 12 and rep.shards == 4 and rep.per_schema == {"edit": 9, "generation": 3}
    assert rep.histograms["edit.execution"] == histogram([1 + i % 5 for i in range(9)])
    assert rep.histograms["edit.consistency"]["missing"] == 2  # i = 0 and 7
    assert (tmp_path / "insp" / "histograms.png").stat().st_size > 1000
    assert len(list((tmp_path / "insp" / "samples").glob("*.png"))) == 2
    assert json.loads((tmp_path / "insp" / "report.json").read_text())["samples"] == 12

    with pytest.raises(SystemExit) as e:
        main(["data", "inspect", str(tmp_path / "s" / "e-*.tar"), "--render", "0"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "9 sample(s) in 3 shard(s)" in out and "edit.execution (n=9)" in out


def test_import_cli(tmp_path, capsys):
    _jsonl_layout(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["data", "import", str(tmp_path / "data.jsonl"), "--schema", "edit", "--out", str(tmp_path / "o" / "x")])
    assert e.value.code == 0
    assert "imported 5 sample(s) into 1 shard(s)" in capsys.readouterr().out
