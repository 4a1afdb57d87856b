"""The drift guard: before a threshold goes up, tell a new normal from a sustained anomaly.

Owns the statistical test, on the recent errors of *all* windows of a stream (normal or not, in arrival
order). Two signatures of an anomaly that a raise would wrongly absorb:

* **mixture** — more than ``max_over_share`` of the recent windows would still be over the raised
  threshold: the stream alternates between normal and anomalous windows, and raising would only hide
  part of it (refused on the level-shift path and an operator's raise);
* **still changing** — a two-sample Kolmogorov–Smirnov test between the older and the newer half of the
  recent errors rejects at level ``alpha``: the level is moving, not settled;
* **not a shifted normal** — a KS test between the shapes (log-error around the median) of the recent
  errors and of known-normal ones rejects: normal mixed with anomalies, or a different kind of signal.

The level-shift path (nearly all of a full window, ``shift_share`` of ``min_windows`` or more errors,
over the threshold: the stream is alerting without pause) must pass all three, and is then accepted as
the new normal. An operator's recalibration must pass the mixture test. The scheduled path has no
guard: it learns only from windows that ended up normal (never from an alert) and moves by at most
``max_change`` a step, which is how it follows slow drift. (The mixture test there would hold a threshold
set too low where it is — it leaves a share of windows over each step up — so an intermittent incident's
short runs, which look the same, are learnt as normal: README, "intermittent incident".) Overlapping windows make neighbouring errors
correlated, so the caller thins the series to non-overlapping windows first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from models.errors import ConfigError

MIN_REFERENCE = 50  # known-normal errors the shape test (c) needs; with fewer it is not made
INSUFFICIENT = "insufficient evidence"  # a refusal for too few recent windows to judge, not for what they show


@dataclass(frozen=True, slots=True)
class DriftSettings:
    enabled: bool = True
    window: int = 600  # recent errors kept per stream
    min_windows: int = 200
    alpha: float = 0.01
    shift_share: float = 0.9
    max_over_share: float = 0.1

    def __post_init__(self) -> None:
        if not (1 <= self.min_windows <= self.window and 0 < self.alpha < 1 and 0.5 < self.shift_share <= 1
                and 0 < self.max_over_share < 0.5):
            raise ConfigError(f"invalid drift settings: {self}")


@dataclass(frozen=True, slots=True)
class Verdict:
    accept: bool
    reason: str


def ks_2samp(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov–Smirnov statistic D and its asymptotic p-value (Stephens' correction)."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    d = float(np.max(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b))))
    en = math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    lam = (en + 0.12 + 0.11 / en) * d
    if lam < 0.2:  # the series below converges slowly there, and p is 1 to many digits anyway
        return d, 1.0
    p = 2.0 * sum((-1) ** (j - 1) * math.exp(-2.0 * j * j * lam * lam) for j in range(1, 101))
    return d, min(1.0, max(0.0, p))


def level_shift(recent: np.ndarray, current: float, s: DriftSettings) -> bool:
    """Are (nearly) all of a full window of recent errors over the current threshold?"""
    return len(recent) >= s.min_windows and float(np.mean(recent > current)) >= s.shift_share


def assess(recent: np.ndarray, proposed: float, s: DriftSettings, thin: int = 1, stationary: bool = True,
           reference: np.ndarray | None = None) -> Verdict:
    """May the threshold rise to ``proposed``, given the stream's recent errors (oldest first)?

    ``reference``: errors of known-normal windows; when given, the recent errors must have their shape
    (same distribution of log-error around its median: a scaled normal, not normal mixed with anomalies).
    """
    finite = recent[np.isfinite(recent)]
    if len(finite) < s.min_windows:
        return Verdict(False, f"{INSUFFICIENT}: {len(finite)} recent windows, {s.min_windows} needed")
    over = float(np.mean(finite > proposed))
    if over > s.max_over_share:
        return Verdict(False, f"sustained anomaly: {over:.1%} of the last {len(finite)} windows would stay over "
                              f"{proposed:.4g} (at most {s.max_over_share:.0%} allowed)")
    if not stationary:
        return Verdict(True, f"{over:.1%} of the last {len(finite)} windows over {proposed:.4g}")
    sample = finite[:: max(1, thin)]
    half = len(sample) // 2
    if half < 10:
        return Verdict(False, f"{INSUFFICIENT}: {len(sample)} non-overlapping windows")
    d, p = ks_2samp(sample[:half], sample[half:])
    if p < s.alpha:
        return Verdict(False, f"still changing: KS D={d:.3f} p={p:.2g} between the two halves of the last "
                              f"{len(sample)} windows (alpha {s.alpha})")
    ref = None if reference is None else reference[np.isfinite(reference) & (reference > 0)]
    # with fewer known-normal errors (a stream new, or reset, at its level) the shape is not compared: refused, a new
    # stream at another level than its artifact's stayed over its threshold for good, pinned or not (a review)
    if ref is not None and len(ref) >= MIN_REFERENCE:
        ds, ps = ks_2samp(_shape(sample), _shape(ref))
        if ps < s.alpha:
            return Verdict(False, f"sustained anomaly: its errors are not shaped like the normal ones "
                                  f"(KS D={ds:.3f} p={ps:.2g} on log-error around the median)")
    return Verdict(True, f"stable level: KS D={d:.3f} p={p:.2g}, {over:.1%} over {proposed:.4g}")


def _shape(errors: np.ndarray) -> np.ndarray:
    """Log-errors around their median: a scaled copy of a distribution has the same shape."""
    logs = np.log(np.maximum(errors, 1e-12))
    return logs - np.median(logs)
