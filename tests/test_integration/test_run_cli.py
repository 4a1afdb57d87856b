"""`tsmon run` as a real process against the session broker: alerts, SIGTERM shutdown, commits, config errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from monitor.replay import messages
from tests.conftest import STREAM_HOP, STREAM_WINDOW, sine_stream

pytestmark = pytest.mark.timeout(180)


def tsmon_env() -> dict[str, str]:
    """The test's environment without any TSMON_* setting that could leak into the daemon's config."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TSMON_")}
    return {**env, "TSMON_LOG_FORMAT": "json"}


def tsmon(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "monitor", *args], cwd=cwd, env=tsmon_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


def write_config(path: Path, bootstrap: str, topic: str, model: Path | None, extra: str = "") -> Path:
    text = f"""\
[kafka]
bootstrap_servers = ["{bootstrap}"]
topics = ["{topic}"]
group_id = "g-{topic}"
alerts_topic = "{topic}.alerts"
dead_letter_topic = "{topic}.dlq"
session_timeout_ms = 2000
heartbeat_interval_ms = 500

[daemon]
commit_interval_ms = 200
device = "cpu"

[http]
port = 0
"""
    if model is not None:
        text += f'\n[[models]]\npath = "{model}"\n'
    path.write_text(text + extra)
    return path


def produce(bootstrap: str, topic: str, stream: str, burst: int, n: int = 2000, **client: Any) -> set[int]:
    """One stream with one burst, in hop-sized chunk messages; returns the partitions it went to.
    ``client``: further producer settings (TLS)."""
    ts, values = sine_stream(n, (burst,), seed=50)
    p = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5, **client)
    try:
        futures = [p.send(topic, key=stream.encode(), value=body) for body, _ in messages(stream, ts, values, STREAM_HOP)]
        p.flush()
        return {f.get(timeout=10).partition for f in futures}
    finally:
        p.close()


def wait_for_firing(bootstrap: str, topic: str, proc: subprocess.Popen[bytes], limit_s: float = 60,
                    **client: Any) -> dict[str, Any]:
    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
                      group_id=None, **client)
    try:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"tsmon run exited early with status {proc.returncode}"
            for records in c.poll(timeout_ms=200).values():
                for r in records:
                    doc = json.loads(r.value)
                    if doc.get("type") == "anomaly" and doc.get("status") == "firing":
                        return doc
        raise AssertionError(f"no firing alert on {topic} within {limit_s} s")
    finally:
        c.close()


def log_events(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # anything not from structlog (e.g. a library warning)
    return out


def test_run_alerts_then_stops_on_sigterm_and_commits(broker: Any, topic: str, stream_model: Path,
                                                      tmp_path: Path) -> None:
    stream, burst = "dev-cli", 1000
    partitions = produce(broker.bootstrap, topic, stream, burst)
    assert len(partitions) == 1  # keyed by stream: one partition holds it all
    cfg = write_config(tmp_path / "tsmon.toml", broker.bootstrap, topic, stream_model)
    stderr_path = tmp_path / "stderr.log"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "monitor", "run", "--config", str(cfg)], cwd=tmp_path,
                                env=tsmon_env(), stdout=subprocess.DEVNULL, stderr=err)
    try:
        fired = wait_for_firing(broker.bootstrap, f"{topic}.alerts", proc)
        assert fired["stream"] == stream and fired["source"]["topic"] == topic
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    events = log_events(stderr_path)
    names = [e.get("event") for e in events]
    assert "daemon_starting" in names and "stopping" in names
    [stopped] = [e for e in events if e.get("event") == "daemon_stopped"]
    assert stopped["windows_scored"] > 0 and stopped["alert_messages"] >= 1 and stopped["commits"] >= 1
    assert names.index("stopping") < names.index("daemon_stopped")
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=f"g-{topic}", enable_auto_commit=False)
    try:
        committed = {p: c.committed(TopicPartition(topic, p)) for p in partitions}
    finally:
        c.close()
    # progress was committed, but never past the last W - H samples that the next window still needs
    sent = 2000 // STREAM_HOP
    assert all(o is not None and 0 < o <= sent - (STREAM_WINDOW - STREAM_HOP) // STREAM_HOP
               for o in committed.values()), committed
    # the logs say where reading began and what the stop committed (a pipeline owner could not tell from them)
    [(p,)] = [tuple(partitions)]
    began = [e for e in events if e.get("event") == "partition_reading_from"]
    assert [(e["partition"], e["offset"]) for e in began] == [(f"{topic}-{p}", 0)], began
    [final] = [e for e in events if e.get("event") == "final_commit"]
    assert final["offsets"] == {f"{topic}-{p}": committed[p]}, final


def test_run_with_a_missing_config_file_is_a_one_line_error(tmp_path: Path) -> None:
    r = tsmon("run", "--config", "missing.toml", cwd=tmp_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ConfigError:") and "missing.toml" in lines[0], r.stderr


def test_run_with_an_invalid_config_names_every_bad_key(tmp_path: Path, stream_model: Path) -> None:
    cfg = write_config(tmp_path / "bad.toml", "127.0.0.1:9", "t-x", stream_model,
                       extra="\n[batch]\nmax_batch = 0\nmax_wait = 3\n")
    r = tsmon("run", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.startswith("ConfigError:"), r.stderr
    assert "batch.max_batch" in r.stderr and "batch.max_wait" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_run_without_a_model_says_how_to_give_one(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "nomodel.toml", "127.0.0.1:9", "t-x", None)
    for args in (("run", "--config", str(cfg)), ("run",)):
        r = tsmon(*args, cwd=tmp_path)
        assert r.returncode == 1, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ConfigError:") and "--model" in lines[0], r.stderr


def test_a_misspelt_input_topic_stops_the_start_and_is_not_created(broker: Any, topic: str, stream_model: Path,
                                                                   tmp_path: Path) -> None:
    """Found by a pipeline owner's pass: `topics = ["sensor.raw"]` for sensors.raw had the broker create
    sensor.raw at the consumer's first metadata request; the daemon then read that empty topic, ready and healthy,
    while the real one went unread."""
    from kafka.admin import KafkaAdminClient

    typo = topic[:-1]  # the fixture's topic exists: one letter short of it does not
    cfg = write_config(tmp_path / "typo.toml", broker.bootstrap, typo, stream_model)
    r = tsmon("run", "--config", str(cfg), cwd=tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("{")]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"ConfigError: kafka.topics: no topic '{typo}' (did you mean '{topic}'?) at "
                               f"{broker.bootstrap}: create it first"), lines
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        assert typo not in admin.list_topics()  # nothing subscribed to it
    finally:
        admin.close()
