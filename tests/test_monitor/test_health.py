"""The HTTP side door (/metrics, probes, /streams), the threshold label cap, and ``tsmon status``."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from models.errors import ConfigError
from monitor.health import HealthServer
from monitor.metrics import Metrics
from tests.test_monitor.test_cli import run as cli_run

ROWS: list[dict[str, Any]] = [
    {"stream": "press-7", "model": "dense", "last_sample_time": "2024-01-01T00:10:00.000Z", "windows_scored": 1234,
     "threshold": 0.123456789, "threshold_source": "calibrated", "threshold_version": 3, "alert_state": "firing",
     "alert_id": "a1b2c3d4e5f6a7b8", "silenced_until_time": None, "lag": 17, "holding_back": 2990,
     "precision": 0.75},
    {"stream": "pump[2]", "model": "lstm", "last_sample_time": 1704067200000, "threshold_source": "artifact",
     "alert_state": "ok", "silent": True},
]


@dataclass
class Stubs:
    healthy: tuple[bool, str] = (True, "loop turned 0.1 s ago")
    ready: tuple[bool, str] = (False, "restoring state")
    rows: list[dict[str, Any]] = field(default_factory=lambda: [dict(r) for r in ROWS])
    broken: bool = False

    def health(self) -> tuple[bool, str]:
        return self.healthy

    def readiness(self) -> tuple[bool, str]:
        return self.ready

    def streams(self) -> list[dict[str, Any]]:
        if self.broken:
            raise RuntimeError("snapshot unavailable")
        return self.rows


@pytest.fixture
def stubs() -> Stubs:
    return Stubs()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(max_stream_labels=2)


@pytest.fixture
def server(stubs: Stubs, metrics: Metrics) -> Iterator[HealthServer]:
    s = HealthServer("127.0.0.1", 0, metrics.registry, stubs.health, stubs.readiness, stubs.streams)
    s.start()
    yield s
    s.close()


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the server ---------------------------------------------------------------------------------------------------


def test_metrics_are_served_in_prometheus_format(server: HealthServer, metrics: Metrics) -> None:
    metrics.samples.inc(42)
    metrics.batch_size.observe(64)
    status, ctype, body = get(server.url + "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    text = body.decode()
    assert "tsmon_samples_total 42.0" in text and 'tsmon_batch_size_bucket{le="64.0"} 1.0' in text


def test_probes_answer_200_or_503_with_the_reason(server: HealthServer, stubs: Stubs) -> None:
    status, ctype, body = get(server.url + "/healthz")
    assert (status, ctype, json.loads(body)) == (200, "application/json", {"ok": True, "reason": "loop turned 0.1 s ago"})
    status, _, body = get(server.url + "/readyz")
    assert (status, json.loads(body)) == (503, {"ok": False, "reason": "restoring state"})
    stubs.healthy, stubs.ready = (False, "loop stalled for 31 s"), (True, "assigned and restored")
    assert get(server.url + "/healthz")[0] == 503 and get(server.url + "/readyz")[0] == 200


def test_streams_and_unknown_paths(server: HealthServer) -> None:
    status, _, body = get(server.url + "/streams?x=1")
    assert status == 200 and json.loads(body) == {"streams": ROWS}
    status, _, body = get(server.url + "/nope")
    assert status == 404 and "/nope" in json.loads(body)["error"]


def test_a_raising_callable_answers_500_and_the_server_goes_on(server: HealthServer, stubs: Stubs) -> None:
    stubs.broken = True
    status, _, body = get(server.url + "/streams")
    assert status == 500 and json.loads(body)["error"] == "RuntimeError: snapshot unavailable"
    stubs.broken = False
    assert get(server.url + "/streams")[0] == 200 and get(server.url + "/healthz")[0] == 200


def test_connections_are_capped_and_a_trickling_client_is_cut_at_the_deadline(
        server: HealthServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client sending a byte every few seconds held its thread for good (the timeout is per read), and every
    connection got a thread of its own: 200 such clients held 59 threads. Now at most MAX_CONNECTIONS are served
    at once (one more takes the slot of the oldest whose request is not in yet) and each is cut REQUEST_DEADLINE_S
    after it was accepted."""
    import threading

    from monitor import health

    monkeypatch.setattr(health, "REQUEST_DEADLINE_S", 0.5)
    assert server._server is not None
    server._server.slots = threading.BoundedSemaphore(2)
    host, port = server.address
    slow = [socket.create_connection((host, port), timeout=5) for _ in range(2)]
    for s in slow:
        s.sendall(b"GET /healthz HTTP/1.1\r\n")  # headers never end
    time.sleep(0.2)
    assert get(server.url + "/healthz")[0] == 200  # a third: in, in the slot of the oldest still sending its request
    slow[0].settimeout(1)
    assert slow[0].recv(1) == b""  # cut for it
    start = time.monotonic()
    while time.monotonic() - start < 3:  # trickle: a byte every 0.1 s, until the server hangs up
        try:
            slow[1].sendall(b"X")
        except OSError:
            break
        slow[1].settimeout(0.1)
        try:
            if slow[1].recv(1) == b"":
                break
        except TimeoutError:
            continue
        except OSError:
            break
    assert time.monotonic() - start < 2  # cut at the deadline, not held for as long as it trickles
    for s in slow:
        s.close()
    time.sleep(0.6)
    assert get(server.url + "/healthz")[0] == 200  # the slots are back


