"""The optional confluent-kafka (librdkafka) backend of the input source and the output sink.

Owns the translation of tsmon's Kafka settings to librdkafka's and the two classes that speak it with the
same semantics as :class:`monitor.source.KafkaSource` and :class:`monitor.sink.KafkaSink`: one consumer
group, manual commits of exactly the offsets the processor gives (never automatic, offsets never stored
by the client), rebalance callbacks on the loop's thread (the daemon commits revoked partitions inside
them), pause/resume, a broker-health signal, and a sink that keeps every message until the broker
acknowledges it, re-sends retriable failures and gives up (counted) on what can never be delivered.
Chosen with ``kafka.client = "confluent"``; needs ``pip install 'tsmon[confluent]'``. The control topic,
the changelog and topic creation stay on kafka-python: they are not on the hot path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from models.errors import BrokerError, ConfigError, PartitionUnreadable, SinkBackpressure, describe
from monitor import logs
from monitor.sink import OutMessage, resend_plan
from monitor.source import PAUSED_ENDS_EVERY_S, PAUSED_ENDS_TIMEOUT_MS, TP, InRecord

KAFKA_PYTHON_MAX_REQUEST = 1_048_576  # kafka-python's max_request_size: the largest message either client sends

log = logs.get("tsmon.confluent")

# kafka-python keyword → librdkafka property (values converted by _convert)
_KEYS = {
    "bootstrap_servers": "bootstrap.servers", "client_id": "client.id", "request_timeout_ms": "socket.timeout.ms",
    "reconnect_backoff_ms": "reconnect.backoff.ms", "reconnect_backoff_max_ms": "reconnect.backoff.max.ms",
    "security_protocol": "security.protocol", "sasl_mechanism": "sasl.mechanism",
    "sasl_plain_username": "sasl.username", "sasl_plain_password": "sasl.password",
    "ssl_cafile": "ssl.ca.location", "ssl_certfile": "ssl.certificate.location", "ssl_keyfile": "ssl.key.location",
    "ssl_check_hostname": "ssl.endpoint.identification.algorithm", "group_id": "group.id",
    "auto_offset_reset": "auto.offset.reset", "session_timeout_ms": "session.timeout.ms",
    "heartbeat_interval_ms": "heartbeat.interval.ms", "max_poll_interval_ms": "max.poll.interval.ms",
    "fetch_max_wait_ms": "fetch.wait.max.ms", "enable_auto_commit": "enable.auto.commit", "acks": "acks",
    "enable_idempotence": "enable.idempotence", "linger_ms": "linger.ms", "delivery_timeout_ms": "delivery.timeout.ms",
    "metadata_max_age_ms": "topic.metadata.refresh.interval.ms", "partition_assignment_strategy": "partition.assignment.strategy",
}
# no librdkafka property: poll sizes, produce() never blocks, the start's wait is tsmon's own (monitor.reach)
_DROPPED = {"max_poll_records", "max_block_ms", "bootstrap_timeout_ms"}


def available() -> bool:
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    if not available():
        raise ConfigError("kafka.client = \"confluent\" needs the confluent-kafka package: "
                          "pip install 'tsmon[confluent]' (or use kafka.client = \"kafka-python\")")


class _ToStructlog(logging.Handler):
    """librdkafka's own log lines (``%3|…|FAIL|…``) into tsmon's log: written to stderr by librdkafka, they came
    as plain text amid the JSON lines. Its warnings and errors are info (what matters also reaches ``error_cb``:
    ``kafka_client_error``), the rest debug."""

    def emit(self, record: logging.LogRecord) -> None:
        (log.info if record.levelno >= logging.WARNING else log.debug)(
            "kafka_client_log", client="confluent", level=record.levelname.lower(), message=record.getMessage()[:500])


def client_logger() -> logging.Logger:
    """The ``logger`` librdkafka's clients are given (their lines are served by poll and flush, on that thread)."""
    logger = logging.getLogger("tsmon.librdkafka")
    if not any(isinstance(h, _ToStructlog) for h in logger.handlers):
        logger.addHandler(_ToStructlog())
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
    return logger


