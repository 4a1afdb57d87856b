"""Per-stream sliding windows: W samples every H samples, restarted by a gap, vectorised per block.

Owns the order rules of a stream: timestamps must increase (a duplicate or backwards block is refused
whole, with a reason, and leaves the state untouched); a gap longer than ``gap_ms`` restarts the window
so that no window spans missing data. State per stream is bounded: the last ``W − 1`` samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class Windows:
    """Windows ready to score: values ``[k, W, C]``, and each window's last timestamp and sample number."""

    values: np.ndarray
    end_ts: np.ndarray  # int64 [k]
    end_seq: np.ndarray  # int64 [k], sample count of the stream at the window's last sample (1-based)

    def __len__(self) -> int:
        return len(self.end_ts)


@dataclass
class StreamWindows:
    """Windowing state of one stream."""

    window: int
    hop: int
    channels: int
    gap_ms: float | None = None  # None: never restart on a gap
    restarts: int = 0
    seen: int = 0  # samples accepted since the stream was created
    last_ts: int | None = None
    _tail: np.ndarray = field(init=False, repr=False)
    _since_start: int = field(init=False, default=0)  # samples since the last (re)start

    def __post_init__(self) -> None:
        if self.window < 2 or self.hop < 1:
            raise ValueError("window must be >= 2 and hop >= 1")
        self._tail = np.empty((0, self.channels), dtype="float32")

    def check(self, ts: np.ndarray, values: np.ndarray) -> str | None:
        """Why a block cannot be appended (``None`` if it can): channel count or time order."""
        if values.ndim != 2 or values.shape[1] != self.channels:
            return f"channel_mismatch: stream has {self.channels} channel(s), block has {values.shape[-1]}"
        if self.last_ts is not None and int(ts[0]) <= self.last_ts:
            kind = "duplicate_timestamp" if int(ts[0]) == self.last_ts else "timestamp_backwards"
            return f"{kind}: {int(ts[0])} after {self.last_ts}"
        return None

    def push(self, ts: np.ndarray, values: np.ndarray) -> Windows:
        """Append a checked block (see :meth:`check`) and return the windows it completes."""
        gaps = self._gap_starts(ts)
        bounds = sorted({0, *gaps, len(ts)})
        parts: list[Windows] = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if lo in gaps:
                self._restart()
            parts.append(self._push_segment(ts[lo:hi], values[lo:hi]))
        self.last_ts = int(ts[-1])
        return _concat(parts, self.window, self.channels)

    def _gap_starts(self, ts: np.ndarray) -> list[int]:
        if self.gap_ms is None:
            return []
        prev = np.r_[self.last_ts if self.last_ts is not None else ts[0], ts[:-1]]
        return [int(i) for i in np.flatnonzero(ts - prev > self.gap_ms)]

    def _restart(self) -> None:
        self._tail = self._tail[:0]
        self._since_start = 0
        self.restarts += 1

    def _push_segment(self, ts: np.ndarray, values: np.ndarray) -> Windows:
        w, h = self.window, self.hop
        arr = np.concatenate([self._tail, values.astype("float32", copy=False)])
        first = self._since_start - len(self._tail)  # position (since start) of arr[0]
        pos = first + np.arange(len(arr))
        new = np.arange(len(arr)) >= len(self._tail)  # windows end in the new samples only
        ends = np.flatnonzero(new & (pos >= w - 1) & ((pos - (w - 1)) % h == 0))
        out = _concat([], w, self.channels)
        if len(ends):
            views = np.lib.stride_tricks.sliding_window_view(arr, (w, self.channels))[:, 0]
            out = Windows(views[ends - (w - 1)].copy(), ts[ends - len(self._tail)],
                          self.seen + ends - len(self._tail) + 1)
        self._since_start += len(values)
        self.seen += len(values)
        self._tail = arr[-(w - 1):].copy() if len(arr) >= w - 1 else arr.copy()
        return out


def _concat(parts: list[Windows], window: int, channels: int) -> Windows:
    parts = [p for p in parts if len(p)]
    if not parts:
        return Windows(np.empty((0, window, channels), "float32"), np.empty(0, "int64"), np.empty(0, "int64"))
    if len(parts) == 1:
        return parts[0]
    return Windows(np.concatenate([p.values for p in parts]), np.concatenate([p.end_ts for p in parts]),
                   np.concatenate([p.end_seq for p in parts]))
