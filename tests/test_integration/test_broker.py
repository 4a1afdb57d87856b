"""The local broker is a real Kafka-protocol broker: kafka-python produces, consumes and commits on it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer

from monitor.broker import LocalBroker, free_port


def test_produce_consume_commit(broker, topic: str) -> None:
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=1, linger_ms=5)
    for i in range(200):
        producer.send(topic, key=f"s{i % 5}".encode(), value=str(i).encode())
    producer.flush(10)
    producer.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=broker.bootstrap, group_id=f"g-{topic}",
                             auto_offset_reset="earliest", enable_auto_commit=False,
                             session_timeout_ms=6000, heartbeat_interval_ms=1000, consumer_timeout_ms=8000)
    seen = set()
    for msg in consumer:
        seen.add(int(msg.value))
        if len(seen) == 200:
            break
    consumer.commit()
    consumer.close()
    assert seen == set(range(200))


def test_persistent_storage_survives_restart(tmp_path) -> None:
    port = free_port()
    with LocalBroker(port=port, data_dir=tmp_path / "data") as b:
        p = KafkaProducer(bootstrap_servers=b.bootstrap, acks=1)
        for i in range(20):
            p.send("persist", value=str(i).encode())
        p.flush(10)
        p.close()
    with LocalBroker(port=port, data_dir=tmp_path / "data") as b:
        c = KafkaConsumer("persist", bootstrap_servers=b.bootstrap, auto_offset_reset="earliest",
                          consumer_timeout_ms=5000)
        values = sorted(int(m.value) for m in c)
        c.close()
    assert values == list(range(20))


def test_broker_command_prints_address_and_stops_on_sigterm() -> None:
    """... with the topics it was asked for made before it says its address (tsmon run needs its input topic)."""
    from kafka.admin import KafkaAdminClient

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "monitor", "--log-format", "json", "broker", "--port", str(port),
                             "--topic", "sensors.raw:3", "--topic", "plain"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line == f"127.0.0.1:{port}"
        admin = KafkaAdminClient(bootstrap_servers=line)
        try:
            described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(["sensors.raw", "plain"])}
        finally:
            admin.close()
        assert described == {"sensors.raw": 3, "plain": 4}
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_an_interrupt_while_the_broker_starts_leaves_nothing_running(tmp_path, monkeypatch) -> None:
    """Found by review: SIGTERM (replay-eval raises SystemExit for it) or Ctrl-C while waiting for the new broker's
    port left it running for good: only a BrokerError stopped it, and the caller's __exit__ was never registered."""
    import monitor.broker as broker_module

    real = broker_module.wait_for_port
    for data_dir, nth in ((None, 1), (tmp_path / "data", 2)):  # with persistent storage its store's port comes first
        procs: list[subprocess.Popen[bytes]] = []  # what it waited for: the store's, then the broker's process

        def wait(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes], nth: int = nth,
                 procs: list[subprocess.Popen[bytes]] = procs) -> None:
            procs.append(proc)
            if len(procs) == nth:  # the broker's port: interrupted there
                raise SystemExit(143)
            real(host, port, timeout, proc)

        monkeypatch.setattr(broker_module, "wait_for_port", wait)
        try:
            with pytest.raises(SystemExit):
                LocalBroker(data_dir=data_dir).start()
            assert len(procs) == nth and all(p.poll() is not None for p in procs)  # broker (and store) stopped
        finally:
            monkeypatch.undo()
            for p in procs:  # a failing run leaves nothing behind either
                if p.poll() is None:
                    p.kill()
                    p.wait()


