"""The broker probe (monitor.reach) against loopback servers that answer in each wrong way, and the real broker."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from models.errors import BrokerError
from monitor import reach
from monitor.config import KafkaConfig, load_config


def kafka(servers: str, **over: Any) -> KafkaConfig:
    return load_config(None, {"kafka.bootstrap_servers": servers, "kafka.topics": "x",
                              **{f"kafka.{k}": v for k, v in over.items()}}).kafka


@contextmanager
def server(answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """A loopback server that runs ``answer`` on each connection (bounded: 20 connections, 5 s each)."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        for _ in range(20):
            while not done.is_set():
                try:
                    conn, _ = srv.accept()
                    break
                except TimeoutError:
                    continue
            else:
                return
            with conn:
                conn.settimeout(5)
                try:
                    answer(conn)
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{srv.getsockname()[1]}"
    finally:
        done.set()
        t.join(10)
        srv.close()


def request(conn: socket.socket) -> bytes:
    size = struct.unpack(">i", conn.recv(4))[0]
    return conn.recv(size)


def kafka_answer(conn: socket.socket) -> None:
    """Answers the ApiVersions request with its correlation id (the rest of a real answer is not read)."""
    body = request(conn)
    assert struct.unpack(">hh", body[:4]) == (reach.API_VERSIONS, 0)
    conn.sendall(struct.pack(">ii", 6, struct.unpack(">i", body[4:8])[0]) + b"\0\0")


def test_a_kafka_answer_passes_and_the_real_broker_answers(broker: Any) -> None:
    with server(kafka_answer) as address:
        assert reach.probe(address, kafka(address), 2) is None
    assert reach.probe(broker.bootstrap, kafka(broker.bootstrap), 5) is None
    reach.wait_for_brokers(kafka(f"127.0.0.1:1,{broker.bootstrap}"), 5)  # one address that answers is enough


@pytest.mark.parametrize(("answer", "says", "lasting"), [
    (lambda c: (request(c), c.sendall(b"\x15\x03\x03\x00\x02\x02\x32")), "answers in TLS: set kafka.security_protocol",
     True),  # a TLS listener's alert to a plaintext request
    (lambda c: (request(c), c.sendall(struct.pack(">ii", 6, 77) + b"\0\0")), "not as a Kafka broker", True),
    (lambda c: request(c), "closed the connection without answering", False),
    (lambda c: (request(c), threading.Event().wait(3)), "no answer to the Kafka request within 1.0 s", False),
])
def test_each_wrong_answer_is_named(answer: Callable[[socket.socket], Any], says: str, lasting: bool) -> None:
    with server(answer) as address:
        problem = reach.probe(address, kafka(address), 1.0)
    assert problem is not None and says in problem.reason and problem.lasting is lasting, problem


def test_tls_against_a_plaintext_server_is_named() -> None:
    """A ClientHello a server closes on (as Kafka's plaintext listener does) or never answers (as Tansu does)."""
    with server(lambda c: c.recv(5)) as address:
        problem = reach.probe(address, kafka(address, security_protocol="SSL"), 1.0)
    assert problem is not None and "during the TLS handshake" in problem.reason
    assert "a plaintext listener?" in problem.reason
    with server(lambda c: threading.Event().wait(3)) as address:
        problem = reach.probe(address, kafka(address, security_protocol="SSL"), 1.0)
    assert problem is not None and problem.reason.startswith("no answer to the TLS handshake within 1.0 s")


def test_refused_and_unresolvable_addresses() -> None:
    from monitor.broker import free_port

    refused = reach.probe(f"127.0.0.1:{free_port()}", kafka("127.0.0.1:9092"), 1.0)
    assert refused is not None and refused.reason.startswith("cannot connect") and not refused.lasting
    unknown = reach.probe("no-such-host.invalid:9092", kafka("127.0.0.1:9092"), 1.0)
    assert unknown is not None and "does not resolve" in unknown.reason and not unknown.lasting


