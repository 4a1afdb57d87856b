"""Where input comes from: a kafka-python consumer in a consumer group with manual commits.

Owns the consumer and the rebalance hooks. The daemon decides *what* to commit (the offset ledger);
the source only commits exactly the offsets it is given, synchronously and within a timeout (a failure is
a :class:`BrokerError`), and says when the broker cannot be used (no open connection: the consumer's own
metrics), which the daemon reports as not ready. On a revoke, kafka-python calls
``on_revoke`` while ``poll`` (or ``close``) blocks, before the partitions move, so the daemon can score,
publish and commit what it holds for them; ``on_assign`` follows with the new partitions (a partition
kept through an eager rebalance keeps its read position: the daemon ``rewind``s it). kafka-python 3
runs these callbacks on its network thread, where a blocking commit would deadlock ("Cannot block on
net.run() from the IO thread"), so a commit asked for inside a callback is sent asynchronously: it is
queued ahead of the JoinGroup on the same connection, and if the broker refuses it anyway the next owner
replays from the previous commit — duplicates with the same alert ids, never a loss.
:class:`MemorySource` is the in-process double for unit tests; anything that claims to test the pipeline
uses the real broker.
"""

from __future__ import annotations

import math
import os
import re
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from models.errors import BrokerError, PartitionUnreadable, describe
from monitor import logs

log = logs.get("tsmon.source")
TP = tuple[str, int]  # (topic, partition)
POLL_SLICE_MS = 10  # longest single wait inside KafkaSource.poll while records flow (see there)
SLICE_WHILE_ACTIVE_S = 1.0  # records within this long: the input counts as flowing
PATTERN_CHECK_S = 1.0  # how often KafkaSource matches its topic pattern against the topics the metadata knows
REJOIN_POLL_MS = 500  # the shortest poll while the group rebalances (see KafkaSource.poll) …
REJOIN_SLICE_MS = 250  # … waited for in slices of this, so that it returns soon after the assignment
NAMED_PARTITION = re.compile(r"TopicPartition\(topic='([^']*)', partition=(\d+)\)")  # in kafka-python's messages
PAUSED_ENDS_EVERY_S = 5.0  # how often the end offsets of paused partitions are asked for (KafkaSource.lags)
PAUSED_ENDS_TIMEOUT_MS = 500  # ... and how long the loop waits for them at most


@dataclass(frozen=True, slots=True)
class InRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int = 0
    headers: Sequence[tuple[str, bytes]] = ()  # the producer's (a dead letter carries them on)

    @property
    def tp(self) -> TP:
        return (self.topic, self.partition)


class Source(Protocol):
    def poll(self, timeout_ms: int, max_records: int | None = None) -> list[InRecord]: ...
    def commit(self, offsets: dict[TP, int], timeout_s: float) -> None: ...  # BrokerError when it fails
    def assignment(self) -> set[TP]: ...
    def pause(self, tps: set[TP]) -> None: ...  # poll returns nothing of them until resume (membership kept)
    def resume(self, tps: set[TP]) -> None: ...
    def broker_problem(self) -> str | None: ...  # why the broker cannot be used now; None when it can
    def rewind(self, offsets: dict[TP, int]) -> None: ...  # kept across a rebalance: read again from these
    def close(self, timeout_s: float) -> None: ...


