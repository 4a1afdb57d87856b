"""Replay a recorded series into a topic in the input wire format, at a chosen rate.

Owns the producer side of the input contract for ``tsmon replay``, the demo and the benchmarks:
consecutive samples with a uniform period go out as one chunk message (``ts``, ``period_ms``,
``samples``); samples with irregular spacing go out one message each. Key = stream id.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from models.errors import BrokerError, describe
from monitor.source import InRecord

# spacing that differs by at most this from the mean still makes one chunk: above microsecond truncation of ISO times
# and float64 rounding of epoch ms (a 360 Hz file stamped to the µs differed by up to 1.2e-3 ms: one message a sample)
_UNIFORM_MS = 0.01


def _numbers(rows: np.ndarray) -> str:
    """JSON for ``[n, C]`` values: bare numbers for one channel, rows otherwise; 9 significant digits
    (exact for float32, about half the bytes of Python's repr of the same values as float64)."""
    if rows.shape[1] == 1:
        return "[" + ",".join([f"{x:.9g}" for x in rows[:, 0].tolist()]) + "]"
    return "[" + ",".join(["[" + ",".join([f"{x:.9g}" for x in r]) + "]" for r in rows.tolist()]) + "]"


def finite_rows(ts_ms: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The rows whose values are all finite, and how many were not: the wire format has no NaN, so a hole
    in a recording becomes a gap in time, which the daemon reports (``tsmon replay``, ``replay-eval``)."""
    ok = np.isfinite(values).all(axis=1)
    return ts_ms[ok], values[ok], int(len(ok) - np.count_nonzero(ok))


def messages(stream: str, ts_ms: np.ndarray, values: np.ndarray, chunk: int) -> Iterator[tuple[bytes, int]]:
    """Message bodies (and their sample counts) for a stream's samples, ``chunk`` samples at most each.

    ``ts_ms`` may be fractional (float): samples evenly spaced to within 0.01 ms go out as a chunk
    with a fractional ``period_ms`` (360 Hz: 2.777777778 ms), timestamps rounded to the millisecond.
    Non-finite values are refused (:func:`finite_rows` first): written as ``nan`` they made invalid JSON,
    whose whole chunk the daemon dead-lettered as ``invalid_json``.
    """
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    if not np.isfinite(values).all():
        raise ValueError("non-finite values have no wire format: drop those rows first (finite_rows)")
    head = json.dumps(stream)
    for lo, t, p in _chunks(ts_ms, chunk):
        v = values[lo : lo + len(t)]
        if p is not None:
            yield (f'{{"stream":{head},"ts":{round(t[0])},"period_ms":{p},"samples":{_numbers(v)}}}'
                   .encode(), len(t))
        else:
            for i in range(len(t)):
                row = "[" + ",".join([f"{x:.9g}" for x in v[i].tolist()]) + "]"
                yield f'{{"stream":{head},"ts":{round(t[i])},"values":{row}}}'.encode(), 1


def _chunks(ts_ms: np.ndarray, chunk: int) -> Iterator[tuple[int, np.ndarray, int | str | None]]:
    """(first row, its timestamps, period_ms as written) of each message; period None: one message a sample."""
    for lo in range(0, len(ts_ms), chunk):
        t = ts_ms[lo : lo + chunk]
        d = np.diff(t)
        period = float(d.mean()) if len(d) else 0.0
        if not (len(t) > 1 and period >= 1 and np.abs(d - period).max() <= _UNIFORM_MS):
            yield lo, t, None
        else:
            yield lo, t, int(period) if period == int(period) else f"{period:.10g}"  # 360 Hz: 2.777777778


def stamped(ts_ms: np.ndarray, chunk: int) -> np.ndarray:
    """The whole-millisecond times the daemon gives the samples of :func:`messages`' messages (a chunk's first
    sample rounded, plus its rounded offsets at the written period: ``records.parse``): what its windows and
    alerts say, which fractional times (360 Hz) miss by up to half a millisecond."""
    out = np.empty(len(ts_ms), dtype="int64")
    for lo, t, p in _chunks(ts_ms, chunk):
        out[lo : lo + len(t)] = (round(t[0]) + np.round(np.arange(len(t)) * float(p)).astype("int64") if p is not None
                                 else np.round(t).astype("int64"))
    return out


def as_records(stream: str, ts_ms: np.ndarray, values: np.ndarray, chunk: int, topic: str, partition: int = 0,
               first_offset: int = 0) -> list[InRecord]:
    """The same messages as consumed records on consecutive offsets of one partition (in-process sources), each
    stamped (its Kafka timestamp) with its first sample's time, as a live producer's would be."""
    out, at = [], 0
    for i, (body, n) in enumerate(messages(stream, ts_ms, values, chunk)):
        out.append(InRecord(topic, partition, first_offset + i, stream.encode(), body, int(ts_ms[at])))
        at += n
    return out


def replay(producer: Any, topic: str, stream: str, ts_ms: np.ndarray, values: np.ndarray, chunk: int = 100,
           rate: float | None = None, stop: threading.Event | None = None) -> int:
    """Send the series; ``rate`` in samples per second (None: as fast as the producer goes). Returns samples sent.

    Raises :class:`BrokerError` when the producer refuses a message (too large: a traceback before) or the broker
    does not take one (reported as success before: nothing looked at the sends' results).
    """
    from kafka.errors import KafkaError

    key, sent, t0, failed = stream.encode(), 0, time.monotonic(), []
    try:
        for body, n in messages(stream, ts_ms, values, chunk):
            if stop is not None and stop.is_set():
                break
            producer.send(topic, key=key, value=body).add_errback(failed.append)
            sent += n
            if rate:
                ahead = sent / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        producer.flush()
    except KafkaError as exc:
        hint = ": a smaller --chunk makes smaller messages" if "TooLarge" in type(exc).__name__ else ""
        raise BrokerError(f"cannot send to {topic} after {sent} samples: {describe(exc)}{hint}") from None
    if failed:
        raise BrokerError(f"{len(failed)} message(s) to {topic} not delivered: {describe(failed[0])}")
    return sent


def timestamps(n: int, period_ms: int, start_ms: int | None = None) -> np.ndarray:
    """Evenly spaced epoch-ms timestamps, starting now (rounded to the period) unless ``start_ms``."""
    start = int(time.time() * 1000) // period_ms * period_ms if start_ms is None else start_ms
    return start + period_ms * np.arange(n, dtype="int64")
