"""Metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

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