@dataclass
class MemorySource:
    """Hands out pre-loaded records in order; owns every partition they come from; records commits."""

    records: list[InRecord] = field(default_factory=list)
    batch: int = 100
    handed: list[InRecord] = field(default_factory=list)  # polled so far, for rewind
    committed: dict[TP, int] = field(default_factory=dict)
    assigned: set[TP] = field(default_factory=set)
    paused: set[TP] = field(default_factory=set)
    down: str | None = None  # set by a test: the broker is "unreachable" and commits fail

    def __post_init__(self) -> None:
        self.assigned |= {r.tp for r in self.records}

    def poll(self, timeout_ms: int, max_records: int | None = None) -> list[InRecord]:
        if self.paused:  # simple and strict: any paused partition holds the whole (ordered) list back
            return []
        n = min(self.batch, max_records or self.batch)
        out, self.records = self.records[:n], self.records[n:]
        self.handed.extend(out)
        return out

    def rewind(self, offsets: dict[TP, int]) -> None:
        again: list[InRecord] = []
        kept: list[InRecord] = []
        for r in self.handed:  # one pass (a membership test per record made it quadratic)
            (again if offsets.get(r.tp, r.offset + 1) <= r.offset else kept).append(r)
        self.handed, self.records = kept, again + self.records

    def pause(self, tps: set[TP]) -> None:
        self.paused |= tps

    def resume(self, tps: set[TP]) -> None:
        self.paused -= tps

    def commit(self, offsets: dict[TP, int], timeout_s: float) -> None:
        if self.down:
            raise BrokerError(f"commit failed: {self.down}")
        self.committed.update(offsets)

    def assignment(self) -> set[TP]:
        return set(self.assigned)

    def broker_problem(self) -> str | None:
        return self.down

    def close(self, timeout_s: float) -> None:
        pass


def from_record_code(exc: BaseException) -> bool:
    """Was ``exc`` raised inside kafka-python's record or codec code (a batch that does not inflate, a record that
    does not decode) — data the client cannot read, not a bug of its or ours?"""
    frames = traceback.extract_tb(exc.__traceback__)
    return any(f"kafka{os.sep}record{os.sep}" in f.filename or f.filename.endswith(f"kafka{os.sep}codec.py")
               for f in frames)