class Clock:
    def __init__(self) -> None:
        self.now, self.slept = 0.0, []

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_waiting_backs_off_until_the_limit_and_a_lasting_problem_stops_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    answers: list[reach.Problem | None] = []
    monkeypatch.setattr(reach, "probe", lambda address, *_: answers.pop(0) if answers else
                        reach.Problem(address, "cannot connect: refused"))
    clock, rounds = Clock(), []
    with pytest.raises(BrokerError, match=r"^cannot reach a broker within 20 s: a:1: cannot connect: refused; "
                                          r"b:2: cannot connect: refused \(give --bootstrap\)$"):
        reach.wait_for_brokers(kafka("a:1,b:2"), 20, "give --bootstrap", on_problems=rounds.append,
                               clock=lambda: clock.now, sleep=clock.sleep)
    assert clock.slept == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 2.5] and len(rounds) == 7

    clock = Clock()
    answers[:] = [reach.Problem("a:1", "refused"), None]  # the second address answers: done
    reach.wait_for_brokers(kafka("a:1,b:2"), 20, clock=lambda: clock.now, sleep=clock.sleep)
    assert clock.slept == []

    answers[:] = [reach.Problem("a:1", "not trusted", True), reach.Problem("b:2", "not trusted", True)]
    with pytest.raises(BrokerError, match=r"^cannot reach a broker: a:1: not trusted; b:2: not trusted$"):
        reach.wait_for_brokers(kafka("a:1,b:2"), 20, clock=lambda: clock.now, sleep=clock.sleep)
    assert clock.slept == []  # a certificate will not be mended by waiting

    answers[:] = [reach.Problem("a:1", "not trusted", True), reach.Problem("b:2", "refused")]
    with pytest.raises(BrokerError, match="within 20 s"):  # one address may still come up: waited for
        reach.wait_for_brokers(kafka("a:1,b:2"), 20, clock=lambda: clock.now, sleep=clock.sleep)
    assert clock.slept

    # lasting_only (the daemon's round before its warm-up): one round, raising only for lasting problems
    clock = Clock()
    answers[:] = [reach.Problem("a:1", "not trusted", True), reach.Problem("b:2", "refused")]
    reach.wait_for_brokers(kafka("a:1,b:2"), 20, clock=lambda: clock.now, sleep=clock.sleep, lasting_only=True)
    assert clock.slept == [] and answers == []
    answers[:] = [reach.Problem("a:1", "not trusted", True), reach.Problem("b:2", "not trusted", True)]
    with pytest.raises(BrokerError, match=r"^cannot reach a broker: a:1: not trusted; b:2: not trusted$"):
        reach.wait_for_brokers(kafka("a:1,b:2"), 20, clock=lambda: clock.now, sleep=clock.sleep, lasting_only=True)


def test_tls_files_that_do_not_load_are_a_config_error_before_any_connection(tmp_path) -> None:
    """The probe built its context inside the connection's try: a missing CA file read as "closed the connection
    during the TLS handshake" and was retried to the limit, or, with nothing listening, not named at all."""
    from models.errors import ConfigError

    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    for cafile, says in ((tmp_path / "missing.pem", "is not a readable file"), (garbage, "no CA certificate")):
        with pytest.raises(ConfigError, match=f"^kafka.ssl_cafile: .*{says}"):
            reach.wait_for_brokers(kafka("127.0.0.1:1", security_protocol="SSL", ssl_cafile=str(cafile)), 30)
    with pytest.raises(ConfigError, match="^kafka.ssl_certfile / ssl_keyfile: the client certificate and its key"):
        reach.wait_for_brokers(kafka("127.0.0.1:1", security_protocol="SSL", ssl_certfile=str(garbage),
                                     ssl_keyfile=str(garbage)), 30)


def test_a_server_that_trickles_its_answer_is_cut_at_the_limit() -> None:
    """Each recv had the whole limit: one byte every 0.4 s took 3.2 s of a 1 s limit."""
    import time

    def trickle(conn: socket.socket) -> None:
        request(conn)
        for b in struct.pack(">ii", 6, 1):
            conn.sendall(bytes([b]))
            time.sleep(0.4)

    with server(trickle) as address:
        started = time.monotonic()
        problem = reach.probe(address, kafka(address), 1.0)
        took = time.monotonic() - started
    assert problem is not None and problem.reason.startswith("no answer to the Kafka request within 1.0 s")
    assert took < 1.5, took


