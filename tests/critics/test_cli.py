"""`firm critic score`: folder layouts, JSONL output, clear errors."""

import json

import pytest
from PIL import Image

from firm.cli import main
from firm.critics.cli import discover_edit_items, discover_gen_items
from firm.rewards import cme, qma
from tests.critics.servers import ScriptedServer, chat_answer, prompt_text


def _answers(body):
    text = prompt_text(body)
    if "Judge EXECUTION" in text:
        return 200, chat_answer('{"reasoning": "done", "score": 5}')
    if "Judge CONSISTENCY" in text:
        return 200, chat_answer('{"reasoning": "one small change", "score": 4}')
    if "Requirements to check" in text:
        return 200, chat_answer("\\boxed{3}")
    if "checklist of concrete" in text:
        return 200, chat_answer("1. a cat")
    return 200, chat_answer("Aesthetics: 5\nTechnical quality: 5\nStructure & texture: 4")


def _save(path, color=(0, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)


def _run(args):
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code


def test_scores_a_pairs_manifest_over_http(tmp_path, capsys):
    for i in range(3):
        _save(tmp_path / "imgs" / f"src{i}.png")
        _save(tmp_path / "imgs" / f"out{i}.jpg", (255, 0, 0))
    lines = [
        {"key": f"k{i}", "source": f"imgs/src{i}.png", "edited": f"imgs/out{i}.jpg", "instruction": "make it red"}
        for i in range(3)
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out" / "scores.jsonl"
    with ScriptedServer(_answers) as srv:
        code = _run(["critic", "score", str(tmp_path), "--out", str(out), "--endpoint", srv.url, "--chunk", "2"])
    assert code == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["key"] for r in rows] == ["k0", "k1", "k2"]
    assert rows[0]["scores"] == {"execution": 5, "consistency": 4}
    assert rows[0]["reward"] == pytest.approx(cme(1.0, 0.75))
    assert rows[0]["reasoning"]["consistency"] == "one small change"
    printed = capsys.readouterr().out
    assert "scored 3 items" in printed and "execution" in printed


def test_scores_generated_images_with_a_chosen_reward(tmp_path):
    _save(tmp_path / "a.png")
    _save(tmp_path / "b.png")
    rows = [{"image": "a.png", "prompt": "a cat", "checklist": ["a cat"]}, {"image": "b.png", "prompt": "a cat"}]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "gen.jsonl"
    with ScriptedServer(_answers) as srv:
        assert _run(["critic", "score", str(tmp_path), "--task", "gen", "--out", str(out), "--endpoint", srv.url]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert got[0]["scores"] == {"instruction": 3, "quality": 4}
    assert got[0]["reward"] == pytest.approx(qma(0.5, 0.75))
    assert got[1]["details"]["checklist"] == ["a cat"]  # planned by the critic


@pytest.mark.slow
def test_scores_a_source_edited_folder_with_the_local_backend(tmp_path, tiny_vlm):
    for name in ("a", "b"):
        _save(tmp_path / "source" / f"{name}.png")
        _save(tmp_path / "edited" / f"{name}.png", (0, 0, 255))
    (tmp_path / "instructions.jsonl").write_text('{"name": "a", "instruction": "make it blue"}\n')
    (tmp_path / "edited" / "b.txt").write_text("add a hat\n")
    out = tmp_path / "local.jsonl"
    args = ["critic", "score", str(tmp_path), "--out", str(out), "--model", str(tiny_vlm), "--max-tokens", "6"]
    assert _run([*args, "--dimensions", "execution", "--reward", "execution_only", "--parse-retries", "0"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["key"] for r in rows] == ["a", "b"]
    assert all(r["scores"] == {"execution": None} and r["reward"] is None for r in rows)


def test_folder_problems_are_reported_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected pairs.jsonl, or source/ and edited/"):
        discover_edit_items(tmp_path)
    _save(tmp_path / "source" / "x.png")
    _save(tmp_path / "edited" / "x.png")
    with pytest.raises(ValueError, match="no instruction for x: .*or pass --instruction"):
        discover_edit_items(tmp_path)
    assert discover_edit_items(tmp_path, "add a moon")[0]["instruction"] == "add a moon"
    _save(tmp_path / "edited" / "y.png")
    with pytest.raises(FileNotFoundError, match="no source image named y"):
        discover_edit_items(tmp_path, "add a moon")
    (tmp_path / "pairs.jsonl").write_text('{"source": "source/x.png", "edited": "missing.png", "instruction": "x"}\n')
    with pytest.raises(FileNotFoundError, match=r"pairs.jsonl:1 'edited': image .*missing.png not found"):
        discover_edit_items(tmp_path)
    (tmp_path / "prompts.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: not valid JSON"):
        discover_gen_items(tmp_path)


def test_needs_exactly_one_backend(tmp_path):
    _save(tmp_path / "source" / "x.png")
    _save(tmp_path / "edited" / "x.png")
    with pytest.raises(SystemExit, match="either --endpoint URL"):
        main(["critic", "score", str(tmp_path), "--out", str(tmp_path / "o.jsonl"), "--instruction", "x"])