class KafkaSource:
    """Subscribe to topics (or a pattern) in a group; poll records; commit given offsets."""

    _callback_done = -math.inf  # monotonic time our last rebalance callback returned
    _pattern: re.Pattern[str] | None = None  # the topic pattern this source follows (see __init__)
    _rejoining = False  # from a revoke to the next assignment: the group rebalances

    def __init__(self, consumer_kwargs: dict[str, Any], topics: list[str], pattern: str | None,
                 on_revoke: Callable[[list[TP]], None], on_assign: Callable[[list[TP]], None]) -> None:
        from kafka import ConsumerRebalanceListener, KafkaConsumer
        from kafka.errors import KafkaError

        source = self

        class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            def on_partitions_revoked(self, revoked: Any) -> None:
                source._rejoining = True
                with source._callback():
                    on_revoke([(tp.topic, tp.partition) for tp in revoked])

            def on_partitions_assigned(self, assigned: Any) -> None:
                source._rejoining = False
                with source._callback():
                    on_assign([(tp.topic, tp.partition) for tp in assigned])

        self._in_callback = False
        self._callback_error: BaseException | None = None  # what our rebalance callback raised inside a poll
        self._last_records = -float("inf")  # monotonic time the last poll returned records
        self._session_s = consumer_kwargs.get("session_timeout_ms", 10_000) / 1000
        self._paused_ends: dict[Any, int] = {}  # end offsets of paused partitions, asked for (lags)
        self._paused_ends_due = 0.0  # monotonic time they are asked for again
        self._polled = time.monotonic()  # when the daemon last polled the input (lags: not for a while, ask the ends)

        self._listener = Listener()
        # A metadata request naming a subscribed topic just deleted must not have the broker create it again (Kafka's
        # auto.create.topics.enable, on by default; Tansu): matched by a pattern, or named in kafka.topics — an input
        # topic deleted while the daemon ran came back at once with the broker's default partition count, the
        # operator's re-create failed, and the daemon read on from the old topic's offsets (a pipeline owner's pass)
        consumer_kwargs = {**consumer_kwargs, "allow_auto_create_topics": False}
        try:
            self._consumer = KafkaConsumer(**consumer_kwargs)
        except KafkaError as exc:
            raise BrokerError(f"cannot reach {consumer_kwargs.get('bootstrap_servers')}: {exc}") from None
        # A pattern is followed here, not by kafka-python's pattern subscription: during a rebalance that one waits for
        # a metadata refresh inside each poll, and with the loop's polls of 100 ms or less the rejoin after a new
        # matching topic never completed — every input partition, old topics too, stopped until a restart (a
        # pipeline owner's pass). The topics it matches (re.match, as kafka-python's) are subscribed by name, and
        # every topic's metadata is kept (refreshed every metadata_max_age_ms) to find new ones.
        self._pattern = re.compile(pattern) if pattern else None  # validated by the config
        self._pattern_checked = -math.inf
        if self._pattern is not None:
            self._consumer._cluster.need_all_topic_metadata = True
            self._consumer._cluster.request_update()  # now, not after metadata_max_age_ms
            self._follow_pattern()
        else:
            self._consumer.subscribe(topics=topics, listener=self._listener)

    def _follow_pattern(self) -> None:
        """Subscribe to the topics the pattern matches now, when they changed (a rebalance follows)."""
        self._pattern_checked = time.monotonic()
        assert self._pattern is not None
        cluster = self._consumer._cluster
        names = sorted(t for t in cluster.topics(exclude_internal_topics=True) if self._pattern.match(t))
        if set(names) == (self._consumer.subscription() or set()):
            return
        log.info("input_topics_matched", pattern=self._pattern.pattern, topics=names[:50], count=len(names))
        if names:
            self._consumer.subscribe(topics=names, listener=self._listener)
        else:  # every matching topic gone: no topic, but a rebalance through the listener (revoke, then an empty
            # assignment), as kafka-python's pattern subscription did; unsubscribe() cleared the assignment without
            # either (the daemon kept the partitions' streams, and read them twice when the topic came back)
            self._consumer._subscription.change_subscription([])
        cluster.need_all_topic_metadata = True  # subscribe() turned it off

    def poll(self, timeout_ms: int, max_records: int | None = None) -> list[InRecord]:
        """Records that arrive within ``timeout_ms``; while records flow, waited for in ``POLL_SLICE_MS`` slices.

        kafka-python 3.0 sleeps ``retry_backoff_ms`` (100 ms) inside ``poll`` whenever it finds no fetch in
        flight, which happens while its IO thread is still handling the last fetch response; in the latency
        benchmark that held back one poll in 40 with records waiting (transport p99 50–107 ms instead of
        ~15). Slicing the wait bounds that sleep to a slice; a fetch in flight still wakes the poll at once.
        A slice costs a poll (~0.7 ms of CPU with the client's threads), so an input silent for
        ``SLICE_WHILE_ACTIVE_S`` is waited for in one piece again (idle CPU 2.4 % of a core instead of 9.6 %).
        """
        from kafka.errors import CorruptRecordError, KafkaError

        now = self._polled = time.monotonic()
        if self._pattern is not None and now - self._pattern_checked >= PATTERN_CHECK_S:
            self._follow_pattern()
        rejoining = self._rejoining and timeout_ms > 0
        if rejoining:  # polls of 100 ms or less (10 ms slices while records flowed) never let kafka-python 3.0 finish
            # a rejoin (its join answered, the assignment never came: all input stopped); nothing is assigned
            # meanwhile, so a longer wait costs no latency — but it ends at the assignment (a restore follows, whose
            # steps the loop takes: a whole second there held the loop's turn)
            timeout_ms = max(timeout_ms, REJOIN_POLL_MS)
        deadline = now + timeout_ms / 1000
        piece = REJOIN_SLICE_MS if rejoining else (
            POLL_SLICE_MS if now - self._last_records < SLICE_WHILE_ACTIVE_S else timeout_ms)
        while True:
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))
            try:
                batches = self._consumer.poll(timeout_ms=min(left_ms, piece), max_records=max_records)
            except Exception as exc:
                # a fetch the client cannot use (an unknown codec, a corrupt batch, one that does not inflate: an
                # EOFError or zlib.error out of its record code, not a KafkaError): the loop pauses and retries, as
                # for a broker that fails; raised, it ended the daemon at every start. Anything else is a bug: raised
                self._raise_callback_error()  # unless our own callback failed: kafka-python wraps that too
                decoding = from_record_code(exc)
                if not (decoding or isinstance(exc, KafkaError)):
                    raise
                parsing = self._drop_failed_fetch()
                message = f"cannot read the input: {describe(exc)}"
                if (named := NAMED_PARTITION.search(str(exc))) is not None:  # a corrupt batch names its partition
                    raise PartitionUnreadable(message, (named[1], int(named[2]))) from None
                # else the partition whose records it was parsing (a header key not UTF-8: a CorruptRecordError
                # naming no partition)
                if parsing is not None and (decoding or isinstance(exc, CorruptRecordError)):
                    raise PartitionUnreadable(message, parsing) from None
                raise BrokerError(message) from None
            self._raise_callback_error()
            if batches or left_ms <= piece or (rejoining and not self._rejoining):
                break
        if batches:
            self._last_records = time.monotonic()
        return [InRecord(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp or 0, r.headers or ())
                for records in batches.values() for r in records]

    def _drop_failed_fetch(self) -> TP | None:
        """kafka-python keeps the buffered records whose parsing raised (a corrupt batch) as the next to hand out;
        the next poll of that partition then spun for ever in its fetcher, which saw no progress (the loop hung,
        and every restart again). Dropped, the partition's next fetch reads from its position again: nothing
        skipped, the same error raised again while the batch stays corrupt. Returns that partition: an error
        that does not name it (a record whose header key is not UTF-8) made every partition wait, not just it."""
        fetcher = getattr(self._consumer, "_fetcher", None)
        parsing = getattr(fetcher, "_next_partition_records", None)
        if parsing is None:
            return None
        fetcher._next_partition_records = None  # type: ignore[union-attr]
        tp = getattr(parsing, "topic_partition", None)
        # a drained one stays there, falsy, after its records were handed out: the error is not its
        return None if tp is None or not parsing else (tp.topic, tp.partition)

    @contextmanager
    def _callback(self) -> Iterator[None]:
        self._in_callback = True
        try:
            yield
        except BaseException as exc:
            self._callback_error = exc  # kafka-python re-raises it as a KafkaError "User rebalance callback ..."
            raise
        finally:
            self._in_callback = False
            self._callback_done = time.monotonic()

    def _raise_callback_error(self) -> None:
        """Raise what our rebalance callback raised (a batch that failed to score at a revoke): taken for a
        poll error and retried, it left a daemon that looked healthy and scored and committed nothing."""
        if self._callback_error is not None:
            exc, self._callback_error = self._callback_error, None
            raise exc

    def commit(self, offsets: dict[TP, int], timeout_s: float) -> None:
        """Commit exactly these offsets, waiting at most ``timeout_s``; BrokerError if the broker did not take them."""
        from kafka import OffsetAndMetadata, TopicPartition
        from kafka.errors import KafkaError

        if not offsets:
            return
        request = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
        try:
            if self._in_callback:
                self._consumer.commit_async(request)
            else:
                self._consumer.commit(request, timeout_ms=max(1, int(timeout_s * 1000)))
        except KafkaError as exc:  # timeout (broker away) or a rebalance took the partitions: replayed, not lost
            raise BrokerError(f"commit failed: {describe(exc)}") from None

    def rewind(self, offsets: dict[TP, int]) -> None:
        """Read these partitions again from these offsets. kafka-python keeps the position (and fetched
        records) of a partition that stays assigned through a rebalance, but the daemon dropped its streams at
        the revoke: without this the samples between the commit and the position never reach a window again.
        Only sets positions (no network), so it is safe inside a rebalance callback."""
        from kafka import TopicPartition

        for (t, p), o in offsets.items():
            self._consumer.seek(TopicPartition(t, p), o)

    def broker_problem(self) -> str | None:
        """Why the broker cannot be used now: the consumer holds no open connection to any broker (its own
        ``connection-count`` metric; kafka-python reconnects by itself with exponential backoff), or, holding
        partitions, has sent the group no heartbeat for a session timeout: the broker is there but does not
        answer (a frozen host, a black-holed network). That one kept its connections open, so /readyz stayed
        200 and ``tsmon_broker_up`` 1 while the input had stopped (measured: a SIGSTOPped broker for 45 s)."""
        metrics = self._consumer.metrics()
        if not metrics.get("consumer-metrics", {}).get("connection-count", 1):
            return "no connection to any broker"
        silent = metrics.get("consumer-coordinator-metrics", {}).get("last-heartbeat-seconds-ago", 0.0)
        # no heartbeat goes out while our rebalance callback runs (a revoke's commit waiting on a stalled sink, up to
        # sink_timeout_s): that silence is ours, not the broker's (it paused the input, "broker not answering")
        if math.isfinite(silent):  # infinite: none sent yet, not a silence
            silent = min(silent, time.monotonic() - self._callback_done)
        if math.isfinite(silent) and silent > self._session_s and self._consumer.assignment():
            return f"broker not answering: no group heartbeat for {silent:.0f} s (session timeout {self._session_s:g} s)"
        return None

    def assignment(self) -> set[TP]:
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def pause(self, tps: set[TP]) -> None:
        self._consumer.pause(*self._assigned(tps))

    def resume(self, tps: set[TP]) -> None:
        self._consumer.resume(*self._assigned(tps))

    def _assigned(self, tps: set[TP]) -> list[Any]:
        """Those of ``tps`` the consumer holds now: kafka-python raises KeyError for any other (a partition the
        daemon paused during an eager rebalance, when the group then gave it elsewhere, stopped the daemon)."""
        return [tp for tp in self._consumer.assignment() if (tp.topic, tp.partition) in tps]

    def lags(self) -> dict[TP, int]:
        """Records behind the high watermark of the last fetch, per assigned partition with both known now.
        ``position`` never waits: without a timeout it resolves every partition's position first (committed
        offsets, resets: the broker), which blocked the loop for ``request_timeout_ms`` with the broker away,
        and then returned None for a partition being reset (a TypeError that stopped the daemon).

        A paused partition is not fetched, so its high watermark froze: an instance that stopped consuming
        (back-pressure, a restore, a failing sink) kept reporting the lag it had then — 0 when it was caught
        up — and no lag alert could fire. Paused partitions' end offsets are asked for instead, every
        ``PAUSED_ENDS_EVERY_S`` with the broker reachable, waiting ``PAUSED_ENDS_TIMEOUT_MS`` at most; and so are
        every assigned partition's while the daemon has not polled its input for as long: it stops polling, without
        pausing, while the scorer falls behind (an SRE pass: a stalled scorer showed lag 0 for 48 s under 1 000
        records/s). A polled partition's high watermark is current, empty fetches included."""
        now = time.monotonic()
        assigned = self._consumer.assignment()
        paused = set(self._consumer.paused()) | (set(assigned) if now - self._polled >= PAUSED_ENDS_EVERY_S else set())
        self._paused_ends = {tp: o for tp, o in self._paused_ends.items() if tp in paused}
        if paused and now >= self._paused_ends_due and self.broker_problem() is None:
            self._paused_ends_due = now + PAUSED_ENDS_EVERY_S
            try:
                self._paused_ends.update(self._consumer.end_offsets(list(paused), timeout_ms=PAUSED_ENDS_TIMEOUT_MS))
            except Exception as exc:  # noqa: BLE001 — a gauge must never stop the loop (kafka-python raises KeyError
                # for a partition the answer left out, RuntimeError from a closed selector)
                log.debug("paused_end_offsets_failed", error=describe(exc))
        out = {}
        for tp in assigned:
            high = max((h for h in (self._consumer.highwater(tp), self._paused_ends.get(tp)) if h is not None),
                       default=None)
            if high is not None and (pos := self._consumer.position(tp, timeout_ms=0)) is not None:
                out[(tp.topic, tp.partition)] = max(0, high - pos)
        return out

    def close(self, timeout_s: float) -> None:
        self._consumer.close(autocommit=False, timeout_ms=max(1, int(timeout_s * 1000)))
