"""Online critic scoring that overlaps with sampling.

The rollout samples its batch in chunks. As soon as a chunk's images are decoded, :class:`OverlappedScorer` hands
them to the reward function (critic + combiner) on a worker thread and the rollout samples the next chunk. At most
``max_pending`` chunks wait for the critic; the rollout blocks when that many are pending and once at the end. The
time the sampling thread spends blocked is the *critic wait time*, logged every step: when it is near zero the
critic is fully hidden behind sampling.

A chunk whose critic call raises is either an error (``on_failure="raise"``, the default: a dead endpoint should stop
the run with a clear message) or, with ``on_failure="missing"``, a chunk of missing scores (NaN rewards, counted and
logged), so that a flaky endpoint costs samples rather than the run.

Chunks can be tagged with a *group* (one rollout): :meth:`OverlappedScorer.collect` with a group waits only for that
rollout's chunks, so an asynchronous RL step can collect rollout k while rollout k + 1's chunks are still scored.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from firm.critics.types import EditRequest, GenRequest
from firm.rewards.functions import RewardOutput
from firm.rewards.mix import CALL_FAILURES, RewardStopped

log = logging.getLogger(__name__)

FAILURE_MODES = CALL_FAILURES  # critic_failure: a chunk whose scoring call raises


def missing_output(n: int, dimensions: Sequence[str], error: str, terms: Sequence[str] = ()) -> RewardOutput:
    """A RewardOutput of ``n`` missing rewards (NaN) for every dimension (and every term of a reward mix)."""
    from firm.critics.types import CriticResult, ErrorKind

    nan = torch.full((n,), math.nan, dtype=torch.float32)
    return RewardOutput(
        rewards=nan.clone(),
        components={d: nan.clone() for d in dimensions},
        missing=dict.fromkeys(dimensions, n),
        results=[CriticResult.failed(dimensions, ErrorKind.CALL_FAILED, error) for _ in range(n)],
        terms={k: nan.clone() for k in terms},
    )


def concat_outputs(outputs: list[RewardOutput]) -> RewardOutput:
    """Chunks' outputs as one, in order."""
    dims = list(outputs[0].components)
    return RewardOutput(
        rewards=torch.cat([o.rewards for o in outputs]),
        components={d: torch.cat([o.components[d] for o in outputs]) for d in dims},
        missing={d: sum(o.missing[d] for o in outputs) for d in dims},
        results=[r for o in outputs for r in o.results],
        terms={k: torch.cat([o.terms[k] for o in outputs]) for k in outputs[0].terms},
    )


