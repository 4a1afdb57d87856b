"""Where tsmon's output goes: alerts, data-quality events and dead letters, acknowledged before commits.

Owns delivery to the broker. :meth:`KafkaSink.flush` is the acknowledgement point of the at-least-once
contract: it returns only when every message sent since the last flush is acknowledged by the broker;
a message the broker refused is re-sent (bounded), and if it still fails the flush raises
:class:`SinkBackpressure` so that the daemon commits nothing and retries later. :class:`MemorySink` is
the in-process double for unit tests of the stages above it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kafka.errors import (
    InvalidRecordError,
    InvalidTopicError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
)

from models.errors import BrokerError, SinkBackpressure, describe
from monitor import logs

# errors that sending again cannot cure: the message or its topic is wrong, or we may not write there
NEVER_DELIVERABLE = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidRecordError, InvalidTopicError,
                     TopicAuthorizationFailedError)

log = logs.get("tsmon.sink")

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class OutMessage:
    topic: str
    key: bytes | None
    value: bytes | None  # None: a tombstone (a changelog key deleted)
    headers: Headers = field(default_factory=list)


def json_message(topic: str, key: str, doc: dict[str, Any], headers: Headers | None = None) -> OutMessage:
    """A JSON document as a message (compact, keys in insertion order, NaN refused)."""
    body = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    return OutMessage(topic, key.encode(), body, headers or [])


def resend_plan(messages: list[tuple[OutMessage, str]]) -> list[tuple[bool, bool]]:
    """A key's last message must stay its newest (an alert's ``resolved`` after its ``firing``, a stream's latest
    state document last). For messages in send order, each with its state — ``failed`` (not delivered: to send
    again), ``open`` (not acknowledged yet) or ``done`` (acknowledged) — whether to send it again and whether to
    keep waiting for it: a failed one goes again, and so does every later message of its topic and key,
    delivered or not — its copy is waited for, not the message as well (kept too, each flush that failed again kept
    every open copy and copied it again: 17 → 1 048 577 in five flushes on librdkafka); one delivered while an
    earlier one of its key is still open is kept, to go again if that one fails. Both sinks apply this one rule."""
    broken: set[tuple[str, bytes]] = set()  # topic and key of a message to send again
    open_: set[tuple[str, bytes]] = set()  # ... of a message still waiting (it may fail yet)
    plan = []
    for m, state in messages:
        key = (m.topic, m.key) if m.key is not None else None
        if state == "failed":
            plan.append((True, False))
            if key:
                broken.add(key)
        elif key in broken:  # after its key's failed message: again, after that one (its copy waited for)
            plan.append((True, False))
        elif state == "open":
            plan.append((False, True))
            if key:
                open_.add(key)
        else:  # delivered: kept while an earlier one of its key waits
            plan.append((False, key in open_))
    return plan


class Sink(Protocol):
    def send(self, msg: OutMessage) -> None: ...
    def flush(self, timeout_s: float) -> None: ...
    def close(self, timeout_s: float) -> None: ...


class MemorySink:
    """Keeps every message in a list; ``fail_next`` makes the next flush raise, as a slow broker would."""

    def __init__(self) -> None:
        self.sent: list[OutMessage] = []
        self.acked: list[OutMessage] = []
        self.fail_next = 0

    def send(self, msg: OutMessage) -> None:
        self.sent.append(msg)

    def flush(self, timeout_s: float) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise SinkBackpressure("memory sink told to fail", retry_after=0.0)
        self.acked = list(self.sent)

    def close(self, timeout_s: float) -> None:
        self.flush(timeout_s)

    def docs(self, topic: str) -> list[dict[str, Any]]:
        return [json.loads(m.value) for m in self.acked if m.topic == topic and m.value is not None]


class KafkaSink:
    """A kafka-python producer that remembers what is in flight until the broker acknowledges it.

    A message the broker cannot take now (no metadata, buffer full, a retriable error) is kept and sent
    again; one it can never take (too large for the broker, not authorised, invalid topic) would hold
    every commit back forever, so it is given up: logged as an error with its topic, key and size, and
    passed to ``on_undeliverable`` (the daemon counts it).
    """

    def __init__(self, producer_kwargs: dict[str, Any], retries: int = 3,
                 on_undeliverable: Callable[[OutMessage, str], None] | None = None) -> None:
        self._kwargs = producer_kwargs
        self._producer = self._new_producer()
        self._retries = retries
        self._inflight: list[tuple[OutMessage, Any | None]] = []  # (message, future or None if not taken yet)
        self._last_error: Exception | None = None
        self._refused = False  # the producer refused a message since the last flush attempt
        self._on_undeliverable = on_undeliverable or (lambda _msg, _why: None)

    def _new_producer(self, **extra: Any) -> Any:
        from kafka import KafkaProducer

        try:
            return KafkaProducer(**{**self._kwargs, **extra})
        except KafkaError as exc:
            where = self._kwargs.get("bootstrap_servers")
            raise BrokerError(f"cannot create a producer for {where}: {exc}") from None

    def _replace_if_fatal(self) -> None:
        """kafka-python's idempotent producer can enter a fatal state (its producer id refused, a sequence it
        cannot recover): it then aborts every batch with that error, and the sink re-sent them on the same
        producer for ever, the input paused. Replace it, as the librdkafka sink does; what was in flight goes
        again on the new one (at-least-once: nothing was committed past it)."""
        manager = getattr(self._producer, "_transaction_manager", None)
        if manager is None or not manager.has_fatal_error():
            return
        log.error("producer_replaced", error=describe(manager.last_error),
                  in_flight=len(self._inflight), consequence="in-flight messages are sent again on a new producer")
        old = self._producer
        try:  # close() flushes first and raises, the producer left open, while batches are incomplete (see close)
            old._accumulator.abort_incomplete_batches()
            old.close(timeout=0.1)
        except Exception as exc:  # noqa: BLE001 — a producer in a fatal state may fail to close; dropped either way
            log.debug("producer_close_failed", error=describe(exc))
        # the version the old one found: no bootstrap in the constructor, which blocked the loop for 30 s (and the
        # shutdown twice) with the broker away
        version = getattr(old, "config", {}).get("api_version")
        self._producer = self._new_producer(**({"api_version": version} if version else {}))
        self._inflight = [(m, None) for m, _f in self._inflight]
        self._refused = False

    def send(self, msg: OutMessage) -> None:
        """Hand ``msg`` to the producer and keep it in flight until acknowledged. If the producer cannot take
        it now (buffer full, or no metadata within ``max_block_ms``) it is kept all the same and handed over
        again at the next flush; after one such refusal the producer is not asked again before that flush, so
        a stuck broker blocks the loop for ``max_block_ms`` once, not once per message. A message it can
        never take is given up."""
        future = None
        if not self._refused:
            try:
                future = self._producer.send(msg.topic, value=msg.value, key=msg.key, headers=msg.headers)
            except KafkaError as exc:
                if not _retriable(exc):
                    self._give_up(msg, exc)
                    return
                self._last_error, self._refused = exc, True
        self._inflight.append((msg, future))

    def _give_up(self, msg: OutMessage, exc: BaseException) -> None:
        why = describe(exc)
        log.error("message_undeliverable", topic=msg.topic, key=(msg.key or b"").decode(errors="replace"),
                  bytes=len(msg.value or b""), error=why)
        self._on_undeliverable(msg, why)

    def flush(self, timeout_s: float) -> None:
        """Block until everything sent is acknowledged; re-send refusals; raise SinkBackpressure if stuck.

        A message still in the producer's buffer is waited for; one the broker refused (or the producer could
        not take) is handed over again, at most ``retries`` times and never after ``timeout_s`` — and so is
        every later message of its topic and key, delivered or not: a key's last message must stay its
        newest (an alert's ``resolved`` after its ``firing``, a stream's latest state document last).
        """
        deadline = time.monotonic() + timeout_s
        self._replace_if_fatal()
        for _attempt in range(self._retries + 1):
            try:
                self._producer.flush(timeout=max(0.1, deadline - time.monotonic()))
            except KafkaTimeoutError as exc:  # the broker is away or slow: what is buffered stays buffered
                self._last_error = exc
            states = []
            for m, f in self._inflight:
                if f is None or (f.is_done and f.failed()):
                    if f is not None and not _retriable(f.exception):
                        self._give_up(m, f.exception)
                        continue
                    self._last_error = f.exception if f is not None else self._last_error
                    states.append((m, f, "failed"))
                else:
                    states.append((m, f, "done" if f.is_done else "open"))
            plan = resend_plan([(m, state) for m, _f, state in states])
            failed = [m for (m, _f, _s), (again, _keep) in zip(states, plan, strict=True) if again]
            kept = [(m, f) for (m, f, _s), (_again, keep) in zip(states, plan, strict=True) if keep]
            if not failed and all(f.is_done for _m, f in kept):
                self._inflight.clear()
                return
            self._inflight = kept
            if time.monotonic() >= deadline:  # no more sends: each may block for max_block_ms
                self._inflight += [(m, None) for m in failed]
                break
            self._refused = False  # ask the producer again, once per attempt
            for m in failed:
                self.send(m)
        first = next((f.exception for _m, f in self._inflight if f is not None and f.is_done and f.failed()),
                     self._last_error)
        raise SinkBackpressure(f"{len(self._inflight)} message(s) not acknowledged by the broker: {first or 'timeout'}",
                               retry_after=1.0)

    @property
    def pending(self) -> int:
        return len(self._inflight)

    def close(self, timeout_s: float) -> None:
        """Deliver what is in flight and close, both within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        try:
            self.flush(timeout_s / 2)
        finally:
            try:
                self._producer.close(timeout=max(0.1, deadline - time.monotonic()))
            except KafkaError as exc:
                # kafka-python's close() flushes first and, when the broker never answers, raises with the producer
                # still open (its __del__ then retries at exit): give the records up so that the close completes.
                # They were never acknowledged, so no offset covering them was committed: they are replayed.
                self._producer._accumulator.abort_incomplete_batches()
                self._producer.close(timeout=0.1)
                raise SinkBackpressure(f"producer closed with {self.pending} message(s) unacknowledged: {exc}",
                                       retry_after=0.0) from None


def _retriable(exc: BaseException | None) -> bool:
    """Will sending again help? Yes, unless the message or its topic is wrong or we may not write there (the
    list the librdkafka sink gives up on). kafka-python marks far more errors not retriable — the broker's
    generic UnknownError, CorruptRecordError, the idempotent producer's sequence and epoch errors at a reset —
    and giving those up lost an alert while its input was committed (measured: a broker whose store restarted
    answered UnknownError to every produce for a moment)."""
    return not isinstance(exc, NEVER_DELIVERABLE)