def test_a_deadline_that_cannot_start_gives_its_slot_back(server: HealthServer,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadline's timer started before the request's try: when it could not (no thread to be had) the slot
    was never given back, and once every slot was lost each probe was closed unanswered for good."""
    import threading

    assert server._server is not None
    server._server.slots = threading.BoundedSemaphore(2)
    real, calls = threading.Timer.start, [0]

    def start(timer: threading.Timer) -> None:
        calls[0] += 1
        if calls[0] <= 2:
            raise RuntimeError("can't start new thread")
        real(timer)

    monkeypatch.setattr(threading.Timer, "start", start)
    for _ in range(2):
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            get(server.url + "/healthz")
    assert get(server.url + "/healthz")[0] == 200


def test_port_in_use_is_a_config_error_and_close_frees_it(server: HealthServer, stubs: Stubs,
                                                         metrics: Metrics) -> None:
    host, port = server.address
    assert host == "127.0.0.1" and port > 0 and server.url == f"http://127.0.0.1:{port}"
    other = HealthServer("127.0.0.1", port, metrics.registry, stubs.health, stubs.readiness, stubs.streams)
    with pytest.raises(ConfigError, match=rf"^http\.port: cannot listen on 127\.0\.0\.1:{port}: "):
        other.start()
    nowhere = HealthServer("no such host!", 0, metrics.registry, stubs.health, stubs.readiness, stubs.streams)
    with pytest.raises(ConfigError, match=r"^http\.host: cannot listen on no such host!:0"):  # it blamed the port
        nowhere.start()
    server.close()
    server.close()  # idempotent
    other.start()
    try:
        assert other.address == ("127.0.0.1", port) and get(other.url + "/healthz")[0] == 200
    finally:
        other.close()


def test_address_before_start_is_an_error(stubs: Stubs, metrics: Metrics) -> None:
    s = HealthServer("127.0.0.1", 0, metrics.registry, stubs.health, stubs.readiness, stubs.streams)
    with pytest.raises(RuntimeError, match="start"):
        _ = s.address
    s.close()  # never started: nothing to do


# --- threshold series and the label cap ---------------------------------------------------------------------------


def threshold(m: Metrics, stream: str, source: str) -> float | None:
    return m.registry.get_sample_value("tsmon_threshold", {"stream": stream, "source": source})


def threshold_series(m: Metrics) -> set[tuple[str, str]]:
    return {(s.labels["stream"], s.labels["source"]) for f in m.registry.collect() if f.name == "tsmon_threshold"
            for s in f.samples}


def unlabelled(m: Metrics) -> float | None:
    return m.registry.get_sample_value("tsmon_threshold_streams_unlabelled")


def test_threshold_label_cap(metrics: Metrics) -> None:
    for stream, value in (("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0)):
        metrics.set_threshold(stream, value, "artifact")
    assert threshold_series(metrics) == {("a", "artifact"), ("b", "artifact")} and unlabelled(metrics) == 2
    metrics.set_threshold("c", 3.5, "calibrated")  # still over the cap
    assert threshold_series(metrics) == {("a", "artifact"), ("b", "artifact")} and unlabelled(metrics) == 2


def test_a_source_change_keeps_one_series_per_stream(metrics: Metrics) -> None:
    metrics.set_threshold("a", 1.0, "artifact")
    metrics.set_threshold("a", 1.5, "calibrated")
    assert threshold_series(metrics) == {("a", "calibrated")} and threshold(metrics, "a", "calibrated") == 1.5
    metrics.set_threshold("a", 1.6, "calibrated")
    assert threshold(metrics, "a", "calibrated") == 1.6 and threshold(metrics, "a", "artifact") is None


def test_forget_frees_the_slot(metrics: Metrics) -> None:
    for stream in ("a", "b", "c"):
        metrics.set_threshold(stream, 1.0, "artifact")
    metrics.set_threshold("c", 2.0, "pinned")  # over the cap: counted, its latest value kept
    metrics.forget_threshold("a")
    # the freed slot goes to the stream waiting over the cap, at once (a metrics review: it waited for its next
    # threshold change, never for a pinned or steady stream)
    assert threshold_series(metrics) == {("b", "artifact"), ("c", "pinned")} and unlabelled(metrics) == 0
    assert threshold(metrics, "c", "pinned") == 2.0
    metrics.forget_threshold("nobody")
    metrics.forget_threshold("b")
    assert threshold_series(metrics) == {("c", "pinned")} and unlabelled(metrics) == 0
    metrics.forget_threshold("c")
    metrics.forget_threshold("b")
    assert threshold_series(metrics) == set()


def test_outcome_series_exist_before_the_first_record() -> None:
    """TsmonNotConsuming is ``rate(tsmon_records_total[5m]) == 0``: without a series at 0 it has no result (and
    cannot fire) for an instance that has taken no record since it started."""
    from prometheus_client import generate_latest

    text = generate_latest(Metrics().registry).decode()
    for outcome in ("ok", "dead_letter"):
        assert f'tsmon_records_total{{outcome="{outcome}"}} 0.0' in text
    assert 'tsmon_calibrations_total{outcome="refused"} 0.0' in text
    # the first alert of each kind after a start is an increase() on the dashboard only from a series at 0
    for status in ("firing", "silenced", "resolved"):
        assert f'tsmon_alert_messages_total{{status="{status}"}} 0.0' in text
    for severity in ("minor", "major", "critical"):
        assert f'tsmon_alerts_fired_total{{severity="{severity}"}} 0.0' in text


def test_the_process_own_series_are_exported_but_not_in_the_snapshot() -> None:
    """A crash loop under systemd or compose (``changes(process_start_time_seconds)``) and memory nearing the unit's
    limit were invisible: the private registry held tsmon_* series only."""
    from prometheus_client import generate_latest

    metrics = Metrics()
    text = generate_latest(metrics.registry).decode()
    for series in ("process_start_time_seconds", "process_resident_memory_bytes", "python_info",
                   "python_gc_collections_total"):
        assert f"\n{series}" in text or f"\n# HELP {series}" in text, series
    assert all(key.startswith("tsmon_") for key in metrics.snapshot())
    assert len(generate_latest(Metrics().registry)) > 0  # a second registry in one process: the collectors are shared


def test_new_counters_sum_in_total(metrics: Metrics) -> None:
    metrics.commands.labels("pin", "ok").inc()
    metrics.commands.labels("silence", "refused").inc(2)
    metrics.alert_severity.labels("major").inc()
    metrics.calibrations.labels("new_normal").inc()
    metrics.snapshots.inc(5)
    assert metrics.total("tsmon_commands_total") == 3 and metrics.total("tsmon_alerts_fired_total") == 1
    assert metrics.total("tsmon_calibrations_total") == 1 and metrics.total("tsmon_state_snapshots_total") == 5
    metrics.lag.labels("tsmon.input", "0").set(17)
    metrics.restore_seconds.set(0.25)
    assert metrics.snapshot()["tsmon_consumer_lag{partition=0,topic=tsmon.input}"] == 17


def test_every_closed_label_set_is_exported_at_zero_from_the_start() -> None:
    """A new user looking at a fresh daemon's /metrics found no tsmon_dead_letters_total, tsmon_windows_skipped_total
    or tsmon_commit_retries_total: a series appeared only at its first event, so ``increase()`` missed that event
    and a rule on the rate had nothing to read. Every value of a closed label set is exported at 0."""
    import re
    from pathlib import Path

    from prometheus_client import generate_latest

    import monitor
    from monitor.metrics import RETRY_CAUSES, SKIP_REASONS
    from monitor.quality import KINDS
    from monitor.records import DEAD_LETTER_REASONS
    from monitor.windows import order_problem

    text = generate_latest(Metrics().registry).decode()
    for name, label, values in (("tsmon_dead_letters_total", "reason", DEAD_LETTER_REASONS),
                                ("tsmon_data_quality_events_total", "kind", KINDS),
                                ("tsmon_windows_skipped_total", "why", SKIP_REASONS),
                                ("tsmon_commit_retries_total", "cause", RETRY_CAUSES)):
        for value in values:
            assert f'{name}{{{label}="{value}"}} 0.0' in text, (name, value)
    # the lists are complete: every reason, skip and cause the code names is in them
    source = "\n".join(p.read_text() for p in Path(monitor.__file__).parent.rglob("*.py"))
    ordered = {str(order_problem(5, 5)).split(":")[0], str(order_problem(3, 5, 4)).split(":")[0]}
    assert len(ordered) == 2
    reasons = set(re.findall(r'BadRecord\(\s*"(\w+)"', source)) | ordered
    assert reasons and reasons <= set(DEAD_LETTER_REASONS), reasons - set(DEAD_LETTER_REASONS)
    assert set(re.findall(r'skipped\.labels\("(\w+)"\)', source)) == set(SKIP_REASONS)
    causes = set(re.findall(r'retries\.labels\("(\w+)"\)', source)) | set(re.findall(r'_failing\("(\w+)"', source))
    assert causes == set(RETRY_CAUSES)
    # TsmonControlCommandsRejected is increase() over these: a forged message, the first after a start, went uncounted
    labelled = set(re.findall(r'commands\.labels\("unknown", "(\w+)"\)', source))
    assert labelled == {"rejected", "error"}
    for outcome in labelled:
        assert f'tsmon_commands_total{{command="unknown",outcome="{outcome}"}} 0.0' in text, outcome


# --- tsmon status -------------------------------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the fixtures logged
    return cli_run(capsys, *args)


def test_status_table(server: HealthServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "status", "--url", server.url)
    assert code == 0
    first = next(line for line in out.splitlines() if "press-7" in line)
    # the whole alert id: ctl feedback --alert needs it (an operator pass: the 8 characters shown matched nothing)
    for cell in ("dense", "2024-01-01T00:10:00.000Z", "1234", "0.1235", "calibrated v3", "firing a1b2c3d4e5f6a7b8",
                 "17", "2990", "0.750"):
        assert cell in first, cell
    second = next(line for line in out.splitlines() if "pump[2]" in line)  # not taken for rich markup
    assert "lstm" in second and "2024-01-01T00:00:00.000Z (silent)" in second and "artifact" in second
    assert "(silent)" not in first


def test_status_json(server: HealthServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "status", "--url", server.url + "/", "--json")
    assert code == 0 and json.loads(out) == ROWS
    # found by the operator pass: host:port read "unknown url type", and the /streams URL itself a 404
    for url in (server.url.removeprefix("http://"), server.url + "/streams"):
        code, out, err = run(capsys, "status", "--url", url, "--json")
        assert code == 0 and json.loads(out) == ROWS, (url, err)


def test_status_of_every_instance_of_a_group(server: HealthServer, metrics: Metrics,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A Service in front of a group answers from one instance a request: status through it showed half the streams,
    another half each time (a review). ``--url`` repeated asks each; one that does not answer is said, the rest shown."""
    other = Stubs(rows=[{"stream": "boiler-1", "model": "lstm", "threshold_source": "artifact", "alert_state": "ok"}])
    second = HealthServer("127.0.0.1", 0, metrics.registry, other.health, other.readiness, other.streams)
    second.start()
    try:
        code, out, _ = run(capsys, "status", "--url", server.url, "--url", second.url, "--json")
        assert code == 0 and [(r["instance"], r["stream"]) for r in json.loads(out)] == [
            (server.url, "press-7"), (server.url, "pump[2]"), (second.url, "boiler-1")]
        code, out, _ = run(capsys, "status", "--url", server.url, "--url", second.url)
        assert code == 0 and "3 streams" in out and "instance" in out
        assert second.url in next(line for line in out.splitlines() if "boiler-1" in line)
        gone = f"http://127.0.0.1:{free_port()}"
        code, out, err = run(capsys, "status", "--url", gone, "--url", second.url, "--json")
        assert code == 1 and [r["stream"] for r in json.loads(out)] == ["boiler-1"]
        assert err.startswith(f"TsmonError: cannot reach the tsmon daemon at {gone}: ")
    finally:
        second.close()


def test_status_url_from_the_environment(server: HealthServer, stubs: Stubs, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSMON_HTTP__PORT", str(server.address[1]))
    stubs.rows = []
    code, out, _ = run(capsys, "status")
    assert code == 0 and out.strip() == "no streams yet"


def test_status_unreachable_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = run(capsys, "status", "--url", url)
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [err.strip()]
    assert err.startswith(f"TsmonError: cannot reach the tsmon daemon at {url}: ") and "http enabled" in err


def test_status_refuses_a_server_that_is_not_tsmon(server: HealthServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "status", "--url", server.url + "/metrics")  # answers /metrics/streams with 404
    assert code == 1 and err.startswith("TsmonError: the tsmon daemon at") and "HTTP 404" in err


def test_a_scrape_during_a_source_change_reads_one_threshold_series() -> None:
    """The series of the old source was removed and the new one made before its value was set: a scrape in
    between (its own thread) read 0 or nothing (946 of 5 780 reads in a review's run)."""
    import threading
    import time

    m = Metrics()
    stop, bad = threading.Event(), []

    def operator() -> None:
        while not stop.is_set():
            m.set_threshold("s", 3.0, "pinned")
            m.set_threshold("s", 2.0, "artifact")

    t = threading.Thread(target=operator)
    t.start()
    try:
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            rows = [s.value for f in m.registry.collect() if f.name == "tsmon_threshold" for s in f.samples
                    if s.labels["stream"] == "s"]
            if rows not in ([3.0], [2.0]):
                bad.append(rows)
    finally:
        stop.set()
        t.join(5)
    assert not bad, bad[:5]


def test_idle_connections_are_cut_and_one_address_gets_a_share(server: HealthServer) -> None:
    """64 idle connections (not a byte sent) took every slot for 10 s at a time, and /healthz went unanswered: a
    liveness probe failing restarts the pod (security review). A connection silent for READ_TIMEOUT_S is cut, and one
    address gets MAX_PER_CLIENT of the slots — not loopback, from which a sidecar proxy forwards every client."""
    from monitor import health

    host, port = server.address
    idle = [socket.create_connection((host, port), timeout=5) for _ in range(health.MAX_CONNECTIONS)]
    time.sleep(0.2)
    start, closed = time.monotonic(), 0
    for s in idle:
        s.settimeout(max(0.1, health.READ_TIMEOUT_S + 2 - (time.monotonic() - start)))
        try:
            closed += s.recv(1) == b""
        except (TimeoutError, OSError):
            pass
        s.close()
    assert closed == health.MAX_CONNECTIONS and time.monotonic() - start < health.READ_TIMEOUT_S + 1.5
    assert get(server.url + "/healthz")[0] == 200
    assert server._server is not None
    pairs = [socket.socketpair() for _ in range(health.MAX_PER_CLIENT + 1)]
    for i, (a, _) in enumerate(pairs):
        server._server.process_request(a, ("10.1.2.3", 40_000 + i))
    assert server._server.clients == {"10.1.2.3": health.MAX_PER_CLIENT}
    assert pairs[-1][1].recv(1) == b""  # the one over its share: closed unanswered
    assert get(server.url + "/healthz")[0] == 200  # another address: in at once
    assert [health._loopback(a) for a in ("127.0.0.6", "::1", "::ffff:127.0.0.1", "::ffff:10.1.2.3", "10.1.2.3")] == \
        [True, True, True, False, False]  # a dual-stack listener sees 127.0.0.1 as ::ffff:127.0.0.1
    for a, b in pairs:
        a.close()
        b.close()


def test_a_probe_gets_in_through_a_flood_of_idle_connections(server: HealthServer,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle loopback clients reconnecting as soon as they are cut (200 of them against 64 slots) answered 0 probes
    of 30: every slot held by a connection sending nothing, a probe closed unanswered. A newcomer now takes the slot
    of the connection that has waited longest without sending its request."""
    import threading

    from monitor import health

    monkeypatch.setattr(health._Handler, "timeout", 30.0)  # the flood outlasts the read timeout: always someone new
    assert server._server is not None
    server._server.slots = threading.BoundedSemaphore(4)
    host, port = server.address
    idle = [socket.create_connection((host, port), timeout=5) for _ in range(4)]
    try:
        time.sleep(0.2)
        answered = 0
        for _ in range(5):
            idle.append(socket.create_connection((host, port), timeout=5))  # the flood goes on
            answered += get(server.url + "/healthz")[0] == 200
        assert answered == 5
        idle[0].settimeout(2)
        assert idle[0].recv(1) == b""  # the oldest idle one was cut for them
    finally:
        for s in idle:
            s.close()


def test_a_connection_whose_request_is_in_is_not_the_one_cut() -> None:
    """Only a connection that has sent nothing is cut for a newcomer: a probe whose request waits in its socket for
    its thread (a flood of newcomers, a busy interpreter) was as likely to go. Asked without waiting: a peek on a
    socket with a timeout waited that long (the accepting thread, 30 s)."""
    from monitor import health

    a, b = socket.socketpair()
    try:
        a.settimeout(30)
        t0 = time.monotonic()
        assert not health._has_bytes(a) and time.monotonic() - t0 < 1
        b.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
        assert health._has_bytes(a)
        assert a.recv(100).startswith(b"GET")  # a peek: nothing taken from it
    finally:
        a.close()
        b.close()


def test_a_large_answer_read_slowly_arrives_whole(server: HealthServer, stubs: Stubs) -> None:
    """The 2 s read timeout also bounded the whole write of the answer: a 6 MB /streams (10 000 streams) read at
    1 MB/s was cut after 5.4 MB, invalid JSON for tsmon status (regression review). The answer has the rest of the
    request's deadline."""
    stubs.rows = [{**ROWS[0], "stream": f"dev-{i:05d}", "pad": "x" * 400} for i in range(4000)]  # ~2 MB
    assert server._server is not None  # small kernel buffers, so that the answer waits for its reader
    server._server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32_768)
    host, port = server.address
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32_768)
    s.sendall(b"GET /streams HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    got, start = b"", time.monotonic()
    while chunk := s.recv(32_768):
        got += chunk
        time.sleep(0.05)  # a slow reader: at most ~650 kB/s
    s.close()
    _, _, body = got.partition(b"\r\n\r\n")
    assert len(json.loads(body)["streams"]) == 4000
    assert time.monotonic() - start > 2.5, "not slow enough to test anything"


def test_streams_body_is_made_once_per_rows_a_row_at_a_time_and_kept_while_they_live(
        server: HealthServer, stubs: Stubs, monkeypatch: pytest.MonkeyPatch) -> None:
    """One json.dumps of 10 000 rows held the GIL — and so the scoring loop — for 55–225 ms per request, and every
    client paid it again (a review). The body is made once per Rows the daemon hands out (new ones when it rebuilds
    them), a row per call, is the JSON it was, and is let go with its rows (it kept a 5 MB body and the old rows
    alive for good: the review of the fix)."""
    import gc

    from monitor import health
    from monitor.health import Rows

    calls: list[object] = []
    dumps = json.dumps

    def counting(obj: object, **kw: Any) -> str:
        calls.append(obj)
        return dumps(obj, **kw)

    monkeypatch.setattr(health.json, "dumps", counting)
    stubs.rows = Rows(dict(r) for r in ROWS)
    first = get(server.url + "/streams")[2]
    assert first == (dumps({"streams": ROWS}, default=str) + "\n").encode()
    assert calls == ROWS  # a call per row, never one for all of them
    assert get(server.url + "/streams")[2] == first and len(calls) == len(ROWS)  # the same rows: not made again
    stubs.rows = Rows([dict(ROWS[1])])  # rebuilt by the loop; the rows before are gone, and their body with them
    gc.collect()
    assert server._body is None
    assert json.loads(get(server.url + "/streams")[2]) == {"streams": [ROWS[1]]}
    assert server._body is not None
    stubs.rows = Rows()
    assert json.loads(get(server.url + "/streams")[2]) == {"streams": []}
    stubs.rows = [dict(ROWS[0])]  # a plain list may change: made for every request
    n = len(calls)
    get(server.url + "/streams")
    stubs.rows[0]["stream"] = "changed"
    assert json.loads(get(server.url + "/streams")[2])["streams"][0]["stream"] == "changed" and len(calls) == n + 2


def _raw(server: HealthServer, request: bytes) -> bytes:
    host, port = server.address
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(request)
        got = b""
        while chunk := s.recv(65_536):
            got += chunk
    return got


def test_a_request_head_over_16_kb_is_refused_and_a_normal_one_served(server: HealthServer) -> None:
    """The stdlib took 100 header lines of 64 KB each: 64 such requests at once took the daemon from 380 MB to
    1.25 GB (a review). The head is capped at MAX_HEAD_BYTES: 431 for headers, 414 for the request line."""
    from monitor.health import MAX_HEAD_BYTES

    headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(MAX_HEAD_BYTES // 1000 + 1))
    assert _raw(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n").startswith(b"HTTP/1.0 431")
    long_line = b"GET /healthz?" + b"q" * MAX_HEAD_BYTES + b" HTTP/1.1\r\n\r\n"
    assert _raw(server, long_line).startswith(b"HTTP/1.0 414")
    fits = headers[: MAX_HEAD_BYTES // 2]
    fits = fits[: fits.rindex(b"\r\n") + 2]
    assert _raw(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fits + b"\r\n").startswith(b"HTTP/1.0 200")
    assert get(server.url + "/healthz")[0] == 200


def test_head_answers_the_gets_status_and_headers_without_a_body(server: HealthServer) -> None:
    """curl -I and uptime checkers send HEAD: it was 501 with an HTML body."""
    conn = http.client.HTTPConnection(*server.address, timeout=5)
    conn.request("HEAD", "/readyz")
    resp = conn.getresponse()
    assert (resp.status, resp.getheader("Content-Type"), resp.read()) == (503, "application/json", b"")
    assert int(resp.getheader("Content-Length")) == len(get(server.url + "/readyz")[2])
    conn.close()


def test_the_listen_queue_takes_a_burst_of_connections_while_none_is_accepted(stubs: Stubs, metrics: Metrics) -> None:
    """At the stdlib's backlog of 5 a connection flood dropped SYNs, each retried 1 s later — the kubelet's probe
    timeout — and 9 of 30 liveness probes went unanswered (a review). Here the server accepts nothing (not
    serving yet): 64 connections must still be queued by the kernel, not left retrying."""
    import select as sel

    from monitor.health import _Server

    owner = HealthServer("127.0.0.1", 0, metrics.registry, stubs.health, stubs.readiness, stubs.streams)
    server = _Server(("127.0.0.1", 0), owner)  # listening, never served
    clients = []
    try:
        for _ in range(64):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(server.server_address)
            clients.append(c)
        deadline, pending = time.monotonic() + 0.8, set(clients)
        while pending and time.monotonic() < deadline:
            _, done, _ = sel.select([], list(pending), [], 0.05)
            pending -= {c for c in done if c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0}
        assert not pending, f"{len(pending)} of 64 connections not queued within 0.8 s"
    finally:
        for c in clients:
            c.close()
        server.server_close()
