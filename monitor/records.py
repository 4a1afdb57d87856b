"""Wire format of input messages: parse and validate one message into a block of samples, or say why not.

Owns the input contract (``monitor/schemas/input.schema.json``): one sample (``value`` or ``values``) or
a chunk (``ts`` of the first sample, ``period_ms``, ``samples``); key = stream id. Anything else is a
:class:`BadRecord` with a reason code for the dead-letter topic — never an exception that escapes, never
a silent drop. NaN and ±inf are rejected explicitly (JSON ``NaN``/``Infinity`` literals included).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import chain
from typing import Any

import numpy as np

NUMBER = {int, float}
_EPOCH, _ONE_MS = datetime(1970, 1, 1, tzinfo=UTC), timedelta(milliseconds=1)
MAX_TS_MS = 10**14  # sample times are ms since the epoch below this (year 5138)
REASONS = ("oversized", "empty", "invalid_json", "not_object", "bad_stream", "bad_timestamp", "bad_shape",
           "wrong_type", "non_finite", "too_many_samples")
# every reason a record is dead-lettered for: the message's own (above), then the daemon's for a valid message
DEAD_LETTER_REASONS = (*REASONS, "no_model", "channel_mismatch", "duplicate_timestamp", "timestamp_backwards",
                       "timestamp_in_future", "timestamp_too_early", "reserved_stream", "too_many_streams",
                       "unparseable", "unprocessable")


@dataclass(frozen=True, slots=True)
class Limits:
    max_bytes: int = 1 << 20
    max_samples: int = 10_000  # per chunk
    max_channels: int = 256
    max_stream_len: int = 256


@dataclass(frozen=True, slots=True)
class SampleBlock:
    """Consecutive samples of one stream: timestamps (epoch ms) and values ``[n, channels]``."""

    stream: str
    ts_ms: np.ndarray  # int64 [n], strictly increasing within a block
    values: np.ndarray  # float32 [n, channels], all finite

    @property
    def channels(self) -> int:
        return int(self.values.shape[1])


@dataclass(frozen=True, slots=True)
class BadRecord:
    """Why a message cannot be used; ``reason`` is one of :data:`DEAD_LETTER_REASONS`."""

    reason: str
    detail: str


def reject_constant(name: str) -> float:
    """``parse_constant`` for JSON that must hold numbers only: NaN, Infinity and -Infinity are refused."""
    raise ValueError(f"{name} is not a number")


def _timestamp_ms(ts: Any) -> int | None:
    if isinstance(ts, bool):
        return None
    if isinstance(ts, int):  # exact, however many digits (math.isfinite would overflow on 10**400)
        return ts if 0 <= ts < MAX_TS_MS else None
    if isinstance(ts, float):
        return int(ts) if math.isfinite(ts) and 0 <= ts < MAX_TS_MS else None
    if isinstance(ts, str):
        try:
            dt = datetime.fromisoformat(ts.upper())  # RFC 3339 (the schema's date-time) allows "t" and "z"
            if dt.tzinfo is None:
                return None  # naive times are ambiguous on a multi-site pipeline
            ms = (dt - _EPOCH) // _ONE_MS  # exact: timestamp() * 1000 came out 1 ms early for some (2004, 2040)
        except (ValueError, OverflowError, OSError):
            return None
        return ms if 0 <= ms < MAX_TS_MS else None
    return None


def _matrix(rows: Any, what: str, limits: Limits) -> np.ndarray | BadRecord:
    """Numbers → float64 array ``[n, channels]``; bools, strings, ragged rows and nesting are bad.

    Types are checked with ``set(map(type, ...))`` (C speed: a chunk of 10 000 samples costs ~0.3 ms).
    ``type(v) is bool`` is not ``int``, so JSON ``true``/``false`` never pass as numbers.
    """
    if not isinstance(rows, list) or not rows:
        return BadRecord("bad_shape", f"{what} must be a non-empty list")
    if len(rows) > limits.max_samples:
        return BadRecord("too_many_samples", f"{what} has {len(rows)} samples (limit {limits.max_samples})")
    kinds = set(map(type, rows))
    try:  # an integer beyond float64 (JSON allows any number of digits) raises OverflowError
        if what == "samples" and kinds <= NUMBER:
            arr = np.asarray(rows, dtype="float64")[:, None]  # a single-channel chunk may list bare numbers
        elif kinds == {list} and set(map(type, chain.from_iterable(rows))) <= NUMBER:
            widths = set(map(len, rows))
            if len(widths) != 1 or not 0 < (width := widths.pop()) <= limits.max_channels:
                return BadRecord("bad_shape",
                                 f"{what}: every sample needs the same channel count (1..{limits.max_channels})")
            arr = np.asarray(rows, dtype="float64").reshape(len(rows), width)
        else:
            return BadRecord("wrong_type", f"{what} must hold numbers (or lists of numbers per sample)")
    except OverflowError:
        return BadRecord("non_finite", f"{what} has a value beyond float range")
    if not np.isfinite(arr).all():
        return BadRecord("non_finite", f"{what} contains NaN or infinity")
    if np.abs(arr).max() > 3.4e38:
        return BadRecord("non_finite", f"{what} has a value beyond float32 range")
    return arr


def parse(value: bytes | None, key: bytes | None = None, limits: Limits = Limits()) -> SampleBlock | BadRecord:
    """Parse one message value (and its key) into a :class:`SampleBlock` or a :class:`BadRecord`."""
    if value is None or len(value) == 0:
        return BadRecord("empty", "message has no value")
    if len(value) > limits.max_bytes:
        return BadRecord("oversized", f"message is {len(value)} bytes (limit {limits.max_bytes})")
    try:
        # UTF-8 only, strictly: json.loads(bytes) guessed UTF-16/32 and let encoded surrogates through. A UTF-8
        # byte-order mark is skipped, as RFC 8259 lets a parser do (.NET and PowerShell writers put one)
        doc = json.loads(value.decode("utf-8-sig"), parse_constant=reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, NaN literal, deep nesting
        # a NaN literal, or an integer of more digits than Python converts (valid JSON, beyond any float)
        reason = "non_finite" if "is not a number" in str(exc) or "integer string conversion" in str(exc) \
            else "invalid_json"
        return BadRecord(reason, str(exc)[:200])
    if not isinstance(doc, dict):
        return BadRecord("not_object", f"message is a JSON {type(doc).__name__}, not an object")
    stream = _stream(doc.get("stream"), key, limits)
    if isinstance(stream, BadRecord):
        return stream
    t0 = _timestamp_ms(doc.get("ts"))
    if t0 is None:
        return BadRecord("bad_timestamp", f"ts must be epoch ms or ISO-8601 with a zone, got {doc.get('ts')!r}"
                                          f"{_quoted_number(doc.get('ts'))}"[:200])
    forms = [k for k in ("value", "values", "samples") if k in doc]
    if len(forms) != 1:
        return BadRecord("bad_shape", "give exactly one of value, values or samples")
    if forms[0] == "samples":
        period = doc.get("period_ms")
        if type(period) not in (int, float) or not 0 < period < MAX_TS_MS or not math.isfinite(period):
            return BadRecord("bad_timestamp", f"a chunk needs a finite period_ms > 0 and below {MAX_TS_MS:.0f} "
                                              f"(year 5138), got {period!r}{_quoted_number(period)}"[:200])
        arr = _matrix(doc["samples"], "samples", limits)
        if isinstance(arr, BadRecord):
            return arr
        if t0 + (len(arr) - 1) * float(period) >= MAX_TS_MS:  # the last sample's too: past year 9999 it stopped the loop
            return BadRecord("bad_timestamp", f"the chunk's last sample is at {t0} + {len(arr) - 1} × {period} ms, "
                                              f"beyond year 5138")
        ts = t0 + np.round(np.arange(len(arr)) * float(period)).astype("int64")
        if len(ts) > 1 and not (np.diff(ts) > 0).all():
            return BadRecord("bad_timestamp", f"period_ms {period} is below 1 ms resolution")
    else:
        raw = doc[forms[0]]
        if forms[0] == "value":
            if type(raw) not in (int, float):
                return BadRecord("wrong_type", f"value must be a number, got {type(raw).__name__}")
            raw = [raw]
        arr = _matrix([raw], forms[0], limits)
        if isinstance(arr, BadRecord):
            return arr
        ts = np.array([t0], dtype="int64")
    return SampleBlock(stream, ts, arr.astype("float32"))


# C0, DEL and C1 control characters, the line and paragraph separators (line breaks to str.splitlines and JavaScript,
# as a newline), and the bidirectional overrides and isolates, which reorder what a terminal or a dashboard shows of
# the characters after them (U+202E made "dev-1<RLO>cba" show as "dev-1abc")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# whitespace and the format characters that show as nothing (as in the input schema's pattern)
_INVISIBLE = re.compile(r"[\s\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064"
                        r"\u2066-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff9-\ufffb"
                        # beyond the BMP: shorthand and musical format controls, tags, variation selectors
                        r"\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e007f\U000e0100-\U000e01ef]*")


def _stream(field: Any, key: bytes | None, limits: Limits) -> str | BadRecord:
    try:
        key_id = key.decode("utf-8") if key else None
    except UnicodeDecodeError:
        return BadRecord("bad_stream", "message key is not UTF-8")
    if field is not None and (not isinstance(field, str) or not field):
        return BadRecord("bad_stream", "stream must be a non-empty string")
    stream = field or key_id
    if not stream:
        return BadRecord("bad_stream", "no stream id: set the message key or a stream field")
    if field and key_id and field != key_id:
        return BadRecord("bad_stream", f"stream field {field[:64]!r} differs from the key {key_id[:64]!r}")
    if len(stream) > limits.max_stream_len:
        return BadRecord("bad_stream", f"stream id longer than {limits.max_stream_len} characters")
    if _INVISIBLE.fullmatch(stream):
        # no glob of `tsmon ctl --stream` or row of `tsmon status` can show it: whitespace, or format characters
        # that show as nothing (U+FEFF, which ECMA-262's \s, a schema validator's, takes for a space; U+200B …)
        return BadRecord("bad_stream", "stream id is only whitespace or invisible characters")
    if (bad := _CONTROL.search(stream)) is not None:  # a NUL, a newline, an escape: garbage, or a terminal's trap
        return BadRecord("bad_stream", f"stream id has a control character (U+{ord(bad.group()):04X})")
    if field and not encodable(field):  # a JSON field may carry lone surrogates (a key decoded from UTF-8 cannot):
        # such an id could never key an alert or a state document
        return BadRecord("bad_stream", "stream id is not valid Unicode (a lone surrogate)")
    return stream


def encodable(text: str) -> bool:
    """Can ``text`` be a message key, UTF-8? JSON may carry lone surrogates (``"\\ud800"``), which no UTF-8 text
    holds: a stream id or a command id with one raised where it keyed a message."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _quoted_number(value: Any) -> str:
    """A note for a number sent as a JSON string ("1796636082820" read as if valid: a pipeline owner's pass)."""
    if not isinstance(value, str):
        return ""
    try:
        number = float(value.strip())
    except ValueError:
        return ""
    return " (a string: send the number itself, without quotes)" if math.isfinite(number) else ""
