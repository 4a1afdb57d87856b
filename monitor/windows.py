"""Per-stream windows: W samples every H samples (or one per heartbeat), restarted by a gap, vectorised per block.

Owns the order rules of a stream: timestamps must increase (a duplicate or backwards block is refused
whole, with a reason, and leaves the state untouched); a gap longer than ``gap_ms`` restarts the window
so that no window spans missing data. State per stream is bounded: the last ``W − 1`` samples.
:attr:`StreamWindows.needed_from` tells the offset ledger which samples a future window still needs.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from models.beats import BeatRule, peak_positions, rule_of
from monitor.alerts import iso


@dataclass(frozen=True, slots=True)
class Windows:
    """Windows ready to score: values ``[k, W, C]``, each window's first/last timestamp and last sample number."""

    values: np.ndarray
    start_ts: np.ndarray  # int64 [k]
    end_ts: np.ndarray  # int64 [k]
    end_seq: np.ndarray  # int64 [k], sample count of the stream at the window's last sample (1-based)

    def __len__(self) -> int:
        return len(self.end_ts)


class _Windowing:
    """What every windowing does alike: the order rules and splitting a block at its gaps."""

    window: int
    channels: int
    gap_ms: float | None
    last_ts: int | None
    gaps: deque[int]  # first sample time after each recent gap, for the alert state (bounded)

    def restart(self) -> None:
        raise NotImplementedError

    def _push_segment(self, ts: np.ndarray, values: np.ndarray) -> Windows:
        raise NotImplementedError

    def recent(self) -> tuple[np.ndarray, np.ndarray]:
        """Timestamps and values of the samples it still holds (the tail a next window needs)."""
        raise NotImplementedError

    def break_at(self, ts: int) -> None:
        """A gap before the sample at ``ts``: no window joins what came before to what follows (the alert state is told
        through :attr:`gaps`)."""
        self.restart()
        self.gaps.append(ts)

    def set_back(self) -> None:
        """The stream's clock was set back: restart, and the next sample follows none before it."""
        self.restart()
        self.last_ts = None
        self.gaps.clear()

    def check(self, ts: np.ndarray, values: np.ndarray) -> str | None:
        """Why a block cannot be appended (``None`` if it can): channel count or time order."""
        if values.ndim != 2 or values.shape[1] != self.channels:
            return f"channel_mismatch: stream has {self.channels} channel(s), block has {values.shape[-1]}"
        return order_problem(int(ts[0]), self.last_ts, int(ts[-1]))

    def push(self, ts: np.ndarray, values: np.ndarray) -> Windows:
        """Append a checked block (see :meth:`check`): restart at each gap; return the windows it completes."""
        gaps = _gap_starts(ts, self.last_ts, self.gap_ms)
        bounds = sorted({0, *gaps, len(ts)})
        parts: list[Windows] = []
        for lo, hi in itertools.pairwise(bounds):
            if lo in gaps:
                self.break_at(int(ts[lo]))
            parts.append(self._push_segment(ts[lo:hi], values[lo:hi]))
        self.last_ts = int(ts[-1])
        return _concat(parts, self.window, self.channels)