def test_tail_prints_a_topics_messages_as_json_lines(broker, topic: str, capsys) -> None:
    """Found by a new user's run: nothing in tsmon read its alerts or dead letters (a Kafka client of one's own)."""
    import json

    from monitor.cli import main

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    producer.send(topic, key=b"dev-1", value=b'{"type": "anomaly", "status": "firing"}', partition=0)
    producer.send(topic, key=b"dev-2", value=b"{not json", headers=[("tsmon.reason", b"invalid_json")], partition=1)
    producer.send(topic, key=b"dev-3", value=b"\xff\xfe", partition=2)
    now_ms = int(time.time() * 1000)
    producer.send(topic, key=b"late-1", value=b'{"n": 1}', partition=3, timestamp_ms=now_ms)
    producer.flush()  # one record a batch: Tansu's end offset of a multi-record batch is its first record's
    producer.send(topic, key=b"late-2", value=b"NaN", partition=3, timestamp_ms=now_ms - 60_000)  # stamped back
    producer.send(topic, key=b"huge", value=b'{"x": 1e400}', partition=0)  # past float range: inf
    producer.flush()
    producer.close()
    capsys.readouterr()

    def tail(*args: str) -> int:
        with pytest.raises(SystemExit) as done:
            main(["tail", "--bootstrap", broker.bootstrap, *args])
        return int(done.value.code or 0)

    assert tail("--topic", topic, "--from-beginning", "--max-messages", "6") == 0
    strict = {"parse_constant": lambda c: pytest.fail(f"{c} is not JSON")}
    lines = [json.loads(x, **strict) for x in capsys.readouterr().out.splitlines()]
    by_key = {d["key"]: d for d in lines}
    assert by_key["huge"]["value"] == '{"x": 1e400}'  # as text (printed as Infinity before)
    assert len(lines) == 6 and by_key["dev-1"]["value"] == {"type": "anomaly", "status": "firing"}
    assert [d["key"] for d in lines if d["partition"] == 3] == ["late-1", "late-2"]  # a partition in its own order
    assert by_key["late-2"]["value"] == "NaN"  # not JSON: as text
    lines = [d for d in lines if d["partition"] < 3 and d["key"] != "huge"]
    assert by_key["dev-2"]["value"] == "{not json" and by_key["dev-2"]["headers"] == {"tsmon.reason": "invalid_json"}
    assert by_key["dev-3"]["value"] == "base64://4="  # not UTF-8
    assert {d["partition"] for d in lines} == {0, 1, 2} and all(d["offset"] == 0 for d in lines)
    started = time.monotonic()
    assert tail("--topic", topic, "--idle", "1") == 0  # from the end: nothing new
    assert capsys.readouterr().out == "" and time.monotonic() - started < 15
    assert tail("--topic", "no-such-topic-here", "--idle", "1") == 1
    err = capsys.readouterr().err
    assert "BrokerError: topic 'no-such-topic-here' not found" in err and "did you mean" not in err
    assert tail("--topic", topic[:-1], "--idle", "1") == 1  # one letter short: the topic it most likely meant
    assert f"not found on {broker.bootstrap}; did you mean {topic!r}" in capsys.readouterr().err  # best first
    started = time.monotonic()  # in a process of its own: kafka-python leaves a failed bootstrap's sockets open
    wrong = subprocess.run([sys.executable, "-m", "monitor", "tail", "--bootstrap", f"127.0.0.1:{free_port()}",
                            "--topic", topic], capture_output=True, text=True, timeout=60, check=False)
    assert wrong.returncode == 1 and "BrokerError: cannot reach" in wrong.stderr
    assert time.monotonic() - started < 20  # (30 s of kafka-python's bootstrap wait before)


