"""Per-stream anomaly thresholds: their provenance and versions, recalibration, and operator overrides.

Each stream starts at its model artifact's threshold (version 0, source ``"artifact"``). The caller
feeds the errors of normal windows; ``recalibrate()`` replaces the threshold by ``quantile × margin`` of a
bounded window of them once it holds ``min_samples`` entries, moving at most ``max_change`` (relative)
per call and staying within ``[floor, ceiling] × artifact value``. Anomalies never feed the window: the
caller passes only windows its alert state calls normal or noise (:mod:`monitor.alerts`: none of a run
that fired, or would have inside a flapping hold, but a minor single-window episode under ``for`` = 1),
and non-finite errors are refused here (``rejected``).

Censoring. The caller feeds as values only windows below the threshold, and the q-quantile of values
truncated at T is always below T: alone, they would lower the threshold on every recalibration, down
to the floor. So the caller also reports, with ``observe_censored``, over-threshold windows that were
normal noise (``monitor.alerts.AlertSettings.noise``), with the threshold they were over; they enter the
same window as ``-T`` ("above T": errors are never negative). The quantile is the Kaplan–Meier estimate
over these right-censored entries (:func:`censored_quantile`; without censored ones, numpy's
``inverted_cdf`` quantile): finite, the threshold moves to it; infinite — too many entries are known only
to be above every observed error — the true quantile is above them and the threshold steps up (see
``_target``). An entry censored at T says nothing about values above T, so one taken under a threshold
that has since risen cannot push it further: counted as "above the current threshold", as ``+inf``
did before (and still does in documents written then), a threshold that started too low was walked up
past the true quantile to the ceiling and held there until those entries left the window.

Level shifts and the drift guard. The caller also feeds the errors of *all* windows (``observe_all``).
When nearly all recent windows are over the threshold the stream is either broken or has a new normal:
:mod:`monitor.drift` decides, and only a settled, normally shaped level is accepted (the threshold jumps
to the recent quantile, source ``calibrated``, reason ``new normal``), and the recent windows it was judged
on replace the normal evidence: left there, the old level's errors made the next scheduled recalibrations
walk the threshold back down by ``max_change`` each, and the stream paged on its new normal. An operator's
raise passes the guard's mixture test too. ``recalibrate`` reports refusals with their reason.

Versions and overrides. Every change is a numbered version with its source and reason (``history``,
``rollback``). Operators pin a value (calibration leaves it alone, and no normal error is learnt: its windows are
judged against the pinned value), freeze calibration per
stream or for all (no normal error is learnt meanwhile, but an operator's verdict, and the drift guard's
recent errors of that time are dropped at the thaw), reset a stream, or ask what another quantile would
give (``candidate``). Thread-safe (one lock): the daemon recalibrates from a scheduler thread and applies
commands on its loop thread.
"""

from __future__ import annotations

import base64
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from models.errors import ArtifactError, ConfigError
from monitor.drift import DriftSettings, assess, level_shift

