"""The optional confluent-kafka (librdkafka) backend on the real broker: the same alerts, dead letters and
commits as the default kafka-python client on the same input, and pause/resume that hold input back."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from monitor.confluent import ConfluentSource, available, rdkafka_config
from monitor.topics import TopicReader
from tests.conftest import sine_stream
from tests.test_integration.test_pipeline import BURSTS, config, firing, produce, run_until_samples

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not available(), reason="confluent-kafka not installed (pip install 'tsmon[confluent]')")]


def test_settings_translate_to_librdkafka_properties() -> None:
    from monitor.config import load_config

    cfg = load_config(None, {"kafka.bootstrap_servers": "a:9092,b:9092", "kafka.security_protocol": "SASL_SSL",
                             "kafka.sasl_mechanism": "SCRAM-SHA-512", "kafka.sasl_username": "u",
                             "kafka.sasl_password": "p", "kafka.ssl_check_hostname": False,
                             "kafka.fetch_max_wait_ms": 20}, env={})
    c = rdkafka_config(cfg.kafka.consumer_kwargs())
    assert c["bootstrap.servers"] == "a:9092,b:9092" and c["group.id"] == "tsmon" and c["fetch.wait.max.ms"] == 20
    assert (c["sasl.mechanism"], c["sasl.username"], c["sasl.password"]) == ("SCRAM-SHA-512", "u", "p")
    assert c["ssl.endpoint.identification.algorithm"] == "none" and c["enable.auto.commit"] is False
    p = rdkafka_config(cfg.kafka.producer_kwargs())
    assert p["acks"] == "all" and p["enable.idempotence"] is False and "max_block_ms" not in p


def raw_values(bootstrap: str, topic: str) -> list[bytes]:
    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=3000)
    try:
        return [m.value for m in c]
    finally:
        c.close()


def committed(bootstrap: str, topic: str, group: str) -> list[int | None]:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return [c.committed(TopicPartition(topic, p)) for p in range(4)]
    finally:
        c.close()


def test_confluent_gives_the_alerts_dead_letters_and_commits_of_kafka_python(broker: Any, topic: str,
                                                                               stream_model: Path) -> None:
    streams = {"dev-anom": sine_stream(4000, BURSTS, seed=2), "dev-clean": sine_stream(4000, seed=3)}
    produce(broker.bootstrap, topic, streams, extra=[(b"dev-anom", b"{oops")], extra_after=20)
    out: dict[str, Any] = {}
    for client in ("kafka-python", "confluent"):
        cfg = config(broker, topic, stream_model, **{
            "kafka.client": client, "kafka.group_id": f"g-{topic}-{client}", "daemon.scoring": "thread",
            "kafka.alerts_topic": f"{topic}.{client}.alerts", "kafka.dead_letter_topic": f"{topic}.{client}.dlq",
            "state.topic": f"{topic}.{client}.state"})  # each run its own changelog: no state carried over
        d = run_until_samples(cfg, 8000)
        docs = TopicReader(broker.bootstrap, cfg.kafka.alerts_topic).settle()
        dead = raw_values(broker.bootstrap, cfg.kafka.dead_letter_topic)
        out[client] = (sorted((a["alert_id"], a["status"]) for a in docs if a.get("type") == "anomaly"),
                       dead, committed(broker.bootstrap, topic, cfg.kafka.group_id),
                       d.metrics.total("tsmon_windows_scored_total"), len(firing(docs)))
    assert out["confluent"] == out["kafka-python"]
    alerts, dead, offsets, _windows, fired = out["confluent"]
    assert fired == 2 and len(alerts) == 4 and dead == [b"{oops"]  # two bursts fire and resolve; one bad message
    assert sum(o or 0 for o in offsets) > 0  # committed (the two keys share at most two of the four partitions)


def test_pause_holds_a_partition_back_and_resume_releases_it(broker: Any, topic: str) -> None:
    assigned: list[list[tuple[str, int]]] = []
    revoked: list[str] = []
    src = ConfluentSource(consumer_kwargs(broker.bootstrap, f"g-{topic}"), [topic], None,
                          lambda _tps: revoked.append(threading.current_thread().name), assigned.append)
    try:
        got, deadline = [], time.monotonic() + 30
        while not src.assignment() and time.monotonic() < deadline:
            got += src.poll(100)
        src.pause({(topic, 0)})
        # the records are written once partition 0 is paused: written before, the first fetch could bring them all
        # while the group was still being joined, and nothing was left to show the pause (a CI run failed so)
        p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=1)
        for i in range(400):
            p.send(topic, key=b"k", value=b"%d" % i, partition=i % 4)
        p.flush(), p.close()
        paused, deadline = [], time.monotonic() + 15
        while len(paused) < 300 and time.monotonic() < deadline:
            paused += src.poll(100)
        paused += [r for _ in range(10) for r in src.poll(100)]  # a second more: partition 0 stays held
        assert paused and {r.partition for r in paused} <= {1, 2, 3}  # partition 0 is held back
        src.resume({(topic, 0)})
        resumed = [r for _ in range(30) for r in src.poll(100)]
        every = got + paused + resumed
        assert sorted(r.offset for r in every if r.partition == 0) == list(range(100))  # all of it, once
        assert len(every) == 400 and [sorted(a) for a in assigned] == [[(topic, p) for p in range(4)]]
        assert src.broker_problem() is None and set(src.lags()) <= src.assignment()
    finally:
        src.close(5)
    # close() leaves the group on a thread of its own; the revoke it triggers ran the daemon's revoke there,
    # which could outlive close() and race the sink's and scorer's close: it only unassigns now
    assert revoked == []


def test_a_batch_failing_its_crc_holds_its_partition_and_one_paused_at_once_has_a_lag(
        broker: Any, topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """librdkafka does not check CRCs by default: a batch whose payload changed was delivered as valid. Checked, its
    error was only a warning per message while the partition stalled, /readyz 200. It is now PartitionUnreadable,
    naming the partition (held and retried by the daemon, as with kafka-python). And a partition paused from its
    assignment on (a restore, a failing sink) had no lag: librdkafka knows no position for it."""
    import kafka.record.default_records as batches

    from models.errors import PartitionUnreadable

    real = batches.DefaultRecordBatchBuilder.build

    def damaged(self: Any) -> Any:
        buf = real(self)
        if (i := bytes(buf).find(b"bad1")) >= 0:
            buf[i : i + 3] = b"BAD"  # the payload changed, its CRC as it was
        return buf

    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=1, linger_ms=0)
    for i in range(10):
        p.send(topic, value=b"good%d" % i, partition=0).get(5)
    monkeypatch.setattr(batches.DefaultRecordBatchBuilder, "build", damaged)
    p.send(topic, value=b"bad1", partition=0).get(5)
    monkeypatch.setattr(batches.DefaultRecordBatchBuilder, "build", real)
    for i in range(10):
        p.send(topic, value=b"after%d" % i, partition=0).get(5)
    for _ in range(30):
        p.send(topic, value=b"x", partition=1).get(5)
    p.close()
    holder: list[ConfluentSource] = []
    src = ConfluentSource(consumer_kwargs(broker.bootstrap, f"g-{topic}"), [topic], None, lambda _tps: None,
                          lambda tps: holder[0].pause({tp for tp in tps if tp[1] == 1}))
    holder.append(src)
    got: list[Any] = []
    bad: list[PartitionUnreadable] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (bad and len(got) >= 10 and (topic, 1) in src.lags()):
            try:
                got += src.poll(100)
            except PartitionUnreadable as exc:
                bad.append(exc)
        assert [r.value for r in got if r.partition == 0] == [b"good%d" % i for i in range(10)]  # nothing skipped
        assert bad and bad[0].tp == (topic, 0) and "CRC" in str(bad[0])
        assert src.lags()[(topic, 1)] == 30 and not [r for r in got if r.partition == 1]
    finally:
        src.close(5)


def test_librdkafka_log_lines_go_through_tsmons_log(capfd: pytest.CaptureFixture[str]) -> None:
    """librdkafka wrote its own lines (``%3|…|FAIL|… Connect to … failed``) to stderr as plain text, amid the JSON
    log lines of a production daemon: they come through tsmon's log as ``kafka_client_log``."""
    import socket

    from models.errors import SinkBackpressure
    from monitor.confluent import ConfluentSink
    from monitor.sink import OutMessage

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = ConfluentSink({"bootstrap_servers": [f"127.0.0.1:{port}"]})
    sink.send(OutMessage("t", b"k", b"v", []))
    with pytest.raises(SinkBackpressure):
        sink.flush(2.0)
    with contextlib.suppress(SinkBackpressure):
        sink.close(0.1)
    seen = capfd.readouterr()
    assert "kafka_client_log" in seen.out + seen.err
    assert not [line for line in seen.err.splitlines() if line.startswith("%")]  # librdkafka's own format


