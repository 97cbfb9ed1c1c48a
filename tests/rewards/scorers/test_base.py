"""The scorer contract (firm/rewards/scorers/base.py): batching, failures that cost only their batch, devices."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from firm.critics.types import GenRequest
from firm.rewards.scorers.base import Scorer, ScorerConfig, Scores, resolve_device


class Scripted(Scorer):
    """Returns the prompt as a number; 'boom' raises for its batch; 'inf' is infinite; 'shape' answers wrongly."""

    @dataclass
    class Config(ScorerConfig):
        name: str = "scripted"

    outputs = ("x",)

    def score_batch(self, requests):
        texts = [r.prompt for r in requests]
        if "boom" in texts:
            raise ConnectionError("down")
        if "shape" in texts:
            return Scores({"x": torch.zeros(len(texts) + 1)})
        return Scores({"x": torch.tensor([float(t) for t in texts])})


def reqs(*texts):
    return [GenRequest(Image.new("RGB", (4, 4)), t) for t in texts]


def test_a_failed_batch_costs_only_itself_and_is_reported():
    sc = Scripted(Scripted.Config(batch_size=2))
    out = sc(reqs("1", "2", "boom", "4", "inf", "6"))
    x = out.values["x"].tolist()
    assert x[:2] == [1.0, 2.0] and math.isnan(x[2]) and math.isnan(x[3])  # the batch of "boom" only
    assert math.isnan(x[4]) and x[5] == 6.0  # an infinite score is a failed one
    assert out.errors[2] == out.errors[3] == "scripted: ConnectionError: down"
    assert out.errors[4] == "scripted: no score" and out.errors[0] is None
    assert out.call_errors == ["scripted: ConnectionError: down"] and sc.calls == 3
    bad = sc(reqs("shape"))
    assert math.isnan(bad.values["x"][0]) and "shape" in bad.call_errors[0]


def test_a_bare_cuda_device_is_this_processs_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("cuda") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")


def test_an_in_process_model_is_called_by_one_thread_at_a_time():
    import threading
    import time

    class Slow(Scripted):
        active = 0
        most = 0

        def score_batch(self, requests):
            type(self).active += 1
            type(self).most = max(type(self).most, type(self).active)
            time.sleep(0.02)
            type(self).active -= 1
            return super().score_batch(requests)

    sc = Slow(Slow.Config(batch_size=1))
    threads = [threading.Thread(target=sc, args=(reqs("1", "2"),)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Slow.most == 1 and sc.calls == 8
    sc.concurrent, Slow.most = True, 0  # a scorer that waits on a server may be called at once
    threads = [threading.Thread(target=sc, args=(reqs("1"),)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Slow.most > 1
