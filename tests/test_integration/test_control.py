"""Operators and on-call on the real broker: signed commands, acks and audit, persisted state, HTTP, pictures.

One daemon (its loop on a background thread, exactly as `tsmon run` wires it) per test, fresh topics;
commands go through `monitor.ctl.send`, the same client `tsmon ctl` uses.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient

from monitor import ctl, explain
from monitor.cli import main
from monitor.config import Config
from monitor.control import new_command, signature
from monitor.daemon import Daemon
from monitor.topics import TopicReader, ensure_topics
from tests.conftest import STREAM_PERIOD_MS, sine_stream
from tests.test_integration.test_pipeline import config, produce

pytestmark = pytest.mark.timeout(180)
KEY = "test-control-key"
FILLER = 30_000  # changelog records of other streams: a restore of a few seconds
T0 = 1_700_000_000_000


class Running:
    """A daemon on a background thread."""

    def __init__(self, cfg: Config) -> None:
        self.daemon = Daemon(cfg)
        self.thread = threading.Thread(target=self.daemon.run, daemon=True)
        self.thread.start()

    def wait(self, cond: Any, limit_s: float = 30.0) -> None:
        t0 = time.monotonic()
        while not cond():
            assert time.monotonic() - t0 < limit_s, "condition not met in time"
            assert self.thread.is_alive(), "daemon stopped"
            time.sleep(0.05)

    def caught_up(self, samples: int) -> None:
        self.wait(lambda: self.daemon.caught_up(samples))

    def stop(self) -> None:
        self.daemon.stop_event.set()
        self.thread.join(30)

    def get(self, path: str) -> tuple[int, bytes]:
        assert self.daemon.http is not None
        try:
            with urllib.request.urlopen(self.daemon.http.url + path, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


def cli(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code in (0, None)


def cfg_for(broker: Any, topic: str, model: Path, **kw: Any) -> Config:
    return config(broker, topic, model, **{"control.key": KEY, "daemon.scoring": "thread",
                                           "control.poll_interval_ms": 50, **kw})


def stream(n: int, start: int = 0, bursts: tuple[int, ...] = (), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``start``..``start + n`` of a sine stream (continuing in time), bursts relative to ``start``."""
    ts, v = sine_stream(n, bursts, seed=seed, start_ms=T0 + STREAM_PERIOD_MS * start)
    return ts, v


def command(cfg: Config, name: str, target: str, **params: Any) -> dict[str, Any]:
    answers = ctl.send(cfg, name, target, params, "alice", f"test {name}", timeout_s=15)
    ctl.verdict(name, target, answers.acks, 15, answers.unanswered)
    assert len(answers.acks) == 1 and answers.unanswered == []
    return answers.acks[0]


def alerts(cfg: Config) -> list[dict[str, Any]]:
    return [d for d in TopicReader(cfg.kafka.bootstrap_servers[0], cfg.kafka.alerts_topic).settle(0.5)
            if d.get("type") == "anomaly"]