MIN_INDEPENDENT = 20  # non-overlapping recent windows the drift guard needs (monitor.drift.assess: 10 a half)
_MIN_CHANGE = 1e-9  # relative; below it a recalibration is not a change (float noise)
MAX_QUANTILE = 0.999  # an artifact thresholded at its maximum (q = 1) still calibrates, at this quantile
NEW_NORMAL = "new normal: "  # reason of a level the drift guard accepted


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
    enabled: bool = True  # False: scheduled recalibrations change nothing (commands still do)
    history: int = 50  # versions kept per stream
    min_change: float = 0.005  # relative; a smaller move is not a new version (no churn in history and logs)
    drift: DriftSettings = field(default_factory=lambda: DriftSettings(enabled=False))

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
            ("history", self.history >= 1, "must be >= 1"),
            ("min_change", 0.0 <= self.min_change < self.max_change, "must be in [0, max_change)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"calibrator {name} {rule}, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class ThresholdState:
    """A stream's threshold, its provenance and its version number."""

    value: float
    source: str  # artifact, calibrated, pinned or rollback
    samples: int  # entries in the stream's window when computed
    updated_ms: int  # epoch ms of the change, 0 for the initial artifact value
    artifact: float  # the artifact value it started from
    version: int = 0
    reason: str = ""


def _positive(x: object) -> bool:
    """A finite number > 0 (a threshold, as a document states it)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


class Ring:
    """The last ``maxlen`` floats in one numpy buffer: 8 bytes a value where a deque of Python floats takes
    ~32. The buffer grows (doubling) until it holds ``maxlen``, so a stream with few windows costs little."""

    __slots__ = ("_buf", "_n", "_start", "maxlen")

    def __init__(self, maxlen: int, values: Iterable[float] = ()) -> None:
        self.maxlen = maxlen
        self._buf = np.empty(0, "float64")
        self._n = self._start = 0  # values held; once full, where the oldest one is
        self.extend(values)

    def __len__(self) -> int:
        return self._n

    def extend(self, values: Iterable[float] | np.ndarray) -> None:
        arr = np.asarray(values if isinstance(values, np.ndarray) else list(values), "float64").ravel()
        k, n, cap = arr.size, self._n, self.maxlen
        if k == 0:
            return
        if n + k <= cap and n < cap:  # still filling: values lie in order at [0, n)
            if n + k > self._buf.size:
                grown = np.empty(min(cap, max(n + k, 2 * self._buf.size, 64)), "float64")
                grown[:n] = self._buf[:n]
                self._buf = grown
            self._buf[n : n + k] = arr
            self._n = n + k
            return
        if n < cap or k >= cap:  # fills up now: keep the newest cap values, in order
            self._buf = np.concatenate([self.values(), arr])[-cap:].copy()
            self._n, self._start = cap, 0
            return
        idx = (self._start + np.arange(k)) % cap  # full: overwrite the oldest
        self._buf[idx] = arr
        self._start = (self._start + k) % cap

    def remove(self, values: Iterable[float]) -> int:
        """Take out one held occurrence of each of ``values`` (newest first: the likeliest still to be there);
        returns how many were found. Rebuilds the buffer: for rare calls (an operator's verdict)."""
        held, gone = self.values(), 0
        keep = np.ones(len(held), bool)
        for v in values:  # a value restored from a state document is its float32 copy (see _pack)
            hits = np.flatnonzero(((held == v) | (held == float(np.float32(v)))) & keep)
            if len(hits):
                keep[hits[-1]], gone = False, gone + 1
        if gone:
            self._buf, self._n, self._start = held[keep].copy(), int(keep.sum()), 0
        return gone

    def values(self) -> np.ndarray:
        """A copy, oldest first."""
        if self._n < self.maxlen:
            return self._buf[: self._n].copy()
        return np.concatenate([self._buf[self._start :], self._buf[: self._start]])

    def clear(self) -> None:
        self._buf, self._n, self._start = np.empty(0, "float64"), 0, 0


@dataclass
class _Stream:
    state: ThresholdState
    normal: Ring  # recent normal errors; -T for a censored one (over threshold T), +inf in older documents
    recent: Ring  # recent errors of all windows, for the drift guard
    versions: deque[ThresholdState]
    thin: int = 1  # every thin-th window does not overlap the previous one
    quantile: float | None = None  # its own (its model's); None: the settings'
    margin: float = 1.0  # its own (its model's) or the settings', as registered
    pinned: bool = False
    frozen: bool = False
    before_pin: ThresholdState | None = None  # what unpin goes back to (the history is bounded)
    recent_frozen: int = 0  # the newest entries of ``recent``, taken in while frozen: dropped when thawed
    lowering_held: str | None = None  # why the last scheduled recalibration did not lower it (tsmon status says)
    leaving: bool = False  # its document is being written before it is dropped: no recalibration may change it now


class Calibrator:
    """Thresholds of all registered streams and the recent errors they are calibrated on."""

    def __init__(self, settings: CalibratorSettings = CalibratorSettings(), clock: Callable[[], float] = time.time,
                 on_change: Callable[[str, ThresholdState | None], None] | None = None) -> None:
        self.settings = settings
        self._clock = clock
        self._on_change = on_change or (lambda _stream, _state: None)  # every new state; None = forgotten
        self._lock = threading.Lock()
        # one recalibration at a time (the data lock is released while each computes): an operator's commanded
        # run that overlapped the scheduled one found its streams changed meanwhile and left them — acknowledged
        # "applied", listed unchanged, the threshold at the scheduled step (a review: 70 of 100 trials)
        self.recalibrating = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._rejected = 0
        self._frozen_all = False

    @property
    def frozen_all(self) -> bool:
        """Operator (``freeze --all``): no stream recalibrates on the schedule or learns."""
        return self._frozen_all

    @frozen_all.setter
    def frozen_all(self, value: bool) -> None:
        with self._lock:
            thawing, self._frozen_all = self._frozen_all and not value, value
            for st in self._streams.values() if thawing else ():
                if not st.frozen:
                    _thaw(st)

    def register(self, stream: str, artifact_value: float, thin: int = 1,
                 quantile: float | None = None, margin: float | None = None, basis: str = "") -> ThresholdState:
        """Start ``stream`` at the artifact's threshold, calibrated at ``quantile`` × ``margin`` (None: the
        settings'); ``basis``: how the artifact's was set (version 0's reason: ``ctl history`` had none to show);
        a second call returns the existing state."""
        if not (math.isfinite(artifact_value) and artifact_value > 0):
            raise ArtifactError(f"threshold of stream {stream!r} must be finite and > 0, got {artifact_value}")
        if quantile is not None and not 0.0 < quantile < 1.0:
            raise ArtifactError(f"threshold quantile of stream {stream!r} must be in (0, 1), got {quantile}")
        if margin is not None and not 0.0 < margin < math.inf:
            raise ArtifactError(f"threshold margin of stream {stream!r} must be finite and > 0, got {margin}")
        with self._lock:
            if stream not in self._streams:
                state = ThresholdState(float(artifact_value), "artifact", 0, 0, float(artifact_value), reason=basis)
                s = self.settings
                # the drift guard judges 20 non-overlapping windows at least (10 a half): at window/hop = 35 and
                # more, drift.window = 600 held fewer, and it refused every new normal, commanded ones too
                recent = recent_size(s.drift.window, thin)
                self._streams[stream] = _Stream(state, Ring(s.window), Ring(recent),
                                                deque([state], maxlen=s.history), max(1, thin), quantile,
                                                margin or s.margin)
                self._on_change(stream, state)
            return self._streams[stream].state

    def threshold(self, stream: str) -> ThresholdState:
        with self._lock:
            return self._streams[stream].state

    def quantile(self, stream: str) -> float:
        """The quantile ``stream`` is calibrated at."""
        with self._lock:
            return self._streams[stream].quantile or self.settings.quantile

    def margin(self, stream: str) -> float:
        """The margin ``stream``'s quantile is multiplied by."""
        with self._lock:
            return self._streams[stream].margin

    # evidence ---------------------------------------------------------------------------------------
    def observe(self, stream: str, errors: np.ndarray | float, commanded: bool = False) -> None:
        """Errors of normal windows (below the threshold, not in an alert); non-finite ones are refused. While
        the stream (or every stream) is frozen, or it is pinned, nothing is learnt, unless ``commanded`` (an
        operator's verdict)."""
        arr = np.asarray(errors, dtype="float64").ravel()
        finite = np.isfinite(arr)
        kept = arr[finite][-self.settings.window:]  # only these can survive the ring anyway
        with self._lock:
            st = self._streams[stream]  # KeyError first: nothing counted for an unknown stream
            self._rejected += int(arr.size - np.count_nonzero(finite))
            if commanded or self._learns(st):
                st.normal.extend(kept)

    def _frozen(self, st: _Stream) -> bool:
        """Frozen streams learn no normal errors: a freeze during a known incident must keep it out of the
        evidence (it stopped only the threshold's changes, and the incident's windows moved it once unfrozen)."""
        return st.frozen or self.frozen_all

    def _learns(self, st: _Stream) -> bool:
        """Normal errors are learnt neither frozen nor pinned: a pinned stream's windows are judged against the
        pinned value, not its own threshold (a review: an incident under a pin set above it was learnt as normal,
        and after the unpin the threshold rose by max_change every run to the ceiling, 4.7× its value)."""
        return not (self._frozen(st) or st.pinned)

    def unobserve(self, stream: str, errors: Iterable[float]) -> int:
        """Take back errors fed by :meth:`observe` that turned out not to be normal (those still in the window);
        returns how many were found."""
        with self._lock:
            return self._streams[stream].normal.remove(float(e) for e in errors)

    def observe_censored(self, stream: str, n: int = 1, above: float = math.inf) -> None:
        """``n`` normal windows whose error was over the threshold ``above`` (stored as ``-above``, see module
        doc; ``inf``: over any value)."""
        if n < 0 or not above > 0:
            raise ValueError(f"censored count must be >= 0 and its threshold > 0, got {n} above {above}")
        with self._lock:
            st = self._streams[stream]
            if self._learns(st):
                st.normal.extend(np.full(min(n, self.settings.window), -above if math.isfinite(above) else math.inf))

    def observe_all(self, stream: str, errors: Iterable[float]) -> None:
        """Errors of every scored window, anomalous or not, in arrival order (for the drift guard); non-finite
        ones are left out (a NaN there made the guard's new level NaN, under which every score is normal)."""
        arr = np.asarray(errors if isinstance(errors, np.ndarray) else list(errors), "float64").ravel()
        kept = arr[np.isfinite(arr)]
        with self._lock:
            st = self._streams[stream]
            st.recent.extend(kept)  # shadow runs over them, frozen or not
            if self._frozen(st):  # but an incident kept here would be judged a new normal once thawed
                st.recent_frozen = min(st.recent_frozen + len(kept), len(st.recent))

    # recalibration ----------------------------------------------------------------------------------
    def recalibrate(self, streams: Iterable[str] | None = None, quantile: float | None = None,
                    commanded: bool = False, refused: dict[str, str] | None = None,
                    held: dict[str, str] | None = None,
                    close: dict[str, str] | None = None) -> dict[str, tuple[ThresholdState, ThresholdState]]:
        """Recompute thresholds (all streams, or ``streams``); ``{stream: (old, new)}`` for those that changed.

        ``commanded`` (an operator's ``recalibrate``): runs even when disabled or frozen for all, and
        moves straight to the target instead of by ``max_change``; pins and per-stream freezes still hold.
        The drift guard's refusals go to ``refused`` (stream → reason) when given, and the streams left alone to
        ``held`` (stream → why: pinned, frozen, or, commanded, no normal error yet — an operator's command must say
        why nothing moved), and to ``close`` why the others with a target stayed: within ``min_change`` of their
        threshold (or held there by ``floor``/``ceiling``), handed over, or changed since the copy.
        """
        if not commanded and (not self.settings.enabled or self.frozen_all):
            return {}
        with self.recalibrating:
            return self._recalibrate(streams, quantile, commanded, refused, held, close)

    def _recalibrate(self, streams: Iterable[str] | None, quantile: float | None, commanded: bool,
                     refused: dict[str, str] | None, held: dict[str, str] | None,
                     close: dict[str, str] | None = None) -> dict[str, tuple[ThresholdState, ThresholdState]]:
        with self._lock:  # copy, then compute without holding the lock
            names = list(self._streams) if streams is None else [s for s in streams if s in self._streams]
            todo = []
            for n in names:
                st = self._streams[n]
                if not (st.pinned or st.frozen):
                    todo.append((n, st.state, st.thin, st.normal.values(), st.recent.values(), quantile or st.quantile,
                                 st.margin))
                elif held is not None:
                    held[n] = f"pinned at {st.state.value:.6g}: unpin it first" if st.pinned else "frozen: unfreeze it first"
        refused = {} if refused is None else refused
        proposed: list[tuple[str, ThresholdState, float, int, str]] = []
        lowering_held: dict[str, str] = {}
        for name, old, thin, normal, recent, q, margin in todo:
            value, samples, reason = self._proposal(old, normal, recent, thin, q, margin, commanded, refused, name,
                                                    held, lowering_held)
            if value is not None:
                proposed.append((name, old, value, samples, reason))
        now_ms = int(self._clock() * 1000)
        changed: dict[str, tuple[ThresholdState, ThresholdState]] = {}
        copied = {name: old for name, old, *_ in todo}
        with self._lock:
            for name in names if not commanded else ():  # (pinned or frozen: nothing held it)
                # not where a pin, reset or rollback came since the copy: it cleared the reason, which then came
                # back quoting the errors a reset had dropped (the concurrency review)
                if (st := self._streams.get(name)) is None:
                    continue
                if st.pinned or st.frozen:  # nothing held it
                    st.lowering_held = None
                elif copied.get(name) is st.state:
                    st.lowering_held = lowering_held.get(name)
            for name, old, value, samples, reason in proposed:
                st = self._streams.get(name)
                # forgotten, re-registered, updated, pinned or frozen since the copy, or leaving: leave it
                if (st is None or st.state is not old or st.pinned or st.frozen or st.leaving
                        or (self.frozen_all and not commanded)):
                    if close is not None:
                        close[name] = ("handed over to another instance" if st is not None and st.leaving else
                                       "changed meanwhile (pinned, frozen, reset or recalibrated): look again")
                    continue
                if abs(value - old.value) <= (within := max(_MIN_CHANGE, self.settings.min_change)) * old.value:
                    if close is not None:  # "applied" and "-" read as if nothing had been looked at (a new user)
                        bound = self._bound(old, value)
                        close[name] = (f"its target {value:.6g} is within calibrator.min_change ({within:.2%}) of "
                                       f"{old.value:.6g}: already there" if not bound else
                                       f"held at calibrator.{bound} ({getattr(self.settings, bound):g} × the "
                                       f"artifact's {old.artifact:.6g}): already there")
                    continue
                if reason.startswith(NEW_NORMAL):  # the old level's errors would walk it back down (see module doc)
                    recent = st.recent.values()
                    st.normal.clear()
                    st.normal.extend(recent[-self.settings.window:])
                changed[name] = (old, self._set(name, st, value, "calibrated", reason, samples, now_ms))
        return changed

    def _proposal(self, old: ThresholdState, normal: np.ndarray, recent: np.ndarray, thin: int,
                  quantile: float | None, margin: float, commanded: bool, refused: dict[str, str],
                  name: str, held: dict[str, str] | None = None,
                  lowering_held: dict[str, str] | None = None) -> tuple[float | None, int, str]:
        s, q = self.settings, quantile or self.settings.quantile
        drift = s.drift
        times = f" × {margin:g}" if margin != 1.0 else ""  # the model's headroom, where it has one (ops read it)
        if drift.enabled and level_shift(recent, old.value, drift):
            wanted = float(np.quantile(recent, q)) * margin
            target = self._bounded(old, wanted)
            verdict = assess(recent, target, drift, thin, reference=normal)
            if not verdict.accept:  # at the ceiling, what stays over it is the cap's doing, not only the data's
                refused[name] = verdict.reason + self._capped(old, wanted, target, recent)
                return None, 0, ""
            return target, len(recent), f"{NEW_NORMAL}{verdict.reason}{self._at_bound(old, target)}"
        if len(normal) < (1 if commanded else s.min_samples):
            if commanded and held is not None:  # an operator must not read "unchanged" (applied, exit 0) here
                held[name] = ("no normal error learnt since the stream started or was reset (or while it was frozen or pinned): "
                              "nothing to recalibrate from")
            return None, 0, ""
        estimate = censored_quantile(normal, q)  # sorted once for the value, its target and its reason
        value = self._target(old, normal, q, margin, commanded, estimate)
        target, how_far = self._target(old, normal, q, margin, True, estimate), ""  # before max_change's step
        n = len(recent) // max(1, thin)  # non-overlapping recent windows
        needed = bound_windows(q, thin)
        moves = max(_MIN_CHANGE, s.min_change) * old.value  # a change smaller than this is none
        if not commanded and value < old.value and thin > 1 and len(recent) < needed <= recent_size(drift.window, thin):
            # Overlapping windows: not lowered before the recent windows can bound it (below). min_samples normal errors
            # came first (W/H = 8: 230 windows, against the 320 the bound needs), and the first scheduled run lowered it
            # to 0.86 × q0.95, where nothing raised it back: 11-16 % of windows over it for good (a review)
            if lowering_held is not None and value < old.value - moves:
                lowering_held[name] = (f"q{q:g} of the normal errors{times} would lower it to {value:.4g}; held at "
                                       f"{old.value:.4g} until {needed} recent windows can bound it ({len(recent)} so "
                                       "far: overlapping windows read low on normal errors alone)")
            value = old.value
        elif not commanded and value < old.value and n * (1.0 - q) >= 2.0:
            # Never lower it below the quantile of every recent window: the normal evidence lacks the over-threshold
            # runs that fired (with overlapping windows normal ones come in runs), so alone it walked the threshold
            # below its quantile (at W/H = 4, 0.79 × q0.95 with 22 % of windows over). Lowering only: an incident
            # among the recent windows can hold the threshold, never raise it. The quantile is read one-sided 95 %
            # high (binomial, on the non-overlapping count): nothing raises it back from a noisy low read; and only
            # where the recent windows hold two expected exceedances or more.
            level = min(MAX_QUANTILE, q + 1.645 * math.sqrt(q * (1.0 - q) / n))
            lowered, value = value, max(value, min(old.value, self._bounded(old, float(np.quantile(recent, level)) * margin)))
            if value > lowered:
                how_far = f"; held by q{level:.3f} of the {len(recent)} recent windows{times}"
            if lowering_held is not None and lowered < old.value - moves and value >= old.value - moves:
                # nothing moved, and nothing said why: an operator saw a stream's threshold stay at its artifact's
                # while the others moved (an on-call pass)
                lowering_held[name] = (f"q{q:g} of the normal errors{times} would lower it to {lowered:.4g}; held at "
                                       f"{old.value:.4g} by q{level:.3f} of the {len(recent)} recent windows{times} "
                                       "(over-threshold ones among them, an incident, hold it)")
        if commanded and drift.enabled and value > old.value * (1 + _MIN_CHANGE):
            verdict = assess(recent, value, drift, thin, stationary=False)
            if not verdict.accept:
                wanted = estimate[0] * margin  # inf: above every error seen, not the cap's doing
                refused[name] = verdict.reason + (self._capped(old, wanted, value, recent) if math.isfinite(wanted) else "")
                return None, 0, ""
        how = "commanded" if commanded else "scheduled"
        # the version's value is read against its reason: a step or a hold is said, with the target it moved towards
        if not how_far and not math.isfinite(estimate[0]):
            how_far = f"; q{q:g} is above every error seen: a calibrator.max_change step up"
        elif not how_far and not math.isclose(value, target, rel_tol=1e-9):
            how_far = f"; a calibrator.max_change step towards {target:.4g}"
        rule = f"{how}: q{q:g} of {len(normal)} recent normal errors{times}"
        return value, len(normal), f"{rule}{self._at_bound(old, target)}{how_far}"

    def _target(self, old: ThresholdState, errors: np.ndarray, quantile: float, margin: float,
                commanded: bool, estimate: tuple[float, float] | None = None) -> float:
        """``estimate``: ``censored_quantile(errors, quantile)`` where the caller has it already."""
        s = self.settings
        q, above = estimate if estimate is not None else censored_quantile(errors, quantile)
        if math.isfinite(q):
            target = q * margin
        else:
            # Step up by max_change once the share above every observed error is twice the expected
            # 1 − quantile, less when just above it: at equilibrium that share is 1 − quantile ± sampling
            # noise, and a full step on any excess made the threshold jump +max_change every few calls.
            excess = above / (1.0 - quantile) - 1.0
            target = old.value * (1.0 + s.max_change * min(1.0, excess))
        if not commanded:
            target = min(max(target, old.value * (1.0 - s.max_change)), old.value * (1.0 + s.max_change))
        return self._bounded(old, target)

    def _bound(self, old: ThresholdState, value: float) -> str:
        """``floor`` or ``ceiling`` where ``value`` is held at that bound of ``old``'s artifact value, else ""."""
        s = self.settings
        return "floor" if value <= old.artifact * s.floor else "ceiling" if value >= old.artifact * s.ceiling else ""

    def _at_bound(self, old: ThresholdState, target: float) -> str:
        """`` (at calibrator.floor/ceiling, …)`` where ``target`` is held there, else nothing."""
        bound = self._bound(old, target)
        return f" (at calibrator.{bound}, {getattr(self.settings, bound):g} × the artifact's)" if bound else ""

    def _capped(self, old: ThresholdState, wanted: float, value: float, recent: np.ndarray) -> str:
        """What a refusal adds where the ceiling cut its target short and that is why it was refused: too many
        windows over the capped level, not over the level itself (an operator read "sustained anomaly" for a level
        at 4 × the artifact's, where q × margin would have left 5 % over). A refusal for another reason (still
        changing, too little evidence, not shaped like the normal ones) is not the cap's doing."""
        d, finite = self.settings.drift, recent[np.isfinite(recent)]
        if wanted <= value * (1 + 1e-9) or len(finite) < d.min_windows:
            return ""
        if not float(np.mean(finite > value)) > d.max_over_share >= float(np.mean(finite > wanted)):
            return ""
        return (f"; its target {wanted:.4g} was capped at calibrator.ceiling ({self.settings.ceiling:g} × the "
                f"artifact's {old.artifact:.4g}): raise the ceiling, or pin")

    def _bounded(self, old: ThresholdState, value: float) -> float:
        return min(max(value, old.artifact * self.settings.floor), old.artifact * self.settings.ceiling)

    def candidate(self, stream: str, quantile: float) -> tuple[float, np.ndarray, bool]:
        """What a commanded recalibration at ``quantile`` would set, the recent errors (shadow runs), and whether a
        level shift is under way: then its target is the new-normal path's (the quantile of every recent window),
        which the drift guard must still accept — a shadow gave the ordinary path's while recalibrate took this one."""
        with self._lock:
            st = self._streams[stream]
            normal, recent, old, margin = st.normal.values(), st.recent.values(), st.state, st.margin
        if self.settings.drift.enabled and level_shift(recent, old.value, self.settings.drift):
            return self._bounded(old, float(np.quantile(recent, quantile)) * margin), recent, True
        if len(normal) == 0:
            raise ValueError(f"stream {stream!r} has no recent normal errors yet (none are learnt while it is frozen or "
                             f"pinned)")
        return self._target(old, normal, quantile, margin, commanded=True), recent, False

    # operator overrides -----------------------------------------------------------------------------
    def _set(self, stream: str, st: _Stream, value: float, source: str, reason: str, samples: int | None = None,
             now_ms: int | None = None) -> ThresholdState:
        """A new version (call with the lock held)."""
        new = replace(st.state, value=float(value), source=source, reason=reason,
                      samples=st.state.samples if samples is None else samples,
                      updated_ms=int(self._clock() * 1000) if now_ms is None else now_ms,
                      version=st.versions[-1].version + 1)
        st.state = new
        st.lowering_held = None  # it moved (or was pinned, reset, rolled back): the next scheduled run says again
        st.versions.append(new)
        self._on_change(stream, new)
        return new

    def pin(self, stream: str, value: float, reason: str) -> ThresholdState:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"a pinned threshold must be finite and > 0, got {value}")
        with self._lock:
            st = self._streams[stream]
            if not st.pinned:
                st.before_pin = st.state
            st.pinned = True
            return self._set(stream, st, value, "pinned", reason)

    def unpin(self, stream: str, reason: str) -> ThresholdState:
        """Back to the value in force before the pin; calibration resumes from there."""
        with self._lock:
            st = self._streams[stream]
            if not st.pinned:
                return st.state
            st.pinned = False
            before = st.before_pin or next((v for v in reversed(st.versions) if v.source != "pinned"), None)
            st.before_pin = None
            value, source = (before.value, before.source) if before else (st.state.artifact, "artifact")
            return self._set(stream, st, value, source, reason)

    def set_frozen(self, stream: str, frozen: bool) -> None:
        with self._lock:
            st = self._streams[stream]
            st.frozen = frozen
            if not frozen and not self._frozen_all:
                _thaw(st)

    def rollback(self, stream: str, version: int, reason: str) -> ThresholdState:
        """Version ``version``'s value again, as a new version; it ends a pin (calibration resumes from it)."""
        with self._lock:
            st = self._streams[stream]
            target = next((v for v in st.versions if v.version == version), None)
            if target is None:
                kept = [v.version for v in st.versions]
                raise ValueError(f"stream {stream!r} has no version {version} (kept: {kept[0]}..{kept[-1]})")
            st.pinned, st.before_pin = False, None
            return self._set(stream, st, target.value, "rollback", f"{reason} (to v{version})".strip())

    def reset(self, stream: str, reason: str) -> ThresholdState:
        """Forget the stream's evidence and overrides; back to the artifact value, as a new version."""
        with self._lock:
            st = self._streams[stream]
            st.normal.clear(), st.recent.clear()
            st.recent_frozen = 0  # left behind, a later thaw dropped that many windows never taken in frozen
            st.pinned = st.frozen = False
            st.before_pin = None
            return self._set(stream, st, st.state.artifact, "artifact", reason, samples=0)

    def lowering_held(self, stream: str) -> str | None:
        """Why the last scheduled recalibration did not lower the stream's threshold, if it held it."""
        with self._lock:  # none while scheduled runs are off or it is frozen: the reason would be stale
            st = self._streams[stream]
            return None if self.frozen_all or not self.settings.enabled or st.frozen else st.lowering_held

    def controls(self, stream: str) -> dict[str, bool]:
        with self._lock:
            st = self._streams[stream]
            return {"pinned": st.pinned, "frozen": st.frozen or self.frozen_all}

    def control_counts(self) -> tuple[int, int]:
        """Streams pinned, and frozen by a freeze of their own (``frozen_all`` aside)."""
        with self._lock:
            return (sum(st.pinned for st in self._streams.values()), sum(st.frozen for st in self._streams.values()))

    def history(self, stream: str) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(v) for v in self._streams[stream].versions]

    def reason_of(self, stream: str, version: int) -> str:
        """Version ``version``'s reason ("" where it is no longer kept): the state may have moved on since."""
        with self._lock:
            return next((v.reason for v in reversed(self._streams[stream].versions) if v.version == version), "")

    # bookkeeping ------------------------------------------------------------------------------------
    def leave(self, stream: str, leaving: bool = True) -> None:
        """Mark a stream whose document is about to be written before it is dropped (an eviction): a recalibration
        applied between the document and the drop was logged and counted, never saved, and the stream came back
        with the version before (the concurrency review). ``leaving=False`` undoes it (the drop did not happen)."""
        with self._lock:
            if (st := self._streams.get(stream)) is not None:
                st.leaving = leaving

    def forget(self, stream: str) -> None:
        """Drop a stream (partition revoked); unknown streams are ignored."""
        with self._lock:
            if self._streams.pop(stream, None) is not None:
                self._on_change(stream, None)

    def streams(self) -> list[str]:
        with self._lock:
            return list(self._streams)

    def samples(self, stream: str) -> int:
        """Entries (values and censored) in the stream's window now."""
        with self._lock:
            return len(self._streams[stream].normal)

    @property
    def rejected(self) -> int:
        """Non-finite errors refused by :meth:`observe`, all streams together."""
        with self._lock:
            return self._rejected

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """JSON-able view of every stream's threshold state, for logs and status."""
        with self._lock:
            return {n: {"value": st.state.value, "source": st.state.source, "samples": st.state.samples,
                        "artifact": st.state.artifact, "updated_ms": st.state.updated_ms,
                        "version": st.state.version, "pinned": st.pinned, "frozen": st.frozen or self.frozen_all}
                    for n, st in self._streams.items()}

    def export(self, stream: str, replayed: int = 0) -> dict[str, Any]:
        """Everything needed to continue the stream elsewhere (the changelog's ``calibrator`` part), less the
        last ``replayed`` windows of the drift guard's recent errors: windows the document leaves to the
        replay (a pending episode's), which feeds them again (twice in the evidence, before)."""
        with self._lock:
            st = self._streams[stream]
            recent = st.recent.values()
            cut = min(max(0, replayed), len(recent))
            recent = recent[: len(recent) - cut]
            return {"versions": [asdict(v) for v in st.versions], "pinned": st.pinned, "frozen": st.frozen,
                    "before_pin": asdict(st.before_pin) if st.before_pin else None,
                    "normal": _pack(st.normal.values()), "recent": _pack(recent),
                    "recent_frozen": max(0, st.recent_frozen - cut)}  # the replay takes them in frozen again

    def restore(self, stream: str, doc: dict[str, Any]) -> ThresholdState:
        """Continue a registered stream from :meth:`export`'s output; validated whole before anything changes
        (raises KeyError, TypeError or ValueError on a malformed document)."""
        versions = [ThresholdState(**v) for v in doc["versions"]]
        before_pin = doc.get("before_pin")  # absent from documents of earlier versions
        before_pin = None if before_pin is None else ThresholdState(**before_pin)
        if not versions or not all(_positive(v.value) and _positive(v.artifact) and isinstance(v.version, int)
                                   for v in [*versions, *filter(None, [before_pin])]):  # an artifact of 0 bounded the
            # next recalibration to a threshold of 0, and the next window over it divided by zero in the loop
            raise ValueError("threshold versions must be a non-empty list of finite values > 0 (value and artifact)")
        normal, recent = _unpack(doc["normal"]), _unpack(doc["recent"])
        pinned, frozen = doc["pinned"], doc["frozen"]
        recent_frozen = doc.get("recent_frozen", 0)  # absent from documents written before
        if not isinstance(recent_frozen, int) or isinstance(recent_frozen, bool) or recent_frozen < 0:
            raise TypeError("recent_frozen must be an integer >= 0")
        if not (isinstance(pinned, bool) and isinstance(frozen, bool)):
            raise TypeError("pinned and frozen must be booleans")
        with self._lock:
            st = self._streams[stream]
            st.versions = deque(versions, maxlen=self.settings.history)
            st.state = versions[-1]
            st.pinned, st.frozen, st.before_pin = pinned, frozen, before_pin if pinned else None
            st.normal = Ring(self.settings.window, normal)
            st.recent = Ring(st.recent.maxlen, [x for x in recent if math.isfinite(x)])  # as register sized it
            st.recent_frozen = min(recent_frozen, len(st.recent))
            if not (frozen or self._frozen_all):  # thawed while away (unfreeze --all reaches resident streams only):
                _thaw(st)  # the incident it was frozen against would have stayed drift evidence, for good
            self._on_change(stream, st.state)
            return st.state


