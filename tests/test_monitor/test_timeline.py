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
    p = SimpleNamespace(model=stream_model, baseline=stream_model, stream="s", hop=10, start=100)
    series = Series(v, ["a", "b"], labels=np.zeros(len(v), "int8"), path="s.csv")
    out = timeline.draw(tmp_path / "t.png", p, series, ts.astype("float64"), {"thresholds": {}, "alerts": []},
                        Span(float(ts[200]), float(ts[-1])))
    assert out.stat().st_size > 10_000
