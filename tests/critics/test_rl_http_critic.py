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

import httpx
import pytest

from firm.critics import EditRequest, PromptSet
from firm.critics.http import HTTPCritic
from tests.conftest import REPO
from tests.critics.servers import free_port
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
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"firm critic serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"firm critic serve did not become healthy:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
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