def test_tail_waits_for_a_tsmon_topic_not_created_yet(broker) -> None:
    """Found by review: on a fresh deployment the README's `tail --dead-letters --from-beginning --idle 5` failed
    (BrokerError: topic not found) — the dead-letter topic exists from the first bad record on. The configuration's
    own topics are waited for; a --topic given by name that is not there is still an error (above)."""
    topic = f"dead-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "TSMON_KAFKA__DEAD_LETTER_TOPIC": topic}
    cmd = [sys.executable, "-m", "monitor", "--log-format", "json", "tail", "--bootstrap", broker.bootstrap,
           "--dead-letters", "--from-beginning"]
    started = time.monotonic()
    idle = subprocess.run([*cmd, "--idle", "1"], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert idle.returncode == 0 and idle.stdout == "", idle.stderr
    assert '"topic_not_created_yet"' in idle.stderr and time.monotonic() - started < 30
    waiting = subprocess.Popen([*cmd, "--max-messages", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    try:
        time.sleep(3.0)  # it is waiting for the topic
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        producer.send(topic, value=b'{"reason": "invalid_json"}', headers=[("tsmon.reason", b"invalid_json")])
        producer.flush()
        producer.close()
        out, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == 0, err
    assert json.loads(out.splitlines()[0])["value"] == {"reason": "invalid_json"}


@pytest.mark.slow
def test_tail_says_when_its_broker_is_gone(tmp_path) -> None:
    """Found by review: with the broker gone its polls came back empty for ever — no end, or with --idle exit 0,
    cut-off output reported as done. It asks the broker whether it is there before it ends or every 10 s idle."""
    with LocalBroker() as b:
        producer = KafkaProducer(bootstrap_servers=b.bootstrap)
        producer.send("gone", value=b'{"n": 1}')
        producer.flush()
        producer.close()
        proc = subprocess.Popen([sys.executable, "-m", "monitor", "tail", "--bootstrap", b.bootstrap, "--topic", "gone",
                                 "--from-beginning", "--idle", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        # and one waiting for a tsmon topic not created yet (asked for on a thread: no metadata wait for ever)
        waiting = subprocess.Popen([sys.executable, "-m", "monitor", "tail", "--bootstrap", b.bootstrap,
                                    "--dead-letters", "--idle", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env={**os.environ, "TSMON_KAFKA__DEAD_LETTER_TOPIC": "never-made"})
        assert "topic_not_created_yet" in waiting.stderr.readline()  # it is waiting (the first line it logs)
        time.sleep(1.0)
        b.kill()
        out, err = proc.communicate(timeout=60)
        started = time.monotonic()
        _, waited = waiting.communicate(timeout=60)
    assert waiting.returncode == 1 and "BrokerError: lost" in waited and "waiting for topic 'never-made'" in waited
    assert time.monotonic() - started < 25  # not the 30 s idle
    assert proc.returncode == 1 and "BrokerError: lost" in err and err.strip().count("\n") == 0
    assert json.loads(out.splitlines()[0])["value"] == {"n": 1}  # what it read before


def test_a_taken_port_is_refused(broker) -> None:
    from models.errors import BrokerError

    with pytest.raises(BrokerError, match="in use"):
        LocalBroker(port=broker.port).start()


def test_the_sink_gives_up_a_message_the_broker_can_never_take(broker, topic: str) -> None:
    """A record over the producer's max_request_size would block every later commit if it were retried
    forever: it is given up (and reported), and what follows is delivered."""
    from monitor.sink import KafkaSink, OutMessage
    from monitor.topics import TopicReader

    lost: list[str] = []
    sink = KafkaSink({"bootstrap_servers": broker.bootstrap, "max_request_size": 100_000},
                     on_undeliverable=lambda m, why: lost.append(why))
    sink.send(OutMessage(topic, b"k", b"x" * 200_000))
    sink.send(OutMessage(topic, b"k", b'{"ok": 1}'))
    sink.flush(10)
    sink.close(5)
    assert len(lost) == 1 and "MessageSizeTooLarge" in lost[0]
    reader = TopicReader(broker.bootstrap, topic)
    try:
        t0 = time.monotonic()
        while not reader.docs and time.monotonic() - t0 < 15:
            time.sleep(0.1)
    finally:
        reader.close()
    assert reader.docs == [{"ok": 1}] and sink.pending == 0


def test_a_topic_reader_finds_a_topic_created_after_it_started(broker, topic: str) -> None:
    """A CI run of the broker-restart fault test read no episode at all: its reader started before the daemon's
    first alert created the topic, and once the reader's partitions_for_topic (for its end offsets) had found none,
    kafka-python looked for it again only after metadata_max_age_ms (5 min); 24 alerts went unread for 90 s.
    replay-eval and ``inspect --alert`` use it too."""
    from monitor.topics import TopicReader

    later = f"{topic}.later"
    reader = TopicReader(broker.bootstrap, later)
    try:
        time.sleep(1.5)  # the reader has asked for the topic and found none
        p = KafkaProducer(bootstrap_servers=broker.bootstrap)
        for i in range(3):
            p.send(later, json.dumps({"i": i}).encode())
        p.flush(), p.close()
        t0 = time.monotonic()
        while len(reader.docs) < 3 and time.monotonic() - t0 < 15:
            time.sleep(0.1)
    finally:
        reader.close()
    assert sorted(d["i"] for d in reader.docs) == [0, 1, 2]


def test_the_newest_messages_are_searched_first_and_a_search_cut_short_says_so(broker, topic: str) -> None:
    """An on-call pass: ``inspect --alert ID`` read the alerts topic from its beginning into memory, and on one of
    2.2 million messages said "not found" after 20 s (1.7 GB), the alert at its end. The newest chunk is read first."""
    from monitor import topics
    from monitor.topics import search_newest

    # a record a batch: Tansu gives a multi-record batch's end offset as its first record's (the newest chunk then
    # reads on past it, by as many as the last batches held)
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, batch_size=1, linger_ms=0)

    def send(doc: dict, key: bytes) -> None:
        p.send(topic, key=key, value=json.dumps(doc).encode())

    send({"alert_id": "old", "explain": {}}, b"dev-0")
    for i in range(6000):
        send({"alert_id": f"filler-{i}", "n": i}, f"dev-{i % 7}".encode())
    send({"alert_id": "new", "revision": 0}, b"dev-1")
    send({"alert_id": "new", "revision": 1, "explain": {}}, b"dev-1")
    p.flush(), p.close()
    client = {"bootstrap_servers": broker.bootstrap}
    pictured = lambda docs: any("explain" in d for d in docs)
    found, read, ended = search_newest(client, topic, b'"new"', pictured, limit_s=30, chunk=500)
    assert ended and [d["revision"] for d in found] == [0, 1]
    assert read <= 2000, read  # a few chunks (500 shared by 4 partitions, doubling), not the 6003 messages
    found, read, ended = search_newest(client, topic, b'"old"', pictured, limit_s=30, chunk=500)
    assert ended and [d["alert_id"] for d in found] == ["old"]  # back to its partition's beginning
    found, read, ended = search_newest(client, topic, b'"none"', pictured, limit_s=30, chunk=500)
    assert ended and found == [] and read == 6003  # the whole topic, once
    with pytest.MonkeyPatch.context() as small:  # chunks of 50 a partition: each round at least a poll, 30 rounds
        small.setattr(topics, "SEARCH_CHUNK_MAX", 50)
        found, read, ended = search_newest(client, topic, b'"old"', pictured, limit_s=2.0, chunk=200)
    assert not ended and found == [] and read < 6003  # out of time: said, not "not found"
    # a live topic is never quiet: the newest chunk was read until the time limit, and "new" said not found
    stop, live = threading.Event(), KafkaProducer(bootstrap_servers=broker.bootstrap)

    def write() -> None:
        while not stop.wait(0.05):
            live.send(topic, key=b"dev-9", value=b'{"alert_id": "live"}')

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        t0 = time.monotonic()
        found, read, ended = search_newest(client, topic, b'"new"', pictured, limit_s=30, chunk=500)
        assert ended and [d["revision"] for d in found] == [0, 1] and time.monotonic() - t0 < 10
        # and past the newest chunk (a review: it never left it while the topic was written)
        found, read, ended = search_newest(client, topic, b'"old"', pictured, limit_s=30, chunk=500)
        assert ended and [d["alert_id"] for d in found] == ["old"]
    finally:
        stop.set()
        writer.join(5)
        live.close()


def test_the_search_reads_on_while_a_chunk_holds_the_alert(broker, topic: str) -> None:
    """A review: the search stopped at the first chunk with a picture, and a repeat of the page there (revision 0)
    was drawn where the update (revision 2) lay just before the chunk. It reads back until a chunk holds none."""
    from monitor.commands.model_cmds import latest_picture
    from monitor.topics import search_newest

    p = KafkaProducer(bootstrap_servers=broker.bootstrap, batch_size=1, linger_ms=0)
    def send(doc: dict) -> None:
        p.send(topic, key=b"dev-1", value=json.dumps(doc).encode())

    send({"alert_id": "a1", "revision": 0, "explain": {"w": 0}})
    send({"alert_id": "a1", "revision": 2, "explain": {"w": 2}})
    for i in range(140):  # past the first chunk: 500 shared by 4 partitions, 125 each
        send({"alert_id": f"f-{i}"})
    send({"alert_id": "a1", "revision": 0, "explain": {"w": 0}})
    p.flush(), p.close()
    found, _, ended = search_newest({"bootstrap_servers": broker.bootstrap}, topic, b'"a1"',
                                    lambda d: any(isinstance(x.get("explain"), dict) for x in d), limit_s=20, chunk=500)
    assert ended and latest_picture(found)["revision"] == 2, found


def test_inspect_draws_an_alert_looked_up_by_its_id_at_the_end_of_a_long_topic(broker, topic: str, stream_model,
                                                                               tmp_path, capsys) -> None:
    """The runbook's first step, end to end: the alert just paged, behind thousands of messages, is found by its id."""
    from models import artifact
    from monitor.cli import main
    from tests.test_monitor.test_explain import firing_alert

    doc = firing_alert(artifact.load(stream_model, "cpu"))
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=20)
    for i in range(3000):
        p.send(topic, key=f"dev-{i % 7}".encode(), value=json.dumps({"alert_id": f"filler-{i}"}).encode())
    p.send(topic, key=b"plant-1", value=json.dumps(doc).encode())
    p.flush(), p.close()
    (tmp_path / "tsmon.toml").write_text(f'[kafka]\nbootstrap_servers = "{broker.bootstrap}"\nalerts_topic = "{topic}"\n')
    out = tmp_path / "alert.png"
    with pytest.raises(SystemExit) as done:
        main(["--log-format", "json", "inspect", "--alert", doc["alert_id"], "--config", str(tmp_path / "tsmon.toml"),
              "--out", str(out)])
    assert done.value.code in (0, None) and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", capsys.readouterr().err


@pytest.mark.parametrize("where", ["end_offsets", "position", "poll"])
def test_a_broker_error_while_reading_the_changelog_is_a_broker_error(broker, topic: str, monkeypatch,
                                                                      where: str) -> None:
    """Read inside a rebalance callback, a kafka-python error escaped poll() and stopped the daemon; the
    daemon catches tsmon's own errors there (state_restore_failed) and goes on."""
    from kafka.errors import KafkaTimeoutError

    from models.errors import BrokerError
    from monitor.state import ChangelogReader

    p = KafkaProducer(bootstrap_servers=broker.bootstrap)
    p.send(topic, key=b"dev-a", value=b'{"type": "stream_state"}')
    p.flush(), p.close()

    def fail(*_a, **_k):
        raise KafkaTimeoutError("Failed to get offsets by timestamps in 1.0 secs")

    monkeypatch.setattr(KafkaConsumer, where, fail)
    with pytest.raises(BrokerError, match=f"cannot read .*{topic}: KafkaTimeoutError"):
        reader = ChangelogReader({"bootstrap_servers": broker.bootstrap}, topic, timeout_s=5)
        reader.step(1.0)


def test_a_changelog_topic_without_partitions_reads_as_empty(broker) -> None:
    """A broker that lost its topics (an in-memory one restarted) has no changelog partition: seeking none
    raised a ValueError out of the restore, and the daemon stopped with a traceback."""
    import uuid

    from monitor.state import ChangelogReader

    reader = ChangelogReader({"bootstrap_servers": broker.bootstrap}, f"absent-{uuid.uuid4().hex[:8]}", timeout_s=5)
    assert reader.step(0.1)  # nothing more to read
    log_ = reader.close()
    # but not "read to its end, nothing there": taken for that, the group's daemon-wide document (a freeze --all,
    # the command ids) was overwritten with this instance's defaults
    assert not log_.complete and log_.records == 0 and log_.docs == {}


def test_a_paused_partition_reports_the_lag_that_builds_up_behind_it(broker, topic: str) -> None:
    """A paused partition is not fetched, so its high watermark froze: an instance that stopped consuming while
    caught up reported lag 0 for as long as the pause lasted, and the lag alerts could never fire."""
    from monitor.config import load_config
    from monitor.source import KafkaSource

    cfg = load_config(None, {"kafka.bootstrap_servers": broker.bootstrap, "kafka.group_id": f"g-{topic}",
                             "kafka.session_timeout_ms": 2000, "kafka.heartbeat_interval_ms": 500}, env={})
    src = KafkaSource(cfg.kafka.consumer_kwargs(), [topic], None, lambda _tps: None, lambda _tps: None)
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=1)
    try:
        deadline = time.monotonic() + 30
        while not src.assignment() and time.monotonic() < deadline:
            src.poll(100)
        p.send(topic, b"x", partition=0), p.flush()
        got = [r for _ in range(30) for r in src.poll(100)]
        assert len(got) == 1 and src.lags()[(topic, 0)] == 0  # caught up
        src.pause(src.assignment())
        for i in range(90):  # one record a batch: Tansu's end offsets are right for those
            p.send(topic, b"%d" % i, partition=0), p.flush()
        assert not src.poll(200)
        assert src.lags()[(topic, 0)] == 90
    finally:
        p.close()
        src.close(5)


def test_the_changelog_is_read_in_steps_to_its_end(broker, topic: str) -> None:
    from monitor.state import ChangelogReader

    p = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for i in range(2000):
        p.send(topic, key=f"dev-{i % 500}".encode(), value=f'{{"n": {i}}}'.encode())
    p.flush(), p.close()
    reader = ChangelogReader({"bootstrap_servers": broker.bootstrap}, topic, timeout_s=20)
    steps = 0
    while not reader.step(0.01) and steps < 2000:
        steps += 1
    log_ = reader.close()
    assert log_.complete and log_.records == 2000  # how many steps it took is the machine's business
    assert len(log_.docs) == 500 and log_.docs["dev-7"] == {"n": 1507}  # the latest document per key


def test_a_topic_pattern_takes_up_new_topics_while_records_flow_at_the_daemons_poll_timeouts(broker) -> None:
    """A pipeline owner's pass: with kafka-python's own pattern subscription, a topic created while the daemon ran
    revoked every partition and, at the loop's polls of 100 ms or less, the rejoin never completed: all input
    stopped, old topics too, until a restart. The source follows the pattern itself: a topic matching it from the
    start, one created while records flow, and none matching at first are all taken up."""
    from kafka.admin import KafkaAdminClient, NewTopic

    from monitor.source import KafkaSource

    prefix = f"p{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10_000)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=1, linger_ms=0)
    kwargs = {"bootstrap_servers": broker.bootstrap, "group_id": f"g-{prefix}", "auto_offset_reset": "earliest",
              "session_timeout_ms": 2000, "heartbeat_interval_ms": 500, "max_poll_interval_ms": 300000,
              "fetch_max_wait_ms": 100, "metadata_max_age_ms": 2000, "enable_auto_commit": False}
    events: list[str] = []
    sources = []
    try:
        admin.create_topics([NewTopic(f"{prefix}.a", 2, 1)])
        src = KafkaSource(kwargs, [], rf"{prefix}\.(a|b)", on_revoke=lambda tps: events.append("revoke"),
                          on_assign=lambda tps: events.append("assign"))
        late = KafkaSource({**kwargs, "group_id": f"g2-{prefix}"}, [], rf"{prefix}\.c", lambda tps: None,
                           lambda tps: None)  # nothing matches it yet
        sources += [src, late]
        seen: set[str] = set()

        def poll_until(done, seconds: float = 30.0) -> None:
            deadline, n = time.monotonic() + seconds, 0
            while time.monotonic() < deadline and not done():
                producer.send(f"{prefix}.a", key=b"k", value=f"a{n}".encode())  # records flow meanwhile
                n += 1
                for s in sources:
                    seen.update(r.value.decode() for r in s.poll(100))

        poll_until(lambda: len(src.assignment()) == 2 and any(v.startswith("a") for v in seen))
        assert src.assignment() == {(f"{prefix}.a", 0), (f"{prefix}.a", 1)}
        admin.create_topics([NewTopic(f"{prefix}.b", 2, 1), NewTopic(f"{prefix}.c", 1, 1)])
        producer.send(f"{prefix}.b", value=b"b0")
        producer.send(f"{prefix}.c", value=b"c0")
        producer.flush(10)
        poll_until(lambda: len(src.assignment()) == 4 and {"b0", "c0"} <= seen)
        assert len(src.assignment()) == 4 and late.assignment() == {(f"{prefix}.c", 0)}, (events, seen - {"b0"})
        assert {"b0", "c0"} <= seen and events[-1] == "assign"
    finally:
        for s in sources:
            s.close(2)
        producer.close()
        admin.close()


@pytest.mark.parametrize("strategy", ["range", "roundrobin", "sticky", "range+sticky"])
def test_the_partition_assignment_strategy_shares_several_topics(broker, strategy: str) -> None:
    """A scale-out review: with several input topics the range assignor gives each topic's partitions to the first
    instances (two topics of one partition each: one instance gets both, the other nothing); roundrobin and sticky
    share them across topics (kafka.partition_assignment). Changed on one instance only, the group keeps range (the
    other offered alone, the newcomer had no protocol in common with the group)."""
    from kafka.admin import KafkaAdminClient, NewTopic

    from monitor.config import load_config
    from monitor.source import KafkaSource

    prefix = f"s{uuid.uuid4().hex[:8]}"
    topics = [f"{prefix}.a", f"{prefix}.b"]
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10_000)
    admin.create_topics([NewTopic(t, 1, 1) for t in topics])
    admin.close()
    cfgs = [load_config(None, {"kafka.bootstrap_servers": broker.bootstrap, "kafka.group_id": f"g-{prefix}",
                               "kafka.topics": topics, "kafka.session_timeout_ms": 2000,
                               "kafka.heartbeat_interval_ms": 500, "kafka.partition_assignment": one}, env={})
            for one in (strategy.split("+") * 2)[:2]]
    sources = [KafkaSource(cfg.kafka.consumer_kwargs(), topics, None, lambda _t: None, lambda _t: None) for cfg in cfgs]
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for s in sources:
                s.poll(100)
            held = [s.assignment() for s in sources]
            if sum(map(len, held)) == 2 and not any(s._rejoining for s in sources):
                break
        assert sum(map(len, held)) == 2, held
        assert sorted(map(len, held)) == ([0, 2] if strategy.startswith("range") else [1, 1]), held
    finally:
        for s in sources:
            s.close(2)
