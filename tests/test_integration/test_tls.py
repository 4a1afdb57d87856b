"""The daemon and its commands over TLS, and what a start says when TLS is set up wrong.

The local broker speaks only plaintext, so a proxy (:mod:`tests.proxy`) ends each client's TLS session in front
of it, the broker advertising the proxy's address: every client (the daemon's consumer, producer and admin, the
test's own) goes through TLS, mutual by default. Certificates come from a test CA (trustme), made per module.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import synthetic_series
from tests.test_integration.test_faults import http_url, wait_for, watch
from tests.test_integration.test_run_cli import log_events, produce, tsmon_env, wait_for_firing, write_config

trustme = pytest.importorskip("trustme")


@dataclass
class Tls:
    """The broker behind TLS proxies, and the files a client needs."""

    bootstrap: str  # mutual TLS, certificate for 127.0.0.1 and localhost; the address the broker advertises
    localhost_only: str  # a proxy whose certificate names localhost only
    plaintext: str  # the broker itself
    ca: Path
    other_ca: Path  # a CA that signed nothing here
    cert: Path  # the client's certificate and key
    key: Path
    refused: list[str]  # handshakes the mutual-TLS proxy refused
    proxy: Any  # the mutual-TLS proxy (tests.proxy.KafkaProxy)
    untrusted: ssl.SSLContext  # a server context for it whose certificate the clients' CA did not sign

    def client(self, **over: Any) -> dict[str, Any]:
        """kafka-python settings of a client the proxies accept."""
        return {"security_protocol": "SSL", "ssl_cafile": str(self.ca), "ssl_certfile": str(self.cert),
                "ssl_keyfile": str(self.key), **over}

    def config(self, path: Path, topic: str, model: Path, bootstrap: str | None = None, **kafka: Any) -> Path:
        """write_config's file with this TLS client's settings in [kafka] (``kafka`` overrides them)."""
        settings = {"security_protocol": "SSL", "ssl_cafile": str(self.ca), "ssl_certfile": str(self.cert),
                    "ssl_keyfile": str(self.key), "bootstrap_timeout_ms": 4000, **kafka}
        cfg = write_config(path, bootstrap or self.bootstrap, topic, model, '\n[control]\nkey = "' + "k" * 32 + '"\n')
        lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items() if v is not None)
        cfg.write_text(cfg.read_text().replace("[kafka]\n", "[kafka]\n" + lines, 1))
        return cfg


def _server(cert: Any, ca: Any, mutual: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    if mutual:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(ctx)
    return ctx


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    from monitor.broker import LocalBroker, free_port
    from tests.proxy import KafkaProxy

    ca, other = trustme.CA(), trustme.CA()
    files = tmp_path_factory.mktemp("tls")
    ca.cert_pem.write_to_path(str(files / "ca.pem"))
    other.cert_pem.write_to_path(str(files / "other-ca.pem"))
    client = ca.issue_cert("tsmon-client@example.org")
    client.private_key_and_cert_chain_pem.write_to_path(str(files / "client.pem"))
    client.private_key_pem.write_to_path(str(files / "client.key"))
    port = free_port()
    mutual = KafkaProxy(port, client_id="none", tls=_server(ca.issue_cert("127.0.0.1", "localhost"), ca, True))
    named = KafkaProxy(port, client_id="none", tls=_server(ca.issue_cert("localhost"), ca, False))
    broker = LocalBroker(port=port, advertised_port=mutual.port)
    broker.start()
    try:
        with mutual, named:
            yield Tls(f"127.0.0.1:{mutual.port}", f"127.0.0.1:{named.port}", broker.bootstrap, files / "ca.pem",
                      files / "other-ca.pem", files / "client.pem", files / "client.key", mutual.refused, mutual,
                      _server(other.issue_cert("127.0.0.1"), ca, True))
    finally:
        broker.stop()


def tsmon(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "monitor", *args], cwd=cwd, env=tsmon_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_the_daemon_alerts_over_mutual_tls_and_its_commands_reach_it(tls: Tls, stream_model: Path, tmp_path: Path,
                                                                     client: str) -> None:
    """Input, alerts, control and audit topics, the changelog: all over TLS with a client certificate. `tsmon replay`
    writes a file into the input, `tsmon tail` reads the alerts and `tsmon ctl` pins a threshold, each through the
    configuration's settings."""
    if client == "confluent":
        pytest.importorskip("confluent_kafka")
    topic, stream = f"t-tls-{client}", f"dev-tls-{client}"  # a stream of its own: the changelog is shared
    cfg = tls.config(tmp_path / "tsmon.toml", topic, stream_model, client=client)
    produce(tls.bootstrap, topic, stream, burst=1000, **tls.client())
    log = tmp_path / "stderr.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "monitor", "run", "--config", str(cfg)], cwd=tmp_path,
                                env=tsmon_env(), stdout=subprocess.DEVNULL, stderr=err)
    try:
        fired = wait_for_firing(tls.bootstrap, f"{topic}.alerts", proc, **tls.client())
        assert fired["stream"] == stream
        csv = tmp_path / "replayed.csv"
        synthetic_series(n=400).drop(columns="label").to_csv(csv, index=False)
        replayed = f"replayed-{client}"  # into the configuration's input topic, over its TLS
        sent = tsmon("replay", "--config", str(cfg), "--input", str(csv), "--stream", replayed, cwd=tmp_path)
        assert sent.returncode == 0, sent.stderr
        deadline = time.monotonic() + 30
        while not any(e.get("event") == "stream_started" and e.get("stream") == replayed for e in log_events(log)):
            assert time.monotonic() < deadline, "the replayed stream never reached the daemon"
            time.sleep(0.2)
        tail = tsmon("tail", "--config", str(cfg), "--from-beginning", "--idle", "2", cwd=tmp_path)
        assert tail.returncode == 0, tail.stderr
        assert any(json.loads(line)["value"].get("alert_id") == fired["alert_id"] for line in tail.stdout.splitlines())
        pin = tsmon("ctl", "pin", "--config", str(cfg), "--stream", stream, "--threshold", "9", "--reason", "tls",
                    "--timeout", "20", cwd=tmp_path)
        assert pin.returncode == 0 and "applied" in pin.stdout, pin.stdout + pin.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0
    assert not any(e.get("event") == "broker_unreachable" for e in log_events(log))


