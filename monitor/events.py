"""Event-level scoring of published alerts against labelled anomaly windows, on the data's own clock.

Owns what `tsmon replay-eval` claims, and nothing is point-adjusted:

* a labelled **event** is an unbroken run of label 1; events that end before the test part are left out, and
  one that straddles its start counts from there;
* an **alert** is one alert id (its ``firing`` and ``resolved`` messages together). It spans from the start of
  the first over-threshold window (``start_ts``) to the end of the window that resolved it (``end_ts``), or
  to the end of the data while still firing. Alerts that fired before the test part (during probation)
  count for nothing;
* an alert is **true** when its span overlaps an event widened by ``tolerance`` at its end
  (``[start, end + tolerance]``: its after-effects), else **false**. It is credited to the events it overlaps
  itself and, unless it fired on one of them (at or after its first sample), to the latest one whose tolerance it
  falls in — an alert fired on the next event, begun within the tolerance of one just before, detected both;
* an event is **detected** when an alert is credited to it; its **delay** is the first such alert's firing
  time (``fired_ts``: the end of the window that made it fire) minus the event's first sample, at least 0 —
  averaged over the events no alert was already firing for when they began. An event that fell inside an
  alert already firing before it began is detected, but not fired for: it is counted in
  ``events_inside_open_alert`` and has no delay, whatever fires after (one alert held open for the whole test
  part would otherwise detect every event with a delay of 0);
* an event that straddles the start of the test part is also detected (inside an open alert, no delay) when an
  alert that fired on it during probation (at or after its first sample) is still open at the start of the test
  part; one already open when the event began counts for nothing, as it would for a later event;
* an alert that overlaps no scored event but one that ended during the warm-up (widened by ``tolerance``)
  was raised by that event: it is neither true nor false (``ignored_for_warmup_event``).

Recall = detected / events; precision = true / (true + false) alerts (those ignored for a warm-up event left out);
false alerts per hour (and per day) over the test part's duration in data time; the p90 delay is numpy's linearly
interpolated percentile; ``log`` lists each scored alert with its verdict. ``time_in_alert`` is the share of the
test part some alert spent open (from its firing to its resolution) — including one that fired during probation
and never resolved, which counts for nothing else: a stream stuck in alert shows here, not as recall.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from models.evaluate import runs


@dataclass(frozen=True, slots=True)
class Span:
    """An interval of data time, epoch ms, both ends inclusive."""

    start_ms: float
    end_ms: float
    began_ms: float | None = None  # an event clipped at the start of the scored part: its first sample (else None)

    def overlaps(self, other: Span, late_ms: float = 0.0) -> bool:
        """Does ``other`` overlap this span widened by ``late_ms`` at its end?"""
        return other.start_ms <= self.end_ms + late_ms and other.end_ms >= self.start_ms


def labelled_events(ts_ms: np.ndarray, labels: np.ndarray, from_ms: float) -> list[Span]:
    """Runs of label 1 as spans of data time; those that end before ``from_ms`` are left out, and one that
    began before it counts from ``from_ms`` (alerts of the warm-up count for nothing, so its delay starts
    with the scored part)."""
    return [Span(from_ms, s.end_ms, s.start_ms) if s.start_ms < from_ms else s
            for s in _runs_ms(ts_ms, labels) if s.end_ms >= from_ms]


def replayed_events(events: list[Span], ts_ms: np.ndarray, labels: np.ndarray, sent: np.ndarray) -> list[Span]:
    """The events with a labelled row among those ``sent`` (a boolean mask): one whose every row was left out of the
    replay (NaN or infinite values) reached no detector, and counted, it capped recall."""
    times = ts_ms[(labels == 1) & sent]
    return [e for e in events if np.any((times >= (e.began_ms if e.began_ms is not None else e.start_ms))
                                        & (times <= e.end_ms))]


def warmup_events(ts_ms: np.ndarray, labels: np.ndarray, from_ms: float) -> list[Span]:
    """The runs of label 1 that :func:`labelled_events` leaves out: they end before ``from_ms``."""
    return [s for s in _runs_ms(ts_ms, labels) if s.end_ms < from_ms]


def _runs_ms(ts_ms: np.ndarray, labels: np.ndarray) -> list[Span]:
    return [Span(float(ts_ms[e.start]), float(ts_ms[e.end])) for e in runs(labels)]


def latest_alerts(docs: list[dict[str, Any]], stream: str) -> list[dict[str, Any]]:
    """One document per alert id of ``stream``: the latest message, but a ``resolved`` one supersedes any
    other (at-least-once: a ``firing`` sent again can arrive after its ``resolved``, and the alert then
    counted as open to the end of the data)."""
    latest: dict[str, dict[str, Any]] = {}
    for d in docs:
        resolved = latest.get(d.get("alert_id"), {}).get("status") == "resolved"  # a firing re-sent after it
        if d.get("type") == "anomaly" and d.get("stream") == stream and not resolved:
            latest[d["alert_id"]] = d
    return list(latest.values())


def alert_span(doc: dict[str, Any], data_end_ms: float, key: str = "start_ts") -> Span:
    """From the alert's ``key`` (its first over-threshold window's start, or ``fired_ts``) to its end."""
    end = doc.get("end_ts")
    return Span(float(doc[key]), float(end) if end is not None else data_end_ms)


def score_alerts(events: list[Span], alerts: list[dict[str, Any]], test: Span, tolerance_ms: float,
                 warmup: list[Span] | None = None) -> dict[str, Any]:
    """Recall, precision, false alerts per hour/day, mean and p90 detection delay (s), alerts per hour.
    ``warmup``: the events that ended before the test part (:func:`warmup_events`)."""
    scored = [a for a in alerts if a.get("fired_ts") is not None and a["fired_ts"] >= test.start_ms]
    spans = [alert_span(a, test.end_ms) for a in scored]
    credited = [_credited(events, s, float(a["fired_ts"]), tolerance_ms)  # per alert, the indices of its events
                for a, s in zip(scored, spans, strict=True)]
    true = [bool(c) for c in credited]
    earlier = [not t and any(ev.overlaps(s, tolerance_ms) for ev in warmup or ()) for s, t in zip(spans, true, strict=True)]
    delays: list[float] = []
    inside = 0
    # alerts fired during probation and still open at the split: they count for nothing, but an event that straddles
    # the split and that such an alert overlaps was found before the scored part began (it fired on the event's
    # first samples, and the event counted as missed: a slower detector would have been credited)
    open_at_split = [(float(a["fired_ts"]), alert_span(a, test.end_ms)) for a in alerts
                     if a.get("fired_ts") is not None and a["fired_ts"] < test.start_ms]
    for i, ev in enumerate(events):
        fired = [float(a["fired_ts"]) for a, c in zip(scored, credited, strict=True) if i in c]
        began = ev.start_ms if ev.began_ms is None else ev.began_ms  # before the split: labelled_events clipped it
        # fired on it: not an alert already stuck open when it began (that counts for nothing, as for a later event)
        found_early = began < test.start_ms and any(f >= began and ev.overlaps(s) for f, s in open_at_split)
        if any(f < ev.start_ms for f in fired) or found_early:
            inside += 1  # open when it began (a later alert during it changes nothing)
        elif fired:
            delays.append((min(fired) - ev.start_ms) / 1000)
    hours = max(test.end_ms - test.start_ms, 1.0) / 3.6e6
    n_true, n_ignored = sum(true), sum(earlier)
    n_false = len(true) - n_true - n_ignored
    detected = len(delays) + inside
    firing = [alert_span(a, test.end_ms, "fired_ts") for a in alerts if a.get("fired_ts") is not None]
    return {
        "recall": detected / len(events) if events else None,
        "precision": n_true / (n_true + n_false) if n_true + n_false else None,
        "false_alerts_per_hour": n_false / hours,
        "false_alerts_per_day": n_false / hours * 24,
        "mean_delay_s": float(np.mean(delays)) if delays else None,
        "p90_delay_s": float(np.percentile(delays, 90)) if delays else None,
        "alerts": len(scored),
        "alerts_per_hour": len(scored) / hours,
        "events": len(events),
        "events_detected": detected,
        "events_inside_open_alert": inside,
        "true_alerts": n_true,
        "false_alerts": n_false,
        "ignored_in_probation": len(alerts) - len(scored),
        "ignored_for_warmup_event": n_ignored,
        "time_in_alert": covered_share(firing, test),
        "log": [{"alert_id": a["alert_id"], "start_ts": a["start_ts"], "fired_ts": a["fired_ts"],
                 "end_ts": a.get("end_ts"), "ratio": a.get("ratio"),
                 "top_channel": (a.get("top_channels") or [{}])[0].get("channel"),
                 "true": t, **({"warmup_event": True} if e else {})}
                for a, t, e in zip(scored, true, earlier, strict=True)],
    }


def _credited(events: list[Span], alert: Span, fired_ms: float, tolerance_ms: float) -> list[int]:
    """The events an alert is credited to: those it overlaps, and, unless it fired on one of them (at or after its
    start), the latest one it is within the tolerance of — an alert fired on an event's after-effects and still open
    when the next began detects both (the next inside it), one fired on the next event only that one."""
    direct = [i for i, ev in enumerate(events) if ev.overlaps(alert)]
    if direct and fired_ms >= min(events[i].start_ms for i in direct):
        return direct
    late = [i for i, ev in enumerate(events) if i not in direct and ev.overlaps(alert, tolerance_ms)]
    return direct + ([max(late, key=lambda i: events[i].end_ms)] if late else [])


def covered_share(spans: list[Span], within: Span) -> float:
    """Share of ``within`` covered by the union of ``spans``."""
    cut = sorted((max(s.start_ms, within.start_ms), min(s.end_ms, within.end_ms)) for s in spans)
    total, reach = 0.0, within.start_ms
    for a, b in cut:
        if b > max(a, reach):  # (an alert wholly outside ``within`` has b < a here)
            total += b - max(a, reach)
            reach = b
    return total / max(within.end_ms - within.start_ms, 1.0)
