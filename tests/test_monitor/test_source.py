"""KafkaSource.poll's sliced wait, on a stand-in for kafka-python's consumer (no broker needed for this)."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from monitor.source import POLL_SLICE_MS, InRecord, KafkaSource


class SleepyConsumer:
    """Answers ``poll`` like kafka-python 3.0 when it finds no fetch in flight: sleeps the whole timeout
    (capped at its 100 ms retry backoff) and returns nothing, until ``ready_at``; then returns a record."""

    def __init__(self, ready_at: float) -> None:
        self.ready_at, self.timeouts = ready_at, []

    def poll(self, timeout_ms: int, max_records: int | None = None) -> dict[Any, list[Any]]:
        self.timeouts.append(timeout_ms)
        if time.monotonic() < self.ready_at:
            time.sleep(min(timeout_ms, 100) / 1000)
            return {}
        rec = SimpleNamespace(topic="t", partition=0, offset=7, key=b"k", value=b"v", timestamp=5)
        return {("t", 0): [rec]}


def source_on(consumer: SleepyConsumer) -> KafkaSource:
    src = KafkaSource.__new__(KafkaSource)  # the consumer is the only state poll uses
    src._consumer = consumer
    return src


def test_poll_waits_in_slices_and_returns_as_soon_as_records_come() -> None:
    consumer = SleepyConsumer(ready_at=time.monotonic() + 0.03)
    got = source_on(consumer).poll(1000)
    assert got == [InRecord("t", 0, 7, b"k", b"v", 5)]
    assert max(consumer.timeouts) <= POLL_SLICE_MS  # never handed the library a 1 s (or 100 ms) sleep
    assert 2 <= len(consumer.timeouts) < 100  # sliced, and it stopped at the first records


def test_poll_gives_up_after_its_timeout_with_nothing() -> None:
    consumer = SleepyConsumer(ready_at=float("inf"))
    t0 = time.monotonic()
    assert source_on(consumer).poll(35) == []
    assert time.monotonic() - t0 >= 0.03 and sum(consumer.timeouts) <= 35 + POLL_SLICE_MS
    assert source_on(SleepyConsumer(float("inf"))).poll(0) == []  # a zero timeout is one non-blocking poll