def _thaw(st: _Stream) -> None:
    """Unfrozen: the windows taken in while frozen leave the drift guard's evidence (``shadow`` had them)."""
    if st.recent_frozen:
        held = st.recent.values()
        st.recent.clear()
        st.recent.extend(held[: len(held) - st.recent_frozen])
        st.recent_frozen = 0


def recent_size(drift_window: int, thin: int) -> int:
    """Recent windows kept per stream: ``drift.window``, and at least ``MIN_INDEPENDENT`` non-overlapping ones."""
    return max(drift_window, MIN_INDEPENDENT * max(1, thin))


def bound_windows(quantile: float, thin: int) -> int:
    """Recent windows a scheduled lowering of a stream of overlapping windows (every ``thin``-th one independent) needs
    to be bounded by them: two expected exceedances of ``quantile`` among the non-overlapping ones."""
    k = math.ceil(2.0 / (1.0 - quantile))
    while k * (1.0 - quantile) < 2.0:  # as _proposal tests it, float for float
        k += 1
    return k * max(1, thin)


def unbounded_lowering(thin: int, quantile: float, drift_window: int) -> int | None:
    """The ``drift.window`` a stream of overlapping windows needs where the one it has keeps too few recent windows to
    bound its scheduled lowerings (see :meth:`Calibrator._proposal`), else None. Unbounded, the normal errors alone
    walk its threshold below its quantile: W/H = 16 at q0.95, 0.71-0.74 × with 37 % of the windows over it."""
    needed = bound_windows(quantile, thin)
    return needed if thin > 1 and recent_size(drift_window, thin) < needed else None


