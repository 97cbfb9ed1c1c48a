"""`firm reward serve` + the ``remote`` scorer: a real server process serving a cheap real scorer, scored through HTTP.

The scorer served here (:class:`RednessScorer`) is defined and registered in this module; the server imports it with
``--import`` (its LitServe worker too, when it unpickles the class). The remote scores must equal the in-process
scorer's bit for bit: PNG carries the pixels losslessly and the text as it is.

The official-package parity tests (HPSv2, ImageReward) run only when $FIRM_HPSV2_VENV / $FIRM_IMAGEREWARD_VENV name a
virtual environment built by scripts/reward_venv.sh; see the end of this file.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from firm.config import ConfigError
from firm.critics.types import EditRequest, GenRequest
from firm.registry import register
from firm.rewards.scorers.base import Scorer, ScorerConfig, Scores, build_scorer, request_image, request_text
from firm.rewards.scorers.remote import RemoteScorer, encode_image
from tests.conftest import REPO
from tests.critics.servers import ScriptedServer, closed_port_url, free_port, wait_healthy

KEY = "reward-key-42"
MAX_PIXELS = 64 * 64  # the served limits are small, so that the tests can cross them cheaply
MAX_TEXT = 200
MAX_REQUESTS = 12
MAX_POST_PIXELS = 10 * 64 * 64  # ten images at the per-image limit


class RednessScorer(Scorer):
    """A cheap real scorer: how red the judged image is (for an edit: how much redder than its source), and how many
    words its text has. It fails a batch whose text is ``boom``."""

    @dataclass
    class Config(ScorerConfig):
        name: str = "test_redness"
        channel: int = 0  # which RGB channel counts as red

    outputs = ("redness", "words")

    def _red(self, im: Image.Image) -> float:
        return float(np.asarray(im.convert("RGB"), dtype=np.float64)[..., self.config.channel].mean() / 255.0)

    def score_batch(self, requests):
        if any(request_text(r) == "boom" for r in requests):
            raise RuntimeError("boom requested")
        red = [
            self._red(r.edited) - self._red(r.source) if isinstance(r, EditRequest) else self._red(request_image(r))
            for r in requests
        ]
        words = [len(request_text(r).split()) for r in requests]
        return Scores({"redness": torch.tensor(red), "words": torch.tensor(words, dtype=torch.float32)})


register("scorers", "test_redness", RednessScorer, overwrite=True)


def _noise(seed: int, size=(24, 20), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8), mode)


def _requests() -> list:
    return [
        GenRequest(_noise(1), "a red apple on a table"),
        GenRequest(Image.new("RGB", (16, 16), (255, 0, 0)), "red", checklist=["is it red?"], key="k1"),
        EditRequest(_noise(2), _noise(3, size=(20, 24)), "make it redder please"),
        GenRequest(_noise(4, mode="RGBA"), "ünïcode prompt ✓ with five words"),
        EditRequest(Image.new("RGB", (8, 8), (0, 0, 0)), Image.new("RGB", (8, 8), (200, 10, 10)), "paint it"),
    ]


@pytest.fixture(scope="module")
def served():
    """Base URL of a real `firm reward serve test_redness` server (API key KEY, small limits, batch_size 1).

    The command line is parsed and the server built as `firm reward serve` does; it runs on a thread of this process
    (its LitServe inference worker and HTTP server are processes of their own), which saves a second start of torch.
    """
    from firm.cli import build_parser
    from firm.rewards.serve import server_from_args

    port = free_port()
    argv = ["reward", "serve", "test_redness", "--import", __name__, "--config", "batch_size=1", "--port", str(port)]
    argv += ["--api-key", KEY, "--max-image-pixels", str(MAX_PIXELS), "--max-request-mb", "0.25"]
    argv += ["--max-text-chars", str(MAX_TEXT), "--max-requests", str(MAX_REQUESTS)]
    argv += ["--max-post-pixels", str(MAX_POST_PIXELS)]
    args = build_parser().parse_args(argv)
    server, host = server_from_args(args)
    # LitServe's worker watchdog is a thread of the process that runs the server (here pytest's), and it would outlive
    # the manager process it polls when the fixture stops the server (a BrokenPipeError logged at exit).
    server._monitor_workers = False
    run = {"host": host, "port": port, "generate_client_file": False, "log_level": "warning"}
    thread = threading.Thread(target=server.run, kwargs=run, daemon=True)
    thread.start()
    url = f"http://{host}:{port}"
    try:
        wait_healthy(url, thread=thread, what="firm reward serve (see the log above)", timeout=120, poll=0.05)
        yield url
    finally:
        if server._shutdown_event is not None:
            server._shutdown_event.set()  # what LitServe's /shutdown does: stop its HTTP server and worker processes
        thread.join(timeout=30)


def _remote(url: str, **kw) -> RemoteScorer:
    api_key = kw.pop("api_key", KEY)
    config = RemoteScorer.Config(url=url, outputs=kw.pop("outputs", ["redness", "words"]), **kw)
    return RemoteScorer(config, api_key=api_key)


def _post(url: str, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        return httpx.post(url + "/v1/score", content=body, headers=headers, timeout=30)
    return httpx.post(url + "/v1/score", json=body, headers=headers, timeout=30)


def test_remote_scores_equal_the_in_process_scorer(served):
    reqs = _requests()
    local = RednessScorer(RednessScorer.Config())(reqs)
    remote = _remote(served, batch_size=2)  # three POSTs
    got = remote(reqs)
    for k in ("redness", "words"):
        assert torch.equal(got.values[k], local.values[k]), k
    assert got.errors == [None] * len(reqs)
    assert remote.calls == 3
    # a subset of the served outputs, in the configured order; the primary is the first
    only = _remote(served, outputs=["words"])(reqs)
    assert list(only.values) == ["words"] and torch.equal(only.values["words"], local.values["words"])
    # built from YAML-like config through the registry, the key from the environment variable it names
    os.environ["FIRM_TEST_REWARD_KEY"] = KEY
    try:
        config = {"name": "remote", "url": served, "outputs": ["redness"], "api_key_env": "FIRM_TEST_REWARD_KEY"}
        built = build_scorer(config)
        assert torch.equal(built(reqs[:2]).values["redness"], local.values["redness"][:2])
    finally:
        del os.environ["FIRM_TEST_REWARD_KEY"]


def test_an_output_the_server_lacks_makes_the_batch_missing_with_the_served_names(served):
    out = _remote(served, outputs=["redness", "hpsv2"])(_requests()[:2])
    assert torch.isnan(out.values["redness"]).all() and torch.isnan(out.values["hpsv2"]).all()
    assert "test_redness" in out.errors[0] and "redness, words" in out.errors[0] and "hpsv2" in out.errors[0]


def test_a_request_the_scorer_fails_on_is_nan_with_the_error_and_its_neighbours_are_scored(served):
    reqs = _requests()[:2] + [GenRequest(_noise(5), "boom")] + _requests()[2:3]
    out = _remote(served, batch_size=8)(reqs)  # one POST; the server's scorer runs batches of 1
    local = RednessScorer(RednessScorer.Config(batch_size=1))(reqs)
    assert math.isnan(out.values["redness"][2]) and math.isnan(out.values["words"][2])
    assert "boom requested" in out.errors[2] and "RuntimeError" in out.errors[2]
    keep = [0, 1, 3]
    assert torch.equal(out.values["redness"][keep], local.values["redness"][keep])
    assert [out.errors[i] for i in keep] == [None] * 3
    # the served model's call raised: reported as a failed call, so this side's critic_failure decides (as locally)
    assert len(out.call_errors) == 1 and "boom requested" in out.call_errors[0] and local.call_errors
    from firm.rewards.mix import RewardMix

    with pytest.raises(RuntimeError, match="scorer 'remote' failed"):
        RewardMix({"remote": _remote(served, batch_size=8)})(reqs)


def test_the_api_key_is_required(served):
    no_key = _remote(served, api_key=None, retries=0)(_requests()[:1])
    assert math.isnan(no_key.values["redness"][0])
    assert "HTTP 401" in no_key.errors[0] and "API key" in no_key.errors[0]
    wrong = _post(served, {"requests": []}, key="wrong")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    x_api_key = httpx.post(
        served + "/v1/score", json={"requests": [{"task": "gen", "image": encode_image(_noise(0)), "prompt": "a b"}]},
        headers={"X-API-Key": KEY}, timeout=30,
    )  # fmt: skip
    assert x_api_key.status_code == 200 and x_api_key.json()["scores"]["words"] == [2.0]
    assert httpx.get(served + "/health", timeout=5).status_code == 200  # liveness stays open
    assert httpx.get(served + "/docs", timeout=5).status_code in (401, 404)


def _png_b64(im: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_malformed_requests_cost_only_themselves(served):
    good = {"task": "gen", "image": encode_image(_noise(7)), "prompt": "one two three"}
    items = [
        good,
        {"task": "gen", "image": "not base64 at all!", "prompt": "x"},
        {"task": "gen", "image": _png_b64(_noise(8), "GIF"), "prompt": "x"},  # decodable, but not whitelisted
        {"task": "gen", "image": _png_b64(_noise(8), "TIFF"), "prompt": "x"},
        {"task": "gen", "image": _png_b64(Image.new("RGB", (65, 64))), "prompt": "x"},  # over the pixel cap
        {"task": "gen", "image": base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"garbage" * 9).decode(), "prompt": "x"},
        {"task": "gen", "image": encode_image(_noise(9))},  # no prompt
        {"task": "edit", "source": good["image"], "edited": good["image"], "instruction": "x", "prompt": "x"},
        {"task": "gen", "image": encode_image(_noise(9)), "prompt": "w " * MAX_TEXT},  # text over the cap
        {"task": "video", "image": encode_image(_noise(9)), "prompt": "x"},
        "just a string",
        {**good, "prompt": "four five six seven"},
    ]
    reply = _post(served, {"requests": items})
    assert reply.status_code == 200, reply.text
    data = reply.json()
    errors = data["errors"]
    assert data["scores"]["words"][0] == 3.0 and data["scores"]["words"][-1] == 4.0
    assert errors[0] is None and errors[-1] is None
    assert data["scores"]["redness"][0] == float(np.float32(np.asarray(_noise(7))[..., 0].mean() / 255))
    expected = ["base64", "not PNG, JPEG or WEBP", "not PNG, JPEG or WEBP", "--max-image-pixels", "does not decode"]
    expected += ["a gen request needs prompt", "an edit request has no prompt", "--max-text-chars", "task"]
    expected += ["requests[10]"]
    for i, why in enumerate(expected, start=1):
        assert data["scores"]["redness"][i] is None and data["scores"]["words"][i] is None
        assert why in errors[i] and f"requests[{i}]" in errors[i], (i, errors[i])
    assert "garbage" not in reply.text  # nothing of a request is echoed back

    # Whole POSTs that cannot be served get a 4xx of their own, and the server keeps serving.
    assert _post(served, b"{not json").status_code == 400
    assert _post(served, {"requests": []}).status_code == 400
    assert _post(served, {"requests": [good], "extra": 1}).status_code == 400
    too_many = _post(served, {"requests": [good] * (MAX_REQUESTS + 1)})
    assert too_many.status_code == 413 and f"at most {MAX_REQUESTS}" in too_many.json()["error"]["message"]
    huge = _post(served, {"requests": [{**good, "prompt": "x" * 300_000}]})  # over --max-request-mb 0.25
    assert huge.status_code == 413
    # a small body of flat images that decode to more pixels than the POST may hold (each within its own limit)
    flat = {"task": "gen", "image": encode_image(Image.new("RGB", (64, 64), (9, 9, 9))), "prompt": "a b"}
    heavy = _post(served, {"requests": [flat] * 11})
    assert heavy.status_code == 413 and "--max-post-pixels" in heavy.json()["error"]["message"]
    assert _post(served, {"requests": [flat] * 10}).status_code == 200
    again = _post(served, {"requests": [good]})
    assert again.status_code == 200 and again.json()["scores"]["words"] == [3.0]


def test_a_dead_server_makes_the_batch_missing_with_a_clear_error():
    url = closed_port_url().removesuffix("/v1")
    remote = _remote(url, retries=1, backoff_s=0.01)
    out = remote(_requests())
    assert all(torch.isnan(v).all() for v in out.values.values())
    assert out.errors[0] == out.errors[-1]
    assert f"reward server {url}/v1/score failed 2 time(s)" in out.errors[0] and "cannot connect" in out.errors[0]


def test_5xx_is_retried_a_garbled_reply_is_missing_and_a_4xx_is_not_retried():
    replies = [(503, {"error": {"message": "loading"}}), (200, None)]

    def respond(body):
        status, payload = replies.pop(0) if replies else (200, None)
        if payload is None:
            n = len(body["requests"])
            payload = {"scorer": "s", "scores": {"redness": [0.25] * n, "words": [None] * n}, "errors": ["x"] * n}
        return status, payload

    with ScriptedServer(respond) as srv:
        remote = _remote(srv.url.removesuffix("/v1"), retries=1, backoff_s=0.01)
        out = remote(_requests()[:2])
        assert out.values["redness"].tolist() == [0.25, 0.25] and torch.isnan(out.values["words"]).all()
        assert out.errors == ["x", "x"] and len(srv.bodies) == 2
        assert {k.lower(): v for k, v in srv.headers[0].items()}["authorization"] == f"Bearer {KEY}"
        sent = srv.bodies[0]["requests"]
        assert [r["task"] for r in sent] == ["gen", "gen"] and sent[1]["checklist"] == ["is it red?"]
        assert Image.open(io.BytesIO(base64.b64decode(sent[0]["image"]))).format == "PNG"

    with ScriptedServer(lambda body: (200, {"scores": {"redness": [1.0]}, "errors": []})) as srv:
        out = _remote(srv.url.removesuffix("/v1"), outputs=["redness"])(_requests()[:1])
        assert math.isnan(out.values["redness"][0]) and "malformed reply" in out.errors[0]

    with ScriptedServer(lambda body: (413, {"error": {"message": "body too large"}})) as srv:
        out = _remote(srv.url.removesuffix("/v1"), retries=3)(_requests()[:1])
        assert len(srv.bodies) == 1 and "HTTP 413: body too large" in out.errors[0]


def test_configs_are_checked_before_anything_starts():
    from firm.rewards.serve import build_server, parse_overrides

    with pytest.raises(ConfigError, match="outputs"):
        build_scorer({"name": "remote", "url": "http://127.0.0.1:1"})
    with pytest.raises(ConfigError, match="url"):
        build_scorer({"name": "remote", "outputs": ["a"]})
    with pytest.raises(ConfigError, match="channels"):
        build_server("test_redness", {"channels": 1})
    with pytest.raises(ConfigError, match="test_redness"):
        build_server("test_rednes")
    assert parse_overrides(["channel=2", "device=cuda:1", "a.b=[1,2]"]) == {
        "channel": 2,
        "device": "cuda:1",
        "a": {"b": [1, 2]},
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["channel"])
    # an official-package scorer whose package this environment lacks: refused, naming the package
    for name, package in (("hpsv2", "hpsv2"), ("image_reward", "ImageReward")):
        with pytest.raises(SystemExit, match=f"lacks the package\\(s\\) {package}.*reward_venv.sh {name}"):
            build_server(name)


# --------------------------------------------------------------------------------------------------------------------
# Official packages, in their own environments (scripts/reward_venv.sh): the served scorer against the package's own
# scoring code, on a tiny random checkpoint built there. Skipped unless the environment variable names such a venv.

PROMPTS = ["a cat", "a red apple on a table", "two dogs on a beach"]

# Run in the HPSv2 environment: a tiny random open_clip architecture and checkpoint ({"state_dict": ...}, as the
# released HPS_v2*_compressed.pt), then the package's own hpsv2.img_score.score on each image (its model_dict filled
# as initialize_model fills it, with the tiny architecture and no pretrained download), and the same with a wrong
# preprocessing: ImageNet's normalisation instead of OpenAI CLIP's.
HPSV2_OFFICIAL = """
import json, sys, warnings
from pathlib import Path
import torch
from PIL import Image
warnings.filterwarnings("ignore")
from hpsv2.src.open_clip import add_model_config, create_model_and_transforms
from torchvision import transforms as T
import hpsv2.img_score as official
out, prompts = Path(sys.argv[1]), json.loads(sys.argv[2])
arch = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
(out / "tiny-hps-test.json").write_text(json.dumps(arch))
add_model_config(out / "tiny-hps-test.json")
kw = dict(precision="amp", device="cpu", jit=False, force_quick_gelu=False, force_custom_text=False,
          force_patch_dropout=False, force_image_size=None, pretrained_image=False, image_mean=None, image_std=None,
          light_augmentation=True, aug_cfg={}, output_dict=True, with_score_predictor=False,
          with_region_predictor=False)
