"""The replay-eval timeline for people: signal, score, threshold, labelled events and alerts on one time axis.

Owns the picture only. Alerts and thresholds are the daemon's (from the sink topic and the calibrator's
changes during the run); the score curve is the same models' score of every window of the series computed
here, offline, because the daemon publishes alerts, not every window's score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: pictures go to files, never to a screen
import matplotlib.pyplot as plt
import numpy as np

from models import artifact
from models.data import Series, finite_windows, gap_windows, windows_for
from models.files import replace_atomically
from monitor.events import Span, alert_span, labelled_events, latest_alerts

MAX_POINTS = 100_000  # per line; longer series are thinned for drawing
MAX_CHANNELS = 4
_UNITS = ((86_400_000, "days"), (3_600_000, "hours"), (60_000, "minutes"), (1000, "seconds"))


def _unit(span_ms: float) -> tuple[float, str]:
    return next(((ms, name) for ms, name in _UNITS if span_ms >= 3 * ms), (1.0, "ms"))


def window_scores(model: Path, values: np.ndarray, ts_ms: np.ndarray, hop: int,
                  gap_ms: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """The end time and score of each finite window that holds no gap over ``gap_ms`` (the daemon scores no such
    window), and the artifact threshold (the threshold at the start)."""
    det = artifact.load(model, "cpu")
    wins, ends = windows_for(values, det.window, hop, det.windowing)
    ok = finite_windows(wins)
    if gap_ms is not None:  # drawn before, scored where neither the daemon nor tsmon score scores (review)
        ok &= ~gap_windows(np.asarray(ts_ms, "int64").astype("datetime64[ms]"), ends, det.window, gap_ms,
                           det.windowing)[0]
    scores = det.score(np.ascontiguousarray(wins[ok])).window if ok.any() else np.empty(0, "float32")
    return ts_ms[ends[ok]], scores, det.threshold.value


LOG_RANGE = 20.0  # scores this many times the lowest threshold: a log axis


def score_axis(ax: Any, scores: np.ndarray, thresholds: list[float]) -> None:
    """The score axis's scale and limits. Anomalies scoring far above the threshold get a log axis: on a linear one
    up to the 99.9th percentile, the threshold and the normal scores lay flat on the x-axis, and false alerts at
    1.1× it showed no crossing."""
    finite = scores[np.isfinite(scores)]  # a window of extreme finite values scores inf or NaN: the limit was
    if not len(finite):  # NaN and matplotlib refused it, after report.json, leaving no picture
        return
    top, low = max(float(np.percentile(finite, 99.9)), max(thresholds)), min(thresholds)
    positive = finite[finite > 0]
    if top > LOG_RANGE * low and len(positive):
        ax.set_yscale("log")
        ax.set_ylim(min(float(np.percentile(positive, 1)), low) / 2, top * 2)
    else:
        ax.set_ylim(0, top * 1.3)


def broken(t_ms: np.ndarray, y: np.ndarray, gap_ms: float | None) -> tuple[np.ndarray, np.ndarray]:
    """``t_ms``, ``y`` with a NaN between points further apart than ``gap_ms`` (and than 3 of their median spacing),
    so that a line is not drawn straight across a gap in the data as if the signal had gone on."""
    t, v = np.asarray(t_ms, "float64"), np.asarray(y, "float64")
    if len(t) < 3:
        return t, v
    d = np.diff(t)
    limit = max(gap_ms or 0.0, 3 * float(np.median(d)))
    cut = np.flatnonzero(d > limit) + 1
    return np.insert(t, cut, np.nan), np.insert(v, cut, np.nan)


def draw(out: Path, p: Any, series: Series, ts_ms: np.ndarray, played: dict[str, Any], test: Span) -> Path:
    """Write the PNG; ``p`` is the replay's :class:`monitor.replay_eval.Plan`."""
    from monitor.replay_eval import BASELINE_SUFFIX

    scale, unit = _unit(ts_ms[-1] - ts_ms[0])
    def x(ms: Any) -> np.ndarray:
        return (np.asarray(ms, dtype="float64") - ts_ms[0]) / scale

    events = labelled_events(ts_ms, series.labels, float(ts_ms[0]))  # type: ignore[arg-type]
    channels = list(series.channels)[:MAX_CHANNELS]
    rows = len(channels) + 2
    fig, axes = plt.subplots(rows, 1, figsize=(14, 1.9 * rows + 0.8), sharex=True, squeeze=False)
    step = max(1, len(ts_ms) // MAX_POINTS)
    for i, name in enumerate(channels):
        ax = axes[i, 0]
        t, v = broken(ts_ms[::step], series.values[::step, i], p.gap_ms)
        ax.plot(x(t), v, lw=0.5, color="tab:blue")
        ax.set_ylabel(name)
    detectors = (("model", p.model, p.stream), ("PCA baseline", p.baseline, p.stream + BASELINE_SUFFIX))
    for j, (label, path, stream) in enumerate(detectors):
        ax = axes[len(channels) + j, 0]
        end_ms, scores, start_threshold = window_scores(path, series.values, ts_ms, p.hop, p.gap_ms)
        k = max(1, len(scores) // MAX_POINTS)
        t, v = broken(end_ms[::k], scores[::k], p.gap_ms)
        ax.plot(x(t), v, lw=0.6, color="tab:gray", label=f"{label} score")
        changes = sorted(played["thresholds"].get(stream, []))
        at = [float(ts_ms[p.start])] + [t for t, _ in changes] + [float(ts_ms[-1])]
        val = [start_threshold] + [v for _, v in changes]
        ax.step(x(at), val + val[-1:], where="post", color="black", lw=1, label="daemon threshold")
        for a in latest_alerts(played["alerts"], stream):
            s = alert_span(a, float(ts_ms[-1]))
            ax.axvspan(x(s.start_ms), x(s.end_ms), color="tab:orange", alpha=0.5, lw=0)
            if j == 0:
                for ch in range(len(channels)):
                    axes[ch, 0].axvspan(x(s.start_ms), x(s.end_ms), ymin=0.9, color="tab:orange", alpha=0.8, lw=0)
        score_axis(ax, scores, val)
        ax.set_ylabel(f"{label}\nscore")
        ax.legend(loc="upper left", fontsize=7)
    for ax in axes[:, 0]:
        for ev in events:
            ax.axvspan(x(ev.start_ms), x(ev.end_ms), color="tab:red", alpha=0.18, lw=0)
        ax.axvspan(x(ts_ms[0]), x(test.start_ms), color="0.85", alpha=0.5, lw=0)
        ax.axvspan(x(ts_ms[0]), x(ts_ms[p.start]), color="0.6", alpha=0.35, lw=0)
    axes[-1, 0].set_xlabel(f"{unit} since the first sample (grey: warm-up, not scored; darker: fitted on, not "
                           f"replayed · red: labelled anomalies · "
                           f"orange: alerts)")
    fig.suptitle(f"tsmon replay-eval: {Path(series.path).name}", fontsize=10)
    fig.tight_layout()
    try:
        return replace_atomically(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
