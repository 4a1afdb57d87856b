"""Faults against real processes and the real broker: `kill -9` of `tsmon run` at seeded random points while a
labelled input is still arriving, then restarts; a bad model or config stops the daemon before it consumes.
"""

from __future__ import annotations

import http.client
import json
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from monitor.replay import messages
from monitor.topics import TopicReader
from tests.conftest import STREAM_HOP, sine_stream
from tests.test_integration.test_run_cli import log_events, tsmon_env, write_config

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]
STREAMS, N, BURSTS = 6, 6000, (2000, 4500)
REPO = Path(__file__).resolve().parents[2]


def play(bootstrap: str, topic: str, seconds: float, chunk: int = STREAM_HOP,
         gate: tuple[threading.Event, float] | None = None, one_per_batch: bool = False) -> threading.Thread:
    """Send every stream message by message, ``chunk`` samples each, spread over ``seconds``, on a thread; the
    thread's ``lost`` counts the messages the broker never took (a test's input cut short is no daemon's fault).

    ``one_per_batch``: a record a batch, for a broker that restarts: Tansu gives a multi-record batch's end offset as
    its first record's, and restarted it wrote new batches at offsets it had used ("AlreadyExists … .batch"), refusing
    them — a CI run lost a partition's input for 19 s, and with it a burst of two streams.

    ``gate`` (event, share): having sent that share of the input, wait for the event (at most 120 s), then go on
    at the same pace. A test whose faults must land before the input ends ties the input to its own progress: on
    busy cores each ``tsmon run`` took 13-15 s to its partitions, and the third kill of three came after the
    40 s of input (or the input ended during an 8 s hold of the sink that the first burst's alerts had missed)."""
    bodies = {f"dev-k{i}": [b for b, _ in messages(f"dev-k{i}", *sine_stream(N, BURSTS, seed=60 + i), chunk)]
              for i in range(STREAMS)}
    rounds = N // chunk

    def run() -> None:
        p = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=0 if one_per_batch else 5,
                          **({"batch_size": 1} if one_per_batch else {}))
        t0, sent = time.monotonic(), []
        for r in range(rounds):
            if gate is not None and r == int(rounds * gate[1]):
                waited = time.monotonic()
                gate[0].wait(120)
                t0 += time.monotonic() - waited
            for name, b in bodies.items():
                sent.append(p.send(topic, key=name.encode(), value=b[r]))
            time.sleep(max(0.0, t0 + (r + 1) * seconds / rounds - time.monotonic()))
        p.flush()
        p.close()
        t.lost = sum(1 for f in sent if f.failed())  # type: ignore[attr-defined]

    t = threading.Thread(target=run, daemon=True)
    t.lost = 0  # type: ignore[attr-defined]
    t.start()
    return t


def config_for(tmp_path: Path, bootstrap: str, topic: str, model: Path) -> Path:
    """A daemon config with state, control and audit topics of this test's own."""
    extra = f'\n[state]\ntopic = "{topic}.state"\n[control]\ntopic = "{topic}.control"\naudit_topic = "{topic}.audit"\n'
    return write_config(tmp_path / "tsmon.toml", bootstrap, topic, model, extra)


def create_topic(bootstrap: str, topic: str) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])
    finally:
        admin.close()


def log_event(log: Path, event: str) -> dict[str, Any]:
    """The daemon's first JSON log line of ``event``."""
    return dict(json.loads(next(ln for ln in log.read_text().splitlines() if f'"{event}"' in ln)))


def http_url(log: Path) -> str:
    return str(log_event(log, "http_listening")["url"])