def rdkafka_config(kwargs: dict[str, Any]) -> dict[str, Any]:
    """librdkafka properties for kafka-python keyword arguments (those of :class:`monitor.config.KafkaConfig`)."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in _DROPPED:
            continue
        if key not in _KEYS:
            raise ConfigError(f"kafka setting {key!r} has no confluent-kafka equivalent")
        if key == "bootstrap_servers":
            value = ",".join(value) if isinstance(value, list | tuple) else value
        elif key == "ssl_check_hostname":
            value = "https" if value else "none"
        elif key == "partition_assignment_strategy":  # kafka-python's assignor classes: their names are librdkafka's
            value = ",".join(a.name for a in value)
        elif key == "request_timeout_ms":
            value = min(int(value), 300_000)  # librdkafka's socket.timeout.ms allows 300 s at most
        out[_KEYS[key]] = value
    return out


def _tps(tps: Any) -> list[TP]:
    return [(tp.topic, tp.partition) for tp in tps]


@dataclass
class _Health:
    """What librdkafka's statistics (every second) and error callback say about the brokers."""

    problem: str | None = None
    lags: dict[TP, int] | None = None
    session_s: float = 45.0

    def stats(self, raw: str) -> None:
        """Called from inside consume(); must never raise (an exception there would stop the loop)."""
        try:
            doc = json.loads(raw)
            # real brokers only: the bootstrap entry counts until the first metadata, the coordinator never
            brokers = [b for b in doc.get("brokers", {}).values() if b.get("source") in ("configured", "learned")]
            self.problem = None if any(b.get("state") == "UP" for b in brokers) else "no connection to any broker"
            # A broker that hangs with its connections open (a frozen host) stays UP. In a steady group the
            # coordinator answers each heartbeat at once (its last receive 0.5 s ago at most, measured); one with a
            # request waiting and silent for half a session timeout does not answer (4.5 s after a 4.5 s
            # freeze). Half: at a whole one librdkafka drops the assignment and the group is no longer steady
            # (a JoinGroup may then wait at a healthy broker for the whole rebalance).
            coordinator = doc.get("brokers", {}).get("GroupCoordinator", {})
            silent = coordinator.get("rxidle", -1) / 1e6
            steady = doc.get("cgrp", {}).get("join_state") == "steady"
            if self.problem is None and steady and coordinator.get("waitresp_cnt", 0) > 0 and silent > self.session_s / 2:
                self.problem = (f"broker not answering: the group coordinator has answered nothing for {silent:.1f} s "
                                f"(session timeout {self.session_s:g} s)")
            lags = {}
            for topic, t in doc.get("topics", {}).items():
                for p, part in t.get("partitions", {}).items():
                    high, position = part.get("hi_offset", -1), part.get("app_offset", -1)
                    if int(p) >= 0 and high >= 0 and position >= 0:  # as kafka-python: high watermark − position
                        lags[(topic, int(p))] = max(0, int(high) - int(position))
            self.lags = lags
        except Exception as exc:  # noqa: BLE001
            log.error("kafka_statistics_unreadable", client="confluent", error=describe(exc))

    def error(self, err: Any) -> None:
        from confluent_kafka import KafkaError

        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self.problem = "no connection to any broker"
        # a dropped connection is reconnected by librdkafka itself: worth a debug line, not a warning
        (log.debug if err.code() == KafkaError._TRANSPORT else log.warning)(
            "kafka_client_error", client="confluent", error=str(err))


