"""Can the configured brokers be reached with these settings? One bounded probe per bootstrap address — the TCP
connection, the TLS handshake when the protocol uses TLS, one Kafka ApiVersions request — that names what failed.

The Kafka clients say none of it: kafka-python reports every failure to bootstrap as "Unable to bootstrap" after
30 s (an untrusted certificate, a refused client certificate and a closed port all read the same), and its TLS
handshake has no time limit (3.0.12): a listener that accepts the connection and never answers the handshake — a
plaintext port with ``security_protocol = "SSL"`` — held ``tsmon run`` for good, without a log line. Callers probe
before they build any client (:func:`wait_for_brokers`), so a start fails within its limit, with the reason;
and the probe gives kafka-python's own TLS handshakes a limit (:func:`bound_tls_handshakes`), so a client that
reconnects into a black hole later fails and retries instead of waiting for good.
"""

from __future__ import annotations

import inspect
import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from models.errors import BrokerError, ConfigError
from monitor import logs

if TYPE_CHECKING:
    from monitor.config import KafkaConfig

API_VERSIONS = 18
_TLS_RECORD = (0x15, 0x16)  # alert, handshake: what a TLS listener sends back to a plaintext request
# OpenSSL reasons that mean "this peer does not speak TLS here" (a plaintext listener answering a ClientHello)
_NOT_TLS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL",
            "HTTP_REQUEST")
# alerts a broker sends when it wants, or does not accept, the client's certificate
_CLIENT_CERT = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN", "ACCESS_DENIED",
                "CERTIFICATE_EXPIRED", "CERTIFICATE_REVOKED")


@dataclass(frozen=True)
class Problem:
    """Why one address failed. ``lasting``: a setting is wrong (certificate, protocol), waiting will not help."""

    address: str
    reason: str
    lasting: bool = False

    def __str__(self) -> str:
        return f"{self.address}: {self.reason}"


def tls_context(kafka: KafkaConfig) -> ssl.SSLContext:
    """The context kafka-python's TLS transport builds from the same settings (TLS ≥ 1.2, the CA file or the
    system's, the hostname check as configured, the client certificate when given). A file that does not load is
    a :class:`ConfigError` naming its setting, not a connection problem."""
    kafka.check_files()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = kafka.ssl_check_hostname
    try:
        if kafka.ssl_cafile:
            ctx.load_verify_locations(kafka.ssl_cafile)
        else:
            ctx.load_default_certs()
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        where = kafka.ssl_cafile or "not set, and the system's CA certificates"
        raise ConfigError(f"kafka.ssl_cafile: {where} holds no CA certificate that loads ({exc})") from None
    if kafka.ssl_certfile:
        try:
            ctx.load_cert_chain(kafka.ssl_certfile, kafka.ssl_keyfile)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"kafka.ssl_certfile / ssl_keyfile: the client certificate and its key do not load "
                              f"({exc})") from None
    return ctx


def _api_versions(client_id: str, correlation: int) -> bytes:
    """An ApiVersions v0 request (every broker since Kafka 0.10 answers it, before any SASL exchange)."""
    cid = client_id.encode()[:200]
    body = struct.pack(">hhih", API_VERSIONS, 0, correlation, len(cid)) + cid
    return struct.pack(">i", len(body)) + body


def _left(end: float) -> float:
    """Seconds to ``end``; TimeoutError once it has passed (each blocking step gets only what is left)."""
    left = end - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _read(sock: socket.socket, n: int, end: float) -> bytes:
    """``n`` bytes, or fewer if the peer closed; TimeoutError at ``end`` (a server trickling bytes included)."""
    data = b""
    while len(data) < n:
        sock.settimeout(_left(end))
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _guess(kafka: KafkaConfig, step: str) -> str:
    """What a connection closed, or left unanswered, at ``step`` most likely means."""
    if not kafka.security_protocol.endswith("SSL"):
        return (f" (a TLS listener, or a broker starting or stopping? kafka.security_protocol is "  # (one that was
                f"{kafka.security_protocol})")  # shutting down got the TLS guess alone: an on-call pass)
    if step == "TLS handshake":
        return f" (a plaintext listener? kafka.security_protocol is {kafka.security_protocol})"
    if step == "Kafka request":
        return " (a broker that wants a client certificate? kafka.ssl_certfile, kafka.ssl_keyfile)"
    return ""


def _closed(address: str, kafka: KafkaConfig, step: str, what: str) -> Problem:
    """The peer closed (or reset) the connection without a word at ``step``. Right after a TLS handshake, with no
    client certificate set, that is a broker that wants one: with TLS 1.3 its refusal comes after the handshake,
    and when the request crosses it the connection is reset before the alert that names it can be read (the
    mutual-TLS test failed once in CI that way, "closed" instead of "certificate required")."""
    if step == "Kafka request" and kafka.security_protocol.endswith("SSL") and not kafka.ssl_certfile:
        return Problem(address, f"{what} right after the TLS handshake: the broker most likely wants a client "
                                "certificate (kafka.ssl_certfile and kafka.ssl_keyfile are not set)", True)
    return Problem(address, f"{what}{_guess(kafka, step)}")