def censored_quantile(entries: np.ndarray, quantile: float) -> tuple[float, float]:
    """Kaplan–Meier ``quantile`` of a window of errors: ``x >= 0`` observed, ``-c`` known only to be above ``c``,
    ``+inf`` above any value. Returns the quantile (``inf`` when the estimated share above the largest
    observed error is still over 1 − ``quantile``) and that share. Without censored entries: numpy's
    ``inverted_cdf`` quantile and 0.

    >>> censored_quantile(np.array([1.0, 2.0, 3.0, 4.0]), 0.5)
    (2.0, 0.0)
    >>> censored_quantile(np.array([1.0, -1.5, 2.0, 3.0]), 0.5)  # -1.5: above 1.5, so 2 or 3 with equal odds
    (2.0, 0.0)
    >>> censored_quantile(np.array([1.0, 2.0, -2.5, -2.5]), 0.75)  # half of them only known to be above 2.5
    (inf, 0.5)
    """
    e = np.asarray(entries, "float64")
    censored = (e < 0) | np.isinf(e)
    x = np.abs(e)
    order = np.lexsort((censored, x))  # by value; at a tie the observed entry first ("above c" is > c)
    x, censored = x[order], censored[order]
    at_risk = len(x) - np.arange(len(x))
    survival = np.cumprod(np.where(censored, 1.0, 1.0 - 1.0 / at_risk))
    observed = np.flatnonzero(~censored)
    if observed.size == 0:
        return math.inf, 1.0
    hit = observed[survival[observed] <= (1.0 - quantile) * (1.0 + 1e-9)]  # tolerance: the product's rounding
    return (float(x[hit[0]]) if hit.size else math.inf), float(survival[observed[-1]])


def _pack(values: np.ndarray) -> str:
    """float32 little-endian, base64: 2 000 errors in 10.7 kB of JSON (censored ones and +inf survive)."""
    return base64.b64encode(np.asarray(values, "<f4").tobytes()).decode()


EMPTY_ERRORS = _pack(np.empty(0))  # no evidence, as a document holds it


def _unpack(text: str) -> list[float]:
    values = np.frombuffer(base64.b64decode(text, validate=True), "<f4").astype("float64")
    if np.isnan(values).any() or np.isneginf(values).any():
        raise ValueError("stored errors must be finite or +inf (censored ones are negative)")
    return values.tolist()