def start(cfg: Path, cwd: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as err:
        return subprocess.Popen([sys.executable, "-m", "monitor", "run", "--config", str(cfg)], cwd=cwd,
                                env={**tsmon_env(), **env}, stdout=subprocess.DEVNULL, stderr=err)


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """Kill what still runs, by PID."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def wait_for(cond: Any, proc: subprocess.Popen[bytes], limit_s: float = 60) -> None:
    t0 = time.monotonic()
    while not cond():
        assert proc.poll() is None, "daemon exited"
        assert time.monotonic() - t0 < limit_s, "daemon did not get that far in time"
        time.sleep(0.05)


def committed_total(bootstrap: str, topic: str, group: str) -> int:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return sum(c.committed(TopicPartition(topic, p)) or 0 for p in range(4))
    finally:
        c.close()


def test_kill_9_at_random_points_loses_no_alert(broker: Any, topic: str, stream_model: Path, tmp_path: Path) -> None:
    cfg = config_for(tmp_path, broker.bootstrap, topic, stream_model)
    log = tmp_path / "stderr.log"
    released = threading.Event()  # set after the last kill: the input waits at 60 % until then
    player = play(broker.bootstrap, topic, seconds=40, gate=(released, 0.6))
    rng = random.Random(2026)
    kills = []
    for i in range(3):  # kill -9 mid-stream, at seeded random points, three times
        proc = start(cfg, tmp_path, log)
        wait_for(lambda i=i: log.read_text().count('"partitions_assigned"') > i, proc)  # consuming now
        time.sleep(rng.uniform(0.5, 3.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        kills.append(committed_total(broker.bootstrap, topic, f"g-{topic}"))
    assert player.is_alive(), "the input ended before the last kill: kills were not mid-stream"
    released.set()
    proc = start(cfg, tmp_path, log)
    try:
        player.join(60)
        docs = resolved_then_stopped(broker.bootstrap, topic, proc)
    finally:
        stop(proc)
    assert kills[0] > 0 and kills[-1] > kills[0], f"no progress between kills: {kills}"

    check_episodes(docs, log)


def check_episodes(docs: list[dict[str, Any]], *logs: Path) -> None:
    """One alert id per burst and stream; each fired before it resolved; repeats only of the same id. ``logs``
    (the daemons' and the broker's) are summed up in the report when the count is off."""
    by_id: dict[str, list[str]] = defaultdict(list)
    streams: dict[str, set[str]] = defaultdict(set)
    for d in docs:
        by_id[d["alert_id"]].append(d["status"])
        streams[d["stream"]].add(d["alert_id"])
    counts = {s: len(ids) for s, ids in streams.items()}
    expected = {f"dev-k{i}": len(BURSTS) for i in range(STREAMS)}
    # a stream with another count of episodes is shown whole: a page on clean data, a burst split by a gap or an id
    # changed on replay read alike here (a slow CI run had 3 ids for dev-k2: the calibrator had dropped the model's
    # margin of 1.5 and brought its threshold down to its noise; test_processor's headroom test holds that now)
    keys = ("alert_id", "status", "start_ts", "end_ts", "fired_ts", "windows_over", "threshold", "threshold_source")
    odd = [{k: d.get(k) for k in keys} for d in docs if counts.get(d["stream"]) != expected.get(d["stream"])]
    if counts != expected:  # whole in the report's captured stdout (the assertion's repr is cut short)
        print("episodes of the streams off count:", *odd, sep="\n")
        for log in logs:
            print(digest(log))
    assert counts == expected, (counts, BURSTS)
    for alert_id, statuses in by_id.items():
        assert set(statuses) == {"firing", "resolved"}, (alert_id, statuses)
        assert statuses.index("firing") < statuses.index("resolved"), (alert_id, statuses)


def digest(log: Path, lines: int = 40) -> str:
    """A log's events counted, then its last warnings and errors (a daemon's) or its last lines (a broker's): a
    CI run whose broker-restart test read no episode at all left nothing to tell the daemon from the reader by."""
    if not log.exists():
        return f"{log.name}: not written"
    docs = [d for d in log_events(log) if isinstance(d, dict)]
    if not docs:
        return f"{log.name}, last lines:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    counts = Counter(str(d.get("event")) for d in docs)
    worst = [json.dumps(d)[:400] for d in docs if d.get("event") == "daemon_stopped"
             or (d.get("level") in ("warning", "error", "critical") and d.get("event") != "kafka_client_log")]
    return f"{log.name}: {dict(counts)}\nlast warnings, errors and the summary:\n" + "\n".join(worst[-lines:])


def wait_all_resolved(bootstrap: str, topic: str, procs: list[subprocess.Popen[bytes]],
                      limit_s: float = 90) -> list[dict[str, Any]]:
    """Read the alerts topic until every burst's episode resolved (then a second more, for late repeats)."""
    want, deadline = STREAMS * len(BURSTS), time.monotonic() + limit_s
    reader = TopicReader(bootstrap, f"{topic}.alerts")
    try:
        while time.monotonic() < deadline:
            # distinct episodes: at-least-once repeats (a re-sent `resolved` after the broker came back) count once
            if len({d["alert_id"] for d in list(reader.docs)
                    if d.get("type") == "anomaly" and d["status"] == "resolved"}) >= want:
                break
            assert all(p.poll() is None for p in procs), "a daemon died"
            time.sleep(0.2)
    finally:
        docs = reader.settle(1.0)
    return [d for d in docs if d.get("type") == "anomaly"]


def resolved_then_stopped(bootstrap: str, topic: str, proc: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
    """Every episode resolved on the alerts topic; then SIGTERM, and the daemon exits with status 0."""
    docs = wait_all_resolved(bootstrap, topic, [proc])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    return docs


def test_kill_9_of_one_of_two_instances(broker: Any, topic: str, stream_model: Path, tmp_path: Path) -> None:
    cfg = config_for(tmp_path, broker.bootstrap, topic, stream_model)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    released = threading.Event()  # set after the kill: the input waits at 60 % until then
    player = play(broker.bootstrap, topic, seconds=40, gate=(released, 0.6))
    a = start(cfg, tmp_path, logs[0])
    wait_for(lambda: '"partitions_assigned"' in logs[0].read_text(), a)
    b = start(cfg, tmp_path, logs[1])
    try:  # B joins: the group rebalances; once B holds partitions, A dies without a goodbye
        wait_for(lambda: '"stream_started"' in logs[1].read_text(), b)
        time.sleep(1.0)
        assert player.is_alive(), "the input ended before the kill"
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=10)
        released.set()
        player.join(60)
        docs = resolved_then_stopped(broker.bootstrap, topic, b)
    finally:
        stop(a)
        stop(b)
    assert logs[1].read_text().count('"partitions_assigned"') >= 2  # B took A's partitions over
    check_episodes(docs, *logs)


@pytest.mark.parametrize("damage", ["missing", "corrupt", "config"])
def test_a_bad_model_or_config_stops_before_consuming(broker: Any, topic: str, stream_model: Path, tmp_path: Path,
                                                      damage: str) -> None:
    model = tmp_path / "model"
    subprocess.run(["cp", "-r", str(stream_model), str(model)], check=True)
    extra = ""
    if damage == "missing":
        model = tmp_path / "nowhere"
    elif damage == "corrupt":
        weights = next(model.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        extra = "\n[batch]\nmax_batch = 0\n"
    p = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for body, _ in messages("dev-x", *sine_stream(200), STREAM_HOP):
        p.send(topic, key=b"dev-x", value=body)
    p.flush(), p.close()
    cfg = write_config(tmp_path / "tsmon.toml", broker.bootstrap, topic, model, extra)
    r = subprocess.run([sys.executable, "-m", "monitor", "run", "--config", str(cfg)], cwd=tmp_path, env=tsmon_env(),
                       capture_output=True, text=True, timeout=60, check=False)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("{")]
    assert r.returncode == 1 and lines[0].startswith(("ArtifactError:", "ConfigError:")), r.stderr
    assert len(lines) == (2 if damage == "config" else 1), lines  # a config error adds one line per bad key
    assert committed_total(broker.bootstrap, topic, f"g-{topic}") == 0  # nothing consumed


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def watch(url: str, want: int, proc: subprocess.Popen[bytes], limit_s: float,
          says: str | None = None) -> tuple[float, str]:
    """Poll ``url`` until it answers ``want`` (with ``says`` in the body, if given); returns (seconds it took, body).
    A poll that gets no well-formed answer is one more try (urllib's BadStatusLine on an HTML error body without
    a status line failed a TLS test once, in an integration run on 2 busy cores; not reproduced alone)."""
    t0 = time.monotonic()
    while True:
        try:
            status, body = http_get(url)
        except (http.client.HTTPException, OSError) as exc:  # urllib's URLError is an OSError
            status, body = 0, f"no answer ({exc!r})"
        if status == want and (says is None or says in body):
            return time.monotonic() - t0, body
        assert proc.poll() is None, "daemon exited"
        assert time.monotonic() - t0 < limit_s, f"{url} still {status} {body} after {limit_s} s"
        time.sleep(0.2)


def test_a_broker_restart_is_ridden_out(stream_model: Path, tmp_path: Path) -> None:
    """The broker (persistent storage) is SIGKILLed mid-stream and restarted 8 s later: the daemon reports
    not-ready while it is away, keeps its loop turning, retries with backoff, resumes and loses nothing."""
    proc = player = None
    with own_broker(data_dir=tmp_path / "s3", log_file=tmp_path / "broker.log") as broker:
        try:
            topic = "t-restart"
            create_topic(broker.bootstrap, topic)
            cfg = config_for(tmp_path, broker.bootstrap, topic, stream_model)
            log = tmp_path / "stderr.log"
            # the producer is a process of its own too: kafka-python leaves the sockets of connection attempts the
            # outage refused to the garbage collector, which pytest would report as unclosed at the end of the session.
            # Messages of 50 samples: the persistent broker reads one file per record batch, ~50 a second when idle,
            # fewer than the 90 a second of 10 samples sent (the daemon ran 30 s behind, on busy cores 45 s)
            code = (f"from tests.test_integration.test_faults import play; "
                    f"t = play({broker.bootstrap!r}, {topic!r}, 40, chunk=50, one_per_batch=True); t.join(); "
                    f"print(f'input lost: {{t.lost}} messages') if t.lost else None; raise SystemExit(1 if t.lost else 0)")
            player = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
            proc = start(cfg, tmp_path, log)
            wait_for(lambda: '"stream_started"' in log.read_text(), proc)
            url = http_url(log)
            watch(f"{url}/readyz", 200, proc, 30)
            time.sleep(2.0)
            broker.kill()
            killed = time.monotonic()
            down_after, reason = watch(f"{url}/readyz", 503, proc, 20)
            # a kill that lands while a commit waits for the sink is said first as the sink's timeout (the consumer
            # had not seen its connections close yet); the next retry names the broker (CI, once in many runs)
            assert "broker unavailable" in reason or "sink back-pressure" in reason, reason
            watch(f"{url}/readyz", 503, proc, 20, says="broker unavailable")
            while time.monotonic() - killed < 8:  # the broker stays away 8 s
                assert http_get(f"{url}/healthz")[0] == 200  # the loop keeps turning: no restart by a liveness probe
                time.sleep(0.5)
            assert player.poll() is None, "the input ended during the outage"
            broker.restart()
            back_after, _ = watch(f"{url}/readyz", 200, proc, 60)
            assert player.wait(90) == 0
            docs = resolved_then_stopped(broker.bootstrap, topic, proc)
        finally:
            stop(proc)
            stop(player)
    text = log.read_text()
    assert '"input_paused"' in text and '"input_resumed"' in text
    print(f"not ready {down_after:.1f} s after the kill, ready again {back_after:.1f} s after the restart")
    check_episodes(docs, log, tmp_path / "broker.log")


def test_a_frozen_broker_is_reported_and_its_return_noticed(stream_model: Path, tmp_path: Path) -> None:
    """A broker that stops answering with its connections open (SIGSTOP: a frozen host, a black-holed network)
    left /readyz 200 and tsmon_broker_up 1 for the 45 s it was frozen; now no group heartbeat for a session
    timeout while partitions are held is a broker problem, and it clears when the broker answers again."""
    proc = player = None
    with own_broker() as broker:
        assert broker.proc is not None
        try:
            topic = "t-frozen"
            create_topic(broker.bootstrap, topic)
            log = tmp_path / "stderr.log"
            code = f"from tests.test_integration.test_faults import play; play({broker.bootstrap!r}, {topic!r}, 3).join()"
            player = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
            proc = start(config_for(tmp_path, broker.bootstrap, topic, stream_model), tmp_path, log)
            wait_for(lambda: '"stream_started"' in log.read_text(), proc)
            url = http_url(log)
            watch(f"{url}/readyz", 200, proc, 30)
            assert player.wait(30) == 0
            time.sleep(2.0)  # input done and committed: idle, no commit will find the broker gone
            assert metric(url, "tsmon_broker_up") == 1
            broker.proc.send_signal(signal.SIGSTOP)
            try:
                down_after, reason = watch(f"{url}/readyz", 503, proc, 20)  # session timeout 2 s
                assert "broker not answering: no group heartbeat" in reason, reason
                assert metric(url, "tsmon_broker_up") == 0 and http_get(f"{url}/healthz")[0] == 200
            finally:
                broker.proc.send_signal(signal.SIGCONT)
            back_after, _ = watch(f"{url}/readyz", 200, proc, 30)
            assert metric(url, "tsmon_broker_up") == 1
        finally:
            stop(proc)
            stop(player)
    print(f"frozen broker reported after {down_after:.1f} s, its return after {back_after:.1f} s")


def metric(url: str, name: str) -> float:
    """Sum of one metric over its labels, read from /metrics."""
    text = http_get(f"{url}/metrics")[1]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith((f"{name} ", f"{name}{{")))