def test_records_after_a_bad_batch_are_read_again_from_it_not_taken_past_it() -> None:
    """librdkafka goes on with the next batch after one that failed its CRC: where a fetch brings several (a real
    Kafka broker), the records after the bad batch came in the same poll and were taken, moving the position past
    the bad one — lost, while the log said nothing was skipped. They are left, and the partition is positioned
    back on the bad batch for its retry; the other partitions' records are taken."""
    from confluent_kafka import KafkaError

    from models.errors import PartitionUnreadable

    class Message:
        def __init__(self, partition: int, offset: int, error: KafkaError | None = None) -> None:
            self.p, self.o, self.e = partition, offset, error

        def error(self) -> KafkaError | None:
            return self.e

        def topic(self) -> str:
            return "t"

        def partition(self) -> int:
            return self.p

        def offset(self) -> int:
            return self.o

        def key(self) -> bytes:
            return b"k"

        def value(self) -> bytes:
            return b"v"

        def timestamp(self) -> tuple[int, int]:
            return (1, 1_700_000_000_000)

        def headers(self) -> None:  # librdkafka's, for a message without any
            return None

    class Consumer:
        sought: ClassVar[list[tuple[str, int, int]]] = []

        def consume(self, num_messages: int, timeout: float) -> list[Message]:
            return [Message(0, 0), Message(0, 1, KafkaError(KafkaError._BAD_MSG)), Message(0, 2), Message(1, 7),
                    Message(2, 4, KafkaError(KafkaError._BAD_MSG))]

        def assignment(self) -> list[TopicPartition]:
            return [TopicPartition("t", p) for p in range(3)]

        def seek(self, tp: Any) -> None:
            self.sought.append((tp.topic, tp.partition, tp.offset))

    src = ConfluentSource.__new__(ConfluentSource)
    src._consumer, src._max, src._bad, src._callback_error = Consumer(), 10, {}, None
    assert [(r.partition, r.offset) for r in src.poll(0)] == [(0, 0), (1, 7)]
    assert Consumer.sought == [("t", 0, 1), ("t", 2, 4)]
    raised = []
    for _ in range(2):  # one a poll: each raise pauses its partition in the daemon
        with pytest.raises(PartitionUnreadable) as bad:
            src.poll(0)
        raised.append(bad.value.tp)
    assert raised == [("t", 0), ("t", 2)]


