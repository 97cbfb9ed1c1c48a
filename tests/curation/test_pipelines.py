"""The pipelines with real teachers: the shapes rule teacher, a local tiny VLM, and an HTTP server on 127.0.0.1."""

import json

import pytest

from firm.critics.types import EditRequest, GenRequest
from firm.curation.journal import ShardSink
from firm.curation.pipelines import DifferenceFirst, PlanThenScore
from firm.curation.prompts import CurationPrompts
from firm.curation.teachers import HTTPTeacher, LocalTeacher, Teacher, TeacherRequest, build_teacher
from firm.data.schema import encode_sample
from firm.data.writer import ShardWriter
from firm.synthetic.critic import ShapesRuleCritic
from firm.synthetic.curation import ShapesEditSource, ShapesGenSource, ShapesRuleTeacher
from tests.critics.servers import ScriptedServer, chat_answer, prompt_text
from tests.helpers.curation_teachers import JunkTeacher
from tests.helpers.data import edit_sample


class Recording:
    """Wraps a teacher and keeps every request."""

    def __init__(self, inner):
        self.inner, self.requests = inner, []
        self.teacher_id = "recording:" + inner.teacher_id

    def generate(self, requests):
        self.requests += list(requests)
        return self.inner.generate(requests)


def _edits(n=10):
    return list(ShapesEditSource(ShapesEditSource.Config(count=n)))


def test_teachers_satisfy_the_protocol():
    assert isinstance(ShapesRuleTeacher(), Teacher) and isinstance(JunkTeacher(), Teacher)
    assert isinstance(build_teacher({"name": "shapes_rule"}), ShapesRuleTeacher)
    with pytest.raises(ValueError, match="teacher: unknown key 'temperature'"):
        build_teacher({"name": "shapes_rule", "temperature": 0.5})


def test_difference_first_with_the_rule_teacher():
    items = _edits()
    rec = Recording(ShapesRuleTeacher())
    pipe = DifferenceFirst({"reporter": rec, "evaluator": rec}, CurationPrompts())
    outs = pipe.process(items)
    critic = ShapesRuleCritic()
    truth = critic.score([EditRequest(it["source"], it["edited"], it["instruction"]) for it in items])
    for it, o, t in zip(items, outs, truth):
        assert o.error is None and o.sample is not None
        encode_sample(o.sample, "edit")  # a valid edit sample
        assert (o.sample["execution"], o.sample["consistency"]) == (t.scores["execution"], t.scores["consistency"])
        assert o.sample["execution_reasoning"] and o.sample["consistency_reasoning"]
        cur = o.sample["provenance"]["curation"]
        assert cur["pipeline"] == "difference_first" and set(cur["templates"]) == {
            "difference_report",
            "edit_evaluation",
        }
        if it["provenance"]["mode"] == "copy":
            assert o.sample["difference_report"]["obvious"] == []
    reports = [r for r in rec.requests if r.task == "difference_report"]
    evals = [r for r in rec.requests if r.task == "edit_evaluation"]
    assert len(reports) == len(evals) == len(items)
    for r, it in zip(reports, items):  # the report is evidence about the images only
        text = r.messages[0]["content"][-1]["text"]
        assert it["instruction"] not in text and [c["type"] for c in r.messages[0]["content"]] == [
            "image",
            "image",
            "text",
        ]
    assert "Obvious differences:" in evals[0].messages[0]["content"][-1]["text"]
    assert pipe.stats["calls.reporter"] == 1 and pipe.stats["requests.evaluator"] == len(items)


def test_evaluator_without_images_and_reused_reports():
    items = _edits(3)
    items[0]["difference_report"] = {"obvious": ["given"], "detailed": {}}
    rec = Recording(ShapesRuleTeacher())
    pipe = DifferenceFirst({"reporter": rec, "evaluator": rec}, CurationPrompts(), evaluator_sees_images=False)
    outs = pipe.process(items)
    assert outs[0].sample["difference_report"] == {"obvious": ["given"], "detailed": {}}
    assert sum(r.task == "difference_report" for r in rec.requests) == 2
    ev = [r for r in rec.requests if r.task == "edit_evaluation"]
    assert all(c["type"] == "text" for r in ev for c in r.messages[0]["content"])


