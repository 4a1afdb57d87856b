"""Per-stream anomaly thresholds: where each comes from, and their recalibration from recent normal errors.

Each stream starts at its model artifact's threshold (source ``"artifact"``). The caller feeds the
errors of normal windows; ``recalibrate()`` replaces the threshold by ``quantile × margin`` of a bounded
window of them once it holds ``min_samples`` entries, moving at most ``max_change`` (relative) per call
and staying within ``[floor, ceiling] × artifact value``. Anomalies never feed the window: the caller
passes only windows not in an alert, and non-finite errors are refused here (counted in ``rejected``).

Censoring. The caller feeds as values only windows below the threshold, and the q-quantile of values
truncated at T is always below T: alone, they would lower the threshold on every recalibration, down
to the floor. So the caller also reports, with ``observe_censored``, over-threshold windows that were
normal noise (an over-threshold run that ended without an alert); they enter the same window as
``+inf`` ("above the threshold of the time"). The quantile is taken with ``method="inverted_cdf"`` (an
actual entry, no interpolation with inf): finite, it is the empirical quantile, the censored entries
all lying above it; ``+inf``, the true quantile is above the threshold, we cannot see where, and the
threshold steps up (see ``_proposal``).

Thread-safe (one lock): the daemon runs ``recalibrate()`` from a scheduler thread.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from models.errors import ArtifactError, ConfigError

_MIN_CHANGE = 1e-9  # relative; below it a recalibration is not a change (float noise)


@dataclass(frozen=True, slots=True)
class CalibratorSettings:
    """How thresholds follow the recent normal errors; validated on construction."""

    quantile: float = 0.95
    margin: float = 1.0
    window: int = 2000  # entries kept per stream
    min_samples: int = 200  # entries needed before the calibrated value takes over
    max_change: float = 0.2  # relative, per recalibration
    floor: float = 0.5  # × artifact value
    ceiling: float = 4.0  # × artifact value
    enabled: bool = True  # False: recalibrate() changes nothing

    def __post_init__(self) -> None:
        # NaN fails every comparison below; inf is refused explicitly where a bound is open
        checks = [
            ("quantile", 0.0 < self.quantile < 1.0, "must be in (0, 1)"),
            ("margin", 0.0 < self.margin < math.inf, "must be finite and > 0"),
            ("window", isinstance(self.window, int) and self.window >= 1, "must be an integer >= 1"),
            ("min_samples", 1 <= self.min_samples <= self.window, "must be in [1, window]"),
            ("max_change", 0.0 < self.max_change <= 1.0, "must be in (0, 1]"),
            ("floor", 0.0 < self.floor <= 1.0, "must be in (0, 1]"),
            ("ceiling", 1.0 <= self.ceiling < math.inf, "must be finite and >= 1"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"calibrator {name} {rule}, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class ThresholdState:
    """A stream's threshold and its provenance."""

    value: float
    source: str  # "artifact" or "calibrated"
    samples: int  # entries in the stream's window when computed
    updated_ms: int  # epoch ms of the last change, 0 for the initial artifact value
    artifact: float  # the artifact value it started from


