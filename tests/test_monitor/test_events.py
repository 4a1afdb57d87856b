"""Event-level scoring of alerts (monitor.events) and labelled anomaly windows (models.data), by hand."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from structlog.testing import capture_logs

from models.data import anomaly_windows, read_series, window_labels
from models.errors import DataError
from monitor.events import Span, labelled_events, latest_alerts, replayed_events, score_alerts, warmup_events

H = 3_600_000  # one hour in ms


def alert(aid: str, start: float, fired: float, end: float | None, status: str = "resolved",
          stream: str = "s") -> dict:
    return {"type": "anomaly", "alert_id": aid, "stream": stream, "status": status, "start_ts": start,
            "fired_ts": fired, "end_ts": end}


def test_labelled_events_are_runs_on_the_time_axis_and_skip_those_before_the_test_part() -> None:
    ts = np.arange(20, dtype="float64") * 1000
    labels = np.zeros(20, "int8")
    labels[2:4] = 1  # before the test part: left out
    labels[10:13] = 1
    labels[19] = 1
    assert labelled_events(ts, labels, from_ms=5000) == [Span(10_000, 12_000), Span(19_000, 19_000)]
    assert labelled_events(ts, labels, from_ms=11_000)[0] == Span(11_000, 12_000, 10_000)  # straddles: counts from
    # there, its first sample kept


def test_an_event_whose_rows_were_all_left_out_of_the_replay_is_not_an_event() -> None:
    """A replay-eval review: rows with NaN are not replayed, yet an event lying wholly in them was scored (no detector
    could find it: recall capped). One with some row replayed stays, whole; one clipped at the split too."""
    ts = np.arange(30, dtype="float64") * 1000
    labels = np.zeros(30, "int8")
    labels[[3, 4, 10, 11, 12, 20, 21]] = 1
    sent = np.ones(30, bool)
    sent[[11, 12, 20, 21, 22]] = False  # the event 10-12 keeps row 10; the one at 20-21 is gone
    events = labelled_events(ts, labels, from_ms=4000)
    assert events == [Span(4000, 4000, 3000), Span(10_000, 12_000), Span(20_000, 21_000)]
    assert replayed_events(events, ts, labels, sent) == events[:2]
    sent[4] = False  # the clipped one's only row in the scored part is not replayed; its row 3 (warm-up) is
    assert replayed_events(events, ts, labels, sent) == events[:2]
    sent[3] = False
    assert replayed_events(events, ts, labels, sent) == events[1:2]


def test_an_alert_is_credited_to_the_event_it_overlaps_not_also_to_an_earlier_one_by_the_tolerance() -> None:
    """Noticed in a replay-eval review: an alert raised by the next event, begun within the tolerance of one that had
    just ended, detected both (the first with the second's delay). Only overlapping none does the tolerance credit,
    and then the latest event it is within the tolerance of."""
    events = [Span(10 * H, 11 * H), Span(11.5 * H, 12 * H), Span(20 * H, 21 * H), Span(22 * H, 22.5 * H)]
    test = Span(0, 40 * H)
    r = score_alerts(events, [alert("b", 11.6 * H, 11.7 * H, 11.9 * H)], test, tolerance_ms=2 * H)
    assert r["events_detected"] == 1 and r["recall"] == 0.25 and r["mean_delay_s"] == pytest.approx(0.2 * 3600)
    # after both of the later pair: only the nearer one (within 2 h of 22.5 h, and of 21 h too)
    r = score_alerts(events, [alert("c", 23 * H, 23.1 * H, 23.5 * H)], test, tolerance_ms=2 * H)
    assert r["events_detected"] == 1 and r["true_alerts"] == 1 and r["mean_delay_s"] == pytest.approx(1.1 * 3600)
    # fired on the first event's after-effects, before the next began, and still open when it did: both (a review
    # of the rule's first version, which credited the next one only)
    r = score_alerts(events[:2], [alert("a", 11.2 * H, 11.3 * H, 11.8 * H)], test, tolerance_ms=2 * H)
    assert (r["events_detected"], r["events_inside_open_alert"]) == (2, 1)
    assert r["mean_delay_s"] == pytest.approx(1.3 * 3600)


def test_recall_precision_false_alert_rate_and_delays_by_hand() -> None:
    events = [Span(10 * H, 11 * H), Span(20 * H, 21 * H), Span(30 * H, 31 * H)]
    test = Span(5 * H, 45 * H)  # 40 hours of test data
    alerts = [
        alert("a", 9.5 * H, 10.25 * H, 10.5 * H),  # detects event 1, delay 0.25 h = 900 s
        alert("b", 10.75 * H, 11 * H, 12 * H),  # also overlaps event 1: true, but not the first to fire
        alert("c", 21.5 * H, 21.75 * H, 22 * H),  # after event 2 ended: within a 1 h tolerance → detects, 1.75 h
        alert("d", 40 * H, 40.1 * H, None, status="firing"),  # open at the end: spans to the end; false
        alert("e", 1 * H, 1.5 * H, 2 * H),  # fired during probation: ignored
        alert("x", 30 * H, 30.5 * H, 31 * H, stream="other"),  # another stream's alert: not ours
    ]
    r = score_alerts(events, latest_alerts(alerts, "s"), test, tolerance_ms=1 * H)
    assert r["events"] == 3 and r["events_detected"] == 2 and r["recall"] == pytest.approx(2 / 3)
    assert r["alerts"] == 4 and r["true_alerts"] == 3 and r["false_alerts"] == 1
    assert r["precision"] == pytest.approx(3 / 4)
    assert r["false_alerts_per_hour"] == pytest.approx(1 / 40)
    assert r["false_alerts_per_day"] == pytest.approx(24 / 40)
    assert r["alerts_per_hour"] == pytest.approx(4 / 40)
    assert r["mean_delay_s"] == pytest.approx((900 + 6300) / 2)
    assert r["p90_delay_s"] == pytest.approx(900 + 0.9 * (6300 - 900))
    assert r["ignored_in_probation"] == 1
    # open from firing: a 10.25–10.5, b 11–12, c 21.75–22, d 40.1–45 (still firing), e before the test part:
    # 0.25 + 1 + 0.25 + 4.9 = 6.4 h of 40 (from each first over-threshold window's start it would be 7.75 h)
    assert r["time_in_alert"] == pytest.approx(6.4 / 40)
    assert r["events_inside_open_alert"] == 0
    strict = score_alerts(events, latest_alerts(alerts, "s"), test, tolerance_ms=0)
    assert strict["events_detected"] == 1 and strict["true_alerts"] == 2  # c no longer counts


def test_a_resolved_message_supersedes_its_firing_one_and_an_alert_counts_once() -> None:
    docs = [alert("a", 0, 10, None, status="firing"), {"type": "data_quality", "stream": "s"},
            alert("a", 0, 10, 50), alert("a", 0, 10, None, status="firing")]  # a firing re-sent after it
    (only,) = latest_alerts(docs, "s")
    assert only["end_ts"] == 50
    r = score_alerts([Span(20, 30)], [only], Span(0, 100), 0)
    # fired before the event began: detected, but inside an alert already open, so no delay
    assert r["alerts"] == 1 and r["recall"] == 1.0 and r["events_inside_open_alert"] == 1
    assert r["mean_delay_s"] is None


def test_events_inside_an_alert_open_since_before_them_are_detected_without_a_delay() -> None:
    events = [Span(1 * H, 1.1 * H), Span(5 * H, 5.1 * H), Span(8 * H, 8.1 * H)]
    held = alert("a", 0, 60_000, None, status="firing")  # fired at the start of the test part, never resolved
    r = score_alerts(events, [held], Span(0, 10 * H), 60_000)
    assert r["recall"] == 1.0 and r["precision"] == 1.0 and r["events_inside_open_alert"] == 3
    assert r["mean_delay_s"] is None and r["p90_delay_s"] is None and r["time_in_alert"] == pytest.approx(1 - 60_000 / (10 * H))
    later = alert("b", 5.05 * H, 5.06 * H, 5.2 * H)  # one that fires during event 2 gives it a delay
    r = score_alerts(events, [{**held, "end_ts": 2 * H}, later], Span(0, 10 * H), 60_000)
    assert r["events_detected"] == 2 and r["events_inside_open_alert"] == 1
    assert r["mean_delay_s"] == pytest.approx(0.06 * 3600)
    during = alert("c", 5.08 * H, 5.09 * H, 5.3 * H)  # fires during event 2, which an alert was open for
    r = score_alerts([Span(1 * H, 10 * H)], [{**held, "end_ts": 2 * H}, during], Span(0, 10 * H), 60_000)
    assert r["events_inside_open_alert"] == 1 and r["mean_delay_s"] is None


def test_an_alert_raised_by_an_event_of_the_warm_up_is_neither_true_nor_false() -> None:
    ts = np.arange(0, 10 * H + 1, 1000.0)
    labels = np.zeros(len(ts), "int8")
    labels[(ts >= 0.9 * H) & (ts <= 0.99 * H)] = 1  # ends 36 s before the test part
    test = Span(1 * H, 10 * H)
    assert labelled_events(ts, labels, test.start_ms) == []
    late = alert("a", 0.985 * H, 1.005 * H, 1.05 * H)  # its first window saw the event; it fired after the split
    r = score_alerts([], [late], test, 60_000, warmup=warmup_events(ts, labels, test.start_ms))
    assert r["alerts"] == 1 and r["false_alerts"] == 0 and r["ignored_for_warmup_event"] == 1
    assert r["precision"] is None and r["log"][0]["warmup_event"] is True
    assert score_alerts([], [late], test, 60_000)["false_alerts"] == 1  # without the warm-up's events: false
    after = alert("b", 0.99 * H + 30_000, 1.005 * H, 1.05 * H)  # began 30 s after the event ended: the tolerance
    warm = warmup_events(ts, labels, test.start_ms)
    assert score_alerts([], [after], test, 60_000, warmup=warm)["ignored_for_warmup_event"] == 1
    assert score_alerts([], [after], test, 10_000, warmup=warm)["false_alerts"] == 1


def test_an_alert_stuck_open_since_probation_counts_for_nothing_but_shows_as_time_in_alert() -> None:
    stuck = alert("s1", 1 * H, 2 * H, None, status="firing")
    r = score_alerts([Span(10 * H, 11 * H)], [stuck], Span(5 * H, 45 * H), 0)
    assert r["alerts"] == 0 and r["recall"] == 0.0 and r["time_in_alert"] == 1.0


def test_an_event_straddling_the_split_found_before_it_is_detected_not_missed() -> None:
    """Found by review: an event beginning in the warm-up and going on into the test part, for which an alert fired
    on its first samples (before the split) and stayed open, counted as missed — a slower detector was credited."""
    ts = np.arange(0, 10 * H + 1, 1000.0)
    labels = np.zeros(len(ts), "int8")
    labels[(ts >= 0.99 * H) & (ts <= 1.01 * H)] = 1  # straddles the split at 1 h
    test = Span(1 * H, 10 * H)
    events = labelled_events(ts, labels, test.start_ms)
    prompt = alert("a", 0.99 * H, 0.995 * H, 1.02 * H)  # fired in the warm-up, resolved after the split
    r = score_alerts(events, [prompt], test, 60_000)
    assert r["recall"] == 1.0 and r["events_inside_open_alert"] == 1 and r["mean_delay_s"] is None
    assert r["alerts"] == 0 and r["ignored_in_probation"] == 1  # the alert itself still counts for nothing
    done = alert("b", 0.99 * H, 0.995 * H, 0.999 * H)  # resolved before the split: not open there
    assert score_alerts(events, [done], test, 60_000)["recall"] == 0.0
    stuck = alert("s", 0.5 * H, 0.6 * H, None, status="firing")  # open at the split: only a straddling event
    later = labelled_events(ts, np.where((ts >= 5 * H) & (ts <= 5.1 * H), 1, 0).astype("int8"), test.start_ms)
    assert score_alerts(later, [stuck], test, 60_000)["recall"] == 0.0  # an event wholly after it: still missed
    # a review: nor a straddling one it was already open for when it began (it did not fire on it)
    assert score_alerts(events, [stuck], test, 60_000)["recall"] == 0.0
    on_it = alert("o", 0.5 * H, 0.99 * H, None, status="firing")  # open since earlier, fired at the event's first sample
    assert score_alerts(events, [on_it], test, 60_000)["events_inside_open_alert"] == 1


def test_time_in_alert_is_never_negative_for_an_alert_beyond_the_scored_part() -> None:
    # a review: a file whose last row goes back in time ended the scored part before an alert began: -0.6
    r = score_alerts([], [alert("a", 80_000, 80_000, None, status="firing")], Span(0, 50_000), 0)
    assert r["time_in_alert"] == 0.0


def test_no_alerts_and_no_events_give_none_not_a_fake_score() -> None:
    r = score_alerts([], [], Span(0, H), 0)
    assert r["recall"] is None and r["precision"] is None and r["mean_delay_s"] is None
    assert r["false_alerts_per_hour"] == 0.0


def test_nab_style_windows_label_the_samples_inside_them(tmp_path) -> None:
    stamps = pd.date_range("2014-01-01", periods=10, freq="h")
    pd.DataFrame({"timestamp": stamps.strftime("%Y-%m-%d %H:%M:%S"), "value": np.arange(10.0)}).to_csv(
        tmp_path / "temp.csv", index=False)
    nab = {"realKnownCause/temp.csv": [["2014-01-01 02:00:00.000000", "2014-01-01 04:00:00.000000"]],
           "realKnownCause/other.csv": [["2014-01-01 00:00:00", "2014-01-01 09:00:00"]]}
    (tmp_path / "windows.json").write_text(json.dumps(nab))
    s = read_series(tmp_path / "temp.csv", windows=tmp_path / "windows.json")
    assert s.labels.tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    (tmp_path / "list.json").write_text(json.dumps([["2014-01-01 08:00", "2014-01-01 09:00"]]))
    assert window_labels(stamps.to_numpy(), anomaly_windows(tmp_path / "list.json", "temp.csv")).sum() == 2
    ms = int(pd.Timestamp("2014-01-01 08:00").value // 10**6)  # numbers are epoch ms, as in the series
    (tmp_path / "ms.json").write_text(json.dumps([[ms, ms + 3_600_000]]))
    assert window_labels(stamps.to_numpy(), anomaly_windows(tmp_path / "ms.json", "temp.csv")).sum() == 2
    # a window between two samples labels none: said, with how many (a replay-eval review: an event dropped silently)
    (tmp_path / "between.json").write_text(json.dumps([["2014-01-01 02:00", "2014-01-01 02:00"],
                                                       ["2014-01-01 05:10", "2014-01-01 05:40"]]))
    with capture_logs() as logs:
        s = read_series(tmp_path / "temp.csv", windows=tmp_path / "between.json")
    assert s.labels.tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    [said] = [e for e in logs if e["event"] == "anomaly_windows_without_samples"]
    assert (said["count"], said["of"], said["first"]) == (1, 2, "2014-01-01T05:10:00 .. 2014-01-01T05:40:00")


@pytest.mark.parametrize("doc, message", [
    ({"a/x.csv": []}, "no entries for 'temp.csv'"),
    ([["2014-01-02", "2014-01-01"]], "ends before it starts"),
    ([["soon", "later"]], "not a timestamp"),
    ({"k": "v"}, "no entries"),
    ([1, 2], "list of [start, end] pairs"),
    ([["2014-01-01", None]], "not a timestamp"),
])
def test_bad_windows_files_say_what_is_wrong(tmp_path, doc, message) -> None:
    (tmp_path / "w.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        anomaly_windows(tmp_path / "w.json", "temp.csv")


def test_out_of_order_rows_are_refused_dropped_and_counted_or_kept(tmp_path) -> None:
    stamps = ["2014-03-09 01:55:00", "2014-03-09 03:00:00", "2014-03-09 03:00:00", "2014-03-09 02:59:00",
              "2014-03-09 03:05:00"]
    pd.DataFrame({"timestamp": stamps, "value": [1.0, 2, 3, 4, 5], "label": [0, 0, 1, 0, 0]}).to_csv(
        tmp_path / "dst.csv", index=False)
    with pytest.raises(DataError, match="row 2 repeats or goes back.*--out-of-order drop"):
        read_series(tmp_path / "dst.csv")
    s = read_series(tmp_path / "dst.csv", out_of_order="drop")
    assert s.values[:, 0].tolist() == [1, 2, 5] and s.labels.tolist() == [0, 0, 0] and s.dropped_out_of_order == 2
    assert len(read_series(tmp_path / "dst.csv", out_of_order="keep").values) == 5


def test_windows_need_timestamps_and_exclude_a_label_column(tmp_path) -> None:
    pd.DataFrame({"value": [1.0, 2.0], "label": [0, 1]}).to_csv(tmp_path / "l.csv", index=False)
    (tmp_path / "w.json").write_text("[]")
    with pytest.raises(DataError, match="labels once"):
        read_series(tmp_path / "l.csv", windows=tmp_path / "w.json")
    pd.DataFrame({"value": [1.0, 2.0]}).to_csv(tmp_path / "n.csv", index=False)
    with pytest.raises(DataError, match="needs a timestamp column"):
        read_series(tmp_path / "n.csv", windows=tmp_path / "w.json")


def test_the_demo_scorecard_counts_episodes_inside_an_open_alert_apart_whatever_fires_later() -> None:
    """The demo's summary follows the same rule as replay-eval: an episode an alert was already firing for
    when it began has no delay, also when another alert fires during it."""
    from monitor.demo import DemoStream, scorecard

    s = DemoStream("d", np.arange(0, 1000, 10, dtype="int64"), np.zeros((100, 1), "float32"),
                   [(100, 400), (600, 700)])
    docs = [alert("a", 50, 80, 200, stream="d"), alert("b", 250, 300, 450, stream="d"),  # a open when it began
            alert("c", 600, 650, 700, stream="d")]  # fires 50 ms into episode 2: 6 samples at 10 ms
    r = scorecard([s], docs, period_ms=10)
    assert r["detected"] == 2 and r["inside_open_alert"] == 1 and r["mean_delay_samples"] == 6.0


def test_spans_that_touch_at_one_instant_overlap_both_ways() -> None:
    # both ends are inclusive: an alert starting on an event's last sample, or ending on its first, overlaps it
    ev = Span(10 * H, 11 * H)
    assert ev.overlaps(Span(11 * H, 12 * H)) and ev.overlaps(Span(9 * H, 10 * H))
    assert ev.overlaps(Span(12 * H, 13 * H), late_ms=1 * H) and not ev.overlaps(Span(12 * H + 1, 13 * H), late_ms=1 * H)


def test_boundaries_of_scoring_an_alert() -> None:
    events = [Span(10 * H, 11 * H)]
    test = Span(5 * H, 45 * H)
    # fired at the test part's first instant: scored, not ignored in probation
    r = score_alerts(events, [alert("a", 4 * H, 5 * H, 6 * H)], test, tolerance_ms=0)
    assert r["alerts"] == 1 and r["ignored_in_probation"] == 0
    # fired on the event's first sample: detected with a delay of 0, not "inside an alert open before it"
    r = score_alerts(events, [alert("b", 9 * H, 10 * H, 12 * H)], test, tolerance_ms=0)
    assert (r["events_detected"], r["events_inside_open_alert"], r["mean_delay_s"]) == (1, 0, 0.0)


def test_an_alert_fired_on_an_events_first_sample_is_not_also_credited_to_the_one_before() -> None:
    # "unless it fired on one of them (at or after its first sample)": at its first sample included
    events = [Span(10 * H, 11 * H), Span(12 * H, 13 * H)]
    r = score_alerts(events, [alert("a", 11.5 * H, 12 * H, 12.5 * H)], Span(0, 40 * H), tolerance_ms=2 * H)
    assert (r["events_detected"], r["recall"]) == (1, 0.5)


def test_a_true_alert_near_a_warm_up_event_is_true_not_ignored() -> None:
    warm = [Span(1 * H, 2 * H)]
    events = [Span(6 * H, 7 * H)]
    r = score_alerts(events, [alert("a", 6 * H, 6.5 * H, 7 * H)], Span(5 * H, 45 * H), tolerance_ms=5 * H,
                     warmup=warm)
    assert (r["true_alerts"], r["false_alerts"], r["ignored_for_warmup_event"], r["precision"]) == (1, 0, 0, 1.0)


def test_time_in_alert_counts_nested_alerts_once() -> None:
    alerts = [alert("a", 0, 10 * H, 20 * H), alert("b", 0, 12 * H, 15 * H)]  # b wholly inside a
    r = score_alerts([], alerts, Span(0, 40 * H), tolerance_ms=0)
    assert r["time_in_alert"] == pytest.approx(10 / 40)


def test_an_event_ending_at_the_start_of_the_test_part_is_scored_not_warm_up() -> None:
    ts = np.arange(10, dtype="float64") * 1000
    labels = np.zeros(10, "int8")
    labels[3:6] = 1  # 3000 … 5000: ends on the first instant of the test part
    assert labelled_events(ts, labels, from_ms=5000) == [Span(5000, 5000, 3000)]
    assert warmup_events(ts, labels, from_ms=5000) == []
