"""``tsmon broker``: a local Kafka-protocol broker in the foreground until SIGTERM or Ctrl-C."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from monitor import logs
from monitor.broker import LocalBroker

log = logs.get("tsmon.broker")


def broker(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 = a free one).", min=0, max=65535)] = 9092,
    data_dir: Annotated[Path | None, typer.Option(help="Persist topics and offsets here (default: memory).")] = None,
) -> None:
    """Run a local broker (Tansu) on 127.0.0.1; prints its bootstrap address when ready."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with LocalBroker(port=port, data_dir=data_dir) as b:
        sys.stdout.write(b.bootstrap + "\n")  # the address is this command's output
        sys.stdout.flush()
        log.info("broker_ready", bootstrap=b.bootstrap, storage=str(data_dir) if data_dir else "memory")
        while not stop.wait(0.5):
            if b.exited:
                log.error("broker_exited", status=None if b.proc is None else b.proc.returncode)
                raise typer.Exit(1)
    log.info("broker_stopped")


def register(app: typer.Typer) -> None:
    app.command()(broker)
