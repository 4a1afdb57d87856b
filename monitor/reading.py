"""Reading the input: one poll at a time, and what happens when a poll or one partition's fetch fails.

A poll that fails as a whole (a fetch the client cannot use: a codec it lacks, a corrupt batch) is retried with
backoff while the daemon's loop goes on; a fetch that names its partition pauses that partition alone until its
own retry, while the others are read. Nothing is skipped: the position stays before what failed. Owns the
retry schedules (:class:`Backoff`) and the reason ``/readyz`` gives while the input is unreadable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from models.errors import BrokerError, PartitionUnreadable
from monitor import logs
from monitor.metrics import Metrics
from monitor.source import TP, InRecord, Source

log = logs.get("tsmon.daemon")
UNREADABLE_CLEAR_S = 5.0  # a partition retried after a failed fetch counts as readable after this long without one
READ_ERROR_EVERY_S = 60.0  # input_read_failed is an error at most this often (then info)


@dataclass
class Backoff:
    """When to retry a failing step: after ``first`` s, then twice as long each time up to ``cap``."""

    first: float
    cap: float
    failures: int = 0
    since: float | None = None  # when this run of failures began
    next_at: float = 0.0

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def failed(self, now: float) -> float:
        """Count a failure; returns the wait before the next try."""
        if self.since is None:
            self.since = now
        delay = min(self.cap, self.first * 2 ** min(self.failures, 30))
        self.failures += 1
        self.next_at = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures, self.since, self.next_at = 0, None, 0.0


class InputReader:
    """Polls ``source``; ``held(tp)`` says whether a partition is paused for another reason (a failing sink or
    broker, a restore, back-pressure), in which case its retry waits for that hold to be lifted."""

    def __init__(self, source: Source, metrics: Metrics, first_s: float, cap_s: float,
                 held: Callable[[TP], bool]) -> None:
        self.source, self.metrics, self.held = source, metrics, held
        self._first, self._cap = first_s, cap_s
        self.retry = Backoff(first_s, cap_s)  # the poll as a whole
        self.problem: str | None = None  # why the last poll failed; /readyz reports it
        self.unreadable: dict[TP, Backoff] = {}  # partitions whose fetch failed, retried apart from the others
        self.waits: set[TP] = set()  # ... of them, those paused until their retry
        self.since: dict[TP, float] = {}  # ... resumed for a retry at (monotonic)
        self._failed_at = -math.inf  # monotonic time of the last failed poll

    def poll(self, timeout_ms: int, room: int) -> list[InRecord]:
        """Poll the input; a poll that fails is retried with backoff while the loop goes on — raised, it ended the
        daemon, and every restart read the same batch again."""
        now = time.monotonic()
        if not self.retry.due(now):
            time.sleep(max(0.0, min(timeout_ms / 1000, self.retry.next_at - now)))
            return []
        self._retry_unreadable(now)
        try:
            records = self.source.poll(timeout_ms, room)
        except PartitionUnreadable as exc:
            if exc.tp not in self.source.assignment():
                return self._failed(exc)
            return self._partition_unreadable(exc)
        except BrokerError as exc:
            return self._failed(exc)
        self._read_well({r.tp for r in records}, now)
        if self.problem is not None and not self.unreadable:
            if self.retry.failures:  # a partition of its own logs partition_read_resumed
                log.info("input_read_resumed", retries=self.retry.failures,
                         after_s=round(time.monotonic() - (self.retry.since or now), 1))
            self.problem = None
            self.retry.succeeded()
        return records

    def forget(self, tp: TP) -> None:
        """``tp`` is readable again, or starts afresh (a new assignment reads it from the commit)."""
        self.unreadable.pop(tp, None)
        self.since.pop(tp, None)
        self.waits.discard(tp)

    def _failed(self, exc: BrokerError) -> list[InRecord]:
        """A poll failed as a whole: nothing is read until one succeeds (backoff)."""
        first = time.monotonic() - self._failed_at > READ_ERROR_EVERY_S  # an error once a minute at most
        self.problem = f"input unreadable: {exc}"
        self.metrics.retries.labels("input").inc()
        delay = self.retry.failed(time.monotonic())
        (log.error if first else log.info)("input_read_failed", error=str(exc)[:500], retry_in_s=round(delay, 2),
                                           consequence="nothing is read until a poll succeeds; nothing skipped")
        self._failed_at = time.monotonic()
        return []

    def _partition_unreadable(self, exc: PartitionUnreadable) -> list[InRecord]:
        """A fetch of one partition cannot be used (a corrupt batch names its partition): that partition waits for
        its retry (backoff) while the others are read. Every poll used to fail with it, so the good partitions
        were read every other poll and /readyz flapped. Its position stays before the bad batch: nothing skipped."""
        tp, now = exc.tp, time.monotonic()
        backoff = self.unreadable.setdefault(tp, Backoff(self._first, self._cap))
        first = backoff.failures == 0 or now - self._failed_at > READ_ERROR_EVERY_S
        delay = backoff.failed(now)
        self.source.pause({tp})
        self.waits.add(tp)
        self.since.pop(tp, None)
        self.metrics.retries.labels("input").inc()
        self.problem = f"input unreadable on {tp[0]}-{tp[1]}: {exc}"
        (log.error if first else log.info)("partition_unreadable", partition=f"{tp[0]}-{tp[1]}",
                                           error=str(exc)[:500], retry_in_s=round(delay, 2), failures=backoff.failures,
                                           consequence="this partition waits, the others are read; nothing skipped")
        self._failed_at = now
        return []

    def _retry_unreadable(self, now: float) -> None:
        """Resume each unreadable partition whose retry is due, unless something else holds it."""
        for tp in [tp for tp in self.waits if self.unreadable[tp].due(now)]:
            if self.held(tp):
                continue  # held for another reason: retried once that is lifted (not "readable" meanwhile)
            self.waits.discard(tp)
            self.since[tp] = now
            if tp in self.source.assignment():
                self.source.resume({tp})

    def _read_well(self, read: set[TP], now: float) -> None:
        """A retried partition that gave records, or stayed quiet for UNREADABLE_CLEAR_S, is readable again."""
        for tp, since in list(self.since.items()):
            if tp in read or now - since >= UNREADABLE_CLEAR_S:
                log.info("partition_read_resumed", partition=f"{tp[0]}-{tp[1]}", retries=self.unreadable[tp].failures)
                self.forget(tp)
