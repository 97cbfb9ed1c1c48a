"""The scorer contract: requests in, named scores out, a missing score is NaN.

A *scorer* maps a batch of requests (:class:`~firm.critics.types.GenRequest` for text-to-image,
:class:`~firm.critics.types.EditRequest` for edits: the same requests the critics take) to one or more named scores,
one float per request. PickScore gives ``pickscore``; a FIRM editing critic gives ``execution``, ``consistency`` and
their CME combination ``cme``. A reward mix (:mod:`firm.rewards.mix`) turns the scores of several scorers into the RL
reward.

The rules every scorer keeps:

* one value per request and per output name, in request order, as a float32 tensor of shape (N,);
* a score that could not be computed is NaN (never 0, never a default), and :attr:`Scores.errors` says why;
* a batch whose model call raises costs only that batch: every score of it is NaN with the exception as the error;
* the model is loaded with ``from_pretrained`` (or the official loader) on ``config.device``, once, at construction.

A scorer is registered by name in the ``scorers`` registry (:mod:`firm.registry`) and configured in YAML; its
``Config`` extends :class:`ScorerConfig`, whose fields (``weight``, ``score``, ``scale``, ``shift``) are the mix's::

    rewards:
      pickscore: {name: pickscore, model: /ckpt/PickScore_v1, processor: /ckpt/laion-CLIP-ViT-H-14, scale: 0.0385}

Adding one is one file (a ``Scorer`` subclass that implements :meth:`Scorer.score_batch`), one registry line and one
parity test (docs/rewards.md).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from firm.critics.types import EditRequest, GenRequest
from firm.devices import process_device

log = logging.getLogger(__name__)

TASKS = ("gen", "edit")


@dataclass
class ScorerConfig:
    """Settings every scorer has: where it runs, and how the reward mix uses it."""

    name: str = ""
    weight: float = 1.0  # weight of this scorer's score in the reward mix
    score: str | None = None  # which of the scorer's outputs the mix uses (null: its primary output)
    scale: float = 1.0  # the mix uses scale * score + shift (e.g. PickScore / 26, as Flow-GRPO does)
    shift: float = 0.0
    device: str = "cpu"  # where the scorer's model runs: cpu | cuda | cuda:N
    batch_size: int = 16  # requests per model call


@dataclass
class Scores:
    """A scorer's answer for N requests.

    Attributes:
        values: output name -> (N,) float32 tensor; NaN where the score is missing.
        errors: per request, ``None`` or why its scores are missing (the first problem met).
        details: per request, anything worth logging (an OCR reading, a judge's reasoning, a critic's result).
        call_errors: the exceptions of the model calls that raised (their requests are missing); the reward mix
            decides whether a failed call stops the run (``module.critic_failure``).
    """

    values: dict[str, torch.Tensor]
    errors: list[str | None] = field(default_factory=list)
    details: list[Any] = field(default_factory=list)
    call_errors: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.errors)

    @classmethod
    def missing(cls, n: int, names: Sequence[str], error: str) -> Scores:
        """``n`` requests whose every score is missing for the same reason."""
        nan = torch.full((n,), math.nan, dtype=torch.float32)
        return cls({k: nan.clone() for k in names}, [error] * n, [None] * n, [error])

    @classmethod
    def cat(cls, parts: Sequence[Scores]) -> Scores:
        names = list(parts[0].values)
        return cls(
            {k: torch.cat([p.values[k] for p in parts]) for k in names},
            [e for p in parts for e in p.errors],
            [d for p in parts for d in p.details],
            [e for p in parts for e in p.call_errors],
        )


def request_text(r: EditRequest | GenRequest) -> str:
    """The text a request is judged against: the edit instruction or the generation prompt."""
    return r.instruction if isinstance(r, EditRequest) else r.prompt


def request_image(r: EditRequest | GenRequest) -> Image.Image:
    """The image being judged: the edited image of an edit, the generated image otherwise."""
    return r.edited if isinstance(r, EditRequest) else r.image


def request_task(r: Any) -> str:
    if isinstance(r, EditRequest):
        return "edit"
    if isinstance(r, GenRequest):
        return "gen"
    raise TypeError(f"a scorer takes EditRequest or GenRequest objects, got {type(r).__name__}")


def resolve_device(device: str) -> torch.device:
    """``device`` as a torch device for this process (a bare ``cuda`` is ``cuda:$LOCAL_RANK`` under a multi-process
    launch; :func:`firm.devices.process_device`), with a clear error when it names a GPU this machine lacks."""
    return process_device(device, "scorer device")


class Scorer:
    """Base class of the scorers. Subclasses set ``outputs`` (and ``tasks``), and implement :meth:`score_batch`.

    Attributes:
        outputs: the names of the scores it returns, primary first.
        tasks: the request kinds it can score (``gen``, ``edit``).
        concurrent: whether several threads may call it at once (``module.critic_threads``, a parallel mix). False
            (the default) for an in-process model: calls are serialised by a lock (two forwards at once would
            double its memory, and a fast tokenizer refuses concurrent use). Scorers that wait on servers say True.
        calls: model calls made (a batch each).
    """

    Config = ScorerConfig
    outputs: tuple[str, ...] = ()
    tasks: tuple[str, ...] = TASKS
    concurrent: bool = False

    def __init__(self, config: ScorerConfig) -> None:
        if config.batch_size < 1:
            raise ValueError(f"scorer {config.name!r}: batch_size must be >= 1, got {config.batch_size}")
        if not (math.isfinite(config.weight) and math.isfinite(config.scale) and math.isfinite(config.shift)):
            raise ValueError(f"scorer {config.name!r}: weight, scale and shift must be finite")
        self.config = config
        self.calls = 0
        self._lock = threading.Lock()

    @property
    def primary(self) -> str:
        """The output the mix uses unless the config names another (``score:``)."""
        choice = self.config.score or self.outputs[0]
        if choice not in self.outputs:
            raise ValueError(f"scorer {self.config.name!r}: score {choice!r} is not one of its outputs {self.outputs}")
        return choice

    def score_batch(self, requests: list[Any]) -> Scores:
        """Scores of at most ``batch_size`` requests (all of one task the scorer supports). May raise: the batch then
        counts as missing."""
        raise NotImplementedError

    def check(self, requests: Sequence[Any]) -> None:
        """Raise a clear error when a request is of a kind this scorer cannot score."""
        for i, r in enumerate(requests):
            task = request_task(r)
            if task not in self.tasks:
                raise TypeError(
                    f"scorer {self.config.name!r} scores {'/'.join(self.tasks)} requests; request {i} is a {task} one"
                )

    def __call__(self, requests: Sequence[Any]) -> Scores:
        """Scores of every request, in order, in batches of ``batch_size``; a batch that raises is missing."""
        if self.concurrent:
            return self._score_all(list(requests))
        with self._lock:
            return self._score_all(list(requests))

    def _score_all(self, requests: list[Any]) -> Scores:
        self.check(requests)
        if not requests:
            return Scores({k: torch.zeros(0) for k in self.outputs}, [], [])
        parts = []
        bs = self.config.batch_size
        for lo in range(0, len(requests), bs):
            chunk = requests[lo : lo + bs]
            try:
                out = self.score_batch(chunk)
                self._check_output(out, len(chunk))
            except Exception as e:  # noqa: BLE001 - a failed batch costs only itself (reported)
                name = self.config.name
                log.warning("scorer %r failed on %d requests: %s: %s", name, len(chunk), type(e).__name__, e)
                out = Scores.missing(len(chunk), self.outputs, f"{self.config.name}: {type(e).__name__}: {e}")
            finally:
                self.calls += 1
            parts.append(out)
        return Scores.cat(parts)

    def _check_output(self, out: Scores, n: int) -> None:
        if set(out.values) != set(self.outputs):
            raise RuntimeError(f"returned scores {sorted(out.values)}, expected {sorted(self.outputs)}")
        for k, v in out.values.items():
            if v.shape != (n,):
                raise RuntimeError(f"score {k!r} has shape {tuple(v.shape)} for {n} requests")
            out.values[k] = v.detach().to("cpu", torch.float32)
            bad = ~torch.isfinite(out.values[k]) & ~torch.isnan(out.values[k])
            out.values[k][bad] = math.nan  # an infinite score is a failed one
        if not out.errors:
            out.errors = [None] * n
        if not out.details:
            out.details = [None] * n
        if len(out.errors) != n or len(out.details) != n:
            raise RuntimeError("errors / details must have one entry per request")
        for i in range(n):
            if out.errors[i] is None and any(math.isnan(float(v[i])) for v in out.values.values()):
                out.errors[i] = f"{self.config.name}: no score"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.name!r})"


def build_scorer(config: Any, *, label: str | None = None) -> Scorer:
    """A scorer from its config: a registered ``Config`` instance, or a mapping with a ``name:`` key.

    Example: ``build_scorer({"name": "pickscore", "model": "/ckpt/PickScore_v1", "processor": "/ckpt/laion"})``.
    """
    from firm.config import build_component

    cls, conf = build_component("scorers", config, source=f"scorer {label}" if label else "scorer")
    return cls(conf)