class Calibrator:
    """Thresholds of all registered streams and the recent normal errors they are calibrated on."""

    def __init__(self, settings: CalibratorSettings = CalibratorSettings(),
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, ThresholdState] = {}
        self._windows: dict[str, deque[float]] = {}
        self._rejected = 0

    def register(self, stream: str, artifact_value: float) -> ThresholdState:
        """Start ``stream`` at the artifact's threshold; a second call returns the existing state."""
        if not (math.isfinite(artifact_value) and artifact_value > 0):
            raise ArtifactError(f"threshold of stream {stream!r} must be finite and > 0, got {artifact_value}")
        with self._lock:
            if stream not in self._states:
                value = float(artifact_value)
                self._states[stream] = ThresholdState(value, "artifact", 0, 0, value)
                self._windows[stream] = deque(maxlen=self.settings.window)
            return self._states[stream]

    def threshold(self, stream: str) -> ThresholdState:
        with self._lock:
            return self._states[stream]

    def observe(self, stream: str, errors: np.ndarray | float) -> None:
        """Errors of normal windows (below the threshold, not in an alert); non-finite ones are refused."""
        arr = np.asarray(errors, dtype="float64").ravel()
        finite = np.isfinite(arr)
        # only the last `window` entries can survive the deque anyway
        kept = arr[finite][-self.settings.window:].tolist()
        with self._lock:
            self._windows[stream].extend(kept)  # KeyError first: nothing counted for an unknown stream
            self._rejected += int(arr.size - np.count_nonzero(finite))

    def observe_censored(self, stream: str, n: int = 1) -> None:
        """``n`` normal windows whose error was above the threshold (stored as +inf, see module doc)."""
        if n < 0:
            raise ValueError(f"censored count must be >= 0, got {n}")
        with self._lock:
            self._windows[stream].extend([math.inf] * min(n, self.settings.window))

    def recalibrate(self) -> dict[str, tuple[ThresholdState, ThresholdState]]:
        """Recompute every stream's threshold; ``{stream: (old, new)}`` for those that changed."""
        if not self.settings.enabled:
            return {}
        with self._lock:  # copy, then compute without holding the lock
            todo = [(s, st, np.array(self._windows[s], dtype="float64")) for s, st in self._states.items()
                    if len(self._windows[s]) >= self.settings.min_samples]
        proposed = [(s, old, self._proposal(old, errs)) for s, old, errs in todo]
        now_ms = int(self._clock() * 1000)
        changed: dict[str, tuple[ThresholdState, ThresholdState]] = {}
        with self._lock:
            for stream, old, (value, samples) in proposed:
                # forgotten, re-registered or updated by a concurrent call since the copy: leave it
                if self._states.get(stream) is not old or abs(value - old.value) <= _MIN_CHANGE * old.value:
                    continue
                new = ThresholdState(value, "calibrated", samples, now_ms, old.artifact)
                self._states[stream] = new
                changed[stream] = (old, new)
        return changed

    def _proposal(self, old: ThresholdState, errors: np.ndarray) -> tuple[float, int]:
        s = self.settings
        q = float(np.quantile(errors, s.quantile, method="inverted_cdf"))
        if math.isfinite(q):
            target = q * s.margin
        else:
            # Step up by max_change once the censored share is twice the expected 1 − quantile, less
            # when just above it: at equilibrium that share is 1 − quantile ± sampling noise, and a
            # full step on any excess made the threshold jump +max_change every few calls.
            excess = np.count_nonzero(np.isinf(errors)) / len(errors) / (1.0 - s.quantile) - 1.0
            target = old.value * (1.0 + s.max_change * min(1.0, float(excess)))
        value = min(max(target, old.value * (1.0 - s.max_change)), old.value * (1.0 + s.max_change))
        value = min(max(value, old.artifact * s.floor), old.artifact * s.ceiling)
        return value, len(errors)

    def forget(self, stream: str) -> None:
        """Drop a stream (partition revoked); unknown streams are ignored."""
        with self._lock:
            self._states.pop(stream, None)
            self._windows.pop(stream, None)

    def streams(self) -> list[str]:
        with self._lock:
            return list(self._states)

    def samples(self, stream: str) -> int:
        """Entries (values and censored) in the stream's window now."""
        with self._lock:
            return len(self._windows[stream])

    @property
    def rejected(self) -> int:
        """Non-finite errors refused by :meth:`observe`, all streams together."""
        with self._lock:
            return self._rejected

    def snapshot(self) -> dict[str, dict[str, float | int | str]]:
        """JSON-able view of every stream's threshold state, for logs and status."""
        with self._lock:
            return {s: {"value": st.value, "source": st.source, "samples": st.samples,
                        "artifact": st.artifact, "updated_ms": st.updated_ms}
                    for s, st in self._states.items()}
