"""Reading the changelog of persisted state back (restore on start and on partition assignment).

Owns the read side of the state topic (the write side is the processor's ``save``, through the sink,
so a snapshot is acknowledged with the alerts before offsets are committed). The topic is keyed by
stream; the latest document per key wins, as compaction would leave it. Brokers that ignore
``cleanup.policy=compact`` (the local test broker does) keep every snapshot, so a restore reads more.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from models.errors import BrokerError
from monitor import logs
from monitor.topics import partition_reader

log = logs.get("tsmon.state")


@dataclass(frozen=True, slots=True)
class Changelog:
    docs: dict[str, dict[str, Any]]  # key → latest document
    records: int
    seconds: float
    complete: bool  # read to the end within the time limit


def read_changelog(client: dict[str, Any], topic: str, timeout_s: float,
                   stop: Callable[[], bool] = lambda: False) -> Changelog:
    """Every partition of ``topic`` from the beginning to its end, without a consumer group; ``stop()``
    (a shutdown signal) cuts the read short like the timeout does (``complete`` False)."""
    from kafka.errors import KafkaError

    t0 = time.monotonic()
    consumer, tps = partition_reader(client, topic, at_end=False, if_missing=(), timeout_s=timeout_s)
    docs: dict[str, dict[str, Any]] = {}
    records, complete = 0, False
    try:
        if not tps:
            return Changelog({}, 0, time.monotonic() - t0, True)
        # may be low on brokers that misreport it: read until quiet too
        end = consumer.end_offsets(tps, timeout_ms=max(1, int((timeout_s - (time.monotonic() - t0)) * 1000)))
        while time.monotonic() - t0 < timeout_s and not stop():
            batches = consumer.poll(timeout_ms=200)
            for rec in (r for rs in batches.values() for r in rs):
                records += 1
                _keep(docs, rec.key, rec.value)
            if not batches and all(consumer.position(tp) >= end[tp] for tp in tps):
                complete = True
                break
    except KafkaError as exc:  # raised inside a rebalance callback, it would stop the daemon's loop
        raise BrokerError(f"cannot read the changelog {topic}: {type(exc).__name__}: {exc}") from None
    finally:
        consumer.close()
    return Changelog(docs, records, time.monotonic() - t0, complete)


def _keep(docs: dict[str, dict[str, Any]], key: bytes | None, value: bytes | None) -> None:
    if key is None:
        return
    name = key.decode("utf-8", "replace")
    if value is None:  # a tombstone: the state was deleted
        docs.pop(name, None)
        return
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError, RecursionError):
        log.error("state_document_unreadable", key=name[:64])
        return
    if isinstance(doc, dict):
        docs[name] = doc
