"""`firm critic bench` end to end: config resolution, report files, the printed table, and resume after SIGKILL."""

import json
import signal
import subprocess
import time

import pytest

from firm.bench.run import load_bench_config, run_bench
from firm.cli import main
from tests.bench.helpers import make_bench, register_scripted

ITEMS = (
    [{"id": f"e{i}", "task": "edit-execution", "human_score": 1 + i % 5} for i in range(6)]
    + [{"id": f"c{i}", "task": "edit-consistency", "human_score": 2 + i % 3} for i in range(4)]
    + [{"id": f"g{i}", "task": "generation", "human_score": 3, "split": ("easy", "hard")[i % 2]} for i in range(4)]
)


@pytest.fixture
def bench_dir(tmp_path, monkeypatch):
    register_scripted(monkeypatch)
    return make_bench(tmp_path / "bench", ITEMS, name="tiny-bench")


@pytest.mark.slow
def test_run_bench_writes_report(bench_dir, tmp_path, capsys):
    yaml = tmp_path / "exp.yaml"
    yaml.write_text(
        f"name: tiny\ndescription: t\ndata: {bench_dir}\noutput_root: {tmp_path / 'out'}\nbootstrap_samples: 200\n"
        "critics:\n  good: {name: test_scripted, default_score: 3}\n"
        "  flaky: {name: test_scripted, default_score: 4, answers: {e0: garbage, g1: null}}\n"
    )
    report = run_bench(load_bench_config(yaml), progress=False)
    out = tmp_path / "out" / "tiny"
    for f in ("results.json", "table.md", "bench.png", "config.yaml", "predictions/good.jsonl"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "results.json").read_text())
    assert saved["critics"].keys() == {"good", "flaky"}
    flaky = saved["critics"]["flaky"]["metrics"]["groups"]
    assert flaky["overall"]["n_failed"] == 2 and flaky["overall"]["n_parsed"] == 12
    good = report["critics"]["good"]["metrics"]["groups"]
    expected = sum(abs(3 - it["human_score"]) for it in ITEMS) / len(ITEMS)
    assert good["overall"]["mae"] == pytest.approx(expected)
    assert saved["environment"]["device"]
    table = (out / "table.md").read_text()
    assert "| good (this run) |" in table and "| flaky (this run) |" in table
    assert "*FIRM-Edit-8B — published* | 0.53 | 0.73 | 0.62 |" in table
    assert "not comparable" in table  # a synthetic benchmark is not FIRM-Bench
    assert "12/14 (14.3% unparseable)" in table
    printed = capsys.readouterr().out
    assert "Edit exec" in printed and "published" in printed
    # Running again resumes entirely from the cache.
    report2 = run_bench(load_bench_config(yaml), progress=False, echo=False)
    assert report2["critics"]["good"]["evaluation"]["n_cached"] == len(ITEMS)
    assert report2["critics"]["good"]["metrics"] == report["critics"]["good"]["metrics"]


def test_cli_data_and_critic_flags(bench_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([
            "critic", "bench", "--data", str(bench_dir), "--critic", "test_scripted", "critic.default_score=5",
            f"output_root={tmp_path / 'o'}", "bootstrap_samples=50", "plot=false", "tasks=[generation]",
        ])  # fmt: skip
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "| test_scripted (this run) |" in out and "Gen hard" in out and "Edit exec" not in out
    saved = json.loads((tmp_path / "o" / "bench" / "results.json").read_text())
    assert saved["critics"]["test_scripted"]["config"]["default_score"] == 5
    assert saved["critics"]["test_scripted"]["metrics"]["groups"]["generation"]["mae"] == pytest.approx(2.0)


@pytest.mark.slow
def test_sigkill_then_resume(bench_dir, tmp_path, python, subprocess_env, repo):
    """A real kill -9 in the middle of an evaluation loses at most the batch in flight."""
    log = tmp_path / "calls.jsonl"
    yaml = tmp_path / "exp.yaml"
    yaml.write_text(
        f"name: killed\ndata: {bench_dir}\noutput_root: {tmp_path / 'out'}\nbatch_size: 2\nbootstrap_samples: 10\n"
        f"imports: [{repo / 'tests/bench/scripted_plugin.py'}]\nplot: false\n"
        f"critics:\n  slow: {{name: test_scripted, sleep_s: 0.3, log_path: {log}}}\n"
    )
    cmd = [python, "-m", "firm", "critic", "bench", str(yaml)]
    proc = subprocess.Popen(cmd, env=subprocess_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    cache_dir = tmp_path / "out" / "killed" / "cache"
    deadline = time.time() + 120
    while time.time() < deadline:
        caches = list(cache_dir.glob("*.jsonl")) if cache_dir.is_dir() else []
        if caches and len(caches[0].read_text().splitlines()) >= 4:
            break
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {json.loads(x)["item_id"] for x in caches[0].read_text().splitlines() if x.endswith("}")}
    assert 4 <= len(done) < len(ITEMS)
    log.unlink()
    res = subprocess.run(cmd, env=subprocess_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    asked = {i for line in log.read_text().splitlines() for i in json.loads(line)}
    assert asked == {it["id"] for it in ITEMS} - done
    assert f"{len(done)} cached, {len(ITEMS) - len(done)} scored" in res.stdout
