"""The daemon's HTTP side door: ``/metrics``, ``/healthz``, ``/readyz`` and ``/streams``.

Owns the HTTP server only, a stdlib ``ThreadingHTTPServer`` on a background daemon thread (one more
thread per request, at most ``MAX_CONNECTIONS``, each cut after ``REQUEST_DEADLINE_S``). It decides
nothing: liveness, readiness and the per-stream rows come from callables the daemon passes in, called on
the request's thread, so they must be cheap and thread-safe (the daemon hands out immutable snapshots). A
callable that raises answers 500 and the server goes on.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import select
import socket
import sys
import threading
import weakref
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from models.errors import ConfigError, describe
from monitor import __version__, logs

log = logs.get("tsmon.health")

Probe = Callable[[], tuple[bool, str]]
JSON = "application/json"
JOIN_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 64  # requests served at once; one more takes the slot of the oldest still sending nothing
MAX_PER_CLIENT = 16  # of them from one address (not loopback): 64 idle connections from one kept every probe out
REQUEST_DEADLINE_S = 10.0  # a connection is cut this long after it was accepted, however it trickles
EVICT_WAIT_S = 0.5  # longest the accepting thread waits for the slot of a connection it cut for a newcomer
READ_TIMEOUT_S = 2.0  # a client silent this long (its request not sent) is cut: idle connections held slots 10 s
MAX_HEAD_BYTES = 16 << 10  # request line and headers: the stdlib's 100 lines of 64 KB let 64 requests take 1 GB
LISTEN_BACKLOG = 1024  # connections the kernel queues: at the stdlib's 5 a flood dropped SYNs, each retried 1 s
# later — the kubelet's probe timeout — and 9 of 30 liveness probes went unanswered


class Rows(list[dict[str, Any]]):
    """A ``/streams`` rows list the daemon hands out once built and never changes: its answer is made once."""

    __slots__ = ("__weakref__",)


class HealthServer:
    """Serves the daemon's metrics, probes and stream table until :meth:`close`.

    Listens from :meth:`start` (port 0 = any free port; :attr:`address` tells which).
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Probe, ready: Probe,
                 streams: Callable[[], list[dict[str, Any]]]) -> None:
        self.host, self.port = host, port
        self.registry = registry
        self.routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            "/metrics": self._metrics,
            "/healthz": lambda: _probe(health),
            "/readyz": lambda: _probe(ready),
            "/streams": lambda: self._streams(streams()),
        }
        self._body_lock = threading.Lock()
        self._body: tuple[weakref.ref[Rows], bytes] | None = None  # the last Rows served, as sent
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve on a daemon thread; a port that cannot be had raises :class:`ConfigError`."""
        if self._server is not None:
            return
        try:
            self._server = _Server((self.host, self.port), self)
        except OSError as exc:  # a name that does not resolve (socket.gaierror) is the host's fault, not the port's
            key = "http.host" if isinstance(exc, socket.gaierror) else "http.port"
            raise ConfigError(f"{key}: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="tsmon-http", daemon=True)
        self._thread.start()
        log.info("http_listening", url=self.url)

    def close(self) -> None:
        """Stop serving and free the port; waits at most a few seconds for the serving thread."""
        server, thread = self._server, self._thread
        if server is None:
            return
        if thread is not None and thread.is_alive():
            server.shutdown()  # returns within one poll interval: requests run on threads of their own
        server.server_close()
        if thread is not None:
            thread.join(JOIN_TIMEOUT_S)
        self._server = self._thread = None
        log.info("http_closed")

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually listened on; the real port when 0 was asked for."""
        if self._server is None:
            raise RuntimeError("HealthServer.address: not listening (call start() first)")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def _streams(self, rows: list[dict[str, Any]]) -> tuple[int, str, bytes]:
        """/streams: the body is made a row at a time, and once per :class:`Rows` (the daemon hands out new ones
        when it rebuilds them): one ``json.dumps`` of 10 000 rows (5 MB) held the GIL, and so the scoring loop, for
        55–225 ms per request, and every client paid it again. The body is kept only while its rows live."""
        if not isinstance(rows, Rows):
            return 200, JSON, _rows_body(rows)
        with self._body_lock:  # a second client of the same rows waits for the body instead of making it again
            if self._body is None or self._body[0]() is not rows:
                self._body = weakref.ref(rows, self._forget), _rows_body(rows)
            return 200, JSON, self._body[1]

    def _forget(self, ref: weakref.ref[Rows]) -> None:
        """The rows of the body kept are gone (the loop built new ones): so is the body (5 MB at 10 000 streams)."""
        body = self._body
        if body is not None and body[0] is ref:
            self._body = None

    def _metrics(self) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)

    def respond(self, path: str) -> tuple[int, str, bytes]:
        """Status, content type and body for a GET of ``path`` (query string ignored)."""
        route = self.routes.get(urlsplit(path).path)
        if route is None:
            return _json(404, {"error": f"no such endpoint: {urlsplit(path).path}",
                               "endpoints": sorted(self.routes)})
        try:
            return route()
        except Exception as exc:  # noqa: BLE001 (a broken callable must not take the server down)
            log.warning("http_endpoint_failed", path=path, error=describe(exc))
            return _json(500, {"error": describe(exc)})


