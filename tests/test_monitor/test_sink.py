"""KafkaSink's acknowledgement and re-send rules, on a scripted stand-in for kafka-python's producer.

The broker itself is exercised by tests/test_integration; here each send's outcome is chosen, which a real
broker cannot be made to do on demand (a leader moving between two batches)."""

from __future__ import annotations

from typing import Any, ClassVar

import kafka
import pytest
from kafka.errors import (
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    TopicAuthorizationFailedError,
    UnknownError,
)

from models.errors import SinkBackpressure
from monitor.sink import KafkaSink, OutMessage


class Future:
    def __init__(self, outcome: str) -> None:
        self.outcome, self.is_done, self.exception = outcome, False, None

    def failed(self) -> bool:
        return self.exception is not None


class ScriptedProducer:
    """Each send takes the next outcome of ``script`` (``ok``, ``retry``: a retriable error, ``fatal``, ``slow``:
    still being retried at the first flush, a retriable error at the next; then ``ok``); ``flush`` completes
    them. ``log`` is what the broker appended, in order."""

    script: ClassVar[list[str]] = []

    def __init__(self, **_kw: Any) -> None:
        self.futures: list[Future] = []
        self.log: list[tuple[str, bytes | None, bytes]] = []

    def send(self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None) -> Future:
        f = Future(self.script.pop(0) if self.script else "ok")
        f.message = (topic, key, value)  # type: ignore[attr-defined]
        self.futures.append(f)
        return f

    def flush(self, timeout: float | None = None) -> None:
        for f in self.futures:
            if f.outcome == "slow":
                f.outcome = "retry"
            elif not f.is_done:
                f.is_done = True
                if f.outcome == "retry":
                    f.exception = NotLeaderForPartitionError("leader moved")
                elif f.outcome == "fatal":
                    f.exception = MessageSizeTooLargeError("too large")
                elif f.outcome == "unknown":  # kafka-python: not retriable; nothing wrong with the message
                    f.exception = UnknownError("broker error")
                else:
                    self.log.append(f.message)  # type: ignore[attr-defined]
        if not all(f.is_done for f in self.futures):
            raise KafkaTimeoutError("flush timed out")

    def close(self, timeout: float | None = None) -> None:
        pass


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> type[ScriptedProducer]:
    monkeypatch.setattr(kafka, "KafkaProducer", ScriptedProducer)
    return ScriptedProducer


def appended(sink: KafkaSink) -> list[tuple[str, bytes | None, bytes]]:
    return sink._producer.log  # type: ignore[attr-defined]


def test_a_failed_message_goes_again_with_every_later_one_of_its_key(scripted: type[ScriptedProducer]) -> None:
    # its firing failed while its resolved got through: re-sent alone, firing came last for that alert, and the
    # older state document became the stream's latest
    scripted.script = ["retry", "ok", "retry", "ok", "ok"]
    sink = KafkaSink({})
    for topic, value in [("alerts", b"firing"), ("alerts", b"resolved"), ("state", b"doc 1"), ("state", b"doc 2")]:
        sink.send(OutMessage(topic, b"dev-1", value))
    sink.send(OutMessage("alerts", b"dev-2", b"other"))
    sink.flush(5.0)
    log = appended(sink)
    for topic, older, newest in [("alerts", b"firing", b"resolved"), ("state", b"doc 1", b"doc 2")]:
        assert [v for t, k, v in log if (t, k) == (topic, b"dev-1")] == [newest, older, newest]
    assert [v for t, k, v in log if k == b"dev-2"] == [b"other"]  # another key is not sent again
    assert sink.pending == 0


def test_a_producer_in_a_fatal_state_is_replaced_and_what_was_in_flight_goes_again(
        scripted: type[ScriptedProducer]) -> None:
    """kafka-python's idempotent producer in a fatal state aborts every batch with that error; the sink re-sent
    them on the same producer for ever (input paused, 503). It is replaced, as the librdkafka sink does."""
    from kafka.errors import ClusterAuthorizationFailedError

    class Manager:
        fatal, last_error = True, ClusterAuthorizationFailedError("producer id refused")

        def has_fatal_error(self) -> bool:
            return self.fatal

    scripted.script = ["retry"]
    sink = KafkaSink({})
    first = sink._producer
    first._transaction_manager = Manager()  # type: ignore[attr-defined]
    sink.send(OutMessage("alerts", b"dev-1", b"firing"))
    sink.flush(5.0)
    assert sink._producer is not first and sink.pending == 0
    assert appended(sink) == [("alerts", b"dev-1", b"firing")] and first.log == []


