"""Honest evaluation: ranking metrics, metrics at the validation-chosen threshold, event-level metrics.

Pure numpy. The threshold always comes from normal validation data, never from test labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from models.errors import DataError


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype="float64")
    starts = np.r_[0, np.flatnonzero(np.diff(xs)) + 1]
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, s = np.asarray(labels).astype(bool), np.asarray(scores, dtype="float64")
    if y.shape != s.shape or y.ndim != 1:
        raise DataError(f"labels and scores must be 1-D of equal length ({y.shape} vs {s.shape})")
    if not np.isfinite(s).all():
        raise DataError("scores contain NaN or inf: a non-finite score is not a ranking")
    if y.all() or not y.any():
        raise DataError("evaluation needs both normal and anomalous examples")
    return y, s


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U; ties count one half)."""
    y, s = _check(labels, scores)
    r = _ranks(s)
    n1, n0 = int(y.sum()), int((~y).sum())
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """PR-AUC as average precision: Σ (R_k − R_{k−1}) · P_k over distinct score thresholds."""
    y, s = _check(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Classification metrics when ``score > threshold`` means anomaly."""
    y, s = np.asarray(labels).astype(bool), np.asarray(scores, dtype="float64")
    pred = ~(s <= threshold)  # NaN counts as anomalous, never as normal
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    tnr = tn / (tn + fp) if tn + fp else 0.0
    return {
        "threshold": float(threshold),
        "accuracy": (tp + tn) / max(1, len(y)),
        "balanced_accuracy": (recall + tnr) / 2,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }


def report(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """ROC-AUC, PR-AUC and the metrics at ``threshold``."""
    return {"roc_auc": roc_auc(labels, scores), "pr_auc": average_precision(labels, scores),
            **at_threshold(labels, scores, threshold)}


@dataclass(frozen=True, slots=True)
class Event:
    start: int  # first sample index (inclusive)
    end: int  # last sample index (inclusive)


def runs(mask: np.ndarray) -> list[Event]:
    """Contiguous runs of True in a boolean array."""
    m = np.r_[False, np.asarray(mask, dtype=bool), False].astype("int8")
    d = np.diff(m)
    return [Event(int(a), int(b) - 1) for a, b in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1))]


def event_metrics(sample_labels: np.ndarray, window_ends: np.ndarray, flagged: np.ndarray, window: int,
                  tolerance: int = 0, span: tuple[int, int] | None = None,
                  positions: np.ndarray | None = None) -> dict[str, Any]:
    """Event-level recall/precision and detection delay (samples), no point adjustment.

    ``window_ends``: the last sample of every scored window, in order; ``flagged``: which of them alarmed. A
    labelled event is an unbroken run of label 1. An alarm is a flagged window, covering samples
    ``[end - window + 1, end]``; alarms of consecutive windows merge into one alarm episode (windows that
    merely share samples do not: with a hop under the window, a false alarm three windows after a true
    one was absorbed into it). ``positions``: each scored window's place among all the series' windows,
    where windows holding NaN/inf were left out — two alarms either side of such a stretch are two
    episodes, not one (None: the scored windows are all the windows). An event is detected when an alarm
    window overlaps ``[start, end + tolerance]``; its delay is the first such window's end minus the event
    start, averaged over the events no episode was open for when they began; an event inside an episode that
    began before it is detected without a delay (``events_inside_open_alarm``), whatever began after. An
    alarm episode is true when it overlaps any event (with the same tolerance). ``span`` limits events to
    the scored part of the series; one that began before it counts from there, as in replay-eval (its delay
    was measured from a start in the training part).
    """
    labels = np.asarray(sample_labels).astype(bool)
    events = runs(labels)
    if span is not None:
        events = [Event(max(e.start, span[0]), e.end) for e in events if e.end >= span[0] and e.start <= span[1]]
    all_ends = np.asarray(window_ends, dtype="int64")
    flagged = np.asarray(flagged, dtype=bool)
    place = np.arange(len(all_ends)) if positions is None else np.asarray(positions, dtype="int64")
    # an episode: flagged windows next to each other in the series (and in the scored list)
    idx = np.flatnonzero(flagged)
    breaks = (np.diff(idx) != 1) | (np.diff(place[idx]) != 1)
    starts, ends = np.r_[True, breaks][: len(idx)], np.r_[breaks, True][: len(idx)]
    first, last = idx[starts], idx[ends]
    episode_of = np.full(len(all_ends), -1)
    episode_of[idx] = np.cumsum(starts) - 1
    began = all_ends[first]  # each episode's first window end
    delays: list[int] = []
    inside = 0
    for e in events:  # the windows hitting it end in [start, end + tolerance + window - 1]
        lo, hi = np.searchsorted(all_ends, [e.start, e.end + tolerance + window], side="left")
        hit = np.unique(episode_of[lo:hi])
        firsts = began[hit[hit >= 0]]
        if np.any(firsts < e.start):  # an episode open when it began (one begun after changes nothing)
            inside += 1
        elif len(firsts):
            delays.append(int(firsts.min()) - e.start)
    spans = zip((all_ends[first] - window + 1).tolist(), all_ends[last].tolist(), strict=True)
    true_eps = sum(any(a <= ev.end + tolerance and b >= ev.start for ev in events) for a, b in spans)
    return {
        "events": len(events),
        "events_detected": len(delays) + inside,
        "events_inside_open_alarm": inside,
        "event_recall": (len(delays) + inside) / len(events) if events else None,
        "alarm_episodes": len(first),
        "event_precision": true_eps / len(first) if len(first) else None,
        "mean_delay_samples": float(np.mean(delays)) if delays else None,
        "tolerance_samples": tolerance,
    }
