"""Reading the changelog of persisted state back (restore on start and on partition assignment).

Owns the read side of the state topic (the write side is the processor's ``save``, through the sink,
so a snapshot is acknowledged with the alerts before offsets are committed). The topic is keyed by
stream; the latest document per key wins, as compaction would leave it. Brokers that ignore
``cleanup.policy=compact`` (the local test broker does) keep every snapshot, so a restore reads more.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from models.errors import BrokerError, describe
from monitor import logs
from monitor.records import reject_constant
from monitor.source import from_record_code
from monitor.topics import partition_reader

log = logs.get("tsmon.state")


@dataclass(frozen=True, slots=True)
class Changelog:
    docs: dict[str, dict[str, Any]]  # key → latest document
    records: int
    seconds: float
    complete: bool  # read to the end within the time limit
    superseded: int = 0  # documents left out for one of a later owner read before them (see _keep)
    # key → offset of the record that decided it (a tombstone's too: a key here and not in docs was deleted);
    # two reads cut short are merged by it (restoring._merged)
    offsets: dict[str, int] = field(default_factory=dict)


class ChangelogReader:
    """Every partition of the changelog from its beginning to its end, without a consumer group, read in
    :meth:`step`s so that the daemon's loop keeps turning meanwhile (health, metrics, signals, the group's
    poll). Kafka errors come out as BrokerError."""

    def __init__(self, client: dict[str, Any], topic: str, timeout_s: float) -> None:
        from kafka.errors import KafkaError

        self.topic, self.records, self.complete, self.superseded = topic, 0, False, 0
        self.docs: dict[str, dict[str, Any]] = {}  # key → latest document
        self.offsets: dict[str, int] = {}  # key → offset of the record that decided it
        self._t0 = time.monotonic()
        self._consumer, self._tps = partition_reader(client, topic, at_end=False, if_missing=(), timeout_s=timeout_s)
        try:  # may be low on brokers that misreport it: read until quiet too
            self._end = self._consumer.end_offsets(self._tps, timeout_ms=max(1, int(timeout_s * 1000))) if self._tps else {}
        except KafkaError as exc:
            self._consumer.close()
            raise BrokerError(f"cannot read the changelog {topic}: {describe(exc)}") from None
        # no partition at all is not "read to its end, nothing there": the topic may be gone (a broker that lost
        # its topics), unauthorised or not known yet to the broker that answered. Read as complete, the group's
        # daemon-wide document (a freeze --all, the command ids) would be overwritten by this instance's defaults.
        self.complete = False
        self._missing = not self._tps
        if self._missing:
            log.error("changelog_missing", topic=topic, consequence="no stream state restored: streams start from "
                      "their artifact; the daemon-wide state (freeze --all) is not overwritten")

    @property
    def seconds(self) -> float:
        return time.monotonic() - self._t0

    def step(self, budget_s: float) -> bool:
        """Read for about ``budget_s``; True once every partition is read to its end (or there is none to read:
        then the read stays incomplete, see ``__init__``)."""
        from kafka.errors import KafkaError

        if self._missing:
            return True

        until = time.monotonic() + budget_s
        try:
            while not self.complete and time.monotonic() < until:
                batches = self._consumer.poll(timeout_ms=max(1, min(200, int((until - time.monotonic()) * 1000))))
                for rec in (r for rs in batches.values() for r in rs):
                    self.records += 1
                    if _keep(self.docs, rec.key, rec.value):
                        if rec.key is not None:
                            self.offsets[rec.key.decode("utf-8", "replace")] = rec.offset
                    else:
                        self.superseded += 1
                self.complete = not batches and all(self._at_end(tp) for tp in self._tps)
        except Exception as exc:  # a KafkaError, or a batch that does not inflate (EOFError, zlib.error); else a bug
            if not (isinstance(exc, KafkaError) or from_record_code(exc)):
                raise
            raise BrokerError(f"cannot read the changelog {self.topic}: {describe(exc)}") from None
        return self.complete

    def _at_end(self, tp: Any) -> bool:
        pos = self._consumer.position(tp, timeout_ms=0)  # known after a fetch; never wait for the broker here
        return pos is not None and pos >= self._end[tp]

    def close(self) -> Changelog:
        self._consumer.close()
        return Changelog(self.docs, self.records, self.seconds, self.complete, self.superseded, self.offsets)


def _keep(docs: dict[str, dict[str, Any]], key: bytes | None, value: bytes | None) -> bool:
    """Take a changelog record into ``docs`` (the latest per key); False for a document of an earlier owner than
    the one already read: each owner that starts a stream writes an ``epoch`` above its document's
    (:func:`fresh_epoch`), so a document its previous owner's producer delivered late (sent before a revoke,
    acknowledged after) does not become the stream's latest — it did, and a pin set at the new owner was lost at
    the next restore."""
    if key is None:
        return True
    name = key.decode("utf-8", "replace")
    if value is None:  # a tombstone: the state was deleted
        docs.pop(name, None)
        return True
    try:
        doc = parse_document(value)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        log.error("state_document_unreadable", key=name[:64], reason=str(exc)[:120], kept="the key's previous document")
        return True
    if not isinstance(doc, dict):
        log.error("state_document_unreadable", key=name[:64], reason=f"a JSON {type(doc).__name__}, not an object",
                  kept="the key's previous document")
        return True
    if name in docs and "epoch" in doc and doc_epoch(doc) < doc_epoch(docs[name]):  # one without (an earlier
        return False  # version's: a rolling upgrade, a rollback) is taken by its offset, as before
    docs[name] = doc
    return True


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"{text[:40]} is not a finite number")
    return x


def parse_document(value: bytes) -> Any:
    """A changelog record's JSON, refusing NaN, Infinity and numbers past float's range (``1e400``): documents are
    written with ``allow_nan=False``, so one taken in with such a value (a foreign or damaged writer's) made the
    stream's next document raise and stopped the daemon — after every restart, as the record stayed the latest."""
    return json.loads(value, parse_constant=reject_constant, parse_float=_finite)


def fresh_epoch(now_s: float) -> int:
    """The least epoch of an owner that starts a stream at ``now_s``: the wall clock in ms. An owner continuing from
    a document writes one above it, and at least this: so a start that did not read the stream's latest document (a
    restore cut short by a broker outage, a document its previous owner's producer delivered after the read)
    still supersedes it, where a count of owners from 0 tied with it or lost to it at every restore after."""
    return int(now_s * 1000)


def doc_epoch(doc: dict[str, Any]) -> int:
    """The fencing number of the owner that wrote ``doc`` (:func:`fresh_epoch`; 0 in documents of earlier versions)."""
    epoch = doc.get("epoch", 0)
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else 0
