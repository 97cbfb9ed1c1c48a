"""Opt-in (`make test-vllm`): FIRM against a real vLLM serving the tiny critic on CPU.

`make test-vllm` creates the vLLM venv (scripts/vllm_venv.sh) and runs this file with FIRM_VLLM pointing at its
`vllm` command; elsewhere (`make test`) it is skipped. The tiny critic (`firm shapes tiny-critic`, head_dim 32) is
taught answers in the built-in formats (Execution split between 4 and 5, so that expected scores are real means),
written in the hub layout (`complete_processor_layout`, as `firm critic export` does), and served with `vllm serve`.
Then `firm critic score` runs for edits and generations in integer, expected-score and structured-output modes, and a
curation run goes from `firm data import` to `firm curate experiments/curation/edit_vllm.yaml`. Timings and parse
rates are printed and written to $FIRM_VLLM_REPORT (default build/test-vllm/report.json): docs/critics.md shows them.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.critics.servers import free_port, wait_healthy

VLLM = os.environ.get("FIRM_VLLM")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM, reason="opt-in: `make test-vllm` (needs a vLLM venv; FIRM_VLLM=path/to/vllm)"),
]

REPORT: dict = {}
RL_PROMPTS = REPO / "experiments" / "rl" / "data" / "shapes_edit" / "prompts.jsonl"


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("FIRM_CRITIC_API_KEY", None)
    return env


def _firm(*args, timeout=900):
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "firm", *map(str, args)], env=_env(), capture_output=True, text=True,
                         timeout=timeout)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout, time.perf_counter() - t0


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory):
    from firm.critics import EditRequest, PromptSet
    from firm.critics.export import complete_processor_layout
    from firm.critics.local import LocalCritic
    from firm.synthetic.tiny_critic import TinyCriticConfig, build_tiny_critic
    from tests.critics.teach import edit_examples, gen_examples, noise_pairs, teach

    root = tmp_path_factory.mktemp("vllm")
    t0 = time.perf_counter()
    # `firm shapes tiny-critic`'s architecture, narrower (64 wide, 2 layers): teaching takes a minute or two on CPU
    small = TinyCriticConfig(hidden_size=64, layers=2, heads=2, kv_heads=1, head_dim=32, vision_depth=1,
                             vision_hidden=64, vocab_size=800, corpus_samples=40)  # fmt: skip
    path = build_tiny_critic(root / "tiny-critic", small)
    texts = [json.loads(line)["prompt"] for line in RL_PROMPTS.read_text().splitlines()][:3]
    ps = PromptSet()
    pairs = noise_pairs(3, size=64, seed=1)
    gen = gen_examples(ps, [b for _, b in pairs[:2]], ["a red circle", "two cats"])
    examples = edit_examples(ps, pairs, texts) + gen
    teach(path, examples, steps=80, lr=1e-2)
    written = complete_processor_layout(path, path, "qwen3_vl")
    REPORT["critic"] = {"build_and_teach_s": round(time.perf_counter() - t0, 1), "hub_files_written": written}
    cfg = json.loads((path / "config.json").read_text())["text_config"]
    assert cfg["head_dim"] == 32
    # what the taught critic answers in this process (transformers), to compare with vLLM's answers below
    src, out = noise_pairs(1, size=64, seed=20)[0]
    probe = EditRequest(src, out, texts[0], key="probe")
    [local] = LocalCritic(LocalCritic.Config(model=str(path), max_new_tokens=40, expected_score=True)).score([probe])
    assert local.complete, f"teaching failed: the local critic answers {local.raw}"

    port = free_port()
    log_path = root / "vllm.log"
    env = dict(_env(), VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    cmd = [VLLM, "serve", str(path), "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny",
           "--limit-mm-per-prompt", '{"image": 2}', "--max-model-len", "4096"]  # fmt: skip
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, what="vllm serve", timeout=900, poll=1.0)
        REPORT["vllm_startup_s"] = round(time.perf_counter() - t0, 1)
        from firm.critics.http import HTTPCritic

        url = f"http://127.0.0.1:{port}/v1"
        http = HTTPCritic(HTTPCritic.Config(endpoints=[url], max_tokens=40, parse_retries=0, expected_score=True))
        [remote] = http.score([probe])
        REPORT["local_vs_vllm"] = {
            "local_raw": local.raw,
            "vllm_raw": remote.raw,
            "local_expected": local.details.get("expected_scores"),
            "vllm_expected": remote.details.get("expected_scores"),
        }
        yield url, texts
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        out = Path(os.environ.get("FIRM_VLLM_REPORT", REPO / "build" / "test-vllm" / "report.json"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(REPORT, indent=2) + "\n")
        print("\n[test-vllm] " + json.dumps(REPORT, indent=2))


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _rates(rows, dims):
    return {d: sum(r["scores"].get(d) is not None for r in rows) / len(rows) for d in dims}


def _edit_folder(root, texts, n=6):
    from tests.critics.teach import noise_pairs

    root.mkdir()
    with (root / "pairs.jsonl").open("w") as f:
        for i, (a, b) in enumerate(noise_pairs(n, size=64, seed=20)):
            a.save(root / f"{i}_src.png")
            b.save(root / f"{i}_out.png")
            row = {"key": f"e{i}", "source": f"{i}_src.png", "edited": f"{i}_out.png", "instruction": texts[i % 3]}
            f.write(json.dumps(row) + "\n")
    return root


def test_critic_score_edits_integer_expected_and_structured(vllm_url, tmp_path):
    url, texts = vllm_url
    folder = _edit_folder(tmp_path / "edits", texts)
    common = ["--endpoint", url, "--max-tokens", "40", "--parse-retries", "0", "--concurrency", "8"]
    modes = {"integer": [], "expected": ["--expected-score"], "structured_vllm": ["--structured-outputs", "vllm"],
             "expected_structured": ["--expected-score", "--structured-outputs", "vllm"]}  # fmt: skip
    for mode, extra in modes.items():
        out = tmp_path / f"{mode}.jsonl"
        _, seconds = _firm("critic", "score", folder, "--out", out, *common, *extra)
        rows = _rows(out)
        rates = _rates(rows, ("execution", "consistency"))
        entry = {"items": len(rows), "seconds": round(seconds, 1), "parse_rate": rates}
        if "expected" in mode:
            exe = [r["details"].get("expected_scores", {}).get("execution") for r in rows]
            entry["expected_execution"] = [None if v is None else round(v, 3) for v in exe]
            entry["expected_fallbacks"] = sum(len(r["details"].get("expected_fallbacks", [])) for r in rows)
            assert all(v is not None and 4.0 < v < 5.0 for v in exe), exe  # real means of 4 and 5
            assert entry["expected_fallbacks"] == 0
        REPORT[f"edit_{mode}"] = entry
        assert rates == {"execution": 1.0, "consistency": 1.0}, [r["raw"] for r in rows]
        assert all(r["raw"]["execution"] for r in rows)  # the raw answers are in the JSONL


def test_critic_score_generations(vllm_url, tmp_path):
    url, _ = vllm_url
    from tests.critics.teach import noise_pairs

    folder = tmp_path / "gen"
    folder.mkdir()
    with (folder / "prompts.jsonl").open("w") as f:
        for i, (_, img) in enumerate(noise_pairs(4, size=64, seed=30)):
            img.save(folder / f"{i}.png")
            row = {"key": f"g{i}", "image": f"{i}.png", "prompt": "a red circle"}
            if i % 2:
                row["checklist"] = ["a red circle"]
            f.write(json.dumps(row) + "\n")
    for mode, extra in {"integer": [], "expected": ["--expected-score"]}.items():
        out = tmp_path / f"gen_{mode}.jsonl"
        _, seconds = _firm("critic", "score", folder, "--task", "gen", "--out", out, "--endpoint", url,
                           "--max-tokens", "48", "--parse-retries", "0", *extra)  # fmt: skip
        rows = _rows(out)
        rates = _rates(rows, ("instruction", "quality"))
        REPORT[f"gen_{mode}"] = {"items": len(rows), "seconds": round(seconds, 1), "parse_rate": rates}
        assert rates["quality"] == 1.0, [r["raw"] for r in rows]
        assert rates["instruction"] >= 0.5, [r["raw"] for r in rows]  # planner answers of a tiny model vary


def test_curation_run_from_an_import(vllm_url, tmp_path):
    url, texts = vllm_url
    folder = _edit_folder(tmp_path / "pairs", texts, n=4)
    raw = tmp_path / "data" / "edit" / "raw"
    _firm("data", "import", folder / "pairs.jsonl", "--schema", "edit", "--out", raw)
    endpoints = f'["{url}"]'
    overrides = [f"source.path={raw}", f"output_dir={tmp_path / 'runs'}", "progress=false", "balance.enabled=false",
                 f"teachers.reporter.endpoints={endpoints}", f"teachers.evaluator.endpoints={endpoints}",
                 f"teachers.rewriter.endpoints={endpoints}", "teachers.reporter.max_tokens=64",
                 "teachers.evaluator.max_tokens=64", "concurrency.max_in_flight=4"]  # fmt: skip
    stdout, seconds = _firm("curate", REPO / "experiments" / "curation" / "edit_vllm.yaml", *overrides)
    manifest = json.loads((tmp_path / "runs" / "edit_vllm" / "manifest.json").read_text())
    c = manifest["counts"]
    REPORT["curation_edit_vllm"] = {"samples": 4, "seconds": round(seconds, 1), "counts": c,
                                    "failures_by_reason": manifest["failures_by_reason"]}  # fmt: skip
    assert c["scored"] + c["failed"] == 4  # every sample judged or counted as failed, none lost
