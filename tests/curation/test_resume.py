"""A curation run SIGKILLed half-way and relaunched yields every key exactly once, without redoing sealed work."""

import json
import signal
import subprocess
from collections import Counter

import pytest

from firm.data.reader import iter_samples

N = 40

YAML = """\
name: resume_test
description: kill / resume test
output_dir: {out}
imports: [tests.helpers.curation_teachers]
pipeline: difference_first
source: {{name: shapes_edit, count: {n}, size: 32}}
teachers:
  default: {{name: shapes_rule_killable}}
concurrency: {{batch_size: 4, max_in_flight: 2}}
output: {{max_count: 6}}
balance:
  enabled: true
  target: {{1: 0.3, 2: 0.2, 3: 0.1, 4: 0.1, 5: 0.3}}
  rewrite: true
  fill: 0.5
progress: false
"""


def _launch(python, env, yaml_path, kill_after, log):
    env = {**env, "FIRM_TEST_KILL_AFTER": str(kill_after), "FIRM_TEST_TEACHER_LOG": str(log)}
    return subprocess.run(
        [python, "-m", "firm", "curate", str(yaml_path)], env=env, capture_output=True, text=True, timeout=240
    )


def _keys(folder) -> list[str]:
    if not folder.is_dir() or not list(folder.glob("*.tar")):
        return []
    return [s["key"] for s in iter_samples(folder, "edit", decode_images=False)]


def _log(path) -> list[tuple[str, str]]:
    return [tuple(line.split()) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [7, 24], ids=["killed-while-scoring", "killed-while-rewriting"])
def test_killed_run_resumes_with_each_key_once(tmp_path, python, subprocess_env, kill_after):
    yaml_path = tmp_path / "resume.yaml"
    yaml_path.write_text(YAML.format(out=tmp_path / "runs", n=N))
    run_dir = tmp_path / "runs" / "resume_test"

    first = _launch(python, subprocess_env, yaml_path, kill_after, tmp_path / "log1")
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert not (run_dir / "manifest.json").exists()
    sealed_scored = set(_keys(run_dir / "scored"))
    sealed_rewritten = set(_keys(run_dir / "rewritten"))
    if kill_after < 20:  # 20 teacher calls score the 40 samples
        assert 0 < len(sealed_scored) < N, "the kill should land after some shards were sealed"
    else:
        assert len(sealed_scored) == N  # killed in the rewrite phase (its shards may or may not be sealed yet)
        assert any(task == "rewrite_instruction" for task, _ in _log(tmp_path / "log1"))

    second = _launch(python, subprocess_env, yaml_path, 0, tmp_path / "log2")
    assert second.returncode == 0, second.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())

    scored = _keys(run_dir / "scored")
    assert sorted(scored) == sorted(f"shapes-edit-{i}" for i in range(N)), "every input key, each once"
    rewritten, final = _keys(run_dir / "rewritten"), _keys(run_dir / "final")
    assert len(rewritten) == len(set(rewritten)) and len(final) == len(set(final))
    assert set(final) <= set(scored) | set(rewritten)
    assert manifest["counts"]["scored"] == N and manifest["counts"]["final"] == len(final)
    assert manifest["counts"]["rewritten"] == len(rewritten) > 0

    # the relaunch did not redo what the killed run had sealed
    redone = Counter(key for task, key in _log(tmp_path / "log2") if task == "edit_evaluation")
    assert not set(redone) & sealed_scored, "sealed samples were judged again"
    assert not {k for k in redone if k.endswith("--rw")} & sealed_rewritten
    launch = manifest["this_launch"]
    assert launch["score"]["resumed_skipped"] == len(sealed_scored)
    assert launch["score"]["processed"] == N - len(sealed_scored)