class HalfTeacher:
    """Reports fine, but its evaluation has an unreadable Consistency score."""

    teacher_id = "half"

    def generate(self, requests):
        out = []
        for r in requests:
            if r.task == "difference_report":
                out.append('{"obvious": ["x"], "detailed": {}}')
            else:
                out.append('{"execution": {"reasoning": "done", "score": 4}, "consistency": {"score": "great"}}')
        return out


def test_unreadable_answers_are_failures_or_missing_scores_never_defaults():
    items = _edits(4)
    junk = JunkTeacher()
    pipe = DifferenceFirst({"reporter": junk, "evaluator": junk}, CurationPrompts())
    outs = pipe.process(items)
    assert all(o.sample is None and o.error.startswith("difference report unreadable") for o in outs)
    assert pipe.stats["failed.report"] == 4

    pipe = DifferenceFirst({"reporter": HalfTeacher(), "evaluator": HalfTeacher()}, CurationPrompts())
    outs = pipe.process(items)
    for o in outs:
        assert o.sample["execution"] == 4 and o.sample["consistency"] is None
        assert any("consistency" in n for n in o.notes)
    assert pipe.stats["missing.consistency"] == 4


def test_plan_then_score_and_rewrites_with_the_rule_teacher():
    items = list(ShapesGenSource(ShapesGenSource.Config(count=6)))
    t = ShapesRuleTeacher()
    pipe = PlanThenScore({"planner": t, "scorer": t, "rewriter": t}, CurationPrompts(), quality=True)
    outs = pipe.process(items)
    truth = ShapesRuleCritic().score([GenRequest(it["image"], it["prompt"]) for it in items])
    for o, tr in zip(outs, truth):
        s = o.sample
        encode_sample(s, "generation")
        assert s["instruction"] == tr.scores["instruction"] and s["quality"] == tr.scores["quality"]
        assert s["checklist"][0]["category"] == "main_subject"
        assert {c["category"] for c in s["checklist"]} >= {"main_subject", "attributes_actions", "style_composition"}
        assert set(s["quality_aspects"]) == {"aesthetics", "technical", "structure"}
    rec = Recording(t)
    pipe.teachers["rewriter"] = rec
    rewritten = pipe.rewrite([o.sample for o in outs])
    for r, o in zip(rec.requests, outs):  # the rewriter sees the scorer's verdict on every checklist item
        verdicts = {v["item"]: v["verdict"] for v in o.sample["provenance"]["curation"]["verdicts"]}
        assert sorted(verdicts) == list(range(1, len(o.sample["checklist"]) + 1))
        text = r.messages[0]["content"][-1]["text"]
        for i, c in enumerate(o.sample["checklist"], 1):
            assert f"{i}. {c['text']}: {verdicts[i]}" in text
        assert r.fields["verdicts"] in text and ": ?" not in r.fields["verdicts"]
    assert any(v == "no" for o in outs for v in [x["verdict"] for x in o.sample["provenance"]["curation"]["verdicts"]])
    for o, orig in zip(rewritten, outs):
        assert o.key == orig.key + "--rw" and o.sample is not None
        prov = o.sample["provenance"]
        assert prov["rewritten"] and prov["original_text"] == orig.sample["prompt"] != o.sample["prompt"]
        assert prov["curation"]["rewriter"] == "recording:shapes_rule"
        assert o.sample["quality"] == orig.sample["quality"]  # quality is about the image alone
    assert sum(o.sample["instruction"] for o in rewritten) < sum(o.sample["instruction"] for o in outs)


def test_edit_rewrites_mismatch_their_images():
    items = [it for it in _edits(12) if it["provenance"]["mode"] == "perfect"][:4]
    t = ShapesRuleTeacher()
    pipe = DifferenceFirst({"reporter": t, "evaluator": t, "rewriter": t}, CurationPrompts())
    scored = [o.sample for o in pipe.process(items)]
    assert all(s["execution"] == 5 for s in scored)
    rewritten = pipe.rewrite(scored)
    assert all(o.sample["execution"] <= 2 for o in rewritten)
    assert all(o.sample["difference_report"] == s["difference_report"] for o, s in zip(rewritten, scored))
    assert pipe.stats["requests.reporter"] == len(items)  # the report was not asked for again


