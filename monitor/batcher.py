"""Micro-batching: windows from all streams of one model wait together until a batch is worth scoring.

Owns the batching policy. A model's queue is released when it holds ``max_batch`` windows or its oldest
window has waited ``max_delay_ms``; a batch never mixes models (their window shapes differ) and keeps
the arrival order of each stream's windows, which the alert state machines rely on. Memory is bounded
by the caller: the daemon stops polling while :attr:`Batcher.size` exceeds its limit.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from monitor.windows import Windows


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


class Batcher:
    """Per-model FIFO queues of window jobs, released by size or age."""

    def __init__(self, max_batch: int, max_delay_ms: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_batch < 1 or max_delay_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_delay_ms >= 0")
        self.max_batch, self.max_delay_s, self._clock = max_batch, max_delay_ms / 1000, clock
        self._queues: dict[str, deque[Job]] = {}
        self._sizes: dict[str, int] = {}

    @property
    def size(self) -> int:
        """Windows waiting, all models together."""
        return sum(self._sizes.values())

    def add(self, model: str, stream: str, windows: Windows) -> None:
        if len(windows):
            self._queues.setdefault(model, deque()).append(Job(stream, windows, self._clock()))
            self._sizes[model] = self._sizes.get(model, 0) + len(windows)

    def wait_s(self) -> float | None:
        """Seconds until the next queue is due by age (0 if one is due now), None if nothing waits."""
        heads = [q[0].enqueued for q in self._queues.values() if q]
        if not heads:
            return None
        return max(0.0, min(heads) + self.max_delay_s - self._clock())

    def ready(self, force: bool = False) -> list[Batch]:
        """Batches due now (all of them when ``force``, e.g. on revoke or shutdown)."""
        now, out = self._clock(), []
        for model, queue in self._queues.items():
            while queue and (force or self._sizes[model] >= self.max_batch
                             or now - queue[0].enqueued >= self.max_delay_s):
                out.append(self._take(model, queue, now))
        return out

    def _take(self, model: str, queue: deque[Job], now: float) -> Batch:
        parts: list[tuple[str, Windows]] = []
        enqueued: list[np.ndarray] = []
        room, oldest = self.max_batch, now - queue[0].enqueued
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
        n = self.max_batch - room
        self._sizes[model] -= n
        return Batch(model, np.concatenate([w.values for _, w in parts]),
                     [s for s, w in parts for _ in range(len(w))],
                     *(np.concatenate([getattr(w, f) for _, w in parts]) for f in ("start_ts", "end_ts", "end_seq")),
                     oldest_wait_s=oldest, enqueued=np.concatenate(enqueued))