def test_a_signal_during_the_tls_handshake_leaves_no_socket_open() -> None:
    """`tsmon run` ends a start on SIGTERM by raising: raised in the handshake, wrap_socket kept the socket."""
    import gc
    import signal
    import warnings

    class Stop(Exception):
        pass

    def stop(_signum: int, _frame: Any) -> None:
        raise Stop

    previous = signal.signal(signal.SIGALRM, stop)
    try:
        with server(lambda c: threading.Event().wait(3)) as address, warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(Stop):
                reach.probe(address, kafka(address, security_protocol="SSL"), 2.0)
            gc.collect()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not [w for w in seen if issubclass(w.category, ResourceWarning)], [str(w.message) for w in seen]


def test_kafka_pythons_tls_handshake_gets_a_limit_once_and_an_unknown_one_is_left_alone(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from kafka.net.transport import KafkaSSLTransport

    monkeypatch.setattr(KafkaSSLTransport, "handshake", KafkaSSLTransport.handshake)  # restored afterwards
    monkeypatch.setattr(reach, "_HANDSHAKE_LIMIT_S", [30.0])
    assert reach.bound_tls_handshakes(3.0) and reach.bound_tls_handshakes(5.0)
    assert KafkaSSLTransport.handshake._tsmon_bounded and reach._HANDSHAKE_LIMIT_S == [5.0]  # the last limit wins

    async def handshake(self: Any, timeout_at: float | None = None) -> None:  # as a later kafka-python may have it
        pass

    monkeypatch.setattr(KafkaSSLTransport, "handshake", handshake)
    assert not reach.bound_tls_handshakes(3.0) and KafkaSSLTransport.handshake is handshake
    said = capsys.readouterr()
    assert "kafka_tls_handshake_unbounded" in said.out + said.err  # (structlog's stream depends on earlier tests)


def test_a_silent_first_address_leaves_the_second_time_to_answer() -> None:
    """Found by review: the first address took the whole limit and a healthy second one got 0.1 s."""
    import time

    def slow(conn: socket.socket) -> None:
        time.sleep(0.15)  # a broker 150 ms away
        kafka_answer(conn)

    with server(lambda c: threading.Event().wait(5)) as silent, server(slow) as healthy:
        reach.wait_for_brokers(kafka(f"{silent},{healthy}"), 4)


def test_no_tls_version_in_common_stops_at_once(tmp_path) -> None:
    ca = pytest.importorskip("trustme").CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # a server of the past, on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version, ctx.maximum_version = ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1

    def old_tls(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            ctx.wrap_socket(conn, server_side=True).recv(1)

    with server(old_tls) as address, pytest.raises(BrokerError, match=r"^cannot reach a broker: .*no TLS version"):
        reach.wait_for_brokers(kafka(address, security_protocol="SSL", ssl_cafile=str(tmp_path / "ca.pem")), 30)


def test_a_close_right_after_the_tls_handshake_names_the_client_certificate(tmp_path) -> None:
    """With TLS 1.3 a broker that wants a client certificate refuses after the handshake; when the probe's request
    crossed its alert the connection was reset first, and the start retried "closed the connection" to its limit
    (the mutual-TLS test failed once in CI that way)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)

    def handshake_then_reset(conn: socket.socket) -> None:
        tls = ctx.wrap_socket(conn, server_side=True)
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
        tls.close()

    with server(handshake_then_reset) as address:
        bare = reach.probe(address, kafka(address, security_protocol="SSL", ssl_cafile=str(tmp_path / "ca.pem")), 2)
        client = ca.issue_cert("tsmon")
        client.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
        with_cert = reach.probe(address, kafka(address, security_protocol="SSL", ssl_cafile=str(tmp_path / "ca.pem"),
                                               ssl_certfile=str(tmp_path / "client.pem")), 2)
    assert bare is not None and bare.lasting and "most likely wants a client certificate" in bare.reason, bare
    assert with_cert is not None and not with_cert.lasting, with_cert  # one is set: not that, waited for