class ConfluentSource:
    """:class:`monitor.source.KafkaSource` on a librdkafka consumer."""

    def __init__(self, consumer_kwargs: dict[str, Any], topics: list[str], pattern: str | None,
                 on_revoke: Callable[[list[TP]], None], on_assign: Callable[[list[TP]], None]) -> None:
        require()
        from confluent_kafka import Consumer, KafkaException

        self._max = int(consumer_kwargs.get("max_poll_records", 500))
        self._health = _Health(session_s=int(consumer_kwargs.get("session_timeout_ms", 45_000)) / 1000)
        self._lost = False  # inside the callback for partitions the group took away: nothing can be committed
        self._closing = False
        self._bad: dict[TP, PartitionUnreadable] = {}  # partitions whose fetch failed: raised by the next polls
        self._unread_lags: dict[TP, int] = {}  # assigned partitions nothing was delivered from yet (see lags)
        self._unread_due = 0.0  # monotonic time they are asked for again
        self._unread_thread: threading.Thread | None = None
        self._in_use = threading.Lock()  # held by that thread around each call: close() never destroys it in use
        # check.crcs: off by default in librdkafka, which then handed a batch whose CRC did not match over as valid
        conf = {**rdkafka_config(consumer_kwargs), "enable.auto.commit": False, "enable.auto.offset.store": False,
                "check.crcs": True, "logger": client_logger(), "statistics.interval.ms": 1000, "stats_cb": self._health.stats,
                "error_cb": self._health.error}

        # what the daemon's callbacks raise, raised again by poll as itself: confluent-kafka re-raises it out of
        # consume(), where a KafkaException (a fatal producer's, from the revoke's flush) was taken for a consume
        # error and retried, the daemon going on after a revoke stopped half way (the confluent review)
        self._callback_error: BaseException | None = None

        def assigned(consumer: Any, partitions: Any) -> None:
            try:
                consumer.assign(partitions)  # before the daemon's callback: it may pause what it was given
                on_assign(_tps(partitions))
            except BaseException as exc:
                self._callback_error = exc
                raise

        def revoked(consumer: Any, partitions: Any) -> None:
            try:
                if not self._closing:  # close() runs on a thread of its own: the daemon has saved and committed
                    on_revoke(_tps(partitions))  # scores, publishes and commits them while they are still ours
                consumer.unassign()
            except BaseException as exc:
                self._callback_error = exc
                raise

        def lost(consumer: Any, partitions: Any) -> None:
            # the group went on without us (no heartbeat for a session timeout): a commit can only fail, and a
            # synchronous one to a broker that hangs blocked the loop until it answered again (43 s measured)
            self._lost = True
            try:
                revoked(consumer, partitions)
            finally:
                self._lost = False

        try:
            self._consumer = Consumer(conf)
            # librdkafka reads a subscription starting with ^ as a (POSIX extended) regex; kafka-python's pattern
            # is re.match: anchored at the start, every alternative
            subscription = [pattern if pattern.startswith("^") else f"^({pattern})"] if pattern else topics
            self._consumer.subscribe(subscription, on_assign=assigned, on_revoke=revoked, on_lost=lost)
        except KafkaException as exc:
            raise BrokerError(f"cannot create a consumer for {conf['bootstrap.servers']}: {exc}") from None

    def _raise_callback_error(self) -> None:
        if self._callback_error is not None:
            exc, self._callback_error = self._callback_error, None
            raise exc

    def poll(self, timeout_ms: int, max_records: int | None = None) -> list[InRecord]:
        from confluent_kafka import KafkaError, KafkaException

        if self._bad:  # the records taken with them went out first; one a poll (each is paused by its raise)
            held = self.assignment()  # (asked only then: poll is the hot path)
            self._bad = {tp: exc for tp, exc in self._bad.items() if tp in held}
            if self._bad:
                raise self._bad.pop(next(iter(self._bad)))
        n = max_records or self._max
        try:  # consume() waits until it has n messages or the timeout passed; kafka-python returns what is there
            messages = self._consumer.consume(num_messages=n, timeout=0)
            if not messages and timeout_ms > 0:
                first = self._consumer.poll(timeout_ms / 1000)  # returns as soon as one message comes
                if first is not None:
                    messages = [first, *(self._consumer.consume(num_messages=n - 1, timeout=0) if n > 1 else [])]
        except KafkaException as exc:
            self._raise_callback_error()
            raise BrokerError(f"consume failed: {exc}") from None
        except BaseException as exc:  # the callback's own error, out of consume(): not to be raised again later
            if exc is self._callback_error:
                self._callback_error = None
            raise
        self._raise_callback_error()
        out, failed = [], {}
        for m in messages:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                if m.topic() and m.partition() is not None and m.partition() >= 0:  # a fetch of one partition that
                    # cannot be used (a batch failing its CRC): that partition waits for its retries, as with
                    # kafka-python (a warning per message, /readyz 200 and the partition stalled, before)
                    tp = (m.topic(), m.partition())
                    self._bad[tp] = PartitionUnreadable(f"cannot read the input: {err}", tp)
                    if m.offset() is not None and m.offset() >= 0:
                        failed.setdefault(tp, m.offset())
                else:
                    log.warning("consume_error", client="confluent", error=str(err))
                continue
            if failed and (m.topic(), m.partition()) in failed:  # librdkafka goes on after a bad batch: what follows
                continue  # it is read again from it (below), never taken past it
            out.append(InRecord(m.topic(), m.partition(), m.offset(), m.key(), m.value(), max(0, m.timestamp()[1]),
                                m.headers() or ()))
        self._back_to(failed)
        return out

    def _back_to(self, failed: dict[TP, int]) -> None:
        """Position each partition whose fetch failed back on the batch that failed: its retry reads from there."""
        from confluent_kafka import KafkaException, TopicPartition

        for (topic, partition), offset in failed.items():
            try:
                self._consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:
                log.error("seek_failed", client="confluent", partition=f"{topic}-{partition}", offset=offset,
                          error=str(exc), consequence="the records after the bad batch may be read past it")

    def commit(self, offsets: dict[TP, int], timeout_s: float) -> None:
        """Commit exactly these offsets (synchronously: librdkafka's commit has no timeout of its own, so the
        daemon only commits while :meth:`broker_problem` says the brokers are reachable)."""
        from confluent_kafka import KafkaException, TopicPartition

        if not offsets:
            return
        if self._lost:
            raise BrokerError("commit failed: the partitions were lost (no heartbeat for a session timeout); "
                              "their next owner replays from the last commit")
        if self._health.problem is not None:  # a synchronous commit would block for the session timeout
            raise BrokerError(f"commit failed: {self._health.problem}")
        try:
            done = self._consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                         asynchronous=False)
        except KafkaException as exc:
            raise BrokerError(f"commit failed: {exc}") from None
        failed = [f"{tp.topic}-{tp.partition}: {tp.error}" for tp in done or [] if tp.error is not None]
        if failed:
            raise BrokerError(f"commit failed: {'; '.join(failed)}")

    def broker_problem(self) -> str | None:
        return self._health.problem

    def assignment(self) -> set[TP]:
        return set(_tps(self._consumer.assignment()))

    def pause(self, tps: set[TP]) -> None:
        from confluent_kafka import TopicPartition

        if tps:
            self._consumer.pause([TopicPartition(t, p) for t, p in tps])

    def resume(self, tps: set[TP]) -> None:
        from confluent_kafka import TopicPartition

        if tps:
            self._consumer.resume([TopicPartition(t, p) for t, p in tps])

    def lags(self) -> dict[TP, int]:
        """Records behind the high watermark per assigned partition, from the last statistics (every second)."""
        assigned = self.assignment()
        out = {tp: lag for tp, lag in (self._health.lags or {}).items() if tp in assigned}
        return {**self._unread(assigned - set(out)), **out}

    def _unread(self, tps: set[TP]) -> dict[TP, int]:
        """Lags of assigned partitions nothing was delivered from since the assignment — paused at once while the
        state is restored, or while the sink fails: librdkafka's statistics know no position for them (nor a high
        watermark, unfetched), so they had no lag series exactly when a takeover made one worth watching. Their
        committed offsets and high watermarks are asked for every ``PAUSED_ENDS_EVERY_S`` with the broker
        reachable, on a thread of its own: each answer waits behind the consumer's fetch (up to its
        ``fetch.wait.max.ms``), too long for the loop."""
        known = {tp: lag for tp, lag in self._unread_lags.items() if tp in tps}
        busy = self._unread_thread is not None and self._unread_thread.is_alive()
        if tps and not busy and time.monotonic() >= self._unread_due and self.broker_problem() is None:
            self._unread_due = time.monotonic() + PAUSED_ENDS_EVERY_S
            self._unread_thread = threading.Thread(target=self._ask_unread, args=(sorted(tps),), daemon=True,
                                                   name="tsmon-unread-lags")
            self._unread_thread.start()
        return known

    def _ask_unread(self, tps: list[TP]) -> None:
        from confluent_kafka import TopicPartition

        wait = 2 * PAUSED_ENDS_TIMEOUT_MS / 1000
        lags: dict[TP, int] = {}
        try:
            with self._in_use:
                if self._closing:
                    return
                committed = self._consumer.committed([TopicPartition(t, p) for t, p in tps], timeout=wait)
            for c in committed:
                with self._in_use:
                    if self._closing:
                        return
                    low, high = self._consumer.get_watermark_offsets(c, timeout=wait, cached=False)
                position = c.offset if c.offset >= 0 else low  # none committed: from the beginning
                if high >= 0 and position >= 0:
                    lags[(c.topic, c.partition)] = max(0, high - position)
        except Exception as exc:  # noqa: BLE001 — a gauge must never stop anything (a closed consumer: RuntimeError)
            log.debug("unread_lags_failed", client="confluent", error=describe(exc))
        self._unread_lags = lags  # replaced whole: read by the loop

    def rewind(self, offsets: dict[TP, int]) -> None:
        """Nothing to do: every assignment here follows an unassign, so librdkafka starts each partition at its
        committed offset, which is the daemon's commit at the revoke or, if that failed, an older one (read
        again, the windows already applied are skipped)."""

    def close(self, timeout_s: float) -> None:
        """Leave the group within ``timeout_s``: librdkafka's close has no timeout of its own, so it runs on a
        thread the daemon stops waiting for (it exits with the process). The revoke it triggers only unassigns:
        the daemon's revoke work (scoring, saving, committing) ran on that thread and could outlive this call,
        racing the sink's and the scorer's close — and the daemon has drained, saved and committed by now."""
        self._closing = True
        # librdkafka forbids destroying a handle in use on another thread: the lag thread's call (1 s at most) ends
        # first, and it makes no other after this
        held = self._in_use.acquire(timeout=max(0.1, timeout_s / 2))
        if not held:
            log.warning("consumer_in_use_at_close", client="confluent", consequence="closed during a lag query")
        closer = threading.Thread(target=self._consumer.close, name="tsmon-confluent-close", daemon=True)
        closer.start()
        closer.join(max(0.1, timeout_s))
        if held:  # the lag thread, if waiting, sees _closing and ends
            self._in_use.release()
        if closer.is_alive():
            log.error("consumer_close_timeout", client="confluent", timeout_s=round(timeout_s, 2),
                      consequence="the group notices after session_timeout_ms; uncommitted input is replayed")


