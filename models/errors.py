"""The one exception hierarchy of tsmon (models and daemon share it).

* TsmonError                 root; the CLI catches only this, prints ``Type: message`` and exits 1
  + DataError                unreadable, malformed or unusable input data (files, columns, shapes, NaN)
  + ArtifactError            missing, corrupt, truncated or incompatible model artifact
  + ModelConfigError         impossible model or training hyper-parameters
  + ConfigError              bad daemon configuration; the message names the key and the fix
  + BrokerError              broker unreachable or refused a request
    + PartitionUnreadable    a fetch of one input partition the client cannot use (carries ``tp``)
  + SinkBackpressure         the sink is slow; carries ``retry_after`` seconds
  + ScoringStuck             a scoring call did not return in time
  + monitor.control.Refused  an operator command not applied; its acknowledgement gives the reason

Every message is one line that names the problem and, where there is one, the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TsmonError(Exception):
    """Root of all tsmon errors."""


class DataError(TsmonError):
    """Input data cannot be read or used as asked."""


class ArtifactError(TsmonError):
    """A model artifact is missing, corrupt, truncated or incompatible."""


class ModelConfigError(TsmonError):
    """Model or training hyper-parameters are invalid."""


class ConfigError(TsmonError):
    """Daemon configuration is invalid."""


class BrokerError(TsmonError):
    """The Kafka broker cannot be reached or refused a request."""


class PartitionUnreadable(BrokerError):
    """A fetch of one input partition cannot be used (a corrupt batch, a codec the client lacks): that partition
    waits and is retried while the others are read."""

    def __init__(self, message: str, tp: tuple[str, int]) -> None:
        super().__init__(message)
        self.tp = tp


class SinkBackpressure(TsmonError):
    """The sink cannot keep up; pause consumption and retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ScoringStuck(TsmonError):
    """A scoring call has not returned within ``daemon.scoring_timeout_s`` (a hung GPU or worker): it cannot be
    interrupted, so the daemon stops without committing past it and the process exits for its supervisor."""


def short_repr(value: object, most: int = 80) -> str:
    """``repr(value)``, cut to ``most`` characters, for an error line: a cell of 2 000 000 digits made a 2 MB one."""
    text = repr(value)
    return text if len(text) <= most else f"{text[:most]}… ({len(text)} characters)"


def did_you_mean(name: str, choices: Iterable[str]) -> str | None:
    """The one of ``choices`` a misspelt ``name`` most likely meant, if one is close (difflib, ratio >= 0.75)."""
    close = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.75)
    return close[0] if close else None


def number(value: object, name: str) -> float:
    """``value`` as a float if it is a JSON number (not a bool, not a string: a hand-edited "0.1" was taken as
    0.1, "x" said only "could not convert string to float"); a TypeError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {short_repr(value)}")
    return float(value)


def numbers(value: object, name: str) -> tuple[float, ...]:
    """``value`` as floats if it is a list of JSON numbers; a TypeError naming ``name`` otherwise."""
    if not isinstance(value, list):
        raise TypeError(f"{name} must be a list of numbers, got {short_repr(value)}")
    return tuple(number(v, f"{name}[{i}]") for i, v in enumerate(value))


def describe(exc: BaseException) -> str:
    """``Type: message`` of any exception, once: kafka-python's errors put their class name in their message
    already ("KafkaTimeoutError: KafkaTimeoutError: None" on /readyz), and one without a message is its name."""
    name, text = type(exc).__name__, str(exc)
    if text.startswith(name):
        text = text[len(name):].lstrip(": ")
    return f"{name}: {text}" if text and text != "None" else name

