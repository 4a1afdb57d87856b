"""``tsmon tail``: a tsmon topic (alerts, dead letters, audit, changelog) as one JSON line per message.

Owns reading a topic for people: without a consumer group (nothing committed, nothing rebalanced in the
daemon's group), every partition, from the end (new messages) or the beginning, with the configuration's
security settings. Before it there was no way to read the alerts but a Kafka client of one's own.
"""

from __future__ import annotations

import base64
import heapq
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from models.errors import BrokerError, describe
from monitor import logs
from monitor.commands.options import bootstrap_option
from monitor.config import load_config
from monitor.reach import wait_for_brokers
from monitor.topics import partition_reader, within

log = logs.get("tsmon.tail")

POLL_MS = 500
TIMEOUT_MS = 10_000  # a request the broker does not answer: it is gone (the daemon waits longer)
ALIVE_EVERY_S = 10.0  # with nothing to read, ask the broker this often whether it is there
TOPIC_EVERY_S = 2.0  # a tsmon topic not created yet: looked for this often


def tail(
    topic: Annotated[str | None, typer.Option(help="Topic (default: kafka.alerts_topic of the configuration).")] = None,
    dead_letters: Annotated[bool, typer.Option("--dead-letters", help="The dead-letter topic instead "
                                                                      "(kafka.dead_letter_topic).")] = False,
    config: Annotated[Path | None, typer.Option("--config", help="TOML configuration file (brokers, security, "
                                                                 "topic names).")] = None,
    bootstrap: Annotated[str | None, bootstrap_option("host:port of a broker (default: kafka.bootstrap_servers).")]
    = None,
    from_beginning: Annotated[bool, typer.Option("--from-beginning", help="Every message the topic keeps, not "
                                                                          "only new ones.")] = False,
    max_messages: Annotated[int | None, typer.Option(help="Stop after this many messages.", min=1)] = None,
    idle: Annotated[float | None, typer.Option(help="Stop after this many seconds without a message.")] = None,
) -> None:
    """Print a topic's messages as JSON lines: topic, partition, offset, ts, key, headers, value (parsed JSON)."""
    from kafka.errors import KafkaError

    if topic is not None and dead_letters:
        raise typer.BadParameter("give --topic or --dead-letters, not both", param_hint="--topic")
    if idle is not None and not 0 < idle < float("inf"):
        raise typer.BadParameter(f"must be a number of seconds > 0, got {idle:g}", param_hint="--idle")
    cfg = load_config(config, {"kafka.bootstrap_servers": [bootstrap]} if bootstrap else None)
    name = topic or (cfg.kafka.dead_letter_topic if dead_letters else cfg.kafka.alerts_topic)
    # a wrong address: said after TIMEOUT_MS (kafka-python's default bootstrap wait is 30 s)
    wait_for_brokers(cfg.kafka, TIMEOUT_MS / 1000, "give --bootstrap or --config")  # a wrong address or TLS, named
    client = within(cfg.kafka.client_kwargs(), TIMEOUT_MS / 1000)
    brokers = ", ".join(client["bootstrap_servers"])
    consumer, tps = partition_reader(client, name, at_end=not from_beginning, if_missing=(),
                                     timeout_s=TIMEOUT_MS / 1000)
    stop = [False]

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        stop[0] = True

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        if not tps:
            if topic is not None:  # a name given: most likely misspelt
                raise BrokerError(f"topic {name!r} not found on {brokers}{_did_you_mean(consumer, name)}")
            # the configuration's alerts or dead-letter topic: created by the first message tsmon writes to it (a
            # fresh deployment without a bad record has none), so it is waited for, as for a message
            log.warning("topic_not_created_yet", topic=name, brokers=brokers,
                        hint="nothing was written to it yet (or kafka names another topic): waiting for it")
        printed, last, checked = 0, time.monotonic(), time.monotonic()
        while not stop[0] and (max_messages is None or printed < max_messages):
            if not tps:
                tps = _appeared(consumer, name, brokers)
                if not tps:
                    if idle is not None and time.monotonic() - last >= idle:
                        break
                    time.sleep(min(TOPIC_EVERY_S, idle or TOPIC_EVERY_S))
                    continue
                last = checked = time.monotonic()  # --idle counts from here: its first messages may take a poll
            batch = consumer.poll(timeout_ms=POLL_MS)
            # partitions interleaved by time, each in its own order (sorted whole, a partition's records with
            # timestamps going back printed out of offset order: a resolved alert before its firing)
            records = list(heapq.merge(*batch.values(), key=lambda r: r.timestamp))
            for rec in records[: None if max_messages is None else max_messages - printed]:
                sys.stdout.write(_json_line(rec) + "\n")
                printed += 1
            sys.stdout.flush()
            now = time.monotonic()
            if records:
                last = checked = now
                continue
            if now - checked >= ALIVE_EVERY_S or (idle is not None and now - last >= idle):
                consumer.end_offsets(tps)  # a broker gone: polls come back empty for ever (with --idle: "done")
                checked = now
            if idle is not None and now - last >= idle:
                break
    except KeyboardInterrupt:  # Ctrl-C is how a tail ends
        pass
    except BrokenPipeError:  # `| head -1`: the reader has what it wanted
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 — nothing more to flush at exit
    except KafkaError as exc:
        raise BrokerError(f"lost {brokers} while reading {name!r}: {exc}"[:300]) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        consumer.close()