def test_a_later_message_delivered_while_an_earlier_one_waits_goes_again_if_that_one_fails(
        scripted: type[ScriptedProducer]) -> None:
    # the producer keeps five requests in flight: "resolved" was acknowledged and forgotten while "firing" was
    # still being retried, then "firing" expired and was re-sent alone, to land last
    scripted.script = ["slow", "ok"]
    sink = KafkaSink({})
    sink.send(OutMessage("alerts", b"dev-1", b"firing"))
    sink.send(OutMessage("alerts", b"dev-1", b"resolved"))
    sink.flush(5.0)
    assert [v for _t, _k, v in appended(sink)] == [b"resolved", b"firing", b"resolved"] and sink.pending == 0


def test_a_message_given_up_sends_nothing_again(scripted: type[ScriptedProducer]) -> None:
    scripted.script = ["fatal", "ok"]
    lost: list[str] = []
    sink = KafkaSink({}, on_undeliverable=lambda _m, why: lost.append(why))
    sink.send(OutMessage("alerts", b"dev-1", b"huge"))
    sink.send(OutMessage("alerts", b"dev-1", b"next"))
    sink.flush(5.0)
    assert appended(sink) == [("alerts", b"dev-1", b"next")] and len(lost) == 1


def test_a_broker_error_that_is_not_the_message_fault_is_retried_not_given_up(scripted: type[ScriptedProducer]) -> None:
    """kafka-python marks UnknownError (the broker's generic error), CorruptRecordError and the idempotent
    producer's sequence errors not retriable: the alert was given up as undeliverable and its input committed.
    Only a wrong message or topic, or a missing permission, is given up."""
    from kafka.errors import CorruptRecordError, OutOfOrderSequenceNumberError

    from monitor.sink import _retriable

    scripted.script = ["unknown", "ok"]
    lost: list[str] = []
    sink = KafkaSink({}, on_undeliverable=lambda _m, why: lost.append(why))
    sink.send(OutMessage("alerts", b"dev-1", b"firing"))
    sink.flush(5.0)
    assert appended(sink) == [("alerts", b"dev-1", b"firing")] and not lost and sink.pending == 0
    assert all(_retriable(e("x")) for e in (CorruptRecordError, OutOfOrderSequenceNumberError, UnknownError))
    assert not _retriable(TopicAuthorizationFailedError("x")) and not _retriable(MessageSizeTooLargeError("x"))


def test_a_message_still_failing_at_the_flush_deadline_is_kept_for_the_next_flush(
        scripted: type[ScriptedProducer]) -> None:
    """Out of time before its retries ran out: the alert must stay in flight (the commit waits for it) and go at
    the next flush — dropped there, the next flush succeeded and the commit passed an alert never delivered."""
    scripted.script = ["retry", "retry"]
    sink = KafkaSink({}, retries=5)
    sink.send(OutMessage("alerts", b"dev-1", b"firing"))
    with pytest.raises(SinkBackpressure):
        sink.flush(0.0)
    assert sink.pending == 1
    with pytest.raises(SinkBackpressure):
        sink.flush(0.0)
    sink.flush(5.0)
    assert appended(sink) == [("alerts", b"dev-1", b"firing")] and sink.pending == 0


def test_a_message_that_keeps_failing_holds_the_flush_back_and_says_why(scripted: type[ScriptedProducer]) -> None:
    scripted.script = ["retry"] * 10
    sink = KafkaSink({}, retries=2)
    sink.send(OutMessage("alerts", b"dev-1", b"firing"))
    with pytest.raises(SinkBackpressure, match="leader moved"):
        sink.flush(5.0)
    assert sink.pending == 1