@contextmanager
def own_broker(**kwargs: Any) -> Iterator[Any]:
    """A broker of this test's own (it will be killed or stalled), stopped by PID at the end."""
    from monitor.broker import LocalBroker

    broker = LocalBroker(**kwargs)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@contextmanager
def proxied_broker() -> Iterator[tuple[str, Any]]:
    """A broker of its own that every client reaches through a proxy able to hold the daemon's Produce requests."""
    from monitor.broker import free_port
    from tests.proxy import KafkaProxy

    broker_port = free_port()
    proxy = KafkaProxy(broker_port, client_id="tsmon")  # the daemon's client id: its producer, not its consumer
    with own_broker(port=broker_port, advertised_port=proxy.port):
        proxy.start()
        try:
            yield f"127.0.0.1:{proxy.port}", proxy
        finally:
            proxy.stop()


def test_a_stalled_sink_pauses_the_input_instead_of_buffering(stream_model: Path, tmp_path: Path) -> None:
    """The daemon's Produce requests are held back by the proxy while its consumer and the test's producer go on:
    at its next output the daemon stops taking input, reports not-ready, takes nothing in for 8 s, and
    publishes every alert once the sink answers again."""
    topic, proc = "t-slow-sink", None
    with proxied_broker() as (bootstrap, proxy):
        try:
            create_topic(bootstrap, topic)
            cfg = config_for(tmp_path, bootstrap, topic, stream_model)
            log = tmp_path / "stderr.log"
            held = threading.Event()  # the input waits at 25 %, before the first burst (33 %), until the hold
            player = play(bootstrap, topic, seconds=40, gate=(held, 0.25))
            proc = start(cfg, tmp_path, log)
            wait_for(lambda: '"stream_started"' in log.read_text(), proc)
            url = http_url(log)
            watch(f"{url}/readyz", 200, proc, 30)
            time.sleep(2.0)
            proxy.hold.set()  # the daemon notices at its next output: the first burst's alerts
            held.set()
            paused_after, reason = watch(f"{url}/readyz", 503, proc, 40)
            assert "sink back-pressure" in reason, reason
            taken = metric(url, "tsmon_records_total")
            time.sleep(8)
            assert metric(url, "tsmon_records_total") == taken  # nothing taken in while the sink was stuck
            assert metric(url, "tsmon_consumption_paused") == 1 and proxy.held > 0
            assert player.is_alive(), "the input ended while the sink was held"
            proxy.hold.clear()
            back_after, _ = watch(f"{url}/readyz", 200, proc, 60)
            player.join(90)
            docs = resolved_then_stopped(bootstrap, topic, proc)
        finally:
            stop(proc)
    print(f"paused {paused_after:.1f} s after the hold, ready {back_after:.1f} s after the release; "
          f"{proxy.held} produce requests held")
    check_episodes(docs, log)


