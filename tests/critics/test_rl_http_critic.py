"""An RL tiny run whose critic is served over HTTP (`firm critic serve`) in expected-score mode: the logged rewards
are continuous (probability-weighted scores from logprobs), not the few values integer scores allow."""

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from firm.critics import EditRequest, PromptSet
from firm.critics.http import HTTPCritic
from tests.conftest import REPO
from tests.critics.servers import free_port, wait_healthy
from tests.critics.teach import edit_examples, noise_pairs, teach

pytestmark = pytest.mark.slow

RL_YAML = REPO / "experiments" / "rl" / "tiny_qwen_edit_nft.yaml"


def _instructions(n):
    rows = [json.loads(line) for line in (RL_YAML.parent / "data/shapes_edit/prompts.jsonl").read_text().splitlines()]
    return [r["prompt"] for r in rows[:n]]


@pytest.fixture(scope="module")
def served_taught_critic(tiny_vlm, tmp_path_factory):
    """A tiny critic taught to split Execution between 4 and 5 (Consistency 5), served by `firm critic serve`."""
    root = tmp_path_factory.mktemp("rl-critic")
    path = root / "critic"
    shutil.copytree(tiny_vlm, path)
    texts = _instructions(3)
    teach(path, edit_examples(PromptSet(), noise_pairs(len(texts), seed=1), texts), steps=80)
    port = free_port()
    log_path = root / "server.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "firm", "critic", "serve", "--model", str(path), "--port", str(port)]
    cmd += ["--served-model-name", "taught", "--max-new-tokens", "40", "--max-batch-size", "8"]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, what="firm critic serve")
        yield f"http://127.0.0.1:{port}/v1", path
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass


def _off_grid(value, step):
    """Whether ``value`` is not a multiple of ``step`` (what means of integer-derived rewards always are)."""
    return abs(value / step - round(value / step)) > 1e-3


def test_rl_tiny_run_with_an_http_critic_in_expected_score_mode_logs_continuous_rewards(served_taught_critic, tmp_path):
    url, critic_dir = served_taught_critic
    # The served critic's expected scores equal the local critic's on the same request (one formula, two sources).
    from firm.critics.local import LocalCritic

    src, out = noise_pairs(1, seed=7)[0]
    req = EditRequest(src, out, _instructions(1)[0], key="k")
    http = HTTPCritic(HTTPCritic.Config(endpoints=[url], expected_score=True, max_tokens=40, parse_retries=0))
    [remote] = http.score([req])
    [local] = LocalCritic(LocalCritic.Config(model=str(critic_dir), expected_score=True, max_new_tokens=40)).score(
        [req]
    )
    assert remote.scores == local.scores and remote.scores["execution"] in (4, 5), remote.raw
    assert remote.details["expected_scores"] == pytest.approx(local.details["expected_scores"], abs=1e-4)
    exe = remote.details["expected_scores"]["execution"]
    assert 4.05 < exe < 4.95, exe  # a real mean of 4 and 5, not an integer
    assert http.stats["expected_fallbacks"] == 0

    # `firm run` as a user starts it, the critic swapped for the served one by an override
    critic = (
        f"module.critic={{name: http, endpoints: ['{url}'], expected_score: true, max_tokens: 40, parse_retries: 0}}"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("FIRM_RUN_DIR", None)
    cmd = [sys.executable, "-m", "firm", "run", str(RL_YAML), f"output_root={tmp_path}", "trainer.max_steps=1"]
    done = subprocess.run([*cmd, "module.log_images_every=0", critic], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [run_dir] = (tmp_path / "tiny_qwen_edit_nft").iterdir()
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("reward/mean")]
    assert rows, "no reward logged"
    row = rows[0]
    assert float(row["reward/missing_frac"]) == 0.0 and float(row["reward/critic_failures"]) == 0.0
    n = 16  # group_size 4 x batch_size 4 samples per RL step
    execution, reward = float(row["reward/execution"]), float(row["reward/mean"])
    assert math.isfinite(reward) and 0.0 < reward <= 1.0
    # With integer scores, the mean normalised Execution is a multiple of 1/(4n) and the mean CME reward a multiple
    # of 1/(40n) (E = a/4, C = b/4: E * (0.6 + 0.4 C) = a (6 + b) / 40). Expected scores land between.
    assert _off_grid(execution, 1 / (4 * n)), execution
    assert _off_grid(reward, 1 / (40 * n)), reward


def _serve(model_dir, port, log_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "firm", "critic", "serve", "--model", str(model_dir), "--port", str(port)]
    cmd += ["--served-model-name", "taught", "--max-new-tokens", "40", "--max-batch-size", "8"]
    with log_path.open("a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    wait_healthy(f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, what="firm critic serve")
    return proc


def _kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=20)


def test_the_run_goes_on_when_the_critic_server_dies_and_comes_back(served_taught_critic, tmp_path):
    """A `firm critic serve` killed (SIGKILL) after the run's first optimizer step and restarted on the same port a
    few seconds later: the RL steps meanwhile count every score as missing (NaN, never 0) and make no update; after
    the restart the critic answers again on the same client, and the run reaches max_steps."""
    _, critic_dir = served_taught_critic
    port, log_path = free_port(), tmp_path / "server.log"
    server = _serve(critic_dir, port, log_path)
    url = f"http://127.0.0.1:{port}/v1"
    critic = (
        f"module.critic={{name: http, endpoints: ['{url}'], max_tokens: 40, parse_retries: 0, max_retries: 1, "
        "backoff_s: 0.1, timeout_s: 30}"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("FIRM_RUN_DIR", None)
    cmd = [sys.executable, "-m", "firm", "run", str(RL_YAML), f"output_root={tmp_path}", "trainer.max_steps=4"]
    cmd += ["module.log_images_every=0", "module.critic_failure=missing", "module.max_idle_rl_steps=1000", critic]
    run = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob("tiny_qwen_edit_nft/*/checkpoints/last.ckpt")):  # the first optimizer step
            assert run.poll() is None, run.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no first optimizer step"
            time.sleep(0.1)
        _kill(server)
        time.sleep(8)  # several RL steps against a dead endpoint
        assert run.poll() is None, "the run stopped while the critic was down"
        server = _serve(critic_dir, port, log_path)
        out, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
        _kill(server)
    assert run.returncode == 0, out[-3000:]
    [run_dir] = (tmp_path / "tiny_qwen_edit_nft").iterdir()
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("reward/missing_frac")]
    missing = [float(r["reward/missing_frac"]) for r in rows]
    down = [r for r, m in zip(rows, missing) if m == 1.0]
    assert down, f"no RL step saw the critic down: {missing}"
    assert all(math.isnan(float(r["reward/mean"])) for r in down)  # missing, never scored as 0
    assert all(float(r["train/skipped_no_valid"]) == 1.0 for r in down)  # and no update from them
    assert missing[0] == 0.0 and missing[-1] == 0.0  # scored before the kill and again after the restart
    import torch

    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