class ScriptedRdkafka:
    """The same script for librdkafka's producer: ``produce`` queues, ``flush`` serves the delivery reports
    (``slow``: no report at the first flush, a retriable error at the next)."""

    script: ClassVar[list[str]] = []

    def __init__(self, _conf: dict[str, Any]) -> None:
        self.queued: list[list[Any]] = []  # [outcome, message, on_delivery]
        self.log: list[tuple[str, bytes | None, bytes]] = []

    def produce(self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None,
                on_delivery: Any = None) -> None:
        self.queued.append([self.script.pop(0) if self.script else "ok", (topic, key, value), on_delivery])

    def poll(self, _timeout: float) -> int:
        return 0

    def flush(self, _timeout: float) -> int:
        from confluent_kafka import KafkaError

        left = []
        for item in self.queued:
            outcome, message, report = item
            if outcome == "slow":
                item[0] = "retry"
                left.append(item)
            elif outcome == "retry":
                report(KafkaError(KafkaError._MSG_TIMED_OUT), None)
            else:
                self.log.append(message)
                report(None, None)
        self.queued = left
        return len(left)

    def purge(self) -> None:
        self.queued = []


@pytest.fixture
def rdkafka(monkeypatch: pytest.MonkeyPatch) -> type[ScriptedRdkafka]:
    confluent_kafka = pytest.importorskip("confluent_kafka")
    monkeypatch.setattr(confluent_kafka, "Producer", ScriptedRdkafka)
    return ScriptedRdkafka


def test_the_librdkafka_sink_keeps_a_keys_last_message_its_newest(rdkafka: type[ScriptedRdkafka]) -> None:
    """ConfluentSink re-sent a failed message alone: its firing landed after its resolved (the delivery review
    reproduced it on a real broker: [warm, A-firing, B-resolved, A-firing]). The KafkaSink rules above, again."""
    from monitor.confluent import ConfluentSink

    rdkafka.script = ["retry", "ok", "retry", "ok", "ok"]
    sink = ConfluentSink({"bootstrap_servers": ["127.0.0.1:9"]})
    for topic, value in [("alerts", b"firing"), ("alerts", b"resolved"), ("state", b"doc 1"), ("state", b"doc 2")]:
        sink.send(OutMessage(topic, b"dev-1", value))
    sink.send(OutMessage("alerts", b"dev-2", b"other"))
    sink.flush(5.0)
    log = sink._producer.log
    for topic, older, newest in [("alerts", b"firing", b"resolved"), ("state", b"doc 1", b"doc 2")]:
        assert [v for t, k, v in log if (t, k) == (topic, b"dev-1")] == [newest, older, newest]
    assert [v for t, k, v in log if k == b"dev-2"] == [b"other"] and sink.pending == 0
    rdkafka.script = ["slow", "ok"]  # resolved acknowledged while firing still waits, then firing fails
    sink = ConfluentSink({"bootstrap_servers": ["127.0.0.1:9"]})
    sink.send(OutMessage("alerts", b"dev-1", b"firing"))
    sink.send(OutMessage("alerts", b"dev-1", b"resolved"))
    sink.flush(5.0)
    assert [v for _t, _k, v in sink._producer.log] == [b"resolved", b"firing", b"resolved"] and sink.pending == 0


def test_a_fatal_librdkafka_producer_is_replaced_not_raised(rdkafka: type[ScriptedRdkafka]) -> None:
    """The confluent review, on librdkafka's mock cluster: a fatal idempotent producer raised KafkaException out of
    send's poll(0) and flush (neither a BrokerError nor back-pressure: the daemon stopped), and its messages' errors
    carry the _FATAL code with fatal() false, so the producer was never replaced and every later flush failed."""
    from confluent_kafka import KafkaError, KafkaException

    from monitor.confluent import ConfluentSink

    made: list[Any] = []

    class FatalFirst(ScriptedRdkafka):
        def __init__(self, conf: dict[str, Any]) -> None:
            super().__init__(conf)
            made.append(self)
            self.fatal = len(made) == 1

        def poll(self, _timeout: float) -> int:
            if self.fatal and self.queued:
                raise KafkaException(KafkaError(KafkaError._FATAL, "out of order sequence", fatal=True))
            return 0

        def flush(self, timeout: float) -> int:
            if not self.fatal:
                return super().flush(timeout)
            for _outcome, _message, report in self.queued:
                report(KafkaError(KafkaError._FATAL), None)  # the code, fatal() false
            self.queued = []
            raise KafkaException(KafkaError(KafkaError._FATAL, fatal=True))

    import confluent_kafka

    confluent_kafka.Producer = FatalFirst  # type: ignore[misc]  # (the fixture restores it)
    sink = ConfluentSink({"bootstrap_servers": ["127.0.0.1:9"]})
    sink.send(OutMessage("alerts", b"dev-1", b"firing"))  # poll(0) raised here
    sink.flush(5.0)
    assert len(made) == 2 and made[1].log == [("alerts", b"dev-1", b"firing")] and sink.pending == 0


