"""systemd's service notifications (the sd_notify protocol): started, watchdog keep-alives, stopping.

Owns the datagrams to ``$NOTIFY_SOCKET``. Under ``Type=notify`` with ``WatchdogSec`` systemd restarts a daemon
whose loop stops turning — the one thing nothing else outside Kubernetes acted on (a Docker HEALTHCHECK only
marks the container, ``Restart=`` only sees an exit). Without ``NOTIFY_SOCKET`` (not under systemd) it does
nothing; a socket that fails is logged once and then left alone: notifications never stop the daemon.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from monitor import logs

log = logs.get("tsmon.sdnotify")
WATCHDOG_EVERY_S = 1.0  # keep-alives at most this often (systemd's WatchdogSec is far longer)


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        path = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
        self._address = "\0" + path[1:] if path.startswith("@") else path  # "@name": the abstract namespace
        self._sock: socket.socket | None = None
        self._last_watchdog = -float("inf")
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, state: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(state.encode(), self._address)
        except OSError as exc:
            log.warning("sd_notify_failed", socket=self._address.replace("\0", "@"), error=str(exc),
                        consequence="no more notifications to systemd (a WatchdogSec unit will restart the daemon)")
            self.close()

    def ready(self, status: str) -> None:
        self.send(f"READY=1\nSTATUS={status}")

    def watchdog(self) -> None:
        now = time.monotonic()
        if now - self._last_watchdog >= WATCHDOG_EVERY_S:
            self._last_watchdog = now
            self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
