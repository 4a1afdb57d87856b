"""Data quality of one stream: gaps, late or duplicate samples, sample-rate drift, flat-lined channels, a clock
set back, and silence with an alert open.

Owns the rule that bad data is not an anomaly. These findings become ``data_quality`` events on the sink
topic — never anomaly alerts — and the windows concerned stay out of calibration and alerting. Events are
rate-limited per kind on the stream's own clock (one per ``cooldown_ms``; the ones held back are counted
in the next), so a replay produces the same events with the same deterministic ids.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

KINDS = ("gap", "late", "duplicate", "rate_drift", "flatline", "clock_step", "stale", "nonfinite_score", "silent",
         "resumed", "clock_out_of_range")
# changes of a stream's state, said once each by their callers: never held back (a sensor that came back for a few
# seconds and died again within the cooldown had its second `silent` dropped, `resumed` left as the last word)
UNTHROTTLED = frozenset({"silent", "resumed", "stale"})
LEARN_DIFFS = 64  # sample intervals that fix a stream's nominal period
CHECK_EVERY = 64  # new intervals between two sample-rate checks
GAPS_HINT = 8  # gaps in a row after which a gap event says the stream is sampled more slowly than gap_ms


def intervals_ms(ts: np.ndarray, prev_ts: int | None) -> np.ndarray:
    """Time between consecutive samples (the first one after ``prev_ts`` when given); cheaper than np.diff."""
    inner = ts[1:] - ts[:-1]
    return inner if prev_ts is None else np.concatenate((ts[:1] - prev_ts, inner))


def _within(d: np.ndarray, ts: np.ndarray, prev_ts: int | None, gap_ms: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The intervals ``d`` of ``ts`` (:func:`intervals_ms`) up to ``gap_ms``, and the sample that ends each."""
    ends = ts if prev_ts is not None else ts[1:]
    if gap_ms is None:
        return d, ends
    keep = d <= gap_ms
    return d[keep], ends[keep]


def flat_channels(windows: np.ndarray, scale: np.ndarray, rel_std: float,
                  window_spread: tuple[float, ...] | None = None) -> np.ndarray:
    """``[k, C]``: channels whose spread in a window ``[k, W, C]`` is at most ``rel_std`` × their training spread —
    among those whose training windows were rarely that steady (``window_spread``, relative to ``scale``: a channel
    constant in training, or a set-point steady for most windows, is not a stuck sensor when it is steady live)."""
    flat = windows.std(axis=1, dtype="float64") <= rel_std * scale  # float32 squares overflow above ~1e19
    return flat if window_spread is None else flat & ~steady(window_spread, rel_std)


def steady(window_spread: tuple[float, ...], rel_std: float) -> np.ndarray:
    """``[C]``: channels as steady as a flat line in 1 % or more of the training windows (``Scaler.window_spread``):
    the flat-line test leaves them alone."""
    return np.asarray(window_spread) <= rel_std


@dataclass(frozen=True, slots=True)
class QualityEvent:
    stream: str
    kind: str
    ts: int  # epoch ms on the stream's clock
    detail: str
    channels: tuple[str, ...] = ()
    suppressed: int = 0  # events of this kind held back by the cooldown since the previous one
    nth: int = 0  # its count among the stream's events of this kind at one time (silences: see Residency)

    @property
    def event_id(self) -> str:
        nth = f"|{self.nth}" if self.nth else ""  # the first one's id as before
        return hashlib.sha256(f"{self.stream}|{self.kind}|{self.ts}{nth}".encode()).hexdigest()[:20]