@pytest.mark.slow
def test_relaunch_with_other_settings_is_refused(tmp_path, python, subprocess_env):
    yaml_path = tmp_path / "resume.yaml"
    yaml_path.write_text(YAML.format(out=tmp_path / "runs", n=8))
    assert _launch(python, subprocess_env, yaml_path, 0, tmp_path / "log").returncode == 0
    again = subprocess.run(
        [python, "-m", "firm", "curate", str(yaml_path), "source.count=9", "concurrency.max_in_flight=1"],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 2 and "differs in: source.count" in again.stderr


def test_retry_failed_relaunch_after_a_finished_run_rebuilds_the_selection(tmp_path, caplog):
    """Retried samples get scores, the selection over the larger set changes, and final/ follows it."""
    from firm.curation.balance import BalanceConfig, select
    from firm.curation.runner import load_curation, run_curation
    from tests.helpers import curation_teachers

    yaml_path = tmp_path / "retry.yaml"
    yaml_path.write_text(
        YAML.replace("shapes_rule_killable", "shapes_rule_flaky")
        .replace("rewrite: true", "rewrite: false")
        .replace("fill: 0.5", "fill: 1.0")
        .replace("{1: 0.3, 2: 0.2, 3: 0.1, 4: 0.1, 5: 0.3}", "{2: 1, 5: 1}")
        .format(out=tmp_path / "runs", n=24)
    )
    run_dir = tmp_path / "runs" / "resume_test"
    # the rule teacher's Execution scores of these 24 edits: 12 x 5, 9 x 1, 2 x 2, 1 x 4; the two 2s fail at first
    curation_teachers.FLAKY_KEYS.clear()
    curation_teachers.FLAKY_KEYS.update({"shapes-edit-4", "shapes-edit-11"})
    try:
        first = run_curation(load_curation(yaml_path))
        assert first["counts"]["failed"] == 2 and first["histograms"]["final"]["execution"]["2"] == 0
        assert first["counts"]["final"] == 12  # score 2 has no sample, so every 5 is kept
        curation_teachers.FLAKY_KEYS.clear()
        again = run_curation(load_curation(yaml_path, ["retry_failed=true"]))
    finally:
        curation_teachers.FLAKY_KEYS.clear()
    assert again["counts"]["failed"] == 0 and again["counts"]["scored"] == 24
    scored = {s["key"]: s["execution"] for s in iter_samples(run_dir / "scored", "edit", decode_images=False)}
    expected = select(scored, BalanceConfig(target={2: 1, 5: 1}).shares(), seed=0)
    final = _keys(run_dir / "final")
    assert sorted(final) == sorted(expected) and Counter(scored[k] for k in final) == {2: 2, 5: 2}
    assert again["counts"]["final"] == 4 and "rebuilding" in caplog.text


def test_a_relaunch_after_a_failed_start_may_fix_the_config(tmp_path, caplog):
    """A first launch that failed before judging anything (a wrong source path) binds nothing: the corrected relaunch
    runs, and a relaunch after real work with another config is still refused."""
    from firm.config import ConfigError
    from firm.curation.runner import load_curation, run_curation

    yaml_path = tmp_path / "shards.yaml"
    yaml_path.write_text(
        f"name: fix_test\noutput_dir: {tmp_path / 'runs'}\nimports: [tests.helpers.curation_teachers]\n"
        "pipeline: difference_first\nsource: {name: shards, path: does/not/exist, schema: edit}\n"
        "teachers:\n  default: {name: shapes_rule_killable}\nbalance: {enabled: false}\nprogress: false\n"
    )
    with pytest.raises(FileNotFoundError, match="shard not found: does/not/exist"):
        run_curation(load_curation(yaml_path))
    # real shards, written by the same writer `firm data import` uses, under a prefix
    from firm.data.writer import ShardWriter
    from firm.synthetic.curation import ShapesEditSource

    with ShardWriter(tmp_path / "data" / "raw", "edit", max_count=3) as w:
        for s in ShapesEditSource(ShapesEditSource.Config(count=5, size=32)):
            w.write(s)
    manifest = run_curation(load_curation(yaml_path, [f"source.path={tmp_path / 'data' / 'raw'}"]))
    assert manifest["counts"]["scored"] == 5
    assert "earlier launch recorded no results; replacing its config" in caplog.text
    with pytest.raises(ConfigError, match="differs in: source.limit"):
        run_curation(load_curation(yaml_path, [f"source.path={tmp_path / 'data' / 'raw'}", "source.limit=2"]))