torch.manual_seed(0)
model, _, _ = create_model_and_transforms("tiny-hps-test", None, **kw)
torch.save({"state_dict": model.state_dict()}, out / "tiny-hps.pt")
other, _, preprocess_val = create_model_and_transforms("tiny-hps-test", None, **kw)  # the checkpoint replaces these
official.model_dict.update(model=other, preprocess_val=preprocess_val)
images = [Image.open(out / f"{i}.png") for i in range(len(prompts))]
cp = str(out / "tiny-hps.pt")
scores = [float(official.score(im, p, cp=cp)[0]) for im, p in zip(images, prompts)]
wrong = T.Compose([*preprocess_val.transforms[:-1], T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
official.model_dict["preprocess_val"] = wrong
wrong_scores = [float(official.score(im, p, cp=cp)[0]) for im, p in zip(images, prompts)]
print(json.dumps({"official": scores, "wrong": wrong_scores}))
"""

# Run in the ImageReward environment: bert-base-uncased's tokenizer as BLIP's init_tokenizer fetches it, from a tiny
# vocabulary in the Hugging Face cache layout (HF_HUB_CACHE, offline); a tiny text encoder (med_config with one layer;
# the hidden size stays 768, the width of the package's MLP head; the ViT is the package's fixed ViT-L), its MLP head
# re-drawn wider so that the scores differ; saved, loaded back with the package's ImageReward.load and scored with its
# ImageReward.score, then with a wrong preprocessing: ImageNet's normalisation instead of CLIP's.
IMAGEREWARD_OFFICIAL = """
import json, os, sys, warnings
from pathlib import Path
out, prompts = Path(sys.argv[1]), json.loads(sys.argv[2])
warnings.filterwarnings("ignore")
import torch
from PIL import Image
from torchvision import transforms as T
from transformers import BertTokenizer
repo = Path(os.environ["HF_HUB_CACHE"]) / "models--bert-base-uncased"
snap = repo / "snapshots" / ("0" * 40)
snap.mkdir(parents=True, exist_ok=True)
(repo / "refs").mkdir(exist_ok=True)
(repo / "refs" / "main").write_text("0" * 40)
words = "the cat dog dogs red apple two on beach of in with table ##s ##ing".split()
vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *"abcdefghijklmnopqrstuvwxyz"]
(snap / "vocab.txt").write_text("\\n".join(vocab) + "\\n")
BertTokenizer(str(snap / "vocab.txt")).save_pretrained(snap)
med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
       "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 64,
       "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 12,
       "num_hidden_layers": 1, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(vocab) + 2,
       "encoder_width": 768, "add_cross_attention": True}
