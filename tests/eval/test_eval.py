"""`firm eval`: loaders, judges' parsers, paired bootstrap, the shapes eval end to end, resume after SIGKILL, two
ranks, and the GEdit / ImgEdit / GenEval-style YAMLs against a scripted judge endpoint on 127.0.0.1."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from firm.eval.generate import shard
from firm.eval.items import EvalSetError, GEditBench, GenEvalSet, ImgEditBench, PromptItem, PromptSet
from firm.eval.judges import GenEvalVQAJudge, ImgEditJudge, VIEScoreJudge, geneval_questions
from firm.eval.report import ReportConfig, paired_difference
from firm.eval.run import load_eval_config, run_eval

REPO = Path(__file__).resolve().parents[2]
EXP = REPO / "experiments" / "eval"
FIRM = [sys.executable, "-m", "firm"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _png(path: Path, colour=(200, 30, 30)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)
    return path.name


def gedit_fixture(root: Path) -> Path:
    recs = []
    for i, (task, lang) in enumerate([("color_alter", "en"), ("subject-add", "cn"), ("color_alter", "en")]):
        img = _png(root / f"src{i}.png", (40 * i, 90, 160))
        text = "make it GARBAGE" if i == 2 else f"instruction {i}"
        recs.append(
            {"key": f"k{i}", "task_type": task, "instruction": text, "instruction_language": lang, "input_image": img}
        )
    (root / "gedit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root / "gedit.jsonl"


def imgedit_fixture(root: Path) -> Path:
    data = {
        str(i): {"id": _png(root / f"im{i}.png"), "prompt": f"change {i}", "edit_type": t}
        for i, t in enumerate(["add", "style"])
    }
    (root / "basic_edit.json").write_text(json.dumps(data))
    return root / "basic_edit.json"


def geneval_fixture(root: Path) -> Path:
    recs = [
        {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
        {
            "tag": "counting",
            "include": [{"class": "cat", "count": 2}],
            "exclude": [{"class": "cat", "count": 3}],
            "prompt": "a photo of two cats",
        },
        {
            "tag": "position",
            "include": [{"class": "dog", "count": 1}, {"class": "car", "count": 1, "position": ["left of", 0]}],
            "prompt": "a car left of a dog",
        },
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root / "meta.jsonl"


# --------------------------------------------------------------------------------------------------------------------
# Loaders and parsers


def test_loaders_read_the_formats_and_name_the_keys_they_found(tmp_path):
    ps = GEditBench(GEditBench.Config(path=str(gedit_fixture(tmp_path / "g")))).load()
    assert [it.language for it in ps.items] == ["en", "cn", "en"] and ps.categories() == ["color_alter", "subject-add"]
    en = GEditBench(GEditBench.Config(path=str(tmp_path / "g" / "gedit.jsonl"), languages=["en"])).load()
    assert len(en.items) == 2
    assert ImgEditBench(ImgEditBench.Config(path=str(imgedit_fixture(tmp_path / "i")))).load().categories() == [
        "add",
        "style",
    ]
    assert GenEvalSet(GenEvalSet.Config(path=str(geneval_fixture(tmp_path / "e")))).load().kind == "gen"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "image": "a.png"}) + "\n")
    with pytest.raises(EvalSetError, match=r"found keys \['image', 'prompt'\]"):
        GEditBench(GEditBench.Config(path=str(bad))).load()
    with pytest.raises(EvalSetError, match="missing"):
        ImgEditBench(ImgEditBench.Config(path=str(bad))).load()


def test_judge_parsers_never_turn_a_bad_answer_into_a_score():
    v = VIEScoreJudge(VIEScoreJudge.Config(), "edit")
    assert v.parse("sc", 'thinking... {"score": [7, 4], "reasoning": "x"}') == (4.0, None, {"scores": [7.0, 4.0]})
    assert v.parse("sc", '{"score": [7]}')[0] is None
    assert v.parse("pq", '{"score": [11, 3]}')[0] is None
    assert v.parse("pq", "seven")[0] is None
    i = ImgEditJudge(ImgEditJudge.Config(), "edit")
    ok = "Prompt Compliance: 5\nVisual Naturalness: 4\nPhysical & Detail Integrity: 3"
    assert i.parse("score", ok)[0] == 4.0
    assert i.parse("score", "Prompt Compliance: 5\nVisual Naturalness: 4")[0] is None
    g = GenEvalVQAJudge(GenEvalVQAJudge.Config(), "gen")
    assert g.parse("inc0", "Yes.")[0] == 1.0 and g.parse("inc0", "no")[0] == 0.0 and g.parse("inc0", "maybe")[0] is None
    qs = geneval_questions(
        {
            "include": [{"class": "cat", "count": 2}, {"class": "car", "color": "red", "position": ["left of", 0]}],
            "exclude": [{"class": "cat", "count": 3}],
        }
    )
    assert [q for q, _, _ in qs] == ["inc0", "inc1", "col1", "pos1", "exc0"] and qs[-1][2] is False
    with pytest.raises(ValueError, match="scores"):
        GenEvalVQAJudge(GenEvalVQAJudge.Config(), "edit")


def test_paired_difference_and_shards():
    items = [PromptItem(f"i{k}", "p", "a" if k < 6 else "b") for k in range(10)]
    ps = PromptSet("t", "gen", items)
    base = {it.id: {0: {"m": 0.2}, 1: {"m": 0.4}} for it in items}
    other = {it.id: {0: {"m": 0.5}, 1: {"m": 0.5 if it.category == "a" else None}} for it in items}
    d = paired_difference(base, other, ps, "m", "samples", ReportConfig(bootstrap_samples=300))
    # a: mean over seeds of (0.3, 0.1) = 0.2 per item; b: only seed 0 pairs: 0.3
    assert d["categories"]["a"]["mean"] == pytest.approx(0.2) and d["categories"]["b"]["mean"] == pytest.approx(0.3)
    assert d["overall"]["mean"] == pytest.approx((6 * 0.2 + 4 * 0.3) / 10)
    lo, hi = d["overall"]["ci"]
    assert lo <= d["overall"]["mean"] <= hi
    parts = [shard(list(range(11)), r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11)) and not set(parts[0]) & set(parts[1])


# --------------------------------------------------------------------------------------------------------------------
# The shapes world end to end


def test_shapes_eval_end_to_end_and_rerun_resumes(tmp_path):
    ov = [f"output_root={tmp_path}", "prompts.n_tasks=6", "report.bootstrap_samples=200"]
    c = load_eval_config(EXP / "shapes_edit.yaml", ov)
    done = run_eval(c, echo=False)
    out = tmp_path / "shapes_edit"
    assert done["generate"]["base"]["sampled"] == 12 and done["generate"]["trained"]["sampled"] == 12
    res = json.loads((out / "results.json").read_text())
    assert res["headline"] == "cme" and res["generation"]["num_steps"] == 4 and res["resolutions"] == [32]
    d = res["differences"]["trained"]["cme"]["overall"]
    b, t = (res["policies"][k]["metrics"]["cme"]["overall"] for k in ("base", "trained"))
    assert d["mean"] == pytest.approx(t - b)  # every pair present: paired mean = difference of means
    assert res["policies"]["trained"]["policy"]["kind"] == "exported_lora"
    assert (out / "table.md").read_text().count("| overall |") >= 1 and res["grids"]
    assert all((out / g).is_file() for g in res["grids"])
    again = run_eval(c, echo=False)
    assert again["generate"]["base"]["sampled"] == 0 and again["score"]["n_asked"] == 0
    assert json.loads((out / "results.json").read_text())["policies"] == res["policies"]


def _manifest_lines(out: Path, label: str) -> list[dict]:
    lines = []
    for p in sorted((out / "manifest").glob(f"{label}.rank*.jsonl")):
        lines += [json.loads(x) for x in p.read_text().splitlines() if x.strip().endswith("}")]
    return lines


@pytest.mark.slow  # four `firm eval` subprocesses, two of them killed
def test_sigkill_during_generate_and_score_then_relaunch(tmp_path):
    ov = [
        f"output_root={tmp_path}",
        "prompts.n_tasks=8",
        "generation.batch_size=2",
        "generation.seeds=[0]",
        "policies.trained.lora=null",
        "policies.trained.policy.family=qwen_image_edit",
        "progress=false",
        "score_batch_size=2",
        "judge.name=test_slow_shapes",
        f"imports=[{Path(__file__).parent / 'slow_judge.py'}]",
    ]
    out = tmp_path / "shapes_edit"
    cmd = [*FIRM, "eval", str(EXP / "shapes_edit.yaml"), *ov]
    proc = subprocess.Popen([*cmd, "--stage", "generate"], cwd=REPO, env=ENV)
    t0 = time.time()
    while len(list((out / "images" / "base").glob("*.png"))) < 2 and time.time() - t0 < 120 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(list((out / "images" / "base").glob("*.png")))
    assert 0 < n_before < 8 or len(list((out / "images").rglob("*.png"))) < 16
    subprocess.run([*cmd, "--stage", "generate"], cwd=REPO, env=ENV, check=True, capture_output=True)
    for label in ("base", "trained"):
        lines = _manifest_lines(out, label)
        generated = [x["sample_id"] for x in lines if x["generated"]]
        assert len(generated) == len(set(generated)), "an image was generated twice"
        assert len({x["sample_id"] for x in lines}) == 8 and len(list((out / "images" / label).glob("*.png"))) == 8
    proc = subprocess.Popen([*cmd, "--stage", "score"], cwd=REPO, env=ENV)
    t0 = time.time()

    def cache() -> int:
        files = (out / "score").glob("*.jsonl") if (out / "score").is_dir() else []
        return sum(len(p.read_text().splitlines()) for p in files)

    while cache() < 4 and time.time() - t0 < 120 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_cached = cache()
    assert 0 < n_cached < 32
    r = subprocess.run([*cmd, "--stage", "score"], cwd=REPO, env=ENV, check=True, capture_output=True, text=True)
    assert f"'n_cached': {n_cached}" in r.stdout or f"'n_cached': {n_cached - 1}" in r.stdout
    lines = [json.loads(x) for p in (out / "score").glob("*.jsonl") for x in p.read_text().splitlines() if x.strip()]
    ids = [x["item_id"] for x in lines]
    assert len(ids) == len(set(ids)) == 32, "a question was asked twice or is missing"


@pytest.mark.slow  # two `firm eval` ranks as subprocesses, then the report
def test_two_ranks_split_the_work_and_the_report_merges_them(tmp_path):
    ov = [
        f"output_root={tmp_path}",
        "prompts.n_tasks=5",
        "generation.seeds=[0]",
        "policies.trained.lora=null",
        "policies.trained.policy.family=qwen_image_edit",
        "progress=false",
        "report.grid_items=1",
    ]
    procs = [
        subprocess.Popen(
            [*FIRM, "eval", str(EXP / "shapes_edit.yaml"), *ov],
            cwd=REPO,
            env={**ENV, "RANK": str(r), "WORLD_SIZE": "2"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    out = tmp_path / "shapes_edit"
    r0 = {x["item_id"] for x in _manifest_lines(out, "base") if x["pid"] == procs[0].pid}
    r1 = {x["item_id"] for x in _manifest_lines(out, "base") if x["pid"] == procs[1].pid}
    assert len(r0) == 3 and len(r1) == 2 and not r0 & r1
    assert (out / "manifest" / "base.rank1.jsonl").is_file()
    res = json.loads((out / "results.json").read_text())
    assert res["n_items"] == 5 and res["policies"]["base"]["metrics"]["cme"]["n_missing"] == 0


# --------------------------------------------------------------------------------------------------------------------
# GEdit / ImgEdit / GenEval-style against a judge endpoint on 127.0.0.1


class _Judge(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _send(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "judge", "object": "model"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = " ".join(
            p.get("text", "")
            for m in req["messages"]
            for p in (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}])
        )
        if "GARBAGE" in text:
            answer = "I would rather not say."
        elif "editing success" in text:
            answer = '{"score": [8, 6], "reasoning": "mostly done"}'
        elif "naturalness" in text:
            answer = '{"score": [9, 4], "reasoning": "some artifacts"}'
        elif "Prompt Compliance" in text:
            answer = "Prompt Compliance: 4\nVisual Naturalness: 3\nPhysical & Detail Integrity: 5"
        elif "or more" in text:
            answer = "No"
        else:
            answer = "Yes, there is."
        self._send(
            {
                "id": "x",
                "object": "chat.completion",
                "model": "judge",
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )


@pytest.fixture
def judge_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


@pytest.mark.parametrize("name", ["gedit", "imgedit", "geneval"])
def test_benchmark_yamls_end_to_end_with_a_local_judge(name, tmp_path, judge_server):
    fixture = {"gedit": gedit_fixture, "imgedit": imgedit_fixture, "geneval": geneval_fixture}[name](tmp_path / "data")
    ov = [
        f"output_root={tmp_path}",
        f"prompts.path={fixture}",
        f"judge.backend.endpoints=[{judge_server}]",
        "generation.seeds=[0]",
        "progress=false",
    ]
    c = load_eval_config(EXP / f"{name}_tiny.yaml", ov)
    run_eval(c, echo=False)
    res = json.loads((tmp_path / f"{name}_tiny" / "results.json").read_text())
    head = res["headline"]
    m = res["policies"]["base"]["metrics"][head]
    if name == "gedit":
        # SC = min(8, 6), PQ = min(9, 4), overall = sqrt(24); the GARBAGE item is a parse failure, not a score
        assert m["categories"]["subject-add"] == pytest.approx(np.sqrt(24)) and m["n_missing"] == 1
        assert res["policies"]["base"]["parse_failures"] == 1 and res["failure_examples"]
        assert [p["overall"] for p in res["published"]] == [7.54, 7.84] and all(
            p["published"] for p in res["published"]
        )
    elif name == "imgedit":
        assert m["overall"] == pytest.approx(4.0)
    else:
        assert (
            m["overall"] == pytest.approx(1.0)
            and "NOT GenEval's detector" in (tmp_path / "geneval_tiny" / "table.md").read_text()
        )
    assert "published:" in (tmp_path / f"{name}_tiny" / "table.md").read_text()
