"""Running critics over a benchmark: concurrency, parse failures, the cache, and resuming after interruptions."""

import json

import pytest

from firm.bench.data import load_benchmark
from firm.bench.evaluate import BenchEvaluationError, PredictionCache, evaluate
from tests.bench.helpers import ScriptedCritic, make_bench

ITEMS = [{"id": f"e{i}", "task": "edit-execution", "human_score": 1 + i % 5} for i in range(7)] + [
    {"id": f"g{i}", "task": "generation", "human_score": 3, "split": "hard"} for i in range(3)
]


@pytest.fixture
def bench(tmp_path):
    return load_benchmark(make_bench(tmp_path / "bench", ITEMS))


def _critic(**kw):
    return ScriptedCritic(ScriptedCritic.Config(**kw))


def _run(bench, critic, cache, **kw):
    kw.setdefault("batch_size", 2)
    return evaluate(bench.items, critic, critic_id="scripted-abc", cache_path=cache, progress=False, **kw)


def test_evaluate_scores_every_item_and_keeps_failures_missing(bench, tmp_path):
    critic = _critic(answers={"e1": None, "e2": "I think it is fine", "e3": 9, "g0": 5})
    preds, stats = _run(bench, critic, tmp_path / "c.jsonl", concurrency=3)
    assert set(preds) == {it.id for it in bench.items}
    assert preds["e0"].score == 3 and preds["g0"].score == 5
    assert preds["e1"].score is None and preds["e1"].error == "no score parsed"
    assert preds["e2"].score is None and preds["e2"].raw == "I think it is fine"
    assert preds["e3"].score is None and "not an integer in 1..5" in preds["e3"].error
    assert (stats.n_items, stats.n_cached, stats.n_computed) == (10, 0, 10)
    assert critic.calls == 5  # 10 items in batches of 2


def test_interrupted_evaluation_resumes_without_recomputing(bench, tmp_path):
    cache, log = tmp_path / "c.jsonl", tmp_path / "calls.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _run(bench, _critic(interrupt_on_call=3, log_path=str(log)), cache)
    first = [json.loads(x) for x in log.read_text().splitlines()]
    cached = PredictionCache(cache, "scripted-abc").load()
    assert set(cached) == set(first[0] + first[1])  # the two finished batches, not the interrupted one
    log.unlink()
    critic = _critic(log_path=str(log))
    preds, stats = _run(bench, critic, cache)
    asked = [i for line in log.read_text().splitlines() for i in json.loads(line)]
    assert set(asked) == {it.id for it in bench.items} - set(cached)  # only what was missing
    assert len(asked) == len(set(asked))
    assert (stats.n_cached, stats.n_computed) == (4, 6)
    # A third run computes nothing.
    again = _critic(log_path=str(log))
    preds2, stats2 = _run(bench, again, cache)
    assert again.calls == 0 and stats2.n_cached == 10
    assert {k: p.score for k, p in preds2.items()} == {k: p.score for k, p in preds.items()}


def test_failed_batches_raise_after_caching_the_rest(bench, tmp_path):
    cache = tmp_path / "c.jsonl"
    with pytest.raises(BenchEvaluationError, match="1 batch\\(es\\) \\(2 items\\) failed") as e:
        _run(bench, _critic(fail_ids=["e4"]), cache, concurrency=2)
    assert "run the same command again" in str(e.value)
    assert len(PredictionCache(cache, "scripted-abc").load()) == 8
    critic = _critic()
    _, stats = _run(bench, critic, cache)
    assert stats.n_computed == 2 and critic.calls == 1


def test_torn_cache_line_is_ignored_and_other_critics_do_not_leak(bench, tmp_path):
    cache = tmp_path / "c.jsonl"
    _run(bench, _critic(), cache)
    lines = cache.read_text().splitlines()
    # Simulate a kill mid-write: drop the last two records and leave half of one on a line without a newline.
    cache.write_text("\n".join(lines[:-2]) + "\n" + lines[-2][: len(lines[-2]) // 2])
    other = PredictionCache(cache, "another-critic")
    assert other.load() == {}
    critic = _critic(default_score=4)
    preds, stats = _run(bench, critic, cache)
    assert stats.n_computed == 2 and stats.n_cached == 8
    assert PredictionCache(cache, "scripted-abc").load().keys() == preds.keys()
    # --fresh recomputes everything.
    _, stats = _run(bench, _critic(), cache, fresh=True)
    assert stats.n_computed == 10


def test_changed_inputs_are_rescored(bench, tmp_path):
    from PIL import Image

    cache = tmp_path / "c.jsonl"
    _run(bench, _critic(), cache)
    Image.new("RGB", (8, 8), (9, 9, 9)).save(bench.items[0].edited)
    _, stats = _run(bench, _critic(), cache)
    assert stats.n_computed == 1


def test_bad_arguments(bench, tmp_path):
    with pytest.raises(ValueError, match="batch_size and concurrency"):
        _run(bench, _critic(), tmp_path / "c.jsonl", concurrency=0)