def test_commands_end_to_end(broker: Any, topic: str, stream_model: Path, tmp_path: Path) -> None:
    # the operator's margin 1 over every stream's model's own (1.5 × its maximum): a shadow at q0.5 is far lower
    cfg = cfg_for(broker, topic, stream_model, **{"calibrator.margin": 1.0})
    run = Running(cfg)
    try:
        produce(broker.bootstrap, topic, {"dev-a": stream(1000), "dev-b": stream(1000, seed=1)})
        run.caught_up(2000)
        assert run.get("/readyz")[0] == 200
        assert run.daemon.http is not None
        url = run.daemon.http.url

        # pin: the next alert of dev-a carries the pinned threshold
        a = command(cfg, "pin", "dev-a", threshold=0.5)
        assert a["status"] == "applied" and a["streams"] == ["dev-a"]
        (effect,) = a["effects"]
        assert effect["before"]["source"] == "artifact" and effect["after"] == {**effect["after"], "threshold": 0.5,
                                                                               "source": "pinned", "pinned": True}
        # silence dev-b: its alert is recorded as silenced, not published as firing
        assert command(cfg, "silence", "dev-b", for_s=3600)["streams"] == ["dev-b"]
        produce(broker.bootstrap, topic, {"dev-a": stream(1000, 1000, bursts=(300,)),
                                          "dev-b": stream(1000, 1000, bursts=(300,), seed=1)})
        run.caught_up(4000)
        docs = alerts(cfg)
        fired = [d for d in docs if d["stream"] == "dev-a" and d["status"] == "firing"]  # the page, its updates
        assert len({d["alert_id"] for d in fired}) == 1 and len({d["revision"] for d in fired}) == len(fired)
        assert all((d["threshold"], d["threshold_source"]) == (0.5, "pinned") for d in fired)
        b = [d for d in docs if d["stream"] == "dev-b"]
        assert [d["status"] for d in b] == ["silenced", "resolved"] and all(d["silenced"] for d in b)

        # a picture from the real alert
        png = explain.render(b[0], tmp_path / "alert.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # unpin → back to the artifact value, as a new version; history and rollback
        assert command(cfg, "unpin", "dev-a")["effects"][0]["after"]["source"] == "artifact"
        hist = command(cfg, "history", "dev-a")["result"]["history"]["dev-a"]
        assert [(v["version"], v["source"]) for v in hist] == [(0, "artifact"), (1, "pinned"), (2, "artifact")]
        after = command(cfg, "rollback", "dev-a", version=1)["effects"][0]["after"]
        assert (after["threshold"], after["source"], after["version"]) == (0.5, "rollback", 3)

        # shadow: a dry run reports, changes nothing
        sh = command(cfg, "shadow", "dev-b", quantile=0.5)["result"]["shadow"]["dev-b"]
        assert sh["candidate"]["windows_over"] > sh["current"]["windows_over"] and sh["windows"] > 100
        assert sh["margin"] == 1.0
        assert command(cfg, "history", "dev-b")["result"]["history"]["dev-b"][-1]["version"] == 0

        # feedback: a false positive counts towards precision and feeds the calibrator
        alert_id = b[0]["alert_id"]
        samples = run.daemon.calibrator.samples("dev-b")
        fb = command(cfg, "feedback", "*", alert_id=alert_id, verdict="false_positive")["result"]
        assert fb["precision"] == 0.0 and run.daemon.calibrator.samples("dev-b") > samples

        # freeze all, recalibrate on demand, reset
        command(cfg, "freeze", "*")
        assert run.daemon.calibrator.frozen_all
        command(cfg, "unfreeze", "*")
        [rc] = ctl.send(cfg, "recalibrate", "dev-b", {"quantile": 0.99}, "alice", "test", timeout_s=15).acks
        assert rc["status"] == "applied"  # a drift guard's refusal is an applied command that fails ctl's verdict
        assert rc["streams"] == ["dev-b"] or rc["result"]["refused"] or rc["result"]["unchanged"]
        reset = command(cfg, "reset-stream", "dev-a")["effects"][0]["after"]
        assert (reset["source"], reset["pinned"]) == ("artifact", False)

        # bad and missing signatures are refused and audited; a replayed command applies once
        doc = new_command("pin", "dev-b", {"threshold": 9.0}, "mallory", "", "wrong-key")
        unsigned = {k: v for k, v in new_command("unpin", "dev-b", {}, "eve", "", KEY).items() if k != "signature"}
        good = new_command("pin", "dev-b", {"threshold": 7.0}, "alice", "replayed", KEY)
        assert good["signature"] == signature(good, KEY)
        p = KafkaProducer(bootstrap_servers=broker.bootstrap)
        for d in (doc, unsigned, good, good):
            p.send(cfg.control.topic, json.dumps(d).encode())
        p.flush(), p.close()
        run.wait(lambda: run.daemon.metrics.total("tsmon_commands_total") >= 14)
        audit = TopicReader(broker.bootstrap, cfg.control.audit_topic).settle(0.5)
        by_id = {a["command_id"]: a for a in audit if a["status"] in ("rejected", "duplicate")}
        assert by_id[doc["command_id"]]["error"] == "bad signature"
        assert by_id[unsigned["command_id"]]["error"] == "unsigned command"
        assert by_id[good["command_id"]]["status"] == "duplicate"
        assert [a["status"] for a in audit if a["command_id"] == good["command_id"]] == ["applied", "duplicate"]
        assert run.daemon.calibrator.threshold("dev-b").value == 7.0
        assert len([v for v in run.daemon.calibrator.history("dev-b") if v["source"] == "pinned"]) == 1

        # observability
        status, body = run.get("/metrics")
        text = body.decode()
        assert status == 200 and 'tsmon_commands_total{command="pin",outcome="applied"} 2.0' in text
        assert 'tsmon_commands_total{command="unknown",outcome="rejected"} 2.0' in text
        assert 'tsmon_threshold{source="pinned",stream="dev-b"} 7.0' in text
        rows = {r["stream"]: r for r in json.loads(run.get("/streams")[1])["streams"]}
        assert rows["dev-b"]["threshold_source"] == "pinned" and rows["dev-b"]["silenced_until_ms"]
        assert rows["dev-a"]["windows_scored"] > 0
    finally:
        run.stop()
    with pytest.raises(OSError):  # the server closed with the daemon
        urllib.request.urlopen(url + "/healthz", timeout=5)


def test_status_and_ctl_commands(broker: Any, topic: str, stream_model: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cfg_for(broker, topic, stream_model)
    for key, value in {"KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap, "CONTROL__KEY": KEY,
                       "CONTROL__TOPIC": cfg.control.topic, "CONTROL__AUDIT_TOPIC": cfg.control.audit_topic}.items():
        monkeypatch.setenv(f"TSMON_{key}", value)
    run = Running(cfg)
    try:
        produce(broker.bootstrap, topic, {"dev-s": stream(600)})
        run.caught_up(600)
        scored = (600 - 40) // 10 + 1
        # built while /streams is read: one taken while windows still waited shows fewer (it raced the assertion)
        run.wait(lambda: any(r["windows_scored"] == scored for r in run.daemon._streams_view()))
        assert run.daemon.http is not None
        cli(["status", "--url", run.daemon.http.url])
        out = capsys.readouterr().out
        assert "dev-s" in out and "artifact" in out and "ok" in out
        cli(["status", "--url", run.daemon.http.url, "--json"])
        (row,) = json.loads(capsys.readouterr().out)
        assert row["stream"] == "dev-s" and row["windows_scored"] == scored

        cli(["ctl", "pin", "--stream", "dev-s", "--threshold", "0.3", "--reason", "noisy lead"])
        out = capsys.readouterr().out
        assert "applied" in out and "pinned" in out and "0.3" in out
        with pytest.raises(SystemExit) as exc:
            main(["ctl", "unpin", "--stream", "no-such-stream"])
        assert exc.value.code == 1
        # the last line of stderr (the daemon on its thread logs there too)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == "CommandFailed: unpin: no daemon has a stream matching 'no-such-stream'"
        # an operator pass: a misspelt control topic was created by the send, and ctl waited out its timeout for an
        # acknowledgement naming no topic
        misspelt = cfg.control.topic.replace("control", "contrl")
        monkeypatch.setenv("TSMON_CONTROL__TOPIC", misspelt)
        with pytest.raises(SystemExit) as exc:
            main(["ctl", "pin", "--stream", "dev-s", "--threshold", "0.3", "--reason", "typo"])
        assert exc.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"ConfigError: control.topic: no topic {misspelt!r} (did you mean {cfg.control.topic!r}?)")
        assert misspelt not in ensure_topics(broker.bootstrap, {})
    finally:
        run.stop()


def test_state_survives_a_restart_and_does_not_refire(broker: Any, topic: str, stream_model: Path) -> None:
    cfg = cfg_for(broker, topic, stream_model)
    run = Running(cfg)
    produce(broker.bootstrap, topic, {"dev-r": stream(1000), "dev-q": stream(1000, seed=3)})
    run.caught_up(2000)
    command(cfg, "pin", "dev-q", threshold=0.5)
    command(cfg, "silence", "dev-q", for_s=600)
    # a sensor not seen yet (an on-call pass: "no daemon has a stream matching", exit 1): a standing silence
    ahead = command(cfg, "silence", "dev-n*", for_s=600)
    assert ahead["streams"] == [] and ahead["result"]["standing"]["pattern"] == "dev-n*"
    produce(broker.bootstrap, topic, {"dev-r": stream(500, 1000, bursts=(470,))})  # an episode left open
    run.caught_up(2500)
    run.wait(lambda: run.daemon.processor.streams["dev-r"].alerts.firing)
    silenced_until = run.daemon.processor.streams["dev-q"].silenced_until_ms
    assert silenced_until > time.time() * 1000
    run.stop()
    fired = [d for d in alerts(cfg) if d["stream"] == "dev-r"]
    assert [d["status"] for d in fired] == ["firing"]

    second = Running(cfg)
    try:  # dev-q has sent nothing since the restart: its document names its partition, so a command reaches it
        assert command(cfg, "freeze", "dev-q")["streams"] == ["dev-q"]  # touches neither its pin nor its silence
        rules = command(cfg, "silences", "*")["result"]["silences"]  # back from the group's document
        assert sorted(r["pattern"] for r in rules) == ["dev-n*", "dev-q"]
        produce(broker.bootstrap, topic, {"dev-r": stream(500, 1500), "dev-q": stream(100, 1000, seed=3),
                                          "dev-n1": stream(600, bursts=(300,), seed=4)})  # first seen now
        second.wait(lambda: "dev-q" in second.daemon.processor.streams and "dev-r" in second.daemon.processor.streams)
        second.wait(lambda: second.daemon.metrics.total("tsmon_samples_total") >= 1200 and
                    second.daemon.processor.pending == 0)
        th = second.daemon.calibrator.threshold("dev-q")
        assert (th.value, th.source) == (0.5, "pinned")
        assert second.daemon.processor.streams["dev-q"].silenced_until_ms == silenced_until  # restored, not re-sent
        assert second.daemon.calibrator.controls("dev-q")["frozen"]
        second.wait(lambda: not second.daemon.processor.streams["dev-r"].alerts.firing)
    finally:
        second.stop()
    statuses = [d["status"] for d in alerts(cfg) if d["stream"] == "dev-r"]
    assert statuses == ["firing", "resolved"]  # the open alert was restored: not fired again, then resolved
    # the rule came back with the group's document: the new sensor's burst was recorded, not paged
    assert [d["status"] for d in alerts(cfg) if d["stream"] == "dev-n1"] == ["silenced", "resolved"]


def test_state_follows_partitions_to_a_second_instance(broker: Any, topic: str, stream_model: Path) -> None:
    cfg = cfg_for(broker, topic, stream_model)
    names = [f"dev-{i}" for i in range(8)]
    first = Running(cfg)
    produce(broker.bootstrap, topic, {n: stream(500, seed=i) for i, n in enumerate(names)})
    first.caught_up(8 * 500)
    command(cfg, "pin", "dev-*", threshold=2.5)
    second = Running(cfg)
    try:
        second.wait(lambda: second.daemon.source.assignment(), limit_s=30)
        first.wait(lambda: len(first.daemon.source.assignment()) < 4, limit_s=30)
        produce(broker.bootstrap, topic, {n: stream(200, 500, seed=i) for i, n in enumerate(names)})
        second.wait(lambda: len(second.daemon.processor.streams) > 0 and second.daemon.processor.pending == 0)
        moved = list(second.daemon.processor.streams)
        assert moved and all(second.daemon.calibrator.threshold(s).source == "pinned" for s in moved)
        assert all(second.daemon.calibrator.threshold(s).value == 2.5 for s in moved)
    finally:
        second.stop()
        first.stop()


def test_ctl_waits_for_every_input_partition_and_names_those_nobody_answered_for(broker: Any, topic: str,
                                                                               stream_model: Path) -> None:
    """A member of the group that does not answer (slow, restoring, gone but not yet timed out) holds some
    partitions: ctl used to report the command applied 1 s after the daemon's ack, though the streams of those
    partitions were not changed. Alone again, the daemon answers for all four and ctl returns on its ack."""
    from kafka import KafkaConsumer

    cfg = cfg_for(broker, topic, stream_model)
    run = Running(cfg)
    held, leave = threading.Event(), threading.Event()

    def member() -> None:  # joins the group, takes its share, never reads the control topic
        c = KafkaConsumer(topic, bootstrap_servers=broker.bootstrap, group_id=cfg.kafka.group_id,
                          session_timeout_ms=2000, heartbeat_interval_ms=500, enable_auto_commit=False)
        for _ in range(600):
            c.poll(timeout_ms=100)
            if c.assignment() and len(run.daemon.source.assignment()) < 4:
                held.set()
            if leave.is_set():
                break
        c.close(autocommit=False)

    try:
        produce(broker.bootstrap, topic, {f"dev-{i}": stream(300, seed=i) for i in range(8)})
        run.caught_up(8 * 300)
        other = threading.Thread(target=member, daemon=True)
        other.start()
        run.wait(held.is_set)
        mine = {f"{t}:{p}" for t, p in run.daemon.source.assignment()}
        answers = ctl.send(cfg, "pin", "dev-*", {"threshold": 2.0}, "alice", "test", timeout_s=3)
        assert [a["instance"] for a in answers.acks] == [run.daemon.instance]
        assert answers.unanswered == sorted({f"{topic}:{p}" for p in range(4)} - mine)
        with pytest.raises(ctl.CommandFailed, match=rf"applied only in part: no daemon answered for input "
                                                    rf"partition\(s\) {answers.unanswered[0]}"):
            ctl.verdict("pin", "dev-*", answers.acks, 3, answers.unanswered)
        leave.set()
        other.join(30)
        run.wait(lambda: len(run.daemon.source.assignment()) == 4)
        t0 = time.monotonic()  # answered for all four: ctl returns once settled, not at the timeout
        answers = ctl.send(cfg, "pin", "dev-*", {"threshold": 2.0}, "alice", "test", timeout_s=30)
        assert time.monotonic() - t0 < 20 and answers.unanswered == []
        assert [sorted(a["inputs"][topic]) for a in answers.acks] == [[0, 1, 2, 3]]
    finally:
        leave.set()
        run.stop()


def test_the_daemon_creates_its_topics_with_the_configured_replication(broker: Any, stream_model: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Replication factor 1 was hard-wired: on a production cluster the changelog lived on one broker (and
    acks=all writes failed where min.insync.replicas is 2). The brokers' default (-1) unless configured; the
    local broker accepts -1 and makes one replica. The alerts and dead-letter topics are created too, before
    anything is sent to them (on a cluster without auto-creation a missing one stalled the sink)."""
    import monitor.daemon

    seen: list[int] = []
    real = monitor.daemon.ensure_topics
    monkeypatch.setattr(monitor.daemon, "ensure_topics",
                        lambda *a, replication_factor, **k: (seen.append(replication_factor),
                                                             real(*a, replication_factor=replication_factor, **k)))
    for rf in (-1, 1):
        cfg = cfg_for(broker, f"rf-{uuid.uuid4().hex[:6]}", stream_model,
                      **{"kafka.replication_factor": rf, "state.topic": f"rf-state-{uuid.uuid4().hex[:6]}"})
        Daemon._ensure_topics(SimpleNamespace(cfg=cfg))  # type: ignore[arg-type]
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        try:
            assert {cfg.state.topic, cfg.kafka.alerts_topic, cfg.kafka.dead_letter_topic} <= set(admin.list_topics())
        finally:
            admin.close()
    assert seen == [-1, 1]


def test_a_long_changelog_is_read_with_the_input_paused_and_the_loop_turning(broker: Any, topic: str,
                                                                           stream_model: Path) -> None:
    """The restore reads the changelog in steps from the loop: health and readiness go on (it used to block
    the loop inside the rebalance callback), and no stream starts before its document is read (the pin)."""
    cfg = cfg_for(broker, topic, stream_model)
    ensure_topics(broker.bootstrap, {cfg.state.topic: 1})
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=20)
    for i in range(FILLER):  # other instances' streams, before this one's document
        p.send(cfg.state.topic, key=f"other-{i}".encode(), value=b'{"type": "stream_state", "v": 0}')
    p.flush(), p.close()
    run = Running(cfg)
    produce(broker.bootstrap, topic, {"dev-q": stream(1000, seed=3)})
    run.caught_up(1000)
    command(cfg, "pin", "dev-q", threshold=0.5)
    run.stop()

    seen: list[tuple[float, float, str]] = []  # (now, the loop's last turn, readiness)
    second = Running(cfg)
    try:
        produce(broker.bootstrap, topic, {"dev-q": stream(100, 1000, seed=3)})
        t0 = time.monotonic()
        while "dev-q" not in second.daemon.processor.streams and time.monotonic() - t0 < 60:
            seen.append((time.monotonic(), second.daemon._beat, second.daemon._ready[1]))
            time.sleep(0.01)
        th = second.daemon.calibrator.threshold("dev-q")
        assert (th.value, th.source) == (0.5, "pinned")  # started from its document, read last
    finally:
        second.stop()
    restoring = [(now, beat) for now, beat, why in seen if why.startswith("restoring state")]
    assert restoring, "never reported as restoring"
    assert max(now - beat for now, beat in restoring) < 1.0  # the loop kept turning meanwhile


def test_an_acknowledgement_over_the_request_limit_reaches_ctl_whole(broker: Any, topic: str) -> None:
    """A command on 8 000 streams: its ack (~1.3 MB of JSON) went over kafka-python's 1 MiB request limit
    and was dropped as undeliverable, so `tsmon ctl` said no daemon had answered; now it goes in parts."""
    from types import SimpleNamespace

    from monitor.controller import Controller
    from monitor.metrics import Metrics
    from monitor.outbox import Outbox
    from monitor.sink import KafkaSink
    from monitor.topics import partition_reader
    from tests.test_monitor.test_control import big_ack

    audit = f"{topic}.audit"
    ensure_topics(broker.bootstrap, {audit: 1})
    lost: list[str] = []
    sink = KafkaSink({"bootstrap_servers": broker.bootstrap}, on_undeliverable=lambda m, why: lost.append(why))
    reader, _ = partition_reader({"bootstrap_servers": broker.bootstrap}, audit, at_end=True)
    try:
        doc = big_ack(8000)
        assert len(json.dumps(doc)) > 1_048_576
        processor = SimpleNamespace(calibrator=None, sink=sink, metrics=Metrics(), outbox=Outbox())
        Controller(processor, KEY, audit, "h:1")._publish(doc, "silence")
        processor.outbox.send_acks(sink)  # as the commit does
        sink.flush(10)
        acks = ctl._collect(reader, doc["command_id"], timeout_s=10, settle_s=1).acks
    finally:
        reader.close()
        sink.close(5)
    assert not lost and len(acks) == 1 and acks[0]["streams"] == doc["streams"] and acks[0]["effects"] == doc["effects"]
    ctl.verdict("silence", "dev-*", [{**acks[0], "result": {}}], 5)
