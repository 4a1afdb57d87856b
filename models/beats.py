"""Beat-aligned windows for ECG: find R peaks with a local rule and cut one window around each.

Owns the alignment rule shared by training and the daemon, so that a stream cut sample by sample gives
exactly the windows the model was trained on. The rule looks only at a bounded neighbourhood:

* ``h[q] = x[q] − mean(x[q−b … q+b])`` on the first channel (the lead): baseline wander removed;
* ``p`` is an R peak when ``h[p]`` is the first maximum of ``h[p−r … p+r]`` and above ``level``;
* its window is the ``W`` samples from ``p − pre``.

A position is decided once ``r + b`` samples after it have arrived (``lookahead``), and the first
``r + b`` samples of a series or of a restarted stream hold no peak. Windows are ECG5000-like (aligned
on the beat), and with ``pre`` longer than the shortest normal RR interval a premature beat brings the
previous R peak into its window.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from models.errors import DataError

KIND = "beats"
SLIDING = "sliding"


@dataclass(frozen=True, slots=True)
class BeatRule:
    window: int  # samples per window
    pre: int  # samples before the R peak
    refractory: int  # r: a peak is the largest of ±r samples
    baseline: int  # b: half-width of the moving mean removed first
    level: float  # least height of a peak above that mean (raw units of the lead)
    lead: int = 0  # channel the peaks are found on

    def __post_init__(self) -> None:
        if not (0 <= self.pre < self.window and self.refractory >= 1 and self.baseline >= 1 and self.lead >= 0):
            raise DataError(f"beat windows need 0 <= pre < window, refractory >= 1, baseline >= 1 and lead >= 0: got "
                            f"pre {self.pre}, window {self.window}, refractory {self.refractory}, baseline "
                            f"{self.baseline}, lead {self.lead}")
        if not np.isfinite(self.level):
            raise DataError("beat level must be finite")

    @property
    def lookahead(self) -> int:
        """Samples after a position that must have arrived before it is decided."""
        return self.refractory + self.baseline

    def to_dict(self) -> dict[str, object]:
        return {"kind": KIND, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> BeatRule:
        keys = ("window", "pre", "refractory", "baseline", "lead")
        try:
            return cls(**{k: int(d[k]) for k in keys}, level=float(d["level"]))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"beat windowing needs {', '.join(keys)} and level: {exc}") from None

    @classmethod
    def fit(cls, values: np.ndarray, window: int, pre: int, refractory: int, baseline: int,
            lead: int = 0) -> BeatRule:
        """The level from normal training data: half the 90th percentile of all local maxima's heights.

        Local maxima 2r apart are R peaks and the smaller waves between them (P, T, noise); R peaks are the
        tallest share of them, and half their height separates them from the rest.
        """
        probe = cls(window, pre, refractory, baseline, -1e30, lead)
        x = np.asarray(values, dtype="float64")[:, lead]
        h = highpassed(x, baseline)
        p = peak_positions(x, probe)
        if len(p) < 3:
            raise DataError(f"too few beats ({len(p)}) in the training data to fit beat windows")
        return cls(window, pre, refractory, baseline, float(0.5 * np.percentile(h[p - baseline], 90)), lead)


def rule_of(windowing: object) -> BeatRule | None:
    """The beat rule a model's ``windowing`` document describes, or None for sliding windows."""
    if not isinstance(windowing, dict):
        raise DataError(f"windowing must be an object, not {windowing!r}")
    if windowing.get("kind") == KIND:
        return BeatRule.from_dict(windowing)
    if windowing.get("kind") != SLIDING:
        raise DataError(f"unknown windowing {windowing.get('kind')!r}: use {SLIDING} or {KIND}")
    return None


def highpassed(x: np.ndarray, b: int) -> np.ndarray:
    """``x[q] − mean(x[q−b … q+b])`` for ``q`` in ``[b, len − b)`` (index ``q − b`` of the result)."""
    if len(x) < 2 * b + 1:
        return np.empty(0)
    view = np.lib.stride_tricks.sliding_window_view(x, 2 * b + 1)
    return x[b : len(x) - b] - view.mean(axis=1)


def peak_positions(x: np.ndarray, rule: BeatRule, start: int = 0) -> np.ndarray:
    """R peaks of the 1-D lead ``x`` among the positions ``[max(start, lookahead), len(x) − lookahead)``."""
    r, b = rule.refractory, rule.baseline
    h = highpassed(np.asarray(x, dtype="float64"), b)
    if len(h) < 2 * r + 1:
        return np.empty(0, "int64")
    view = np.lib.stride_tricks.sliding_window_view(h, 2 * r + 1)  # view[k] centred on x position k + r + b
    centre = np.arange(len(view)) + r + b
    is_peak = (view.argmax(axis=1) == r) & (h[r : r + len(view)] > rule.level) & (centre >= start)
    return centre[is_peak].astype("int64")


def beat_windows(values: np.ndarray, rule: BeatRule) -> tuple[np.ndarray, np.ndarray]:
    """Windows ``[k, W, C]`` at every complete beat of ``values`` and the index of each one's last sample.

    A file's NaN/inf samples are bridged (linearly) to find the peaks only: the window around one still holds
    them, so it is dropped and counted as non-finite, never lost — NaN spread over the high-pass's span and won
    every peak's argmax, and the beat vanished from the windows uncounted. (The daemon never sees them: records
    with NaN are dead-lettered.)
    """
    lead = values[:, rule.lead].astype("float64")
    bad = ~np.isfinite(lead)
    if bad.any() and not bad.all():
        lead[bad] = np.interp(np.flatnonzero(bad), np.flatnonzero(~bad), lead[~bad])
    p = peak_positions(lead, rule)
    starts = p - rule.pre
    starts = starts[(starts >= 0) & (starts + rule.window <= len(values))]
    wins = values[starts[:, None] + np.arange(rule.window)] if len(starts) else np.empty(
        (0, rule.window, values.shape[1]), values.dtype)
    return wins, starts + rule.window - 1
