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
from monitor.config import topic_problem
from monitor.topics import ensure_topics

log = logs.get("tsmon.broker")
DEFAULT_PARTITIONS = 4  # what this broker gives a topic it creates on first use


def topic_specs(values: list[str] | None) -> dict[str, int]:
    """``NAME`` or ``NAME:PARTITIONS`` → partitions by topic name; a bad one is a usage error."""
    specs: dict[str, int] = {}
    for value in values or []:
        name, _, count = value.partition(":")
        if (problem := topic_problem(name)) is not None:
            raise typer.BadParameter(problem, param_hint="--topic")
        if count and not (count.isascii() and count.isdigit() and 1 <= int(count) <= 10_000):  # not "²"
            raise typer.BadParameter(f"{value!r}: partitions must be a whole number from 1 to 10000",
                                     param_hint="--topic")
        if name in specs:
            raise typer.BadParameter(f"{name!r} is given twice", param_hint="--topic")
        specs[name] = int(count) if count else DEFAULT_PARTITIONS
    return specs


def broker(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 = a free one).", min=0, max=65535)] = 9092,
    data_dir: Annotated[Path | None, typer.Option(help="Persist topics and offsets here (default: memory).")] = None,
    topic: Annotated[list[str] | None, typer.Option(
        "--topic", help=f"Create this topic once ready (repeatable): NAME or NAME:PARTITIONS (default "
                        f"{DEFAULT_PARTITIONS}); one that exists is left alone. tsmon run needs its input topics.")] = None,
) -> None:
    """Run a local broker (Tansu) on 127.0.0.1; prints its bootstrap address when ready."""
    topics = topic_specs(topic)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with LocalBroker(port=port, data_dir=data_dir) as b:
        if topics:  # before the address is printed: whoever waits for it finds them
            ensure_topics(b.bootstrap, topics)
        sys.stdout.write(b.bootstrap + "\n")  # the address is this command's output
        sys.stdout.flush()
        log.info("broker_ready", bootstrap=b.bootstrap, storage=str(data_dir) if data_dir else "memory",
                 topics=topics or None)
        while not stop.wait(0.5):
            if b.exited:
                log.error("broker_exited", status=None if b.proc is None else b.proc.returncode)
                raise typer.Exit(1)
    log.info("broker_stopped")


def register(app: typer.Typer) -> None:
    app.command()(broker)