# what is wrong → what the one-line error must say; whether it must come at once (a setting wrong for sure), else
# whether the start probed again before its limit (a quick failure) and logged it
CASES = {
    "untrusted CA": ({"ssl_cafile": "other"}, "the broker's certificate is not trusted", True, False),
    "hostname": ({"bootstrap": "localhost_only"}, "certificate is not valid for 127.0.0.1", True, False),
    # (the alert that names it, or — when the probe's request crosses it — a reset right after the handshake)
    "no client certificate": ({"ssl_certfile": None, "ssl_keyfile": None}, "client certificate", True, False),
    "plaintext to TLS": ({"security_protocol": "PLAINTEXT", "ssl_cafile": None, "ssl_certfile": None,
                          "ssl_keyfile": None},
                         "(a TLS listener, or a broker starting or stopping? kafka.security_protocol is PLAINTEXT)",
                         False, True),
    # kafka-python waited for ever here: the broker reads the ClientHello as the size of a request and waits for it
    # (one probe takes the whole 4 s limit)
    "TLS to plaintext": ({"bootstrap": "plaintext"}, "no answer to the TLS handshake", False, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_start_with_tls_set_up_wrong_says_what_is_wrong(tls: Tls, stream_model: Path, tmp_path: Path,
                                                          case: str) -> None:
    """Each used to end in "Unable to bootstrap" after 35 s, naming nothing — or, against a plaintext port, never
    ended. Now a setting that is wrong for sure stops the start at once; the others at bootstrap_timeout_ms (4 s)."""
    over, says, at_once, retried = CASES[case]
    over = dict(over)
    where = over.pop("bootstrap", None)
    if over.get("ssl_cafile") == "other":
        over["ssl_cafile"] = str(tls.other_ca)
    cfg = tls.config(tmp_path / "tsmon.toml", f"t-tls-bad-{len(case)}", stream_model,
                     bootstrap=getattr(tls, where) if where else None, **over)
    run = tsmon("run", "--config", str(cfg), cwd=tmp_path, timeout=90)
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 1 and last.startswith("BrokerError: cannot reach a broker") and says in last, run.stderr
    assert "Traceback" not in run.stderr
    # a setting wrong for sure is said before the models are warmed (it was said after the warm-up: 4 s on idle
    # cores, 27 s on busy ones); the others, which a broker starting can look like, after it (a wrong precision is
    # said first); at once is said by the message (no "within"), not by a timing
    assert ('"models_warmed"' in run.stderr) is not at_once
    assert ("within 4 s" in last) is not at_once
    assert ('"broker_unreachable"' in run.stderr) is retried  # said while it retried


def test_a_broker_certificate_no_longer_trusted_is_named_while_the_daemon_runs(tls: Tls, stream_model: Path,
                                                                                tmp_path: Path) -> None:
    """The broker's certificate is replaced by one the daemon's CA file did not sign (a rotation that went wrong)
    and its connections are dropped: the daemon reports the broker unavailable and logs kafka-python's reason
    (through the standard library to a NullHandler, it was nowhere); the trusted certificate back, it recovers."""
    topic = "t-tls-rotation"
    cfg = tls.config(tmp_path / "tsmon.toml", topic, stream_model)
    produce(tls.bootstrap, topic, "dev-rotation", burst=1000, n=400, **tls.client())
    log = tmp_path / "stderr.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "monitor", "run", "--config", str(cfg)], cwd=tmp_path,
                                env=tsmon_env(), stdout=subprocess.DEVNULL, stderr=err)
    trusted = tls.proxy.tls
    try:
        wait_for(lambda: '"stream_started"' in log.read_text(), proc)
        url = http_url(log)
        watch(f"{url}/readyz", 200, proc, 30)
        tls.proxy.tls = tls.untrusted
        tls.proxy.drop()
        _, reason = watch(f"{url}/readyz", 503, proc, 40)
        assert "broker" in reason, reason
        wait_for(lambda: any(e.get("event") == "kafka_client_log" and "CERTIFICATE_VERIFY_FAILED" in e["message"]
                             for e in log_events(log)), proc, 20)
        tls.proxy.tls = trusted
        watch(f"{url}/readyz", 200, proc, 60)
    finally:
        tls.proxy.tls = trusted
        proc.terminate()
        proc.wait(timeout=30)
    said = [e for e in log_events(log) if e.get("event") == "kafka_client_log"]
    print(f"{len(said)} kafka_client_log lines; reason {reason!r}")
    assert proc.returncode == 0


def test_the_daemon_comes_back_after_its_broker_address_answered_no_tls_handshake_for_a_while(
        tls: Tls, stream_model: Path, tmp_path: Path) -> None:
    """The address takes connections and answers none for 8 s (a balancer without a healthy backend), its open
    connections dropped: kafka-python's reconnects waited in their TLS handshakes with no limit, so the daemon
    stayed "broker unavailable" after the address answered again (a producer was still stuck 240 s later). With
    the handshake bounded by request_timeout_ms (3 s here) the reconnects fail, retry, and find it again."""
    topic = "t-tls-blackhole"
    cfg = tls.config(tmp_path / "tsmon.toml", topic, stream_model, request_timeout_ms=3000, fetch_max_wait_ms=100)
    produce(tls.bootstrap, topic, "dev-blackhole", burst=1000, n=400, **tls.client())
    log = tmp_path / "stderr.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "monitor", "run", "--config", str(cfg)], cwd=tmp_path,
                                env=tsmon_env(), stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: '"stream_started"' in log.read_text(), proc)
        url = http_url(log)
        watch(f"{url}/readyz", 200, proc, 30)
        tls.proxy.blackhole.set()
        tls.proxy.drop()
        watch(f"{url}/readyz", 503, proc, 30)
        time.sleep(8)
        tls.proxy.blackhole.clear()
        back, _ = watch(f"{url}/readyz", 200, proc, 60)
    finally:
        tls.proxy.blackhole.clear()
        proc.terminate()
        proc.wait(timeout=30)
    print(f"ready again {back:.1f} s after the address answered")
    assert proc.returncode == 0
