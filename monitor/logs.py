"""Structured logging: JSON lines in production (or when TSMON_LOG_FORMAT=json), pretty on a terminal.

Events that can happen once per record, window or stream (a dead letter, a non-finite score, a stream
starting) go through a :class:`Throttle`: their counts are in the metrics, the log keeps a sample."""

from __future__ import annotations

import json
import logging
import os
import re
import select
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from models.errors import ConfigError

_FLAGS: dict[str, str | None] = {"level": None, "fmt": None}  # given on the command line: they win over config


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("json", "console")


def _env(name: str, allowed: tuple[str, ...]) -> str | None:
    """``TSMON_LOG_LEVEL`` / ``TSMON_LOG_FORMAT``, checked: ``verbose`` was taken as INFO, ``pretty`` as json."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if (value.upper() if name.endswith("LEVEL") else value.lower()) not in allowed:
        raise ConfigError(f"{name}={value[:40]!r}: use one of {', '.join(allowed)}")
    return value.upper() if name.endswith("LEVEL") else value.lower()


def configure_from_flags(level: str | None, fmt: str | None) -> None:
    """The root ``--log-level`` / ``--log-format`` (None: not given), remembered for :func:`configure_daemon`
    and :func:`quiet`; else ``TSMON_LOG_LEVEL`` / ``TSMON_LOG_FORMAT``, checked."""
    _FLAGS.update(level=level or _env("TSMON_LOG_LEVEL", LEVELS), fmt=fmt or _env("TSMON_LOG_FORMAT", FORMATS))
    configure(_FLAGS["level"], _FLAGS["fmt"])


def configure_daemon(level: str | None, fmt: str | None) -> None:
    """``tsmon run``'s ``[daemon] log_level`` / ``log_format`` (file or ``TSMON_DAEMON__*``), unless the flags or
    ``TSMON_LOG_*`` were given: they were read only from the flags, so the images'
    ``TSMON_DAEMON__LOG_FORMAT=json`` did nothing and no configuration could change the level."""
    configure(_FLAGS["level"] or level, _FLAGS["fmt"] or fmt)
    forward_kafka_python()  # the daemon's log only: the one-shot commands keep their one-line errors (the probe
    # names what they need), where kafka-python's reconnection lines came around a broker that went away
    logging.captureWarnings(True)  # Python warnings (torch's UserWarnings) to the "py.warnings" logger, so
    # library_log lines too: they came out as plain text amid the JSON


def quiet(level: str) -> None:
    """Commands whose output is a table log at ``level`` unless a level was asked for; the format asked for
    stays (replay-eval and demo reset both: ``--log-level DEBUG --log-format console`` gave errors in JSON)."""
    configure(_FLAGS["level"] or level, _FLAGS["fmt"])


def configure(level: str | None = None, fmt: str | None = None) -> None:
    """Configure structlog once for the process; ``fmt`` is ``json``, ``console`` or None (auto)."""
    level_name = (level or "INFO").upper()
    fmt = fmt or ("console" if sys.stderr.isatty() else "json")
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),
        cache_logger_on_first_use=False,
    )


# kafka-python errors that are routine: a metadata refresh in flight when its client closes (the restore's reader
# closes at every assignment) is cancelled, and kafka-python logs that as an error
_ROUTINE = re.compile(r"Metadata refresh: failed Cancelled$")


class _KafkaPython(logging.Handler):
    """kafka-python's warnings and errors as ``kafka_client_log`` lines (errors as warnings, warnings as info; its
    own level in ``client_level``), at most 3 in 5 minutes for each message text (digits and ``<…>`` object names
    left out) — a broker away for an hour wrote hundreds of reconnection lines a minute otherwise, and a budget per
    template (``Connection failed: %s``) let refused connections hide a certificate failure after them.
    kafka-python logs through the standard library to a NullHandler, so why a connection failed — a certificate no
    longer trusted after a rotation, a refused address — was nowhere, and the daemon said only "no connection to any
    broker". Nothing it does may raise: it runs in kafka-python's own threads (a failed write to stderr ended the
    client's IO thread, and poll() then waited for good)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.throttle = Throttle(burst=3, period_s=300.0, max_events=1000)  # message texts are not a closed set

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._emit(record)
        except Exception:  # noqa: BLE001, S110 - a log line that cannot be written is not kafka-python's problem
            pass

    def _emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()[:500]
        except Exception:  # noqa: BLE001 - a record whose arguments do not format: said as it is
            message = str(record.msg)[:500]
        key = record.name + ":" + re.sub(r"<(?!class )[^>]*>|[0-9.]+", "#", message)[:160]
        if (extra := self.throttle(key)) is None:
            return
        fields: dict[str, Any] = {"logger": record.name, "message": message, **extra}
        if record.exc_info and record.exc_info[1] is not None:  # log.exception: the error, not the whole traceback
            fields["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"[:500]
        self._log(record, message, fields)

    def _log(self, record: logging.LogRecord, message: str, fields: dict[str, Any]) -> None:
        log = get("tsmon.kafka")
        error = record.levelno >= logging.ERROR and not _ROUTINE.match(message)
        (log.warning if error else log.info)("kafka_client_log", client="kafka-python",
                                             client_level=record.levelname.lower(), **fields)


class _Library(_KafkaPython):
    """Any other library's warnings and errors that reach the root logger (apscheduler's ``Execution of job …
    skipped: maximum number of running instances reached``, ``Run time of job … was missed``): with no handler
    they went to the standard library's last resort, as plain text amid the JSON lines. Now ``library_log`` lines
    at their own level, throttled per message as kafka-python's."""

    def _log(self, record: logging.LogRecord, message: str, fields: dict[str, Any]) -> None:
        log = get("tsmon.library")
        (log.error if record.levelno >= logging.ERROR else log.warning)("library_log", **fields)


OUT_OF_RANGE = "Fetch offset %s is out of range for topic-partition %s"  # kafka-python 3's fetcher, at info
TRUNCATED = "Truncation detected for "  # ... its position moved back or reset: the leader's log was truncated


class _OutOfRange(_KafkaPython):
    """kafka-python's reset of a partition whose position is not in its log (OFFSET_OUT_OF_RANGE), which it logs at
    info only (never forwarded): the committed offset was deleted by retention while the daemon was down, set past
    the end by an operator, or the log was truncated. The partition then jumps to ``kafka.auto_offset_reset`` —
    records skipped (what retention deleted; with ``latest``, everything up to the end) or read again — and the log
    said nothing, ``partition_reading_from`` only where reading began. Now ``input_offset_out_of_range``, a warning,
    at most 3 in 5 minutes, as the client's own lines."""

    def __init__(self) -> None:
        super().__init__()
        self.setLevel(logging.INFO)

    def filter(self, record: logging.LogRecord) -> bool:  # (a truncated log — unclean leader election — too)
        return record.msg == OUT_OF_RANGE or (isinstance(record.msg, str) and record.msg.startswith(TRUNCATED))

    def _log(self, record: logging.LogRecord, message: str, fields: dict[str, Any]) -> None:
        get("tsmon.kafka").warning(
            "input_log_truncated" if message.startswith(TRUNCATED) else "input_offset_out_of_range",
            client="kafka-python", message=message,
            **{k: v for k, v in fields.items() if k not in ("logger", "message")},
            consequence="the position is not in the partition's log (retention deleted records before they were "
                        "read, the group's offsets were set past the end, the log was truncated): kafka-python resets "
                        "it to kafka.auto_offset_reset — earliest reads from the log's start (what was deleted is "
                        "lost), latest skips every record up to the end")


def forward_kafka_python() -> None:
    """Install :class:`_KafkaPython` on the ``kafka`` logger once (its debug and info records are not even made),
    and :class:`_Library` on the root logger once, for every other library's warnings and errors."""
    logger = logging.getLogger("kafka")
    if not any(isinstance(h, _KafkaPython) for h in logger.handlers):
        logger.addHandler(_KafkaPython())
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    fetcher = logging.getLogger("kafka.consumer.fetcher")  # its info lines are made (the handler keeps one of them)
    if not any(isinstance(h, _OutOfRange) for h in fetcher.handlers):
        fetcher.addHandler(_OutOfRange())
        fetcher.setLevel(logging.INFO)
    root = logging.getLogger()
    if not any(isinstance(h, _Library) for h in root.handlers):
        root.addHandler(_Library())


class _Stderr:
    """Whatever ``sys.stderr`` is at the time of each write (test runners and daemons swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]


class Throttle:
    """At most ``burst`` lines of one event per ``period_s``; the others are dropped and counted, and the next
    line of that event that is logged says how many (``suppressed``). 1 000 bad records wrote 1 000 warnings,
    10 000 streams 10 000 ``stream_started`` lines at every eager rebalance."""

    def __init__(self, burst: int = 20, period_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 max_events: int | None = None) -> None:
        self.burst, self.period_s, self._clock = burst, period_s, clock
        self.max_events = max_events  # events remembered at most (for events that are not a closed set)
        self._seen: dict[str, tuple[float, int, int]] = {}  # event → (period start, lines in it, dropped since a line)
        self._lock = threading.Lock()  # the loop and the scheduler's thread share the processor's (counts were lost)

    def __call__(self, event: str) -> dict[str, int] | None:
        """None: drop this line. Else the fields to add to it: ``{"suppressed": n}`` after dropped ones, or {}."""
        with self._lock:
            return self._count(event)

    def _count(self, event: str) -> dict[str, int] | None:
        now = self._clock()
        if self.max_events is not None and event not in self._seen and len(self._seen) >= self.max_events:
            self._forget_expired(now)
            if len(self._seen) >= self.max_events:  # that many events in one period: start again
                self._seen.clear()
        start, lines, dropped = self._seen.get(event, (now, 0, 0))
        if now - start >= self.period_s:
            start, lines = now, 0
        if lines >= self.burst:
            self._seen[event] = (start, lines, dropped + 1)
            return None
        self._seen[event] = (start, lines + 1, 0)
        return {"suppressed": dropped} if dropped else {}

    def _forget_expired(self, now: float) -> None:
        """Drop the events whose period has passed and that have nothing suppressed to report."""
        self._seen = {e: v for e, v in self._seen.items() if now - v[0] < self.period_s or v[2]}

    def log(self, method: Callable[..., Any], event: str, **fields: Any) -> None:
        """``method(event, **fields)`` (a bound logger's ``info``, ``error`` …) unless the event is over its budget."""
        if (extra := self(event)) is not None:
            method(event, **fields, **extra)


def from_signal_handler(event: str, level: str = "info", **fields: object) -> None:
    """One JSON line straight to file descriptor 2, for a signal handler: structlog's printer holds a plain lock
    around each write, and a handler that logged while the interrupted code held it waited for itself for ever
    (a SIGTERM during a log write — likely when the reader of stderr lags — hung the daemon, a second one too)."""
    line = json.dumps({"event": event, "level": level, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       **fields}, default=str)
    try:
        if select.select([], [2], [], 0)[1]:  # a full pipe would block the handler until its reader catches up
            os.write(2, line.encode() + b"\n")
    except (OSError, ValueError):
        pass  # stderr closed or full: the exit status still tells