def consumer_kwargs(bootstrap: str, group: str) -> dict[str, Any]:
    from monitor.config import load_config

    cfg = load_config(None, {"kafka.bootstrap_servers": bootstrap, "kafka.group_id": group,
                             "kafka.session_timeout_ms": 2000, "kafka.heartbeat_interval_ms": 500}, env={})
    return cfg.kafka.consumer_kwargs()


def test_the_sink_gives_up_only_on_what_can_never_be_delivered(broker: Any, topic: str) -> None:
    from confluent_kafka import KafkaError

    from monitor.config import load_config
    from monitor.confluent import ConfluentSink, _never_deliverable
    from monitor.sink import OutMessage

    assert _never_deliverable(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    for code in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT):
        assert not _never_deliverable(KafkaError(code))  # kept and sent again, as kafka-python does
    given_up: list[str] = []
    cfg = load_config(None, {"kafka.bootstrap_servers": broker.bootstrap}, env={})
    sink = ConfluentSink(cfg.kafka.producer_kwargs(), on_undeliverable=lambda m, why: given_up.append(m.topic))
    try:
        sink.send(OutMessage(topic, b"k", b"x" * (2 << 20), []))  # over librdkafka's 1 MB message.max.bytes
        sink.send(OutMessage(topic, b"k", b"fine", []))
        sink.flush(10)
        assert given_up == [topic] and sink.pending == 0
        assert raw_values(broker.bootstrap, topic) == [b"fine"]
    finally:
        sink.close(5)


