"""Micro-batching: windows from all streams of one model wait together until a batch is worth scoring.

Owns the batching policy. A batch never mixes models (their window shapes differ) and keeps the arrival
order of each stream's windows, which the alert state machines rely on. Two policies:

- fixed (default): a model's queue is released when it holds ``max_batch`` windows or its oldest window
  has waited ``max_delay_ms``;
- adaptive (``latency_target_ms`` set): when the scorer is idle a queue is released a tenth of the target
  after its oldest window came (small batches when the input is light; windows that arrive together still
  go together), otherwise when it reaches the size the model scores within a third of the
  target, or when waiting longer would break the target (its oldest window's wait plus two batches' scoring
  time, one in flight ahead of it and its own). The scoring time of a batch of ``n`` is learnt from the
  batches scored (:class:`CostModel`), so batches grow under load up to what the target allows. Once
  ``BACKLOG`` such batches wait the target is lost for them anyway: ``max_batch`` at a time drains them fastest.

Memory is bounded by the caller: the daemon pauses its input while :attr:`Batcher.size` exceeds its limit.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from monitor.windows import Windows

BACKLOG = 4  # batches' worth of windows waiting from which the adaptive policy scores max_batch at a time


@dataclass(frozen=True, slots=True)
class Job:
    """The windows one block of one stream completed."""

    stream: str
    windows: Windows
    enqueued: float  # monotonic seconds


@dataclass(frozen=True, slots=True)
class Batch:
    """Rows of several streams' windows stacked for one forward pass of ``model``."""

    model: str
    values: np.ndarray  # float32 [n, W, C]
    streams: list[str]  # per row
    start_ts: np.ndarray
    end_ts: np.ndarray
    end_seq: np.ndarray
    oldest_wait_s: float
    enqueued: np.ndarray | None = None  # per row, monotonic seconds its window entered the batcher

    def __len__(self) -> int:
        return len(self.streams)


class CostModel:
    """Seconds one forward pass of ``n`` windows takes, ``a + b·n``, fitted by least squares with exponential
    forgetting (recent batches count most: the machine's load changes). With one batch size seen so far it
    is proportional (``b`` = seconds per window, ``a`` = 0)."""

    def __init__(self, decay: float = 0.95) -> None:
        self.decay = decay
        self._w = self._n = self._t = self._nn = self._nt = 0.0

    def observe(self, n: int, seconds: float) -> None:
        if n < 1 or not math.isfinite(seconds) or seconds < 0:  # a broken clock: learn nothing
            return
        d = self.decay
        self._w, self._n, self._t = d * self._w + 1, d * self._n + n, d * self._t + seconds
        self._nn, self._nt = d * self._nn + n * n, d * self._nt + n * seconds

    @property
    def known(self) -> bool:
        return self._w > 0

    def coefficients(self) -> tuple[float, float]:
        """(a, b): fixed seconds per pass and seconds per window, both ≥ 0."""
        var = self._w * self._nn - self._n ** 2
        if var > 1e-9 * self._w * self._nn:
            b = (self._w * self._nt - self._n * self._t) / var
            a = (self._t - b * self._n) / self._w
            if a >= 0 and b > 0:
                return a, b
        return 0.0, self._t / self._n if self._n else 0.0

    def predict(self, n: int) -> float:
        a, b = self.coefficients()
        return a + b * n

    def largest(self, budget_s: float, cap: int) -> int:
        """The largest batch (1 … ``cap``) scored within ``budget_s``; ``cap`` while nothing is known."""
        a, b = self.coefficients()
        if not self.known or b <= 0:
            return cap
        return max(1, min(cap, int((budget_s - a) / b + 1e-9)))  # 39.99999 windows fit as 40