@dataclass
class StreamQuality:
    """Quality checks of one stream; ``scale`` is the model's per-channel training spread."""

    stream: str
    scale: np.ndarray
    channel_names: list[str]
    flatline_rel_std: float = 1e-3
    rate_tolerance: float = 0.25
    cooldown_ms: float = 60_000
    period_ms: float | None = None  # learned from the first intervals
    on_finding: Callable[[str], None] | None = None  # every finding, a held-back one too (the daemon's counter)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    _diffs: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    _new_diffs: int = 0
    _last_emit: dict[str, int] = field(default_factory=dict)
    _held: dict[str, int] = field(default_factory=dict)
    _drifting: bool = False
    _recent_period: float | None = None  # the median of the last CHECK_EVERY intervals, at the last check
    _gaps_in_row: int = 0  # intervals over gap_ms since the last one under it

    def event(self, kind: str, ts: int, detail: str, channels: tuple[str, ...] = (), nth: int = 0) -> list[QualityEvent]:
        """Count a finding; return it as an event unless the cooldown holds it back (never ``UNTHROTTLED`` ones)."""
        self.counts[kind] += 1
        if self.on_finding is not None:
            self.on_finding(kind)
        last = self._last_emit.get(kind)
        # late samples go back in time: both ways
        if last is not None and abs(ts - last) < self.cooldown_ms and kind not in UNTHROTTLED:
            self._held[kind] = self._held.get(kind, 0) + 1
            return []
        self._last_emit[kind] = ts
        return [QualityEvent(self.stream, kind, ts, detail, channels, self._held.pop(kind, 0), nth)]

    def timing(self, ts: np.ndarray, prev_ts: int | None, gap_ms: float | None,
               rate_gap_ms: float | None) -> list[QualityEvent]:
        """Gaps longer than ``gap_ms`` (an event each, subject to the cooldown), then sample-rate drift, learnt from
        the intervals up to ``rate_gap_ms`` (the absolute ``gap_ms`` where ``gap_ms`` is relative to the learnt
        period: otherwise a slower rate would be all gaps and never seen as a drift)."""
        d = intervals_ms(ts, prev_ts)
        rate = self._rate(*_within(d, ts, prev_ts, rate_gap_ms))
        if gap_ms is None:
            return rate
        first, events = int(prev_ts is None), []  # d[j] ends at sample j + first
        over, before = d > gap_ms, -1  # the block's first interval goes on from the last block's run
        for j in np.flatnonzero(over):
            self._gaps_in_row, before = (self._gaps_in_row + 1 if j == before + 1 else 1), j
            # a stream sampled more slowly than gap_ms is all gaps and never completes a window: say so
            hint = (f"; every one of its last {self._gaps_in_row} intervals was over gap_ms ({gap_ms:g} ms), so its "
                    "windows never complete: set gap_ms (windows.gap_ms, or the route's) above its sampling interval"
                    if self._gaps_in_row >= GAPS_HINT else "")
            events += self.event("gap", int(ts[j + first]), f"no samples for {int(d[j])} ms{_readable(d[j])}{hint}")
        if len(over) and not over[-1]:
            self._gaps_in_row = 0
        return events + rate

    def period_to_learn(self, ts: np.ndarray, prev_ts: int | None, rate_gap_ms: float | None) -> float | None:
        """While no period is learnt: the one :meth:`timing` will learn from this block, if it will (else None). A
        stream's first poll can hold thousands of samples, cut into windows before the period was known: its
        dropouts were spliced into windows where a poll of one record would have restarted them."""
        if self.period_ms is not None:
            return None
        d = intervals_ms(ts, prev_ts)
        d = d if rate_gap_ms is None else d[d <= rate_gap_ms]
        diffs = [*self._diffs, *d.tolist()][-(self._diffs.maxlen or len(self._diffs) + len(d)):]  # as _rate keeps
        return float(statistics.median(diffs)) if len(diffs) >= LEARN_DIFFS else None

    @property
    def current_period_ms(self) -> float | None:
        """The sample period now: the learnt one, or while the rate has drifted from it, the recent one."""
        return self._recent_period if self._drifting and self._recent_period else self.period_ms

    def periods(self) -> tuple[float | None, float | None]:
        """What a changelog document keeps of the rate: the learnt period, and the recent one while drifting."""
        return self.period_ms, (self._recent_period if self._drifting else None)

    def resume(self, learnt: float | None, recent: float | None) -> None:
        """Continue with the periods a document kept (:meth:`periods`): relearnt from 64 intervals, a gap of a
        few periods right after a restore or an eviction was spliced into windows (``windows.gap_periods``)."""
        if learnt is not None and self.period_ms is None:
            self.period_ms = learnt
            self._recent_period, self._drifting = recent, recent is not None

    def set_back(self) -> None:
        """The stream's clock was set back: the rate limit restarts (kept, it ran on the old time's stamps, and a second
        step to within a cooldown of the first one's new time was held back); what it held back is still told."""
        self._last_emit.clear()

    def cooldowns(self) -> dict[str, dict[str, int]]:
        """What a changelog document keeps of the rate limit: per kind, the time of the last event published and the
        number held back since (a replay after a restart published again what the cooldown had held back, under
        a new id)."""
        return {"last_emit": dict(self._last_emit), "held": dict(self._held)}

    def resume_cooldowns(self, doc: object) -> None:
        """Continue the rate limit a document kept (:meth:`cooldowns`); entries of unknown kinds or types are left
        out (documents of earlier versions keep none)."""
        if not isinstance(doc, dict):
            return
        for name, into in (("last_emit", self._last_emit), ("held", self._held)):
            part = doc.get(name)
            if isinstance(part, dict):
                into.update({k: v for k, v in part.items()
                             if k in KINDS and isinstance(v, int) and not isinstance(v, bool)})

    def intervals(self, ts: np.ndarray, prev_ts: int | None, gap_ms: float | None) -> list[QualityEvent]:
        """Learn the period from in-order samples and report a drift of the sample rate (gaps left out)."""
        return self._rate(*_within(intervals_ms(ts, prev_ts), ts, prev_ts, gap_ms))

    def _rate(self, d: np.ndarray, ends: np.ndarray) -> list[QualityEvent]:
        if self.period_ms is None:
            self._new_diffs += len(d)
            self._diffs.extend(d.tolist())
            if len(self._diffs) >= LEARN_DIFFS:
                self.period_ms = float(statistics.median(self._diffs))  # ≤ 256 floats: 3 µs, np.median 19
                self._new_diffs = 0
            return []
        # every CHECK_EVERY intervals counted across polls, judged at the sample that completes them: checked once per
        # poll on its last 64 intervals, the event's time and id depended on how records were grouped into polls (a
        # replay read in other polls sent it again under another id), and a slowdown inside one poll went unseen.
        # The steps' medians in one numpy call (a 10 000-sample chunk is 156 steps)
        have = self._new_diffs  # the newest intervals, of a step not complete yet
        left = np.fromiter(itertools.islice(self._diffs, len(self._diffs) - have, None), "float64", have)
        pending = np.concatenate((left, d))
        steps = len(pending) // CHECK_EVERY
        self._diffs.extend(d[-(self._diffs.maxlen or len(d)):].tolist())  # only the newest are read again
        self._new_diffs = len(pending) - steps * CHECK_EVERY
        medians = np.median(pending[: steps * CHECK_EVERY].reshape(steps, CHECK_EVERY), axis=1) if steps else ()
        events: list[QualityEvent] = []
        for step, recent in enumerate(medians):
            events += self._check(float(recent), int(ends[(step + 1) * CHECK_EVERY - have - 1]))
        return events

    def _check(self, recent: float, end_ts: int) -> list[QualityEvent]:
        """The sample rate of a step of CHECK_EVERY intervals (their median ``recent``) against the learnt one:
        ``rate_drift`` when it drifts."""
        assert self.period_ms is not None
        self._recent_period = recent
        change = recent / self.period_ms - 1 if self.period_ms > 0 else 0.0
        was, self._drifting = self._drifting, abs(change) > self.rate_tolerance
        if self._drifting and not was:
            return self.event("rate_drift", end_ts,
                              f"sample period {recent:.3g} ms, learned {self.period_ms:.3g} ms ({change:+.0%})")
        return []

    def flat(self, windows: np.ndarray) -> np.ndarray:
        """Per window and channel: is the channel flat-lined (stuck or lead-off) in that window? ``[k, C]``."""
        return flat_channels(windows, self.scale, self.flatline_rel_std)

    def unscorable(self, values: np.ndarray, channel_error: np.ndarray, score: float, end_ts: int) -> list[QualityEvent]:
        """A window of finite values whose score is NaN or inf (values the model's arithmetic overflows on, e.g. an
        instrument's 9.9e37 overload code): no anomaly, no "normal" — but said, not only logged and counted."""
        bad = ~np.isfinite(channel_error)
        names = tuple(n for n, b in zip(self.channel_names, bad, strict=True) if b) or tuple(self.channel_names)
        with np.errstate(over="ignore", invalid="ignore"):
            largest = float(np.nanmax(np.abs(values.astype("float64")))) if values.size else math.nan
        return self.event("nonfinite_score", end_ts, f"score {score} on values up to |{largest:.3g}| on "
                          f"{', '.join(names)}: beyond what the model computes; not scored, not taken as normal", names)

    def flat_events(self, flat: np.ndarray, end_ts: np.ndarray, open_alert: str | None = None) -> list[QualityEvent]:
        """Windows with a flat-lined channel are not scored: said, with the alert that stays open meanwhile (it
        neither resolves nor escalates until the channel varies again)."""
        out: list[QualityEvent] = []
        held = f"; alert {open_alert} stays open, neither resolved nor raised," if open_alert else ""
        for row in np.flatnonzero(flat.any(axis=1)):
            names = tuple(self.channel_names[c] for c in np.flatnonzero(flat[row]))
            out += self.event("flatline", int(end_ts[row]), f"no variation on {', '.join(names)}: the stream's "
                              f"windows are not scored{held} until it varies again", names)
        return out


def _readable(ms: float) -> str:
    """A long interval also in a unit people read (" (5.0 h)"): 18001000 ms alone, a new user had to work it out."""
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("min", 60_000)):
        if round(ms / size, 1) >= 1:  # (3 599 999 ms is 1.0 h, not 60.0 min)
            return f" ({ms / size:.1f} {unit})"
    return ""
