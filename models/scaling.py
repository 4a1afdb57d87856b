"""Per-channel normalisation fitted on training data and stored with the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.errors import DataError, numbers

METHODS = ("standard", "robust", "none")  # the per-channel scalings
TINY_SPREAD = 1e-30  # below this a spread is no spread (its reciprocal still fits in float32)
FLOAT32_RESOLUTION = 1e-7  # a spread under this share of the level is float32 rounding, not variation


def varies(spread: np.ndarray, level: np.ndarray) -> np.ndarray:
    """Channels whose ``spread`` is a variation of the data, relative to their ``level`` (its magnitude), not nothing
    or float32 rounding: an absolute cut-off at 1e-8 took a live channel in metres or amperes (spread 1e-9) for a
    constant one, scaled it by 1, and the daemon found it flat in every window — never scored."""
    return spread > np.maximum(TINY_SPREAD, FLOAT32_RESOLUTION * np.abs(level))


@dataclass(frozen=True, slots=True)
class Scaler:
    """Affine per-channel scaling ``(x - center) / scale``.

    ``method="standard"`` uses mean and standard deviation, ``"robust"`` median and IQR/1.349
    (so it equals the standard deviation for Gaussian data) — better for sensors with outliers.

    >>> s = Scaler.fit(np.array([[[1.0], [3.0]]], dtype="float32"))
    >>> s.transform(np.array([[[3.0]]], dtype="float32")).ravel().tolist()
    [1.0]
    """

    center: tuple[float, ...]
    scale: tuple[float, ...]
    method: str = "standard"
    # with method "none", the training data's standard deviation per channel (the scale is 1 there: the daemon's
    # flat-line test, relative to it, was absolute and flagged a live channel of std 3e-4 in every window); None for
    # the other methods, whose scale is that spread, and in artifacts written before
    spread: tuple[float, ...] | None = None
    # per channel, the 1st percentile over the training windows of the spread inside a window, relative to
    # ``flat_scale``: a channel this steady in 1 % of the normal windows or more (a constant one, a set-point that
    # moves now and then) is never flat-lined by the daemon — it skipped every window of such a stream, unscored.
    # None where fitted on samples, not windows, and in artifacts written before (the daemon tests every channel)
    window_spread: tuple[float, ...] | None = None

    @property
    def flat_scale(self) -> tuple[float, ...]:
        """What a channel's variation is measured against (the flat-line test)."""
        return self.spread if self.spread is not None else self.scale

    @classmethod
    def fit(cls, windows: np.ndarray, method: str = "standard") -> Scaler:
        """Fit on ``[n, window, channels]`` (or ``[samples, channels]``) finite training data."""
        flat = windows.reshape(-1, windows.shape[-1]).astype("float64")
        if flat.shape[0] == 0:
            raise DataError("cannot fit normalisation on empty training data")
        if not np.isfinite(flat).all():
            raise DataError("cannot fit normalisation: training data contains NaN or inf")
        check_method(method)
        if method == "standard":
            center, scale = flat.mean(axis=0), flat.std(axis=0)
        elif method == "robust":
            center = np.median(flat, axis=0)
            q75, q25 = np.percentile(flat, [75, 25], axis=0)
            scale = (q75 - q25) / 1.349
        else:  # none
            center, scale = np.zeros(flat.shape[1]), np.ones(flat.shape[1])
        scale = np.where(varies(scale, center), scale, 1.0)  # a constant channel stays constant, not inf
        spread = None
        if method == "none":  # the scale (1) says nothing of the data's variation
            std = flat.std(axis=0)
            spread = tuple(map(float, np.where(varies(std, flat.mean(axis=0)), std, 1.0)))
        flat_scale = np.asarray(spread if spread is not None else scale)
        steady = None if windows.ndim != 3 else tuple(map(float, _low_window_spread(windows) / flat_scale))
        return cls(tuple(map(float, center)), tuple(map(float, scale)), method, spread, steady)

    @property
    def channels(self) -> int:
        return len(self.center)

    def transform(self, x: np.ndarray) -> np.ndarray:
        c = np.asarray(self.center, dtype="float32")
        s = np.asarray(self.scale, dtype="float32")
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, and the score says so (NaN)
            return ((x - c) / s).astype("float32", copy=False)

    def inverse(self, x: np.ndarray) -> np.ndarray:
        c = np.asarray(self.center, dtype="float32")
        s = np.asarray(self.scale, dtype="float32")
        return (x * s + c).astype("float32", copy=False)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"method": self.method, "center": list(self.center), "scale": list(self.scale)}
        if self.spread is not None:
            out["spread"] = list(self.spread)
        if self.window_spread is not None:
            out["window_spread"] = list(self.window_spread)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Scaler:
        center, scale = numbers(d["center"], "normalisation.center"), numbers(d["scale"], "normalisation.scale")
        with np.errstate(over="ignore", divide="ignore"):  # in float32, as transform computes: a scale of 1e-300
            c32, s32 = np.asarray(center, "float32"), np.asarray(scale, "float32")  # passed as finite and > 0, then
            fits = bool(np.isfinite(c32).all() and (s32 > 0).all() and np.isfinite(1 / s32).all())  # every score
        if len(center) != len(scale) or not all(np.isfinite(center + scale)) or min(scale) <= 0 or not fits:  # was empty
            raise ValueError("normalisation center/scale must be finite (in float32), positive and of equal length")
        method = str(d.get("method", "standard"))
        if method not in METHODS:  # loaded, then eval's baseline refused it as if a command-line option were wrong
            raise ValueError(f"normalisation method {method!r} is not one of {', '.join(METHODS)}")
        spread = None if d.get("spread") is None else numbers(d["spread"], "normalisation.spread")
        if spread is not None and (len(spread) != len(scale) or not all(np.isfinite(spread)) or min(spread) <= 0):
            raise ValueError("normalisation spread must be finite, positive and one per channel")
        steady = None if d.get("window_spread") is None else numbers(d["window_spread"], "normalisation.window_spread")
        if steady is not None and (len(steady) != len(scale) or not all(np.isfinite(steady)) or min(steady) < 0):
            raise ValueError("normalisation window_spread must be finite, non-negative and one per channel")
        return cls(center, scale, method, spread, steady)


