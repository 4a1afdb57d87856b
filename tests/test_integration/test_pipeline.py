"""The daemon end to end on the real broker: alerts, dead letters, restarts, calibration, shutdown commits.

Every test gets fresh uuid topics and its own consumer group; the daemon runs in-process (its loop on the
test's thread) against the session broker, exactly as `tsmon run` wires it.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from monitor.config import Config, load_config
from monitor.daemon import Daemon
from monitor.replay import messages
from monitor.topics import TopicReader, ensure_topics
from tests.conftest import STREAM_HOP, STREAM_PERIOD_MS, STREAM_WINDOW, sine_stream

pytestmark = pytest.mark.timeout(120)
BURSTS = (1500, 3000)


def produce(bootstrap: str, topic: str, streams: dict[str, tuple[np.ndarray, np.ndarray]], chunk: int = STREAM_HOP,
            extra: list[tuple[bytes, bytes]] | None = None, extra_after: int = 50, **producer: Any) -> int:
    """Send streams interleaved message by message (``extra`` raw messages after ``extra_after`` rounds)."""
    p = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5, **producer)
    bodies = {s: [b for b, _ in messages(s, ts, v, chunk)] for s, (ts, v) in streams.items()}
    sent = 0
    for i in range(max(map(len, bodies.values()))):
        for s, b in bodies.items():
            if i < len(b):
                p.send(topic, key=s.encode(), value=b[i])
                sent += 1
        if i == extra_after:
            for key, value in extra or []:
                p.send(topic, key=key, value=value)
    p.flush()
    p.close()
    return sent


def config(broker: Any, topic: str, model: Path, **overrides: Any) -> Config:
    base = {"kafka.bootstrap_servers": broker.bootstrap, "kafka.topics": [topic], "kafka.group_id": f"g-{topic}",
            "kafka.alerts_topic": f"{topic}.alerts", "kafka.dead_letter_topic": f"{topic}.dlq",
            "kafka.session_timeout_ms": 2000, "kafka.heartbeat_interval_ms": 500, "daemon.commit_interval_ms": 200,
            "daemon.device": "cpu", "calibrator.enabled": False, "models": [{"pattern": "*", "path": str(model)}],
            "control.topic": f"{topic}.control", "control.audit_topic": f"{topic}.audit",
            "state.topic": f"{topic}.state", "http.port": 0}
    return load_config(None, {**base, **overrides}, env={})


def run_until_samples(cfg: Config, samples: int, limit_s: float = 60, linger_s: float = 0.0, **kw: Any) -> Daemon:
    """Run a daemon until it has taken ``samples`` samples and scored them (then ``linger_s`` more)."""
    d = Daemon(cfg, **kw)
    t0, done = time.monotonic(), []

    def until() -> bool:
        if not done and d.caught_up(samples):
            done.append(time.monotonic())
        return (bool(done) and time.monotonic() - done[0] >= linger_s) or time.monotonic() - t0 > limit_s

    d.run(until=until)
    assert d.metrics.total("tsmon_samples_total") >= samples, "daemon did not consume everything in time"
    return d


def firing(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [a for a in docs if a.get("type") == "anomaly" and a["status"] == "firing"]


@pytest.mark.parametrize("scoring", ["process", "thread"])
def test_labelled_bursts_alert_and_a_clean_stream_does_not(broker: Any, topic: str, stream_model: Path,
                                                           scoring: str) -> None:
    streams = {"dev-anom": sine_stream(4000, BURSTS, seed=2), "dev-clean": sine_stream(4000, seed=3)}
    produce(broker.bootstrap, topic, streams)
    cfg = config(broker, topic, stream_model, **{"daemon.scoring": scoring})
    run_until_samples(cfg, 8000)
    docs = TopicReader(broker.bootstrap, cfg.kafka.alerts_topic).settle()
    fired = firing(docs)
    assert {a["stream"] for a in docs if a.get("type") == "anomaly"} == {"dev-anom"}
    assert len(fired) == 2
    ts = streams["dev-anom"][0]
    for a, burst in zip(sorted(fired, key=lambda a: a["start_ts"]), BURSTS, strict=True):
        assert ts[burst] - STREAM_WINDOW * STREAM_PERIOD_MS <= a["start_ts"] <= ts[burst + 29]
        assert a["fired_ts"] <= ts[burst + 29] + 2 * STREAM_HOP * STREAM_PERIOD_MS  # within for=2 windows
        assert a["top_channels"][0]["channel"] == "ch0" and a["threshold_source"] == "artifact"
        assert a["model"]["name"] == "sine-pca" and len(a["model"]["version"]) == 12
        assert a["source"]["topic"] == topic and a["source"]["first_offset"] <= a["source"]["last_offset"]
        assert a["ratio"] > 1 and a["severity"] in ("minor", "major", "critical")
    resolved = {a["alert_id"] for a in docs if a.get("status") == "resolved"}
    assert resolved == {a["alert_id"] for a in fired}  # each burst ends → each episode resolves


def test_input_compressed_with_every_kafka_codec_is_read(broker: Any, topic: str, stream_model: Path) -> None:
    """Input a producer compressed with lz4, zstd or snappy stopped the daemon at its first poll (kafka-python
    lacked the codec libraries: UnsupportedCodecError), and every restart read the same batch again."""
    codecs = ("gzip", "lz4", "zstd", "snappy")
    for i, codec in enumerate(codecs):
        produce(broker.bootstrap, topic, {f"dev-{codec}": sine_stream(600, seed=i)}, compression_type=codec)
    d = run_until_samples(config(broker, topic, stream_model), 600 * len(codecs), limit_s=30)  # all four streams
    assert d.metrics.total("tsmon_dead_letters_total") == 0 and d.metrics.total("tsmon_commit_retries_total") == 0


def test_malformed_input_is_dead_lettered_and_the_stream_keeps_flowing(broker: Any, topic: str,
                                                                       stream_model: Path) -> None:
    bad = [(b"dev-1", b"{oops"), (b"dev-1", b'{"stream":"dev-1","ts":1,"value":NaN}'),
           (b"dev-1", b'{"stream":"dev-1","ts":1,"values":[1,2,3]}'), (b"dev-1", b'{"stream":"dev-1"}'),
           (b"other", b'{"stream":"dev-1","ts":1,"value":1}')]
    produce(broker.bootstrap, topic, {"dev-1": sine_stream(2000, seed=4)}, extra=bad, extra_after=20)
    # the stream's first samples again, after its end: refused as going backwards, the stream unharmed
    ts, v = sine_stream(2000, seed=4)
    produce(broker.bootstrap, topic, {"dev-1": (ts[:20], v[:20])})
    # the producer's own headers go on with a dead letter (a pipeline owner's trace id was dropped); not tsmon's
    p = KafkaProducer(bootstrap_servers=broker.bootstrap)
    p.send(topic, key=b"dev-1", value=b"{traced", headers=[("trace-id", b"t-42"), ("tsmon.reason", b"faked")])
    p.flush(), p.close()
    cfg = config(broker, topic, stream_model)
    d = run_until_samples(cfg, 2000)
    assert d.metrics.total("tsmon_windows_scored_total") == (2000 - STREAM_WINDOW) // STREAM_HOP + 1
    c = KafkaConsumer(cfg.kafka.dead_letter_topic, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                      consumer_timeout_ms=3000)
    dead = [(m.value, dict(m.headers)) for m in c]
    c.close()
    reasons = sorted(h["tsmon.reason"].decode() for _, h in dead)
    assert reasons == sorted(["invalid_json", "non_finite", "channel_mismatch", "bad_timestamp", "bad_stream",
                              "timestamp_backwards", "timestamp_backwards", "invalid_json"])
    traced = next(h for value, h in dead if value == b"{traced")
    assert traced["trace-id"] == b"t-42" and traced["tsmon.reason"] == b"invalid_json"
    for value, h in dead:
        assert h["tsmon.source.topic"].decode() == topic and int(h["tsmon.source.offset"]) >= 0
    assert {v for v, _ in dead} >= {b for _, b in bad}  # original bytes, unchanged
    assert d.metrics.total("tsmon_dead_letters_total") == 8
    quality = [a for a in TopicReader(broker.bootstrap, cfg.kafka.alerts_topic).settle()
               if a.get("type") == "data_quality"]
    assert [q["kind"] for q in quality] == ["late"]  # the second one is within the cooldown: counted, not sent


def test_a_stream_whose_clock_is_set_back_pages_at_its_new_time(broker: Any, topic: str, stream_model: Path) -> None:
    """A device clock 30 minutes fast, then corrected: its records, produced as it samples them (Kafka timestamps),
    were dead-lettered until its clock passed the old time and the incident in them never paged. After
    windows.clock_step_s of them it restarts at the new time and pages."""
    now = int(time.time() * 1000) - 15_000  # the corrected clock: the last 15 s (a run is taken while the time it
    fast = now + 1_800_000  # went back from is still ahead of this host's clock)
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=1, linger_ms=5)
    for ts, v in (sine_stream(1000, start_ms=fast), sine_stream(1000, bursts=(500,), seed=2, start_ms=now)):
        for i, (body, n) in enumerate(messages("dev-step", ts, v, STREAM_HOP)):
            p.send(topic, key=b"dev-step", value=body, timestamp_ms=int(ts[i * n]) + 5)  # produced 5 ms after
    p.flush()
    p.close()
    cfg = config(broker, topic, stream_model, **{"windows.clock_step_s": 1.0})
    d = run_until_samples(cfg, 1900, linger_s=0.5)  # 10 records (1 s) of the corrected clock are dead-lettered
    docs = TopicReader(broker.bootstrap, cfg.kafka.alerts_topic).settle()
    assert [q["kind"] for q in docs if q.get("type") == "data_quality"] == ["late", "clock_step"]
    alerts = [a for a in docs if a.get("type") == "anomaly"]
    burst = now + 500 * STREAM_PERIOD_MS  # sample 500 of the corrected clock
    assert [a["status"] for a in alerts] == ["firing", "resolved"]
    assert burst - STREAM_WINDOW * STREAM_PERIOD_MS <= alerts[0]["start_ts"] <= burst + 29 * STREAM_PERIOD_MS
    assert d.metrics.total("tsmon_dead_letters_total") == 10


def _crash(d: Daemon) -> None:
    """Stop like a killed process: nothing flushed or committed at the end (the consumer just leaves)."""
    d.processor.sink.flush(10)  # what was already sent may or may not have reached the broker; say it did
    d.source._consumer.close(autocommit=False)  # type: ignore[attr-defined]
    d.processor.sink._producer.close(timeout=5)  # type: ignore[attr-defined]  # a dead process's sockets close too
    if d.control is not None:
        d.control.close()
    if d.http is not None:
        d.http.close()
    d.processor.close()


@pytest.mark.parametrize("graceful", [True, False])
def test_restart_mid_stream_gives_the_same_alerts(broker: Any, stream_model: Path, graceful: bool) -> None:
    streams = {f"dev-{i}": sine_stream(4000, BURSTS if i % 2 == 0 else (2200,), seed=10 + i) for i in range(4)}
    topics = {}
    for run in ("reference", "restarted"):
        topics[run] = f"t-{uuid.uuid4().hex[:12]}"
        ensure_topics(broker.bootstrap, {topics[run]: 4})
        produce(broker.bootstrap, topics[run], streams)
    ref_cfg = config(broker, topics["reference"], stream_model)
    run_until_samples(ref_cfg, 16000)
    reference = TopicReader(broker.bootstrap, ref_cfg.kafka.alerts_topic).settle()

    cfg = config(broker, topics["restarted"], stream_model)
    first = Daemon(cfg)
    if not graceful:
        first._shutdown = lambda: _crash(first)  # type: ignore[method-assign]
    first.run(until=lambda: first.metrics.total("tsmon_samples_total") >= 7000)
    done_first = first.metrics.total("tsmon_samples_total")
    assert done_first < 16000
    second = run_until_samples(cfg, 16000 - done_first)  # at least what the first one never read
    after = TopicReader(broker.bootstrap, cfg.kafka.alerts_topic).settle()

    def episodes(docs: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
        return {(a["alert_id"], a["stream"], a["status"]) for a in docs if a.get("type") == "anomaly"}

    assert len(firing(reference)) == 6
    assert episodes(after) == episodes(reference)  # same ids, nothing missed, nothing new
    replayed = second.metrics.total("tsmon_samples_total") - (16000 - done_first)
    assert 0 <= replayed < 16000 - (16000 - done_first)  # resumed from the committed offsets, not the start
    if graceful:  # only what windows still needed was re-read: the last W - H samples of each stream
        assert replayed <= 4 * (STREAM_WINDOW - STREAM_HOP)


def test_partitions_kept_through_a_rebalance_are_read_again_from_the_commit(broker: Any, stream_model: Path) -> None:
    """A second member joins the group for a second and leaves without committing: each eager rebalance revokes
    every partition and gives some (then all) straight back. kafka-python keeps the read position of a kept
    partition, but the daemon dropped its streams at the revoke, so it reads again from its commit: every
    window is applied once (the restored phase cuts the replay's windows after the last one applied) and the alerts
    are the uninterrupted run's (the windows spanning the revoke used to be lost)."""
    streams = {f"dev-{i}": sine_stream(4000, BURSTS if i % 2 == 0 else (2200,), seed=40 + i) for i in range(4)}
    topics = {}
    for run in ("reference", "rebalanced"):
        topics[run] = f"t-{uuid.uuid4().hex[:12]}"
        ensure_topics(broker.bootstrap, {topics[run]: 4})
        sent = produce(broker.bootstrap, topics[run], streams)
    reference = run_until_samples(config(broker, topics["reference"], stream_model), 16000)
    want = reference.metrics.total("tsmon_windows_scored_total")

    cfg = config(broker, topics["rebalanced"], stream_model)
    d, held = Daemon(cfg), threading.Event()

    def member() -> None:  # holds its share of the partitions for a second, reads, never commits, leaves
        c = KafkaConsumer(topics["rebalanced"], bootstrap_servers=broker.bootstrap, group_id=cfg.kafka.group_id,
                          session_timeout_ms=2000, heartbeat_interval_ms=500, enable_auto_commit=False)
        for _ in range(300):
            c.poll(timeout_ms=100)
            if c.assignment() and not held.is_set():
                held.set()
                leave = time.monotonic() + 1.0
            if held.is_set() and time.monotonic() > leave:
                break
        c.close(autocommit=False)

    other = threading.Thread(target=member, daemon=True)
    t0 = time.monotonic()

    def until() -> bool:
        if other.ident is None and d.metrics.total("tsmon_samples_total") >= 5000:
            other.start()
            time.sleep(1.5)  # its JoinGroup is in: the daemon's next poll rebalances, mid-stream
        applied = d.metrics.total("tsmon_windows_scored_total") - skipped(d)
        return (not other.is_alive() and applied >= want and d.processor.pending == 0) or time.monotonic() - t0 > 60

    try:
        d.run(until=until)
    finally:
        other.join(30)
    assert held.is_set() and d.metrics.total("tsmon_records_total") > sent  # mid-stream; partitions read again
    assert d.metrics.total("tsmon_windows_scored_total") - skipped(d) == want  # none lost, none applied twice
    alerts = {topic: {(a["alert_id"], a["status"]) for a in TopicReader(broker.bootstrap, f"{topic}.alerts").settle()
                      if a.get("type") == "anomaly"} for topic in topics.values()}
    assert len(alerts[topics["reference"]]) == 12 and alerts[topics["rebalanced"]] == alerts[topics["reference"]]


def skipped(d: Daemon) -> float:
    return d.metrics.registry.get_sample_value("tsmon_windows_skipped_total", {"why": "restored"}) or 0.0


def test_calibrator_follows_drift_and_ignores_anomalies(broker: Any, topic: str, stream_model: Path) -> None:
    n = 6000
    ts, drift = sine_stream(n, seed=20)
    drift[:, :] += np.linspace(0, 1, n)[:, None] * 0.2 * np.random.default_rng(5).normal(size=(n, 2))  # noisier
    streams = {"dev-drift": (ts, drift), "dev-clean": sine_stream(n, seed=21),
               "dev-spiky": sine_stream(n, tuple(range(600, n - 100, 700)), seed=22)}
    produce(broker.bootstrap, topic, streams)
    cfg = config(broker, topic, stream_model, **{"calibrator.enabled": True, "calibrator.min_samples": 100,
                                                 "calibrator.window": 300, "calibrator.interval_s": 3600,
                                                 "calibrator.max_change": 0.5, "calibrator.floor": 0.05,
                                                 "calibrator.quantile": 0.99, "calibrator.margin": 1.0,
                                                 "kafka.max_poll_records": 30})  # (not the model's 1.5)
    # Recalibrate as the data flows, every 300 samples taken, rather than on the wall clock (the whole input
    # takes about a second here, so a schedule would race it), then 10 more times after the end.
    d, taken, after_end = Daemon(cfg), [0.0], []

    def until() -> bool:
        n_taken = d.metrics.total("tsmon_samples_total")
        if (n_taken - taken[0] >= 300 and d.processor.pending == 0) or d.caught_up(3 * n):
            taken[0] = n_taken
            d.recalibrate()
            after_end.extend([1] if d.caught_up(3 * n) else [])
        return len(after_end) >= 10

    d.run(until=until)
    th = d.final_thresholds
    artifact_value = th["dev-clean"]["artifact"]
    assert th["dev-drift"]["source"] == "calibrated"
    assert th["dev-clean"]["value"] < artifact_value  # the artifact's 1.5 × max was generous for clean data
    assert th["dev-drift"]["value"] > 1.5 * th["dev-clean"]["value"]  # followed the noisier normal data up
    assert th["dev-spiky"]["value"] < 1.3 * th["dev-clean"]["value"]  # bursts never fed the normal window
    docs = TopicReader(broker.bootstrap, cfg.kafka.alerts_topic).settle()
    assert all(a["threshold_source"] in ("artifact", "calibrated") for a in firing(docs))


def test_graceful_shutdown_commits_everything_not_needed(broker: Any, topic: str, stream_model: Path) -> None:
    streams = {"dev-a": sine_stream(1000, seed=30), "dev-b": sine_stream(1000, seed=31)}
    sent = produce(broker.bootstrap, topic, streams)
    cfg = config(broker, topic, stream_model, **{"daemon.commit_interval_ms": 600_000})  # only the final commit
    run_until_samples(cfg, 2000)
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=cfg.kafka.group_id, enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in range(4)]
    committed = sum(c.committed(tp) or 0 for tp in tps)
    c.close()
    # the last W - H = 30 samples (3 messages) of each stream wait for the next window; all else is committed
    assert committed == sent - 2 * (STREAM_WINDOW - STREAM_HOP) // STREAM_HOP
    again = run_until_samples(cfg, 2 * (STREAM_WINDOW - STREAM_HOP))
    assert again.metrics.total("tsmon_records_total") == 6 and again.metrics.total("tsmon_windows_scored_total") == 0