def _probe(check: Probe) -> tuple[int, str, bytes]:
    ok, reason = check()
    return _json(200 if ok else 503, {"ok": bool(ok), "reason": str(reason)})


def _rows_body(rows: list[dict[str, Any]]) -> bytes:
    """``{"streams": rows}`` as JSON, made a row per call (the loop runs between them) and joined in one copy."""
    chunks = [b'{"streams": [']
    for i, row in enumerate(rows):
        chunks += [b", "] * (i > 0) + [json.dumps(row, default=str).encode()]
    chunks.append(b"]}\n")
    return b"".join(chunks)


def _json(status: int, body: Any) -> tuple[int, str, bytes]:
    return status, JSON, (json.dumps(body, default=str) + "\n").encode()


class _Server(ThreadingHTTPServer):
    """One thread per request, at most ``MAX_CONNECTIONS`` at once and ``MAX_PER_CLIENT`` from one address, each cut
    ``REQUEST_DEADLINE_S`` after it was accepted, or after ``READ_TIMEOUT_S`` of silence: a client sending a byte
    every few seconds held its thread for good (the handler's timeout is per read), 200 such clients held 59
    threads, and 64 idle connections from one client kept every probe out for 10 s at a time."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], owner: HealthServer) -> None:
        self.owner = owner
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.lock = threading.Lock()
        self.clients: dict[str, int] = {}  # connections being served, per client address
        self.waiting: dict[int, socket.socket] = {}  # accepted, request not in yet (oldest first), by id
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        host = _host(client_address)
        with self.lock:  # not loopback: a sidecar proxy forwards every client, probes included, from there
            crowded = self.clients.get(host, 0) >= MAX_PER_CLIENT and not _loopback(host)
            if not crowded:
                self.clients[host] = self.clients.get(host, 0) + 1
        if crowded or not (self.slots.acquire(blocking=False) or self._make_room()):
            if not crowded:
                self._left(host)
            log.debug("http_connection_refused", client=str(client_address),
                      reason="too many connections from this client" if crowded else "too many connections")
            self.shutdown_request(request)
            return
        with self.lock:
            self.waiting[id(request)] = request
        try:
            super().process_request(request, client_address)  # starts the request's thread
        except BaseException:
            with self.lock:
                self.served(request)
            self.slots.release()
            self._left(host)
            raise

    def _make_room(self) -> bool:
        """Every slot taken: cut the connection that has waited longest without sending anything, and take its
        slot. Refused instead, a probe lost to a stream of idle connections: 200 loopback clients reconnecting as
        soon as they were cut (READ_TIMEOUT_S) answered 0 probes of 30, and a liveness probe restarts the daemon."""
        with self.lock:
            oldest = next((c for c in self.waiting.values() if not _has_bytes(c)), None)  # sent some: not idle
            if oldest is not None:
                self.served(oldest)
        if oldest is None:
            return False
        _cut(oldest)
        return self.slots.acquire(timeout=EVICT_WAIT_S)  # its thread ends at the cut and gives the slot back

    def served(self, request: socket.socket) -> None:
        """Its request is in (or it is over): no longer the one to cut for a newcomer."""
        self.waiting.pop(id(request), None)

    def _left(self, host: str) -> None:
        with self.lock:
            n = self.clients.get(host, 0) - 1
            if n > 0:
                self.clients[host] = n
            else:
                self.clients.pop(host, None)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        cut = threading.Timer(REQUEST_DEADLINE_S, _cut, (request,))
        cut.daemon = True
        try:
            cut.start()  # may fail (no thread to be had): the slot must come back all the same
            super().process_request_thread(request, client_address)
        except RuntimeError:
            self.shutdown_request(request)
        finally:
            cut.cancel()
            with self.lock:
                self.served(request)
            self.slots.release()
            self._left(_host(client_address))

    def handle_error(self, request: Any, client_address: Any) -> None:  # default prints a traceback to stderr
        exc = sys.exc_info()[1]  # called inside socketserver's except block
        log.debug("http_connection_error", client=str(client_address), error=describe(exc))


def _host(client_address: Any) -> str:
    return client_address[0] if isinstance(client_address, tuple) else str(client_address)


def _loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, and ::ffff:127.x (how a dual-stack listener on "::" sees 127.0.0.1)."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _has_bytes(conn: socket.socket) -> bool:
    """Whether a connection has something not read yet — its request, waiting for its thread to get to it, or its
    end (then its thread ends it: no slot to win by cutting it). Asked without waiting (a peek on a socket with a
    timeout waits that long)."""
    poller = select.poll()
    try:
        poller.register(conn, select.POLLIN)
    except (OSError, ValueError):  # closed meanwhile
        return True
    return bool(poller.poll(0))


def _cut(request: socket.socket) -> None:
    """End a connection past its deadline: its thread's blocked read returns and the request ends."""
    try:
        request.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class _HeadReader:
    """The request's input as the handler reads its head: at most ``MAX_HEAD_BYTES`` in all, past which a line
    reads as too long (the handler answers 431, or 414 for the request line)."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.left = raw, MAX_HEAD_BYTES

    def readline(self, size: int | None = -1) -> bytes:
        line = self.raw.readline(self.left + 1 if size is None or size < 0 else min(size, self.left + 1))
        self.left -= len(line)
        if self.left < 0:
            raise http.client.LineTooLong(f"request head over {MAX_HEAD_BYTES} bytes")
        return line

    def __getattr__(self, name: str) -> Any:  # read, close, ...: the file's own
        return getattr(self.raw, name)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = f"tsmon/{__version__}"
    timeout = READ_TIMEOUT_S  # seconds a silent client may hold its thread (per read; the deadline bounds it all)

    def setup(self) -> None:
        super().setup()
        self.rfile = _HeadReader(self.rfile)  # type: ignore[assignment]

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except http.client.LineTooLong:  # the request line itself (the headers' is answered 431 by parse_request)
            self.requestline, self.request_version, self.command = "", "", ""
            self.send_error(414, f"request line over {MAX_HEAD_BYTES} bytes")
            self.close_connection = True

    def parse_request(self) -> bool:
        ok = super().parse_request()  # the request line and headers are in: no longer a connection to cut
        with self.server.lock:
            self.server.served(self.connection)
        return ok

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:  # curl -I and uptime checkers: the GET's status and headers (it was 501, in HTML)
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        # the request is in: the answer may take the rest of the deadline (which the cut bounds) to be read — the
        # read timeout applied to the whole write, and cut a 6 MB /streams read at 1 MB/s (regression review)
        self.connection.settimeout(REQUEST_DEADLINE_S)
        status, content_type, content = self.server.owner.respond(self.path)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(content)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(content)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http_request", client=self.address_string(), line=format % args)