def test_a_message_given_up_while_a_flush_resends_it_is_not_waited_for(rdkafka: type[ScriptedRdkafka]) -> None:
    """The confluent review: a message first kept unsent (the queue was full) and refused for good when the flush
    sent it again was given up and counted, but stayed in the list as "open": every later flush failed (no commit,
    input paused until a restart)."""
    from confluent_kafka import KafkaError, KafkaException

    from monitor.confluent import ConfluentSink

    class FullThenRefusing(ScriptedRdkafka):
        full = True

        def produce(self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None,
                    on_delivery: Any = None) -> None:
            if value == b"first" and FullThenRefusing.full:
                FullThenRefusing.full = False
                raise BufferError("queue full")
            if value == b"huge":
                raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
            super().produce(topic, value, key, headers, on_delivery)

    import confluent_kafka

    confluent_kafka.Producer = FullThenRefusing  # type: ignore[misc]
    lost: list[str] = []
    sink = ConfluentSink({"bootstrap_servers": ["127.0.0.1:9"]}, on_undeliverable=lambda _m, why: lost.append(why))
    sink.send(OutMessage("dlq", b"a", b"first"))  # the queue is full: kept, and the next ones wait behind it
    sink.send(OutMessage("dlq", b"b", b"huge"))
    sink.flush(5.0)
    sink.flush(5.0)
    assert len(lost) == 1 and sink.pending == 0 and sink._producer.log == [("dlq", b"a", b"first")]


def test_both_clients_send_messages_up_to_the_same_size(rdkafka: type[ScriptedRdkafka]) -> None:
    """The confluent review, on the broker: a 1 010 000-byte message (a large document, the dead letter of a near
    1 MB input) was delivered by kafka-python and given up and paged by librdkafka (its limit 1 000 000 bytes)."""
    from kafka.producer.kafka import KafkaProducer

    from monitor.confluent import ConfluentSink

    sink = ConfluentSink({"bootstrap_servers": ["127.0.0.1:9"]})
    assert sink._conf["message.max.bytes"] == KafkaProducer.DEFAULT_CONFIG["max_request_size"] == 1_048_576


class StuckKeyProducer(ScriptedProducer):
    """``fail…`` values fail at once (retriable); every other message stays in flight (a partition not answering)."""

    def flush(self, timeout: float | None = None) -> None:
        for f in self.futures:
            if not f.is_done and f.message[2].startswith(b"fail"):  # type: ignore[attr-defined]
                f.is_done, f.exception = True, NotLeaderForPartitionError("leader moved")
        raise KafkaTimeoutError("flush timed out")


class StuckKeyRdkafka(ScriptedRdkafka):
    def flush(self, _timeout: float) -> int:
        from confluent_kafka import KafkaError

        left = []
        for item in self.queued:
            if item[1][2].startswith(b"fail"):
                item[2](KafkaError(KafkaError._MSG_TIMED_OUT), None)
            else:
                left.append(item)
        self.queued = left
        return len(left)


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_key_stuck_behind_a_failing_message_does_not_multiply_what_is_in_flight(
        client: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delivery review: a message still open behind a failed one of its key was kept and copied; every flush that
    failed again kept every open copy and copied it again — pending 17, 257, 4 097 … 1 048 577 after five flushes
    on librdkafka (6, 10, 14 … on kafka-python), the producer's queue as much. Its copy is what is waited for."""
    if client == "confluent":
        confluent_kafka = pytest.importorskip("confluent_kafka")
        monkeypatch.setattr(confluent_kafka, "Producer", StuckKeyRdkafka)
        from monitor.confluent import ConfluentSink

        sink: Any = ConfluentSink({"bootstrap_servers": ["127.0.0.1:9"]})
    else:
        monkeypatch.setattr(kafka, "KafkaProducer", StuckKeyProducer)
        sink = KafkaSink({}, retries=3)
    sink.send(OutMessage("state", b"dev-1", b"fail doc 1"))
    sink.send(OutMessage("state", b"dev-1", b"doc 2"))
    sizes = []
    for _ in range(5):
        with pytest.raises(SinkBackpressure):
            sink.flush(1.0)
        sizes.append(sink.pending)
    assert max(sizes) <= 2, sizes