def test_a_stopped_stream_is_evicted_across_restarts_and_its_commit_goes_on(broker: Any, stream_model: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sensors stop inside a window: their last records hold the partition's commit until they are evicted
    (``limits.idle_evict_s``). A restart read those records again and counted the sensors' silence from then on,
    so a daemon restarted more often than ``idle_evict_s`` never let the commit go on. Now the second instance,
    started after the silence has lasted ``idle_evict_s``, evicts them once it has read the partition to its end:
    before its own ``idle_evict_s`` could have run out, and the commit reaches the end."""
    import monitor.daemon as daemon_module
    import monitor.residency as residency_module

    monkeypatch.setattr(daemon_module, "CAUGHT_UP_AFTER_S", 0.5)
    monkeypatch.setattr(residency_module, "SEEN_CLOCK_SKEW_S", 0.0)  # one host here
    idle_s = 9.0  # 6 s left 5 s to evict in, which took 3.1-3.4 s beside two busy loops (a load pass)
    topic = f"t-{uuid.uuid4().hex[:12]}"
    ensure_topics(broker.bootstrap, {topic: 1})
    n = STREAM_WINDOW * 3 + STREAM_HOP // 2  # stopped inside a window
    sent = produce(broker.bootstrap, topic, {"dev-a": sine_stream(n, seed=50), "dev-b": sine_stream(n, seed=51)})
    cfg = config(broker, topic, stream_model, **{"limits.idle_evict_s": idle_s})
    first = run_until_samples(cfg, 2 * n)
    assert first.metrics.total("tsmon_streams_evicted_total") == 0
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=cfg.kafka.group_id, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    assert (c.committed(tp) or 0) < sent  # held for the windows the stopped sensors never completed
    time.sleep(idle_s)  # down meanwhile: the sensors have now been silent for idle_evict_s
    second = Daemon(cfg)
    t0 = time.monotonic()
    second.run(until=lambda: second.metrics.total("tsmon_streams_evicted_total") >= 2
               or time.monotonic() - t0 > idle_s - 1)
    assert second.metrics.total("tsmon_records_total") > 0  # it read the held records again
    assert second.metrics.total("tsmon_streams_evicted_total") == 2
    assert c.committed(tp) == sent
    c.close()
    print(f"second instance: evicted both {time.monotonic() - t0:.1f} s after it started")
    third, ready = Daemon(cfg), []

    def settled() -> bool:  # its partition assigned and its state restored, then a second more
        if not ready and third._restored and third.source.assignment():
            ready.append(time.monotonic())
        return bool(ready) and time.monotonic() - ready[0] > 1.0 or time.monotonic() - t0 > 30

    third.run(until=settled)
    assert ready and third.metrics.total("tsmon_records_total") == 0  # nothing read a third time


def test_a_forgotten_stream_is_tombstoned_on_the_changelog(broker: Any, stream_model: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``state.forget_after_s``: the documents of streams unseen while their partition's input moved that long on
    are deleted on the broker (a tombstone, value null), so the next restore does not read them back — not only
    dropped from one instance's memory."""
    import monitor.daemon as daemon_module

    monkeypatch.setattr(daemon_module, "FORGET_EVERY_S", 0.2)
    topic = f"t-{uuid.uuid4().hex[:12]}"
    ensure_topics(broker.bootstrap, {topic: 1})  # the quiet streams and the one that goes on share the partition
    produce(broker.bootstrap, topic, {"dev-a": sine_stream(600, seed=40), "dev-b": sine_stream(600, seed=41)})
    stop = threading.Event()

    def ticker() -> None:  # a third stream keeps the partition's input moving on, in record time
        p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=1)
        for body, _ in messages("dev-c", *sine_stream(3000, seed=42), STREAM_HOP):
            if stop.wait(0.05):
                break
            p.send(topic, key=b"dev-c", value=body)
        p.close()

    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    cfg = config(broker, topic, stream_model, **{"limits.idle_evict_s": 0.5, "state.forget_after_s": 1.0})
    first = Daemon(cfg)
    t0 = time.monotonic()
    try:
        first.run(until=lambda: first.metrics.total("tsmon_state_forgotten_total") >= 2 or time.monotonic() - t0 > 40)
    finally:
        stop.set()
        thread.join(10)
    assert first.metrics.total("tsmon_streams_evicted_total") >= 2
    assert first.metrics.total("tsmon_state_forgotten_total") == 2  # dev-a, dev-b; dev-c went on
    kept = config(broker, topic, stream_model, **{"state.forget_after_s": "none"})  # would keep what it reads
    second = Daemon(kept)
    t0 = time.monotonic()
    second.run(until=lambda: second._restored and time.monotonic() - t0 > 1 or time.monotonic() - t0 > 40)
    assert second._restored and not {"dev-a", "dev-b"} & set(second.processor.restored)
