"""The replay-eval timeline picture."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from models.data import Series
from monitor import timeline
from monitor.events import Span
from tests.conftest import sine_stream


def test_a_window_that_scores_inf_or_nan_does_not_cost_the_picture(stream_model: Path, tmp_path: Path) -> None:
    """Finite but extreme values score inf/NaN (the README says so for 3e38); the y-limit then was NaN and
    matplotlib raised, after report.json was written: no picture."""
    ts, v = sine_stream(1000)
    v[600, 0] = 3e38
    _, scores, _ = timeline.window_scores(stream_model, v, ts.astype("float64"), 10)
    assert not np.isfinite(scores).all()
    p = SimpleNamespace(model=stream_model, baseline=stream_model, stream="s", hop=10, start=100, gap_ms=None)
    series = Series(v, ["a", "b"], labels=np.zeros(len(v), "int8"), path="s.csv")
    out = timeline.draw(tmp_path / "t.png", p, series, ts.astype("float64"), {"thresholds": {}, "alerts": []},
                        Span(float(ts[200]), float(ts[-1])))
    assert out.stat().st_size > 10_000


def test_windows_across_a_gap_get_no_score(stream_model: Path) -> None:
    """Review: the timeline drew scores for windows across a gap, which neither the daemon nor tsmon score scores."""
    ts, v = sine_stream(1000)
    ts = ts + np.where(np.arange(1000) >= 500, 60_000, 0)  # one minute missing before sample 500
    end, _, _ = timeline.window_scores(stream_model, v, ts.astype("float64"), 10)
    kept, _, _ = timeline.window_scores(stream_model, v, ts.astype("float64"), 10, gap_ms=5000)
    across = ts[[509, 519, 529]]  # window 40, hop 10: the windows ending at samples 509-529 hold the minute
    assert np.isin(across, end).all() and len(kept) == len(end) - 3 and not np.isin(across, kept).any()


def test_anomalies_far_over_the_threshold_get_a_log_axis_that_shows_the_threshold() -> None:
    """Found by review: the score axis ran linearly to the 99.9th percentile (an anomaly 100× the threshold), and the
    threshold and normal scores lay flat on the x-axis — false alerts at 1.1× showed no crossing."""
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    scores = np.r_[rng.uniform(0.01, 0.03, 2000), np.full(10, 3.0)]  # normal ~0.02, threshold 0.03, bursts 3.0
    fig, ax = plt.subplots()
    timeline.score_axis(ax, scores, [0.03, 0.032])
    low, high = ax.get_ylim()
    assert ax.get_yscale() == "log" and low < 0.01 and high >= 3.0  # normal scores and the threshold apart, visible
    timeline.score_axis(ax2 := fig.add_subplot(212), np.r_[scores[:2000], [0.05]], [0.03])  # no spike: linear
    assert ax2.get_yscale() == "linear" and ax2.get_ylim()[0] == 0
    before = ax.get_ylim()
    timeline.score_axis(ax, np.array([np.nan, np.inf]), [0.03])  # nothing finite: left as it was
    assert ax.get_ylim() == before
    plt.close(fig)


def test_lines_are_broken_at_a_gap_not_drawn_across_it() -> None:
    """A model CLI pass: the signal and the score were drawn as a straight line across a gap in the data."""
    from monitor.timeline import broken

    t = np.r_[np.arange(10) * 1000.0, 60_000 + np.arange(10) * 1000.0]
    bt, bv = broken(t, np.arange(20.0), 5000.0)
    assert len(bt) == 21 and np.isnan(bt[10]) and np.isnan(bv[10]) and bv[11] == 10.0
    assert len(broken(t[:10], np.arange(10.0), 5000.0)[0]) == 10  # no gap: unchanged