@dataclass
class StreamWindows(_Windowing):
    """Windowing state of one stream."""

    window: int
    hop: int
    channels: int
    gap_ms: float | None = None  # None: never restart on a gap
    restarts: int = 0
    seen: int = 0  # samples accepted since the stream was created
    last_ts: int | None = None
    gaps: deque[int] = field(default_factory=lambda: deque(maxlen=64))
    _tail: np.ndarray = field(init=False, repr=False)
    _tail_ts: np.ndarray = field(init=False, repr=False)
    _since_start: int = field(init=False, default=0)  # samples since the last (re)start
    _align_ts: int | None = field(init=False, default=None)  # see align()
    _align_skip: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.window < 2 or self.hop < 1:
            raise ValueError("window must be >= 2 and hop >= 1")
        self._tail = np.empty((0, self.channels), dtype="float32")
        self._tail_ts = np.empty(0, dtype="int64")

    def _next_start(self) -> int:
        """Position (since the last restart) of the first sample of the next window."""
        w, h, last = self.window, self.hop, self._since_start - 1
        next_end = w - 1 if last < w - 1 else w - 1 + h * ((last - (w - 1)) // h + 1)
        return next_end - w + 1

    def recent(self) -> tuple[np.ndarray, np.ndarray]:
        return self._tail_ts, self._tail

    @property
    def needed_from(self) -> int:
        """Sample number (1-based, like ``end_seq``) of the first sample a future window will contain."""
        return self.seen - self._since_start + self._next_start() + 1

    def phase(self) -> tuple[int, int, int] | None:
        """Where the next window starts, as a replay must find it again: ``(seq, ts, skip)`` — the sample
        number to hold input from, and for :meth:`align`, the timestamp of a sample at or before the start and
        how many samples from that one on to pass over. None before any sample."""
        if self._align_ts is not None:
            if self.last_ts is not None and self.last_ts >= self._align_ts:
                # passing over samples from the stored one on: the last passed over, and those still to pass
                # (the stored timestamp with the skip already reduced moved the next owner's grid)
                return self.seen, self.last_ts, self._align_skip + 1
            return self.seen + 1, self._align_ts, self._align_skip  # not reached yet: the stored point stands
        if self.last_ts is None:
            return None
        start, since = self._next_start(), self._since_start
        if start < since:  # arrived: it is in the tail (the sample number is needed_from's)
            return self.seen - since + start + 1, int(self._tail_ts[start - (since - len(self._tail_ts))]), 0
        return self.seen, self.last_ts, start - since + 1  # hop ≥ window: after the last sample, a few more

    def align(self, from_ts: int, skip: int = 0) -> None:
        """Start the first window where :meth:`phase` said (a restored stream: the replay's windows then fall
        where the first owner's did, and so do alert ids): pass over the samples stamped before ``from_ts``,
        then ``skip`` more. Passed-over samples are counted, not windowed. A replay that begins after
        ``from_ts`` (state older than the commit) cannot be aligned and is windowed from its first sample."""
        self._align_ts, self._align_skip = from_ts, skip

    def push(self, ts: np.ndarray, values: np.ndarray) -> Windows:
        if self._align_ts is not None:
            if self.last_ts is None and int(ts[0]) > self._align_ts:
                self._align_ts, self._align_skip = None, 0
            else:
                k = int(np.searchsorted(ts, self._align_ts))  # before the stored sample
                take = min(self._align_skip, len(ts) - k)
                gap = self._gap_in_skip(ts, k, take)
                if gap is not None:  # the first owner restarted its windows there, and so does this replay
                    take, self._align_skip = gap - k, 0
                else:
                    self._align_skip -= take
                if k < len(ts) and self._align_skip == 0:
                    self._align_ts = None
                k += take
                if k:
                    self.seen, self.last_ts = self.seen + k, int(ts[k - 1])
                    ts, values = ts[k:], values[k:]
                if not len(ts):
                    return _concat([], self.window, self.channels)
        return super().push(ts, values)

    def _gap_in_skip(self, ts: np.ndarray, k: int, take: int) -> int | None:
        """Index of the first sample of ``ts[k : k + take]`` (the samples :meth:`align` passes over) that follows
        a gap after another passed-over one — where the first owner restarted — or None."""
        if not take:
            return None
        begun = k == 0 and self.last_ts is not None and self.last_ts >= self._align_ts  # passing over since a push ago
        gaps = _gap_starts(ts[k : k + take], self.last_ts if begun else None, self.gap_ms)
        return k + gaps[0] if gaps else None

    def restart(self) -> None:
        """Forget the partial window: the next window starts with the next sample."""
        self._align_ts, self._align_skip = None, 0
        self._tail, self._tail_ts = self._tail[:0], self._tail_ts[:0]
        self._since_start = 0
        self.restarts += 1

    def _push_segment(self, ts: np.ndarray, values: np.ndarray) -> Windows:
        w, h, n = self.window, self.hop, len(values)
        arr = np.concatenate([self._tail, values.astype("float32", copy=False)])
        all_ts = np.concatenate([self._tail_ts, ts])
        first = self._since_start - len(self._tail)  # position (since start) of arr[0]
        # window ends fall on positions w-1, w-1+h, …; only those among the new samples are new windows
        p0 = max(w - 1, self._since_start)
        p0 = w - 1 + -(-(p0 - (w - 1)) // h) * h
        ends = np.arange(p0, self._since_start + n, h) - first  # indices into arr
        out = _concat([], w, self.channels)
        if len(ends):
            starts = ends - (w - 1)
            out = Windows(arr[starts[:, None] + np.arange(w)], all_ts[starts], all_ts[ends],
                          self.seen + ends - len(self._tail) + 1)
        self._since_start += n
        self.seen += n
        keep = min(len(arr), w - 1)
        self._tail, self._tail_ts = arr[len(arr) - keep:].copy(), all_ts[len(arr) - keep:].copy()
        return out


@dataclass
class BeatWindows(_Windowing):
    """Beat-aligned windowing state of one stream: the windows :func:`models.beats.beat_windows` cuts from
    the same samples, one per R peak, decided ``rule.lookahead`` samples after the peak.

    Same interface as :class:`StreamWindows` (order rules, gaps, ``needed_from``); state is bounded by
    ``max(pre, lookahead)`` samples plus the windows still waiting for their last sample.
    """

    rule: BeatRule
    channels: int
    gap_ms: float | None = None
    restarts: int = 0
    seen: int = 0
    last_ts: int | None = None
    gaps: deque[int] = field(default_factory=lambda: deque(maxlen=64))
    _buf: np.ndarray = field(init=False, repr=False)
    _buf_ts: np.ndarray = field(init=False, repr=False)
    _offset: int = field(init=False, default=0)  # position (since the last restart) of _buf[0]
    _since_start: int = field(init=False, default=0)
    _decided: int = field(init=False, default=0)  # positions below this have been looked at for peaks
    _pending: list[int] = field(init=False, default_factory=list)  # peaks whose window is not complete yet

    def __post_init__(self) -> None:
        self._buf = np.empty((0, self.channels), dtype="float32")
        self._buf_ts = np.empty(0, dtype="int64")

    @property
    def window(self) -> int:
        return self.rule.window

    def recent(self) -> tuple[np.ndarray, np.ndarray]:
        return self._buf_ts, self._buf

    @property
    def needed_from(self) -> int:
        """Sample number (1-based) of the first sample a future window, or deciding a future peak, needs."""
        r = self.rule
        back = max(r.pre, r.lookahead)  # a pending peak is found again after a restart only with its lookbehind
        first = min([p - back for p in self._pending] + [self._decided - back])
        return self.seen - self._since_start + max(first, 0) + 1

    def phase(self) -> None:
        """Beat windows keep no phase: each is placed by its R peak, found again by a replay (needed_from)."""

    def align(self, from_ts: int, skip: int = 0) -> None:
        """Nothing to align (see :meth:`phase`)."""

    def restart(self) -> None:
        self._buf, self._buf_ts = self._buf[:0], self._buf_ts[:0]
        self._offset = self._since_start = self._decided = 0
        self._pending = []
        self.restarts += 1

    def _push_segment(self, ts: np.ndarray, values: np.ndarray) -> Windows:
        r, n = self.rule, len(values)
        arr = np.concatenate([self._buf, values.astype("float32", copy=False)])
        arr_ts = np.concatenate([self._buf_ts, ts])
        total = self._since_start + n
        k = max(0, self._decided - r.lookahead - self._offset)  # decided positions are not looked at again
        found = peak_positions(arr[k:, r.lead], r, start=self._decided - self._offset - k) + self._offset + k
        self._decided = max(self._decided, total - r.lookahead)
        self._pending += [int(p) for p in found if p >= r.pre]
        done = [p for p in self._pending if p - r.pre + r.window <= total]
        self._pending = [p for p in self._pending if p - r.pre + r.window > total]
        out = _concat([], r.window, self.channels)
        if done:
            starts = np.asarray(done, dtype="int64") - r.pre - self._offset  # indices into arr
            ends = starts + r.window - 1
            out = Windows(arr[starts[:, None] + np.arange(r.window)], arr_ts[starts], arr_ts[ends],
                          self.seen - self._since_start + self._offset + ends + 1)
        self.seen += n
        self._since_start = total
        keep = min([p - r.pre for p in self._pending] + [self._decided - max(r.pre, r.lookahead)])
        cut = min(max(keep - self._offset, 0), len(arr))
        self._buf, self._buf_ts = arr[cut:].copy(), arr_ts[cut:].copy()
        self._offset += cut
        return out


def for_stream(windowing: dict[str, object], window: int, hop: int, channels: int,
               gap_ms: float | None) -> StreamWindows | BeatWindows:
    """The windowing state a model's ``windowing`` document asks for (sliding by default)."""
    rule = rule_of(windowing)
    return BeatWindows(rule, channels, gap_ms) if rule is not None else StreamWindows(window, hop, channels, gap_ms)


def _gap_starts(ts: np.ndarray, last_ts: int | None, gap_ms: float | None) -> list[int]:
    if gap_ms is None:
        return []
    inner = np.flatnonzero(ts[1:] - ts[:-1] > gap_ms) + 1
    first = [0] if last_ts is not None and ts[0] - last_ts > gap_ms else []
    return first + inner.tolist()


def order_problem(first_ts: int, last_ts: int | None, block_last_ts: int | None = None) -> str | None:
    """Why a block starting at ``first_ts`` (ending at ``block_last_ts``) cannot follow a stream whose last sample
    is at ``last_ts``. A block that ends on that very sample is a duplicate (a producer re-sent its last message:
    a chunk of 10 samples was reported as a clock going back); one that only starts there is too."""
    if last_ts is None or first_ts > last_ts:
        return None
    kind = "duplicate_timestamp" if last_ts in (first_ts, block_last_ts) else "timestamp_backwards"
    # times as dates and numbers (a pipeline owner's pass: "1796636759637 after 1796636759637" said nothing)
    return f"{kind}: its samples start at {iso(first_ts)} ({first_ts}), not after the stream's last, {iso(last_ts)}" \
           f" ({last_ts})"


def _concat(parts: list[Windows], window: int, channels: int) -> Windows:
    parts = [p for p in parts if len(p)]
    if not parts:
        empty = np.empty(0, "int64")
        return Windows(np.empty((0, window, channels), "float32"), empty, empty, empty)
    if len(parts) == 1:
        return parts[0]
    fields = ("values", "start_ts", "end_ts", "end_seq")
    return Windows(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))