(out / "med_config.json").write_text(json.dumps(med))
import ImageReward as RM
torch.manual_seed(0)
model = RM.ImageReward(device="cpu", med_config=str(out / "med_config.json"))
with torch.no_grad():
    for q in model.mlp.parameters():
        q.normal_(0.0, 0.05)
torch.save(model.state_dict(), out / "ImageReward-tiny.pt")
del model
official = RM.load(str(out / "ImageReward-tiny.pt"), device="cpu", med_config=str(out / "med_config.json"))
images = [Image.open(out / f"{i}.png") for i in range(len(prompts))]
with torch.no_grad():
    scores = [float(official.score(p, im)) for im, p in zip(images, prompts)]
    official.preprocess = T.Compose([*official.preprocess.transforms[:-1],
                                     T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    wrong = [float(official.score(p, im)) for im, p in zip(images, prompts)]
print(json.dumps({"official": scores, "wrong": wrong}))
"""


def _venv_python(variable: str) -> str:
    venv = os.environ.get(variable)
    if not venv:
        pytest.skip(f"${variable} names no virtual environment (scripts/reward_venv.sh builds one)")
    python = Path(venv) / "bin" / "python"
    if not python.is_file():
        pytest.fail(f"${variable}={venv}: no bin/python there")
    return str(python)


def _official_parity(tmp_path, python: str, code: str, scorer: str, config: dict, env: dict, atol: float):
    """The served scorer's scores against the package's own, on the tiny checkpoint the package's env built."""
    for i in range(len(PROMPTS)):
        _noise(20 + i, size=(48, 40 + 8 * i)).save(tmp_path / f"{i}.png")  # not square: resize and crop both act
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **env)
    ref = subprocess.run(
        [python, "-c", code, str(tmp_path), json.dumps(PROMPTS)], env=env, capture_output=True, text=True, timeout=900
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref = json.loads(ref.stdout.strip().splitlines()[-1])
    port = free_port()
    cmd = [python, "-m", "firm", "reward", "serve", scorer, "--port", str(port), "--api-key", KEY]
    for k, v in config.items():
        cmd += ["--config", f"{k}={tmp_path / v}"]
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, what="firm reward serve", timeout=600)
        reqs = [GenRequest(Image.open(tmp_path / f"{i}.png"), p) for i, p in enumerate(PROMPTS)]
        reqs.append(EditRequest(_noise(30), Image.open(tmp_path / "1.png"), PROMPTS[1]))  # an edit: edited vs text
        out = _remote(f"http://127.0.0.1:{port}", outputs=[scorer])(reqs)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    got = out.values[scorer]
    official = torch.tensor(ref["official"] + ref["official"][1:2])
    assert out.errors == [None] * len(reqs)
    tolerance = atol + 1e-5 * official.abs()
    assert ((got - official).abs() <= tolerance).all(), (got.tolist(), official.tolist())
    # the comparison sees a preprocessing bug: the wrong normalisation moves every score well past the tolerance
    wrong = torch.tensor(ref["wrong"])
    moved = (wrong - official[: len(wrong)]).abs()
    assert (moved > 10 * tolerance[: len(wrong)]).all(), (moved.tolist(), tolerance.tolist())


def test_hpsv2_served_from_its_environment_matches_the_package(tmp_path):
    python = _venv_python("FIRM_HPSV2_VENV")
    config = {"checkpoint": "tiny-hps.pt", "architecture": "tiny-hps-test.json"}
    _official_parity(tmp_path, python, HPSV2_OFFICIAL, "hpsv2", config, {"OMP_NUM_THREADS": "1"}, atol=1e-5)


def test_image_reward_served_from_its_environment_matches_the_package(tmp_path):
    python = _venv_python("FIRM_IMAGEREWARD_VENV")
    config = {"checkpoint": "ImageReward-tiny.pt", "med_config": "med_config.json"}
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    _official_parity(tmp_path, python, IMAGEREWARD_OFFICIAL, "image_reward", config, env, atol=1e-5)


def test_the_cli_defaults_are_the_servers_limits():
    import firm.rewards_cli as cli
    from firm.images import MAX_IMAGE_PIXELS
    from firm.rewards import serve
    from firm.rewards.scorers.remote import API_KEY_ENV

    assert (cli.MAX_REQUESTS, cli.MAX_REQUEST_BYTES, cli.MAX_TEXT_CHARS, cli.MAX_POST_PIXELS) == (
        serve.MAX_REQUESTS,
        serve.MAX_REQUEST_BYTES,
        serve.MAX_TEXT_CHARS,
        serve.MAX_POST_PIXELS,
    )
    assert (cli.MAX_IMAGE_PIXELS, cli.API_KEY_ENV) == (MAX_IMAGE_PIXELS, API_KEY_ENV)