def _tls_problem(exc: ssl.SSLError, address: str, host: str, step: str, kafka: KafkaConfig) -> Problem:
    """An OpenSSL failure in words, with the setting that decides it."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or str(exc)
        if "mismatch" in message or "not valid for" in message:
            return Problem(address, f"the broker's certificate is not valid for {host} ({message}): connect by a "
                                    "name it holds, or set kafka.ssl_check_hostname = false", True)
        return Problem(address, f"the broker's certificate is not trusted ({message}): kafka.ssl_cafile must hold "
                                "the CA that signed it", True)
    reason = exc.reason or str(exc)
    if isinstance(exc, ssl.SSLEOFError) or "EOF" in reason:  # closed without a word: not a setting for sure
        return _closed(address, kafka, step, f"closed the connection during the {step}: {reason}")
    if any(r in reason for r in _NOT_TLS):
        return Problem(address, f"does not answer in TLS ({reason}): a plaintext listener? "
                                "(kafka.security_protocol)", True)
    if any(r in reason for r in _CLIENT_CERT):
        return Problem(address, f"the broker refused the TLS session ({reason}): it may want a client certificate "
                                "it trusts (kafka.ssl_certfile, kafka.ssl_keyfile)", True)
    if any(r in reason for r in ("PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE")):
        return Problem(address, f"no TLS version in common with the broker ({reason}): the clients need TLS 1.2 "
                                "or later", True)
    if "HANDSHAKE_FAILURE" in reason:
        return Problem(address, f"the broker ended the TLS handshake ({reason}): no cipher in common, or it "
                                "wants a client certificate (kafka.ssl_certfile, kafka.ssl_keyfile)", True)
    return Problem(address, f"TLS failed: {reason}")  # not known to be a setting (a proxy's internal error …)


def probe(address: str, kafka: KafkaConfig, timeout_s: float, ctx: ssl.SSLContext | None = None) -> Problem | None:
    """Connect to one bootstrap address as the clients would and ask it for its API versions; None when a Kafka
    broker answered, else what failed. All of it within ``timeout_s`` (the name's lookup aside: the resolver's own
    limits). ``ctx``: the TLS context (:func:`tls_context`, made once by the caller) when the protocol uses TLS."""
    from monitor.config import host_port

    where = host_port(address)
    if where is None:
        return Problem(address, "not a host:port address", True)
    host, port = where
    tls = kafka.security_protocol.endswith("SSL")
    step, end = "connect", time.monotonic() + timeout_s
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except socket.gaierror as exc:
        return Problem(address, f"the name does not resolve ({exc.strerror or exc})")
    except TimeoutError:
        return Problem(address, f"no answer to the connection within {timeout_s:.1f} s")
    except OSError as exc:
        return Problem(address, f"cannot connect: {exc.strerror or exc}")
    sock: socket.socket = raw
    try:
        if tls:
            step = "TLS handshake"
            sock = (ctx or tls_context(kafka)).wrap_socket(raw, server_hostname=host.rstrip("."),
                                                           do_handshake_on_connect=False)  # closed below if a
            sock.settimeout(_left(end))  # signal ends the handshake (wrap_socket closes only on OSError)
            sock.do_handshake()
        step = "Kafka request"
        sock.settimeout(_left(end))
        sock.sendall(_api_versions(kafka.client_id, 1))
        head = _read(sock, 8, end)
    except ssl.SSLError as exc:
        return _tls_problem(exc, address, host, step, kafka)
    except TimeoutError:
        return Problem(address, f"no answer to the {step} within {timeout_s:.1f} s{_guess(kafka, step)}")
    except OSError as exc:  # reset, or closed in the middle of the handshake
        return _closed(address, kafka, step, f"closed the connection during the {step}: {exc.strerror or exc}")
    finally:
        sock.close()  # the TLS socket took over the connection (``raw`` is detached then)
        raw.close()
    if not tls and head[:1] and head[0] in _TLS_RECORD and head[1:2] == b"\x03":
        return Problem(address, "answers in TLS: set kafka.security_protocol = \"SSL\" (or \"SASL_SSL\")", True)
    if len(head) < 8:
        return _closed(address, kafka, step, "closed the connection without answering the Kafka request")
    if struct.unpack(">i", head[4:8])[0] != 1:
        return Problem(address, "answered, but not as a Kafka broker", True)
    return None


def wait_for_brokers(kafka: KafkaConfig, timeout_s: float, hint: str = "", step_s: float = 10.0,
                     on_problems: Callable[[list[Problem]], None] | None = None,
                     clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                     lasting_only: bool = False) -> None:
    """Return once a bootstrap address answers a Kafka request; probe them again (backing off from 0.5 to 5 s)
    while none does, for at most ``timeout_s``. Raises :class:`BrokerError` naming every address's problem at
    the limit, or at once when every address has a lasting problem (a certificate, a protocol: waiting will not
    mend a setting), with ``hint`` after them. ``on_problems`` hears each failed round (to log it).
    ``lasting_only``: one round, which raises only for lasting problems (a setting wrong for sure, said before
    anything slow), and returns otherwise."""
    ctx = tls_context(kafka) if kafka.security_protocol.endswith("SSL") else None  # a file that fails: ConfigError
    if ctx is not None:  # the clients built after this probe: their handshakes end too
        bound_tls_handshakes(kafka.request_timeout_ms / 1000)
    deadline, backoff = clock() + timeout_s, 0.5
    while True:
        problems = []
        for i, address in enumerate(kafka.bootstrap_servers):  # the time left shared by the addresses not probed
            share = (deadline - clock()) / (len(kafka.bootstrap_servers) - i)  # yet (a silent first one took all
            problem = probe(address, kafka, min(step_s, max(1.0, share)), ctx)  # of it, a healthy second got 0.1 s)
            if problem is None:
                return
            problems.append(problem)
        lasting = all(p.lasting for p in problems)
        if lasting_only and not lasting:
            return
        left = deadline - clock()
        if lasting or left <= 0:
            within = "" if lasting else f" within {timeout_s:g} s"
            raise BrokerError(f"cannot reach a broker{within}: " + "; ".join(map(str, problems))
                              + (f" ({hint})" if hint else ""))
        if on_problems is not None:
            on_problems(problems)
        sleep(min(backoff, left))
        backoff = min(backoff * 2, 5.0)


_HANDSHAKE_LIMIT_S = [30.0]  # what bound_tls_handshakes() installed last


def bound_tls_handshakes(limit_s: float) -> bool:
    """Give kafka-python's TLS handshakes a time limit; True when installed (kafka-python 3's transport found).

    kafka-python 3.0.12 waits for a TLS handshake with no limit (its connection timeout covers the TCP connect and
    the Kafka requests, not the handshake between them). A broker address that accepted connections and never
    answered them for a while — a proxy or load balancer without a healthy backend — left a client that reconnected
    then waiting for good: measured, a producer still stuck 240 s after the address answered again, so the daemon
    stayed "broker unavailable" until restarted. With the limit the handshake fails like any connection, and the
    client's own reconnects (with backoff) find the broker again. Same loop as kafka-python's, with its own wait's
    ``timeout_at`` set."""
    _HANDSHAKE_LIMIT_S[0] = limit_s
    try:
        from kafka.net.selector import NetworkSelector
        from kafka.net.transport import KafkaSSLTransport
    except ImportError:  # another kafka-python: its own handshake is left as it is
        return _unbounded("no kafka.net.transport.KafkaSSLTransport")
    original = KafkaSSLTransport.handshake
    if getattr(original, "_tsmon_bounded", False):
        return True
    code = getattr(original, "__code__", None)
    if ("timeout_at" not in inspect.signature(NetworkSelector.wait_read).parameters
            or list(inspect.signature(original).parameters) != ["self"]
            or code is None or not {"do_handshake", "wait_read", "wait_write"} <= set(code.co_names)):
        return _unbounded("its handshake is not the one checked (3.0.9-3.0.12)")  # replaced, it would undo a change
    connected = logging.getLogger("kafka.net.transport")

    async def handshake(self: Any) -> None:
        timeout_at = time.monotonic() + _HANDSHAKE_LIMIT_S[0]
        try:
            while True:
                try:
                    self._sock.do_handshake()
                    connected.info("%s: connected to %s", self, self._sock)
                    return
                except ssl.SSLWantReadError:
                    await self._net.wait_read(self._sock, timeout_at)
                except ssl.SSLWantWriteError:
                    await self._net.wait_write(self._sock, timeout_at)
        except BaseException:  # kafka-python drops a failed transport unclosed: at every reconnect into a black
            self.close()  # hole a socket stayed open until the cycle collector ran
            raise

    handshake._tsmon_bounded = True  # type: ignore[attr-defined]
    KafkaSSLTransport.handshake = handshake  # type: ignore[method-assign]
    return True


def _unbounded(why: str) -> bool:
    logs.get("tsmon.reach").warning("kafka_tls_handshake_unbounded", reason=why,
                                    hint="a TLS address that takes connections and never answers can hold a "
                                         "client until restarted")
    return False