def test_http_teacher_bounded_concurrency():
    report = {"obvious": ["the hat is red"], "detailed": {"color": ["hat: blue -> red"]}}

    def respond(body):
        text = prompt_text(body)
        if "report of every visual difference" in text:
            return 200, chat_answer(json.dumps(report))
        return 200, chat_answer(
            'Sure. {"execution": {"reasoning": "hat red", "score": 5}, "consistency": {"reasoning": "ok", "score": 4}}'
        )

    with ScriptedServer(respond, delay_s=0.05) as server:
        t = HTTPTeacher(HTTPTeacher.Config(endpoints=[server.url], max_concurrency=2))
        pipe = DifferenceFirst({"reporter": t, "evaluator": t}, CurationPrompts())
        items = [edit_sample(i, size=16) for i in range(6)]
        for it in items:
            for k in ("difference_report", "execution", "consistency", "execution_reasoning", "consistency_reasoning"):
                it.pop(k)
        outs = pipe.process(items)
        assert server.max_active <= 2 and len(server.bodies) == 12
    assert all(o.sample["execution"] == 5 and o.sample["consistency"] == 4 for o in outs)
    assert outs[0].sample["difference_report"] == report
    assert t.teacher_id.startswith("http:scripted@http://127.0.0.1")
    first = server.bodies[0]["messages"][0]["content"]
    assert first[0]["type"] == "image_url" and first[0]["image_url"]["url"].startswith("data:image/png;base64,")


@pytest.mark.slow
def test_local_teacher_on_a_tiny_vlm(tmp_path):
    from tests.helpers.tiny_vlm import build_tiny_vlm

    path = build_tiny_vlm(tmp_path / "tiny")
    t = LocalTeacher(LocalTeacher.Config(model=str(path), max_new_tokens=6, batch_size=2))
    assert t.teacher_id == "local:tiny"
    pipe = DifferenceFirst({"reporter": t, "evaluator": t}, CurationPrompts())
    outs = pipe.process(_edits(3))  # random weights: the answers are junk, and must be reported as such
    assert all(o.sample is None and "unreadable" in o.error for o in outs)
    answers = t.generate([TeacherRequest("plan", CurationPrompts().render("plan", [], prompt="a cat"))])
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_sink_recovers_from_a_hard_kill(tmp_path):
    facts = lambda s: {"scores": {"execution": s["execution"]}}  # noqa: E731
    sink = ShardSink(tmp_path, "scored", "edit", {"max_count": 2}, facts)
    for i in range(5):
        sink.write(edit_sample(i))
    sink.fail("edit-00099", "unreadable")
    # simulate a kill: no close(); the open shard stays .tmp; the last sealed shard lost its journal line; a cut line
    lines = (tmp_path / "journal.jsonl").read_text().splitlines()
    shard_lines = [ln for ln in lines if '"shard"' in ln]
    kept = [ln for ln in lines if ln != shard_lines[-1]]
    (tmp_path / "journal.jsonl").write_text("\n".join(kept) + '\n{"shard": "scored-0000')
    assert list(tmp_path.glob("*.tar.tmp"))
    sink.writer._tar.tarstream.fileobj.closed = True  # a killed process flushes nothing (not even at GC)
    sink.writer._file.close()
    sink._journal.close()

    again = ShardSink(tmp_path, "scored", "edit", {"max_count": 2}, facts)
    assert sorted(again.done) == [f"edit-{i:05d}" for i in range(4)]
    assert again.done["edit-00003"] == {"scores": {"execution": 4}}  # read back from the shard itself
    assert again.failed == {"edit-00099": "unreadable"}
    assert not list(tmp_path.glob("*.tar.tmp"))
    again.write(edit_sample(4))
    with pytest.raises(ValueError, match="already in a sealed shard"):
        again.write(edit_sample(1))
    again.close()
    third = ShardSink(tmp_path, "scored", "edit", {"max_count": 2}, facts)
    assert len(third.done) == 5 and len(third.shards()) == 3
    third.close()


def test_writer_abort_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "x", "edit", max_count=10) as w:
            w.write(edit_sample(0))
            raise RuntimeError("boom")
    assert not list(tmp_path.iterdir())