class OverlappedScorer:
    """Scores request chunks on worker threads while the caller keeps sampling.

    Args:
        reward_fn: ``requests -> RewardOutput`` (e.g. :class:`firm.rewards.FirmEditReward`).
        dimensions: the dimensions ``reward_fn`` reports (to build missing outputs on failure).
        max_pending: chunks allowed to wait for the critic before :meth:`submit` blocks (>= 1).
        threads: concurrent critic calls (an HTTP critic with several endpoints can take more than one).
        on_failure: ``raise`` or ``missing`` (see the module docstring).
        terms: the term names of a reward mix (kept, as NaN, in missing chunks).
    """

    def __init__(
        self,
        reward_fn: Callable[[list[Any]], RewardOutput],
        dimensions: Sequence[str],
        *,
        max_pending: int = 2,
        threads: int = 1,
        on_failure: str = "raise",
        terms: Sequence[str] = (),
    ) -> None:
        if max_pending < 1 or threads < 1:
            raise ValueError(f"critic_queue and critic_threads must be >= 1, got {max_pending}, {threads}")
        if on_failure not in FAILURE_MODES:
            raise ValueError(f"critic_failure must be one of {FAILURE_MODES}, got {on_failure!r}")
        self.reward_fn = reward_fn
        self.dimensions = tuple(dimensions)
        self.terms = tuple(terms)
        self.max_pending = max_pending
        self.on_failure = on_failure
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="firm-critic")
        self._pending: deque[tuple[int, int, Future, Any]] = deque()
        self._done: list[tuple[int, RewardOutput, Any]] = []
        self.wait_s = 0.0
        self.busy_s = 0.0  # time the critic spent inside reward_fn calls (summed over threads)
        self.failures = 0
        self.group_failures: dict[Any, int] = {}  # failed chunks per group, until that group is collected
        self._chunk = 0

    def _timed(self, requests: list[Any]) -> RewardOutput:
        t0 = time.perf_counter()
        try:
            return self.reward_fn(requests)
        finally:
            self.busy_s += time.perf_counter() - t0

    def submit(self, requests: list[Any], group: Any = None) -> None:
        """Queue a chunk (of rollout ``group``) for scoring; blocks (counted as wait time) while ``max_pending``
        chunks are pending."""
        while len(self._pending) >= self.max_pending:
            self._finish_oldest()
        fut = self._pool.submit(self._timed, requests)
        self._pending.append((self._chunk, len(requests), fut, group))
        self._chunk += 1

    def _finish_oldest(self) -> None:
        idx, n, fut, group = self._pending.popleft()
        t0 = time.perf_counter()
        try:
            out = fut.result()
        except Exception as e:  # noqa: BLE001 - reported or re-raised below
            self.wait_s += time.perf_counter() - t0
            if isinstance(e, RewardStopped):
                raise
            if self.on_failure == "raise":
                raise RuntimeError(
                    f"the reward failed on rollout chunk {idx} ({n} requests): {type(e).__name__}: {e}. "
                    "Fix the critic or scorer (endpoint up? model loaded?) or set module.critic_failure=missing to "
                    "count such chunks as missing scores"
                ) from e
            self.failures += 1
            self.group_failures[group] = self.group_failures.get(group, 0) + 1
            log.warning("critic failed on chunk %d (%d requests), scores counted as missing: %s", idx, n, e)
            out = missing_output(n, self.dimensions, f"critic call failed: {type(e).__name__}: {e}", self.terms)
        else:
            self.wait_s += time.perf_counter() - t0
            if len(out.rewards) != n:
                raise RuntimeError(f"the reward function returned {len(out.rewards)} rewards for {n} requests")
        self._done.append((idx, out, group))

    def collect(self, group: Any = None) -> RewardOutput:
        """Wait for the chunks of ``group`` (None: every pending chunk); their outputs concatenated in submission
        order. Chunks of other groups submitted earlier are finished first (first in, first out)."""
        if group is None:
            while self._pending:
                self._finish_oldest()
        else:
            while any(p[3] == group for p in self._pending):
                self._finish_oldest()
        mine = [d for d in self._done if group is None or d[2] == group]
        if not mine:
            raise RuntimeError("OverlappedScorer.collect: nothing was submitted")
        self._done = [d for d in self._done if not (group is None or d[2] == group)]
        if not self._pending and not self._done:
            self._chunk = 0
        return concat_outputs([o for _, o, _ in sorted(mine, key=lambda t: t[0])])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def build_requests(
    task: str,
    images: list[Any],
    prompts: list[str],
    keys: list[str],
    sources: list[Any] | None = None,
    checklists: list[Any] | None = None,
) -> list[EditRequest | GenRequest]:
    """Critic requests for generated images: edit requests need the source images, generation ones the prompts."""
    if task == "edit":
        if sources is None or any(s is None for s in sources):
            raise ValueError("edit requests need the source image of every sample")
        return [
            EditRequest(source=s, edited=im, instruction=p, key=k)
            for s, im, p, k in zip(sources, images, prompts, keys)
        ]
    cl = checklists if checklists is not None else [None] * len(images)
    return [GenRequest(image=im, prompt=p, checklist=c, key=k) for im, p, c, k in zip(images, prompts, cl, keys)]