def _appeared(consumer: Any, topic: str, brokers: str) -> list[Any]:
    """The partitions of ``topic`` once it exists (assigned from their beginning: every message is new), else [].

    The broker is asked on a thread: kafka-python waits for metadata without a time limit."""
    from kafka import TopicPartition

    found: list[Any] = []

    def ask() -> None:
        try:
            found.append(consumer.partitions_for_topic(topic))  # asks the broker again while the topic is unknown
        except Exception as exc:  # noqa: BLE001 — said below, as a broker that does not answer
            found.append(exc)

    asking = threading.Thread(target=ask, name="tail-metadata", daemon=True)
    asking.start()
    asking.join(TIMEOUT_MS / 1000)
    if not found or isinstance(found[0], Exception):
        why = describe(found[0]) if found else f"no answer within {TIMEOUT_MS / 1000:g} s"
        raise BrokerError(f"lost {brokers} while waiting for topic {topic!r}: {why}"[:300])
    parts = found[0]
    if not parts:
        return []
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    return tps


def _json_line(rec: Any) -> str:
    """Strict JSON: a value holding a number past float range (1e400 reads as inf) is given as text."""
    line = as_line(rec)
    try:
        return json.dumps(line, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return json.dumps({**line, "value": _text(rec.value)}, ensure_ascii=False, allow_nan=False)


def as_line(rec: Any) -> dict[str, Any]:
    """One message as a JSON-able object; a value that is not JSON is given as text, or base64 if not UTF-8."""
    return {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset, "ts": rec.timestamp,
            "key": _text(rec.key), "headers": {k: _text(v) for k, v in (rec.headers or [])},
            "value": _value(rec.value)}


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(raw).decode()


def _value(raw: bytes | None) -> Any:
    if raw is None:
        return None  # a tombstone (the changelog's forgotten streams)
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except ValueError:  # a dead letter's bytes as they came (not UTF-8: base64)
        return _text(raw)


def _no_constant(name: str) -> Any:
    raise ValueError(name)  # NaN, Infinity: not JSON, printed they made a line strict parsers refuse: as text


def register(app: typer.Typer) -> None:
    app.command()(tail)


def _did_you_mean(consumer: Any, name: str) -> str:
    """The broker's topics closest to a name it lacks (``tsmon.alert`` for ``tsmon.alerts``), or nothing."""
    import difflib

    try:
        topics = sorted(t for t in consumer.topics() if not t.startswith("__"))
    except Exception:  # noqa: BLE001 — a suggestion must never hide the error it adds to
        return ""
    close = difflib.get_close_matches(name, topics, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(t) for t in close)}?" if close else ""