def _spread_over(windows: np.ndarray, max_windows: int) -> np.ndarray:
    """At most about ``max_windows`` of ``windows``, taken evenly over the set (a view: nothing copied)."""
    return windows[:: max(1, len(windows) // max_windows)]


def _low_window_spread(windows: np.ndarray, chunk: int = 4096, max_windows: int = 100_000) -> np.ndarray:
    """Per channel, the 1st percentile of the standard deviation inside each window ``[n, W, C]``, on at most
    ``max_windows`` of them spread over the set, in chunks."""
    windows = _spread_over(windows, max_windows)
    stds = [windows[i : i + chunk].astype("float64").std(axis=1) for i in range(0, len(windows), chunk)]
    return np.percentile(np.concatenate(stds), 1, axis=0)


def check_method(method: str) -> None:
    """A DataError for a scaling that is not one of :data:`METHODS`."""
    if method not in METHODS:
        raise DataError(f"unknown normalisation {method!r}: use {', '.join(METHODS[:-1])} or {METHODS[-1]}")


OUTLIER_SCALE = 100.0  # a standard deviation this many times the spread of the middle half: a few samples set it


def outlier_scaled(windows: np.ndarray, scaler: Scaler, max_windows: int = 20_000) -> list[int]:
    """Channels whose ``standard`` scale a few extreme samples set: their standard deviation is over
    ``OUTLIER_SCALE`` × IQR/1.349 of the training data (one 1e30 in a sine made every window score the same 1.9e-9 —
    the model blind, ROC-AUC 0.5). ``robust`` is not moved by them. Checked on at most ``max_windows`` windows."""
    if scaler.method != "standard" or windows.ndim != 3 or len(windows) == 0:
        return []
    sample = _spread_over(windows, max_windows).reshape(-1, windows.shape[-1]).astype("float64")
    q75, q25 = np.percentile(sample, [75, 25], axis=0)
    middle = (q75 - q25) / 1.349
    scale = np.asarray(scaler.scale)
    return [int(c) for c in np.flatnonzero((middle > 0) & (scale > OUTLIER_SCALE * middle))]