def test_partitions_lost_to_a_frozen_broker_do_not_block_the_loop() -> None:
    """The broker hangs with its connections open (SIGSTOP): at the session timeout librdkafka hands the
    partitions back as lost, inside poll, and the daemon's revoke commits — synchronously, with no timeout:
    poll blocked until the broker answered again (43 s of a 45 s freeze in the review's run). A lost
    partition is not committed (the commit fails at once); its next owner replays from the last commit."""
    import signal

    from models.errors import BrokerError
    from tests.test_integration.test_faults import create_topic, own_broker

    with own_broker() as broker:
        assert broker.proc is not None
        topic = "t-lost"
        create_topic(broker.bootstrap, topic)
        p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=1)
        for i in range(40):
            p.send(topic, key=b"k", value=b"%d" % i, partition=i % 4)
        p.flush(), p.close()
        outcome: list[str] = []

        def revoke(tps: list[tuple[str, int]]) -> None:
            try:
                src.commit(dict.fromkeys(tps, 1), 0.5)
                outcome.append("committed")
            except BrokerError as exc:
                outcome.append(str(exc))

        src = ConfluentSource(consumer_kwargs(broker.bootstrap, "g-lost"), [topic], None, revoke, lambda _tps: None)
        try:
            got, deadline = 0, time.monotonic() + 30
            while got < 40 and time.monotonic() < deadline:
                got += len(src.poll(100))
            assert got == 40
            broker.proc.send_signal(signal.SIGSTOP)
            try:
                slowest, end = 0.0, time.monotonic() + 8  # session timeout 2 s
                while not outcome and time.monotonic() < end:
                    t0 = time.monotonic()
                    src.poll(100)
                    slowest = max(slowest, time.monotonic() - t0)
            finally:
                broker.proc.send_signal(signal.SIGCONT)
            assert outcome and "lost" in outcome[0] and slowest < 2.0, (outcome, slowest)
        finally:
            src.close(5)


def test_a_frozen_broker_is_a_broker_problem_for_the_librdkafka_source() -> None:
    """Its statistics said nothing about a broker that hangs with its connections open (state UP): broker_problem()
    stayed None for a 20 s freeze, so tsmon_broker_up stayed 1. The coordinator's silence with a request waiting
    in a steady group now counts, and clears when it answers again."""
    import signal

    from tests.test_integration.test_faults import create_topic, own_broker

    with own_broker() as broker:
        assert broker.proc is not None
        create_topic(broker.bootstrap, "t-hang")
        kwargs = {**consumer_kwargs(broker.bootstrap, "g-hang"), "session_timeout_ms": 6000}
        src = ConfluentSource(kwargs, ["t-hang"], None, lambda _tps: None, lambda _tps: None)
        try:
            deadline = time.monotonic() + 30
            while not src.assignment() and time.monotonic() < deadline:
                src.poll(100)
            for _ in range(15):
                src.poll(100)
            assert src.broker_problem() is None
            broker.proc.send_signal(signal.SIGSTOP)
            try:
                seen, end = None, time.monotonic() + 5.5  # half the session timeout, plus statistics every second
                while seen is None and time.monotonic() < end:
                    src.poll(100)
                    seen = src.broker_problem()
            finally:
                broker.proc.send_signal(signal.SIGCONT)
            assert seen is not None and seen.startswith("broker not answering"), seen
            end = time.monotonic() + 10
            while src.broker_problem() is not None and time.monotonic() < end:
                src.poll(100)
            assert src.broker_problem() is None
        finally:
            src.close(5)