def stop_within(proc: subprocess.Popen[bytes], log: Path, budget: float) -> None:
    """SIGTERM while the final commit cannot succeed: exit status 0 within the shutdown budget."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    took = time.monotonic() - t0
    stopped = log_event(log, "daemon_stopped")
    print(f"exit {took:.1f} s after SIGTERM, shutdown_s {stopped['shutdown_s']} (budget {budget} s)")
    assert '"final_commit_failed"' in log.read_text()
    assert stopped["shutdown_s"] <= budget + 0.5  # from the signal to the end of the drain
    # interpreter exit adds ~0.5 s; a signal landing in a commit's flush once added up to its whole timeout
    assert took <= budget + 3


def test_shutdown_is_bounded_while_the_sink_is_stalled(stream_model: Path, tmp_path: Path) -> None:
    """SIGTERM while the daemon's output cannot be delivered (alerts and snapshots waiting in the producer):
    exit status 0 within shutdown_timeout_s; nothing is committed past what was not acknowledged."""
    topic, proc, budget = "t-stalled-stop", None, 4.0
    with proxied_broker() as (bootstrap, proxy):
        try:
            create_topic(bootstrap, topic)
            log = tmp_path / "stderr.log"
            player = play(bootstrap, topic, seconds=20)
            proc = start(config_for(tmp_path, bootstrap, topic, stream_model), tmp_path, log,
                         TSMON_DAEMON__SHUTDOWN_TIMEOUT_S=str(budget))
            wait_for(lambda: '"stream_started"' in log.read_text(), proc)
            proxy.hold.set()
            watch(f"{http_url(log)}/readyz", 503, proc, 40)  # paused: output is waiting
            held_at = committed_total(bootstrap, topic, f"g-{topic}")
            stop_within(proc, log, budget)
            player.join(30)
            # commits still reach the broker (only Produce is held): none went past the unacknowledged output
            assert committed_total(bootstrap, topic, f"g-{topic}") == held_at
        finally:
            proxy.hold.clear()
            stop(proc)


def test_shutdown_is_bounded_when_the_broker_is_gone(stream_model: Path, tmp_path: Path) -> None:
    """SIGTERM while the broker is away: the final flush and commit cannot succeed, and the daemon still exits
    (status 0) within shutdown_timeout_s, saying that the input since the last commit will be replayed."""
    topic, proc, budget = "t-shutdown", None, 4.0
    with own_broker() as broker:
        try:
            cfg = config_for(tmp_path, broker.bootstrap, topic, stream_model)
            log = tmp_path / "stderr.log"
            player = play(broker.bootstrap, topic, seconds=10)
            proc = start(cfg, tmp_path, log, TSMON_DAEMON__SHUTDOWN_TIMEOUT_S=str(budget))
            wait_for(lambda: '"stream_started"' in log.read_text(), proc)
            url = http_url(log)
            player.join(30)
            broker.kill()
            watch(f"{url}/readyz", 503, proc, 20)
            stop_within(proc, log, budget)
        finally:
            stop(proc)


def test_a_kill_after_a_page_of_a_stream_long_past_its_last_document_keeps_the_alert_id(
        broker: Any, topic: str, stream_model: Path, tmp_path: Path) -> None:
    """Review (crash and restart): the commit passed a stream's last document once the stream had read more than a
    window + alerts.max_hold_windows hops past it. A kill -9 after the next page and before the next commit then
    replayed from past the document's window_from_ts, on another window grid (messages of 7 samples, hop 10): the
    incident paged again under another id, and the first id was never resolved. max_hold_windows = 5 and no snapshot
    tick stand for a fast stream between snapshots (10 040 samples at window 40, hop 10 by default)."""
    from tests.conftest import children, kill_all

    extra = (f'\n[alerts]\nmax_hold_windows = 5\n[state]\ntopic = "{topic}.state"\nsnapshot_interval_s = 3600\n'
             f'[control]\ntopic = "{topic}.control"\naudit_topic = "{topic}.audit"\n')
    cfg = write_config(tmp_path / "tsmon.toml", broker.bootstrap, topic, stream_model, extra)
    log = tmp_path / "stderr.log"
    bodies = [b for b, _ in messages("dev-g", *sine_stream(3000, (700, 2000), seed=61), 7)]
    first, second = 214, 292  # samples 0-1497 (the first burst, then normal), then to 2043 (the second burst's end)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=1, linger_ms=5)
    reader = TopicReader(broker.bootstrap, f"{topic}.alerts")

    def send(part: list[bytes]) -> None:
        for b in part:
            producer.send(topic, key=b"dev-g", value=b)
        producer.flush()

    def pages() -> list[dict[str, Any]]:
        return [d for d in list(reader.docs) if d.get("type") == "anomaly"]

    procs, kids = [], set()
    try:  # one commit every 10 s: the first comes after the first part is read and scored
        proc = start(cfg, tmp_path, log, TSMON_DAEMON__COMMIT_INTERVAL_MS="10000")
        procs.append(proc)
        send(bodies[:first])
        wait_for(lambda: committed_total(broker.bootstrap, topic, f"g-{topic}") > 150, proc, 120)
        send(bodies[first:second])
        wait_for(lambda: len({d["alert_id"] for d in pages() if d["status"] == "firing"}) == 2, proc, 30)
        kids = children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        kill_all(proc, kids)
        assert committed_total(broker.bootstrap, topic, f"g-{topic}") < 2000 // 7, "committed past the page: no test"
        proc = start(cfg, tmp_path, log)
        procs.append(proc)
        send(bodies[second:])
        wait_for(lambda: len({d["alert_id"] for d in pages() if d["status"] == "resolved"}) >= 2, proc, 120)
        time.sleep(1.0)
        kids |= children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        producer.close()
        for p in procs:
            kill_all(p, kids)
        docs = reader.settle(1.0)
    by_id: dict[str, set[str]] = defaultdict(set)
    for d in docs:
        if d.get("type") == "anomaly":
            by_id[d["alert_id"]].add(d["status"])
    assert len(by_id) == 2 and all(s == {"firing", "resolved"} for s in by_id.values()), dict(by_id)
