"""A loopback TCP proxy in front of the test broker that can hold back the Kafka Produce requests of one client,
and can speak TLS to the clients (the broker itself only speaks plaintext here).

The broker advertises the proxy's address, so every client connects through it. Requests are framed
(4-byte size), and the request header names the API (Produce = 0) and the client id: requests of
``client_id`` with API key 0 wait while :attr:`hold` is set, so the daemon's producer (its sink) stalls
while its consumer and every other client go on. Responses are copied through unchanged. With ``tls`` (a
server-side context) every client connection is a TLS session, ended at the proxy: handshakes it refused are
in :attr:`refused`.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from types import TracebackType
from typing import Self

PRODUCE = 0


class KafkaProxy:
    def __init__(self, upstream_port: int, client_id: str, host: str = "127.0.0.1",
                 tls: ssl.SSLContext | None = None) -> None:
        self.upstream = (host, upstream_port)
        self.client_id = client_id.encode()
        self.tls = tls
        self.hold = threading.Event()
        self.held = 0  # Produce requests that had to wait
        self.refused: list[str] = []  # TLS handshakes that failed, why
        self.blackhole = threading.Event()  # while set, new connections are held open and never answered
        self._stop = threading.Event()
        self._server = socket.create_server((host, 0))
        self.port = int(self._server.getsockname()[1])
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        self._spawn(self._accept)

    def _spawn(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        with self._lock:
            self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.append(client)
            self._spawn(self._open, client)

    def _open(self, client: socket.socket) -> None:
        if self.blackhole.is_set():  # accepted, never read, never closed (until stop): a backend-less balancer
            return
        if self.tls is not None:  # the handshake in this connection's thread: a silent client holds only itself
            try:
                client.settimeout(10)
                client = self.tls.wrap_socket(client, server_side=True)
                client.settimeout(None)
            except OSError as exc:  # ssl.SSLError included
                self.refused.append(str(exc))
                _close(client)
                return
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            _close(client)
            return
        upstream.settimeout(None)
        with self._lock:
            self._sockets += [client, upstream]
        self._spawn(self._requests, client, upstream)
        self._spawn(self._copy, upstream, client)

    def _requests(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                size = _read(src, 4)
                frame = _read(src, struct.unpack(">i", size)[0])
                api_key = struct.unpack(">h", frame[:2])[0]
                cid_len = struct.unpack(">h", frame[8:10])[0]
                cid = frame[10 : 10 + cid_len] if cid_len >= 0 else b""
                if api_key == PRODUCE and cid == self.client_id and self.hold.is_set():
                    self.held += 1
                    while self.hold.is_set() and not self._stop.is_set():
                        time.sleep(0.02)
                dst.sendall(size + frame)
        except (OSError, struct.error, ConnectionError):
            pass
        finally:
            _close(src, dst)

    def _copy(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src, dst)

    def drop(self) -> None:
        """Close every connection made so far (the clients reconnect: with :attr:`tls` as it is then)."""
        with self._lock:
            sockets, self._sockets = list(self._sockets), []
        _close(*sockets)

    def stop(self) -> None:
        self._stop.set()
        _close(self._server)  # shut down too: closing alone did not wake the accept() (5 s more at every stop)
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        _close(*sockets)
        for t in threads:
            t.join(5)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _read(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def _close(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()