class Batcher:
    """Per-model FIFO queues of window jobs, released by size or age (fixed) or by a latency target."""

    def __init__(self, max_batch: int, max_delay_ms: float, clock: Callable[[], float] = time.monotonic,
                 latency_target_ms: float | None = None) -> None:
        if max_batch < 1 or max_delay_ms < 0 or (latency_target_ms is not None and latency_target_ms <= 0):
            raise ValueError("max_batch must be >= 1, max_delay_ms >= 0 and latency_target_ms > 0")
        self.max_batch, self.max_delay_s, self._clock = max_batch, max_delay_ms / 1000, clock
        self.target_s = latency_target_ms / 1000 if latency_target_ms is not None else None
        self.costs: dict[str, CostModel] = {}
        self._queues: dict[str, deque[Job]] = {}
        self._sizes: dict[str, int] = {}

    @property
    def adaptive(self) -> bool:
        return self.target_s is not None

    def observed(self, model: str, n: int, seconds: float) -> None:
        """A batch of ``n`` windows of ``model`` took ``seconds`` to score (warm-up passes count too)."""
        self.costs.setdefault(model, CostModel()).observe(n, seconds)

    def limit(self, model: str) -> int:
        """Largest batch of ``model`` now: ``max_batch``, or under a target what scores in a third of it."""
        cost = self.costs.get(model)
        if self.target_s is None or cost is None:
            return self.max_batch
        return cost.largest(self.target_s / 3, self.max_batch)

    def _due_in(self, model: str, queue: deque[Job], now: float) -> float:
        """Seconds until ``model``'s queue is due by age (≤ 0: due now)."""
        age = now - queue[0].enqueued
        due = self.max_delay_s - age
        cost = self.costs.get(model)
        if self.target_s is not None and cost is not None:
            n = min(self._sizes[model], self.limit(model))
            due = min(due, self.target_s - 2 * cost.predict(n) - age)
        return due

    @property
    def size(self) -> int:
        """Windows waiting, all models together."""
        return sum(self._sizes.values())

    def add(self, model: str, stream: str, windows: Windows) -> None:
        if len(windows):
            self._queues.setdefault(model, deque()).append(Job(stream, windows, self._clock()))
            self._sizes[model] = self._sizes.get(model, 0) + len(windows)

    def _idle_due_in(self, queue: deque[Job], now: float) -> float:
        """Seconds until an idle scorer takes this queue: a tenth of the target after its oldest window came
        (so that windows arriving together go together); never under the fixed policy."""
        if self.target_s is None:
            return float("inf")
        return min(self.target_s / 10, self.max_delay_s) - (now - queue[0].enqueued)

    def idle_wait_s(self) -> float | None:
        """Seconds until an idle scorer would take a batch (0: now), None if nothing waits or the policy is fixed."""
        return None if self.target_s is None else self._soonest(lambda _m, q, now: self._idle_due_in(q, now))

    def wait_s(self) -> float | None:
        """Seconds until the next queue is due by age (0 if one is due now), None if nothing waits."""
        return self._soonest(self._due_in)

    def _soonest(self, due_in: Callable[[str, deque[Job], float], float]) -> float | None:
        now = self._clock()
        dues = [due_in(m, q, now) for m, q in self._queues.items() if q]
        return max(0.0, min(dues)) if dues else None

    def ready(self, force: bool = False, idle: bool = False, room: int | None = None) -> list[Batch]:
        """Batches due now (all of them when ``force``, e.g. on revoke or shutdown), at most ``room``.

        ``idle``: nothing is being scored; under a latency target the first waiting queue goes at once.
        """
        now, out = self._clock(), []
        while room is None or len(out) < room:
            # of the queues due now, the one whose oldest window has waited longest: taking them in a fixed
            # order, one model's steady full batches kept another's queue waiting past max_delay_ms for good
            best: tuple[str, deque[Job], int] | None = None
            for model, queue in self._queues.items():
                if not queue or (best is not None and best[1][0].enqueued <= queue[0].enqueued):
                    continue
                limit, size = self.limit(model), self._sizes[model]
                backlog = size >= BACKLOG * limit  # the target is lost for these: full batches drain fastest
                if (force or backlog or size >= limit or self._due_in(model, queue, now) <= 0
                        or (idle and not out and self._idle_due_in(queue, now) <= 0)):
                    best = (model, queue, self.max_batch if backlog else limit)
            if best is None:
                return out
            out.append(self._take(*best[:2], now, best[2]))
        return out

    def _take(self, model: str, queue: deque[Job], now: float, limit: int) -> Batch:
        parts: list[tuple[str, Windows]] = []
        enqueued: list[np.ndarray] = []
        room, oldest = limit, now - queue[0].enqueued
        while queue and room:
            job = queue[0]
            if len(job.windows) <= room:
                queue.popleft()
                parts.append((job.stream, job.windows))
                enqueued.append(np.full(len(job.windows), job.enqueued))
                room -= len(job.windows)
            else:  # split a large job; the rest keeps its place at the head of the queue
                w = job.windows
                head = Windows(w.values[:room], w.start_ts[:room], w.end_ts[:room], w.end_seq[:room])
                rest = Windows(w.values[room:], w.start_ts[room:], w.end_ts[room:], w.end_seq[room:])
                queue[0] = Job(job.stream, rest, job.enqueued)
                parts.append((job.stream, head))
                enqueued.append(np.full(room, job.enqueued))
                room = 0
        self._sizes[model] -= limit - room
        return Batch(model, np.concatenate([w.values for _, w in parts]),
                     [s for s, w in parts for _ in range(len(w))],
                     *(np.concatenate([getattr(w, f) for _, w in parts]) for f in ("start_ts", "end_ts", "end_seq")),
                     oldest_wait_s=oldest, enqueued=np.concatenate(enqueued))