def _never_deliverable(err: Any) -> bool:
    """Errors that sending again cannot cure (the message or its topic is wrong, or we may not write there).
    Everything else, a missing topic and timeouts included, is kept and sent again, as kafka-python does."""
    from confluent_kafka import KafkaError

    return err.code() in {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_RECORD,
                          KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.TOPIC_EXCEPTION, KafkaError._INVALID_ARG}


def _is_fatal(err: Any) -> bool:
    """A fatal producer error (idempotence: an out-of-order sequence, a fenced producer): ``fatal()``, or the
    ``_FATAL`` code that produce() and delivery reports carry once the producer is in that state."""
    from confluent_kafka import KafkaError

    return err is not None and hasattr(err, "code") and (err.fatal() or err.code() == KafkaError._FATAL)


class _Entry:
    __slots__ = ("error", "msg", "state")

    def __init__(self, msg: OutMessage) -> None:
        self.msg, self.state, self.error = msg, "new", None  # new, sent, acked, failed, given_up


class ConfluentSink:
    """:class:`monitor.sink.KafkaSink` on a librdkafka producer."""

    def __init__(self, producer_kwargs: dict[str, Any], retries: int = 3,
                 on_undeliverable: Callable[[OutMessage, str], None] | None = None) -> None:
        require()
        # murmur2 as kafka-python and the Java client: a stream's messages land on the same partition
        # whichever client wrote them; at most 5 requests in flight, as kafka-python
        # and kafka-python's largest request (1 MiB): librdkafka's 1 000 000 bytes gave up messages it delivers
        self._conf = {**rdkafka_config(producer_kwargs), "partitioner": "murmur2_random",
                      "max.in.flight.requests.per.connection": 5, "message.max.bytes": KAFKA_PYTHON_MAX_REQUEST,
                      "logger": client_logger(),
                      "error_cb": self._client_error}
        self._failed_fatally = False  # the producer reported a fatal error (idempotence): flush replaces it
        self._producer = self._new_producer()
        self._retries = retries
        self._entries: list[_Entry] = []
        self._refused = False  # the producer refused a message since the last flush: later ones wait (order)
        self._on_undeliverable = on_undeliverable or (lambda _msg, _why: None)

    def _new_producer(self) -> Any:
        from confluent_kafka import KafkaException, Producer

        try:
            return Producer(self._conf)
        except KafkaException as exc:
            raise BrokerError(f"cannot create a producer for {self._conf['bootstrap.servers']}: {exc}") from None

    def _produce(self, entry: _Entry) -> None:
        from confluent_kafka import KafkaException

        def delivered(err: Any, _msg: Any) -> None:
            entry.state, entry.error = ("failed", err) if err is not None else ("acked", None)

        if self._refused:
            entry.state = "failed"  # unsent: handed over at the next flush, after the one refused before it
            return
        try:
            self._producer.produce(entry.msg.topic, value=entry.msg.value, key=entry.msg.key,
                                   headers=entry.msg.headers, on_delivery=delivered)
            entry.state = "sent"
        except BufferError:  # the local queue is full: kept, handed over again at the next flush
            entry.state, entry.error, self._refused = "failed", None, True
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if err is not None and hasattr(err, "code") and _never_deliverable(err):
                entry.state, entry.error = "given_up", err
                self._give_up(entry.msg, str(err))
            else:  # e.g. a fatal producer error: kept; flush replaces the producer
                entry.state, entry.error, self._refused = "failed", err, True

    def _client_error(self, err: Any) -> None:
        log.warning("kafka_client_error", client="confluent", error=str(err))
        self._failed_fatally = self._failed_fatally or _is_fatal(err)

    def send(self, msg: OutMessage) -> None:
        from confluent_kafka import KafkaException

        entry = _Entry(msg)
        self._produce(entry)
        if entry.state != "given_up":
            self._entries.append(entry)
        try:
            self._producer.poll(0)  # serve delivery reports as we go
        except KafkaException as exc:  # a fatal producer raises here: it stopped the daemon (the confluent review)
            self._failed_fatally = True
            log.error("producer_failed", client="confluent", error=str(exc), consequence="replaced at the next flush")

    def _give_up(self, msg: OutMessage, why: str) -> None:
        log.error("message_undeliverable", topic=msg.topic, key=(msg.key or b"").decode(errors="replace"),
                  bytes=len(msg.value or b""), error=why)
        self._on_undeliverable(msg, why)

    def _fatal(self) -> bool:
        """librdkafka reports an idempotent producer's fatal state as ``_FATAL`` errors whose own ``fatal()`` is
        false (the producer was never replaced: every flush after it failed), or raises it from poll and flush."""
        return self._failed_fatally or any(_is_fatal(e.error) for e in self._entries)

    def flush(self, timeout_s: float) -> None:
        """Block until everything sent is acknowledged; re-send what failed (at most ``retries`` times per
        flush, in order) unless it can never be delivered — and with it every later message of its topic and
        key, delivered or not (:func:`monitor.sink.resend_plan`, as KafkaSink); raise SinkBackpressure if something
        is still unacknowledged after ``timeout_s``. A producer in a fatal state (idempotence) is replaced first."""
        from confluent_kafka import KafkaException

        deadline = time.monotonic() + timeout_s
        waiting: list[_Entry] = []
        for _attempt in range(self._retries + 1):
            try:
                self._producer.flush(max(0.0, deadline - time.monotonic()))
            except KafkaException:  # a fatal producer raises here too
                self._failed_fatally = True
            if self._fatal():
                log.error("producer_fatal", client="confluent", consequence="a new producer re-sends the rest")
                with contextlib.suppress(KafkaException):
                    self._producer.purge()
                self._producer, self._failed_fatally = self._new_producer(), False
                for e in self._entries:
                    if e.state not in ("acked", "given_up"):
                        e.state, e.error = "failed", None
            entries = []
            for e in self._entries:
                if e.state == "given_up":  # given up (and counted) as the last flush re-sent it: not waited for
                    continue
                if e.state == "failed" and e.error is not None and _never_deliverable(e.error):
                    self._give_up(e.msg, str(e.error))
                else:
                    entries.append(e)
            waiting, failed = [], []
            states = {"failed": "failed", "acked": "done"}  # else sent: "open"
            plan = resend_plan([(e.msg, states.get(e.state, "open")) for e in entries])
            for e, (again, keep) in zip(entries, plan, strict=True):
                if keep:
                    waiting.append(e)
                if again:
                    if e.state != "failed":  # a later one of a failed key: a copy goes after that one
                        e = _Entry(e.msg)
                        e.state = "failed"  # unsent: if the deadline stops this flush, the next one sends it
                    waiting.append(e)
                    failed.append(e)
            self._entries = waiting
            if not waiting:
                self._refused = False
                return
            if time.monotonic() >= deadline:
                break
            self._refused = False  # ask the producer again, in the original order
            for e in failed:
                self._produce(e)
        first = next((e.error for e in waiting if e.error is not None), "timeout")
        raise SinkBackpressure(f"{len(waiting)} message(s) not acknowledged by the broker: {first}", retry_after=1.0)

    @property
    def pending(self) -> int:
        return len(self._entries)

    def close(self, timeout_s: float) -> None:
        """Deliver what is in flight within ``timeout_s``; what is not acknowledged by then is purged (it was
        never committed past, so it is replayed)."""
        from confluent_kafka import KafkaException

        try:
            self.flush(timeout_s)
        except SinkBackpressure:
            with contextlib.suppress(KafkaException):  # a fatal producer raises from these too
                self._producer.purge()
                self._producer.flush(0)
            raise
