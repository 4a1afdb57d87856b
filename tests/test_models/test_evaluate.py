"""Metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from models.data import Series, series_dataset
from models.errors import DataError
from models.evaluate import at_threshold, average_precision, event_metrics, roc_auc, runs


def test_roc_auc_by_hand() -> None:
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)  # 3 of 4 pairs ordered
    assert roc_auc(y, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert roc_auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5  # ties count one half


def test_average_precision_by_hand() -> None:
    # ranking 1,0,1: precision at the two positives 1/1 and 2/3 → AP = (1 + 2/3) / 2
    assert average_precision(np.array([1, 0, 1]), np.array([0.9, 0.8, 0.7])) == pytest.approx(5 / 6)


def test_nan_scores_are_rejected_for_ranking_and_flagged_at_threshold() -> None:
    with pytest.raises(DataError, match="NaN"):
        roc_auc(np.array([0, 1]), np.array([0.1, np.nan]))
    m = at_threshold(np.array([0, 0]), np.array([0.1, np.nan]), 0.5)
    assert m["confusion"]["fp"] == 1  # a NaN score is never "normal"


def test_metrics_at_threshold_by_hand() -> None:
    m = at_threshold(np.array([0, 0, 0, 1, 1]), np.array([0.1, 0.2, 0.9, 0.8, 0.3]), 0.5)
    assert m["confusion"] == {"tn": 2, "fp": 1, "fn": 1, "tp": 1}
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert m["accuracy"] == pytest.approx(3 / 5)


def test_runs() -> None:
    assert [(e.start, e.end) for e in runs(np.array([0, 1, 1, 0, 1]))] == [(1, 2), (4, 4)]


def test_event_metrics_by_hand() -> None:
    labels = np.zeros(100, dtype=int)
    labels[20:30] = 1  # event A
    labels[60:65] = 1  # event B (missed)
    # window 10: alarm windows ending at 27 and 28 (cover 18..28) hit A with delay 27-20 = 7;
    # the alarm ending at 90 (81..90) is a false episode
    ends = np.arange(9, 100)  # a window ending at every sample
    ev = event_metrics(labels, ends, np.isin(ends, [27, 28, 90]), window=10)
    assert ev["events"] == 2 and ev["events_detected"] == 1
    assert ev["event_recall"] == 0.5
    assert ev["alarm_episodes"] == 2 and ev["event_precision"] == 0.5
    assert ev["mean_delay_samples"] == 7.0


def test_alarms_of_windows_that_only_share_samples_are_two_episodes() -> None:
    """Window 40, hop 10: alarms at the windows ending 1060 and 1090, two normal windows between. Merged
    because their samples touch, the false one (1051…1090, past the event's end + tolerance) was absorbed."""
    labels = np.r_[np.zeros(1000), np.ones(10), np.zeros(200)].astype(int)
    ends = np.arange(39, 1210, 10)
    ev = event_metrics(labels, ends, np.isin(ends, [1059, 1089]), window=40, tolerance=40)
    assert ev["alarm_episodes"] == 2 and ev["event_precision"] == 0.5 and ev["event_recall"] == 1.0
    ev = event_metrics(labels, ends, np.isin(ends, [1059, 1069, 1079, 1089]), window=40, tolerance=40)
    assert ev["alarm_episodes"] == 1 and ev["event_precision"] == 1.0  # consecutive windows: one episode


def test_an_event_straddling_the_split_counts_from_the_scored_part() -> None:
    labels = np.zeros(300, dtype=int)
    labels[80:130] = 1  # begins 20 samples before the test part (100 on)
    ends = np.arange(109, 300, 10)
    ev = event_metrics(labels, ends, ends == 119, window=10, span=(100, 299))
    assert ev["events_detected"] == 1 and ev["mean_delay_samples"] == 19.0  # from 100, not 39 from 80


def test_alarms_either_side_of_windows_left_out_for_nan_are_two_episodes() -> None:
    """Windows holding NaN are not scored: the windows before and after such a stretch are neighbours in the
    scored list, not in the series. Merged, a false alarm 300 samples after a true one was absorbed into it."""
    n, window, hop = 2000, 20, 5
    values = np.sin(np.arange(n) / 7.0).astype("float32")[:, None]
    values[1400:1700] = np.nan
    labels = np.zeros(n, "int8")
    labels[1385:1395] = 1
    data = series_dataset(Series(values, ["x"], None, labels, "", "s.csv"), window, hop, 0.5)
    ends = data.test_ends
    flagged = np.isin(ends, [1399, 1719])  # the last window before the NaN and the first after it
    first = int(np.flatnonzero(ends == 1399)[0])
    assert np.flatnonzero(flagged).tolist() == [first, first + 1]  # neighbours in the scored list
    span = (int(ends[0]) - window + 1, int(ends[-1]))
    ev = event_metrics(labels, ends, flagged, window, tolerance=window, span=span, positions=data.test_positions)
    assert ev["alarm_episodes"] == 2 and ev["event_precision"] == 0.5 and ev["event_recall"] == 1.0
    assert event_metrics(labels, ends, flagged, window, tolerance=window, span=span)["alarm_episodes"] == 1


def test_events_inside_an_alarm_open_before_them_have_no_delay() -> None:
    labels = np.zeros(5000, int)
    for start in (1000, 2500, 4000):
        labels[start : start + 30] = 1
    ends = np.arange(19, 5000, 5)
    ev = event_metrics(labels, ends, np.ones(len(ends), bool), window=20, tolerance=20)  # alarms throughout
    assert ev["event_recall"] == 1.0 and ev["events_inside_open_alarm"] == 3 and ev["mean_delay_samples"] is None
    ev = event_metrics(labels, ends, (ends >= 1004) & (ends < 3000), window=20, tolerance=20)
    assert ev["events_inside_open_alarm"] == 1 and ev["mean_delay_samples"] == 4.0  # the first began for event 1
    none = event_metrics(labels, ends, np.zeros(len(ends), bool), window=20)
    assert none["alarm_episodes"] == 0 and none["event_precision"] is None and none["event_recall"] == 0.0


def test_an_event_an_episode_was_open_for_when_it_began_has_no_delay_whatever_alarms_later() -> None:
    labels = np.zeros(200, int)
    labels[50:121] = 1
    ends = np.arange(9, 200, 5)
    flagged = ((ends >= 44) & (ends <= 69)) | ((ends >= 99) & (ends <= 124))  # episode 1 begins before it
    ev = event_metrics(labels, ends, flagged, 10)
    assert ev["events_inside_open_alarm"] == 1 and ev["mean_delay_samples"] is None and ev["alarm_episodes"] == 2


def test_balanced_accuracy_uses_the_true_negative_rate_of_the_normals() -> None:
    # tn 3, fp 1, fn 2, tp 1: the normals' TNR is 3/4 (over tn + fp), not 3/5 (over tn + fn)
    m = at_threshold(np.array([0, 0, 0, 0, 1, 1, 1]), np.array([0.1, 0.2, 0.3, 0.9, 0.1, 0.2, 0.9]), 0.5)
    assert m["confusion"] == {"tn": 3, "fp": 1, "fn": 2, "tp": 1}
    assert m["balanced_accuracy"] == pytest.approx((1 / 3 + 3 / 4) / 2)


def test_average_precision_takes_tied_scores_as_one_threshold() -> None:
    # one distinct score: a single threshold with precision 1/2 at recall 1, whatever order the tie is sorted in
    assert average_precision(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert average_precision(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)


def test_ranking_metrics_need_both_classes() -> None:
    for labels in (np.array([0, 0, 0]), np.array([1, 1, 1])):
        with pytest.raises(DataError, match="both normal and anomalous"):
            roc_auc(labels, np.array([0.1, 0.2, 0.3]))
        with pytest.raises(DataError, match="both normal and anomalous"):
            average_precision(labels, np.array([0.1, 0.2, 0.3]))


def test_an_event_is_hit_by_a_window_whose_first_sample_is_its_last() -> None:
    # event 10..12, window 4: the window ending at 15 covers 12..15 and overlaps it; the one ending at 16 does not
    labels = np.zeros(40, dtype=int)
    labels[10:13] = 1
    ends = np.arange(3, 40)
    hit = event_metrics(labels, ends, ends == 15, window=4)
    assert hit["events_detected"] == 1 and hit["mean_delay_samples"] == 5.0 and hit["event_precision"] == 1.0
    miss = event_metrics(labels, ends, ends == 16, window=4)
    assert miss["events_detected"] == 0 and miss["event_precision"] == 0.0
    late = event_metrics(labels, ends, ends == 17, window=4, tolerance=2)  # covers 14..17: within end + 2
    assert late["events_detected"] == 1 and late["event_precision"] == 1.0


def test_an_episode_whose_first_window_ends_at_the_events_start_detects_it_with_no_delay() -> None:
    # it began at the event, not before it: a detection with delay 0, not an event inside an alarm already open
    labels = np.zeros(40, dtype=int)
    labels[20:25] = 1
    ends = np.arange(3, 40)
    ev = event_metrics(labels, ends, (ends >= 20) & (ends <= 22), window=4)
    assert ev["events_detected"] == 1 and ev["events_inside_open_alarm"] == 0 and ev["mean_delay_samples"] == 0.0


def test_events_after_the_span_are_not_counted() -> None:
    labels = np.zeros(60, dtype=int)
    labels[10:13] = 1
    labels[50:53] = 1  # after the scored part
    ends = np.arange(3, 40)
    ev = event_metrics(labels, ends, ends == 12, window=4, span=(0, 39))
    assert ev["events"] == 1 and ev["event_recall"] == 1.0
