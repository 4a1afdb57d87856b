"""`tsmon replay-eval` through the real broker and daemon: known answers, multichannel, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from models import artifact
from models.data import read_series, series_dataset
from models.errors import DataError
from models.train import TrainConfig
from models.workflow import train_detector
from monitor.replay_eval import ReplayOptions, replay_clock, run, time_axis
from tests.conftest import child_processes, kill_all, running

W, HOP = 20, 5
EVENTS = (1519, 2019, 2519)  # each on a window end (19 + 5k): the first window that sees it ends on it


def labelled_sine(path: Path, n: int = 3000, events: tuple[int, ...] = EVENTS, length: int = 10) -> Path:
    """1 Hz samples of a 20-sample sine; +4 for ``length`` samples at each event, labelled."""
    rng = np.random.default_rng(0)
    t = np.arange(n)
    v = np.sin(2 * np.pi * t / 20) + 0.02 * rng.normal(size=n)
    label = np.zeros(n, "int8")
    for e in events:
        v[e : e + length] += 4.0
        label[e : e + length] = 1
    pd.DataFrame({"timestamp": pd.date_range("2024-01-01", periods=n, freq="s"), "value": v,
                  "label": label}).to_csv(path, index=False)
    return path


def train(path: Path, out: Path, kind: str, window: int, hop: int, fraction: float, quantile: float = 0.95,
          margin: float = 1.0, **params: Any) -> Path:
    series = read_series(path)
    ds = series_dataset(series, window, hop, fraction)
    det, training = train_detector(ds, kind, params, TrainConfig(epochs=8, seed=0, device="cpu", lr=5e-3),
                                   quantile, margin)
    training["data"].update({"train_fraction": fraction})
    return artifact.save(det, out, training)


def _alerts(ts: np.ndarray, stream: str, spans: list[tuple[str, int, int, int | None]]) -> list[dict[str, Any]]:
    """Alert documents of ``stream``: (id, first over-threshold row, firing row, resolving row or None)."""
    return [{"type": "anomaly", "alert_id": aid + stream, "stream": stream, "status": "resolved" if e else "firing",
             "start_ts": int(ts[s]), "fired_ts": int(ts[f]), "end_ts": int(ts[e]) if e else None}
            for aid, s, f, e in spans]


@pytest.mark.parametrize("nan_tail", [False, True])
def test_the_report_composes_the_figures_from_the_alerts_by_hand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 nan_tail: bool) -> None:
    """replay_eval.run with the broker's part replaced by hand-made alerts (a replay-eval review). With a NaN tail
    the rows never replayed stretched the scored part (false alerts an hour understated) and the event there,
    which no detector could see, capped recall."""
    from monitor import replay_eval

    path = labelled_sine(tmp_path / "sine.csv")  # events at 1519, 2019, 2519 (10 s each), 1 Hz, 3000 s
    if nan_tail:
        df = pd.read_csv(path)
        df.loc[2400:, "value"] = float("nan")
        df.to_csv(path, index=False)
    model = train(path, tmp_path / "pca", "pca", 20, 5, 0.4)
    series = read_series(path)
    ts = time_axis(series, None)
    end = 2399 if nan_tail else 2999
    spans = [("p", 1000, 1005, 1010),  # probation
             ("a", 1510, 1525, 1540),  # event 1, delay 6 s
             ("f", 1800, 1805, 1810),  # false
             ("o", end - 9, end - 4, None)]  # false, never resolved: open to the end of the scored part
    monkeypatch.setattr(replay_eval, "_play", lambda p, *a, **k: {
        "alerts": _alerts(ts, p.stream, spans) + _alerts(ts, p.stream + ".baseline", spans), "thresholds": {},
        "final_thresholds": {}, "summary": {}})
    monkeypatch.setattr("monitor.timeline.draw", lambda *a, **k: tmp_path / "timeline.png")
    r = run(model, series, ts, ReplayOptions(out=tmp_path / "out"))
    hours, events = (end - 1200) / 3600, 2 if nan_tail else 3
    for res in (r, r["baseline"]):
        assert res["events"] == events and res["events_detected"] == 1
        assert res["recall"] == pytest.approx(1 / events)
        assert res["alerts"] == 3 and res["true_alerts"] == 1 and res["false_alerts"] == 2
        assert res["false_alerts_per_hour"] == pytest.approx(2 / hours)
        assert res["mean_delay_s"] == pytest.approx(6.0) and res["ignored_in_probation"] == 1
        assert res["time_in_alert"] == pytest.approx((15 + 5 + 4) / (end - 1200))
    assert r["data"]["test_hours"] == pytest.approx(hours) and r["data"]["events_unplayed"] == (1 if nan_tail else 0)


def test_the_replay_calibrator_counts_data_time_unless_told_otherwise(tmp_path: Path) -> None:
    from monitor.config import load_config

    plain = load_config(None, {}, env={})
    wall = tmp_path / "wall.toml"
    wall.write_text('[calibrator]\nclock = "wall"\n')
    assert replay_clock(None, plain) == "data"  # the daemon's wall-clock default is not a choice the user made
    assert replay_clock(None, load_config(wall, {}, env={})) == "wall"  # the user's config is evaluated as it is
    assert replay_clock("data", load_config(wall, {}, env={})) == "data"  # and the flag overrides it
    with pytest.raises(DataError, match="data or wall"):
        replay_clock("hourly", plain)


def test_the_replay_never_plays_windows_the_model_was_fitted_on(tmp_path: Path) -> None:
    """Labels the training run did not have (here: a labelled burst in the validation part) drop windows from
    the replay's own split and move its validation windows back into fitted ones: the model's stored start holds."""
    from dataclasses import replace

    from monitor.replay_eval import plan

    path = labelled_sine(tmp_path / "sine.csv", events=(1100, 2019))  # window ends 19 + 5k; split at 1200
    series = read_series(path)
    unlabelled = series_dataset(replace(series, labels=None), W, HOP, 0.4)
    det, training = train_detector(unlabelled, "pca", {}, TrainConfig(seed=0, device="cpu"))
    training["data"].update({"train_fraction": 0.4})
    model = artifact.save(det, tmp_path / "pca", training)
    # unlabelled: 237 windows before the split, 47 validate, the first from sample 950 (as in the known answers)
    assert unlabelled.summary["val_start_sample"] == 950
    # labelled: the 5 windows ending 1104…1124 see the burst at 1100…1109, 232 are normal, round(46.4) = 46
    # validate, the first of them is window 186 (none before it left out), from sample 5 × 186 = 930 < 950
    labelled = series_dataset(series, W, HOP, 0.4)
    assert labelled.summary["val_start_sample"] == 930
    p = plan(model, series, time_axis(series, None), ReplayOptions(out=tmp_path / "out"), None)
    assert p.trained_on_file and p.start == 950
    assert p.speed == pytest.approx((3000 - 950 - 1) / 30.0)  # --seconds covers what is played
    # a larger share for fitting keeps the stored start as its floor (its own validation windows start later:
    # 297 windows end before 0.5 × 3000 = 1500, 292 of them normal; the last round(0.2 × 292) = 58 validate,
    # from window 239 on, which starts on sample 5 × 239 = 1195)
    later = plan(model, series, time_axis(series, None), ReplayOptions(out=tmp_path / "o2", train_fraction=0.5), None)
    assert later.split == 1500 and later.start == 1195
    # the baseline is fitted on the model's own training windows all the same, not on the larger share
    fitted = artifact.read_manifest(later.baseline)["training"]["data"]
    assert fitted["train_fraction"] == 0.4 and fitted["train"] == labelled.summary["train"]
    # a smaller one would score windows the model was fitted on: refused, not replayed
    with pytest.raises(DataError, match=r"--train-fraction 0.3 is below the model's own split on this file \(0.4\)"):
        plan(model, series, time_axis(series, None), ReplayOptions(out=tmp_path / "o3", train_fraction=0.3), None)
    # a baseline of other channels, refused before the replay (the ML user pass: it was replayed dead-lettered
    # throughout, then the report failed on an internal shape error)
    two = replace(series, values=np.repeat(series.values, 2, axis=1), channels=["value", "copy"])
    other, _ = train_detector(series_dataset(replace(two, labels=None), W, HOP, 0.4), "pca", {},
                              TrainConfig(seed=0, device="cpu"))
    wide = artifact.save(other, tmp_path / "pca2", {})
    with pytest.raises(DataError, match=r"the baseline .*pca2 takes 2 channel\(s\) \['value', 'copy'\], the model 1"):
        plan(model, series, time_axis(series, None), ReplayOptions(out=tmp_path / "o4", baseline=wide), None)
    assert not (tmp_path / "o4").exists()  # refused before anything is written
    # a pace no replay keeps, refused before the broker starts (a model CLI pass: an OverflowError from the player)
    with pytest.raises(DataError, match=r"--speed 1e-09 would replay the .* s of wall time, over 7 days"):
        plan(model, series, time_axis(series, None), ReplayOptions(out=tmp_path / "o5", speed=1e-9), None)


def test_a_model_trained_with_rows_dropped_is_replayed_from_its_own_split_in_the_files_rows(tmp_path: Path) -> None:
    """Found by the ML user pass: a model trained with ``--out-of-order drop`` stores its split and validation start
    in the rows it kept; the replay plays every row of the file and took them as file rows: it began 6 samples
    early, inside training windows, and scored from 6 rows before the model's split."""
    from monitor.replay_eval import plan

    path = labelled_sine(tmp_path / "sine.csv", events=(2019,))
    df = pd.read_csv(path)
    pd.concat([df.iloc[:100], df.iloc[50:56], df.iloc[100:]]).to_csv(path, index=False)  # 6 rows sent again
    kept = read_series(path, out_of_order="drop")
    assert kept.dropped_out_of_order == 6
    ds = series_dataset(kept, W, HOP, 0.4)
    det, training = train_detector(ds, "pca", {}, TrainConfig(seed=0, device="cpu"))
    training["data"].update({"train_fraction": 0.4, "out_of_order": "drop"})
    model = artifact.save(det, tmp_path / "pca", training)
    played = read_series(path, out_of_order="keep")
    p = plan(model, played, time_axis(played, None), ReplayOptions(out=tmp_path / "out"), None)
    assert p.trained_on_file and (p.start, p.split) == (ds.summary["val_start_sample"] + 6, 1200 + 6)
    fitted = artifact.read_manifest(p.baseline)["training"]["data"]  # the baseline: on the model's own windows
    assert (fitted["train"], fitted["split_sample"]) == (ds.summary["train"], 1200)
    # a share a little over the model's: 0.401 of the file's 3006 rows is row 1205, before the model's split
    later = plan(model, played, time_axis(played, None), ReplayOptions(out=tmp_path / "o2", train_fraction=0.401),
                 None)
    assert later.split == 1206


@pytest.mark.slow
def test_known_answers_recall_delay_and_identical_baseline(broker: Any, tmp_path: Path) -> None:
    """Every event is detected at the second window over the threshold (``for`` = 2): delay = one hop = 5 s.

    The model is itself PCA fitted on the same windows as the baseline, so both must report the same figures.
    """
    data = labelled_sine(tmp_path / "sine.csv")
    model = train(data, tmp_path / "pca", "pca", W, HOP, 0.4, quantile=1.0, margin=1.5)  # clean data stays under
    cfg = tmp_path / "tsmon.toml"
    cfg.write_text("[calibrator]\nenabled = false\n")  # thresholds stay the artifact's: answers known in advance
    series = read_series(data)
    r = run(model, series, time_axis(series, None),
            ReplayOptions(seconds=4, config=cfg, bootstrap=broker.bootstrap, out=tmp_path / "out"))
    # 237 windows end before the split sample 1200 (19, 24, …, 1199); the last round(0.2 × 237) = 47 validate,
    # the first of them ends on 19 + 5 × 190 = 969 and starts on 950: only from there is the series played
    assert r["model"]["trained_on_this_file"] and r["data"]["split_sample"] == 1200
    assert r["data"]["played_from_sample"] == 950
    assert r["replay"]["complete"] and r["replay"]["samples_sent"] == 2 * (3000 - 950)
    assert r["events"] == 3 and r["recall"] == 1.0 and r["precision"] == 1.0
    assert r["alerts"] == 3 and r["false_alerts_per_hour"] == 0.0
    assert r["mean_delay_s"] == pytest.approx(5.0) and r["p90_delay_s"] == pytest.approx(5.0)
    for key in ("recall", "precision", "alerts", "mean_delay_s", "false_alerts_per_hour"):
        assert r["baseline"][key] == r[key], key
    ids = {a["alert_id"] for a in r["log"]}  # the baseline's figures come from its own stream's alerts
    assert len(ids) == 3 and len(r["baseline"]["log"]) == 3 and ids.isdisjoint(a["alert_id"] for a in r["baseline"]["log"])
    assert [a["fired_ts"] for a in r["log"]] == [
        int(pd.Timestamp("2024-01-01").value // 10**6) + (e + HOP) * 1000 for e in EVENTS]
    assert Path(r["timeline"]).stat().st_size > 10_000
    assert json.loads((tmp_path / "out" / "report.json").read_text())["recall"] == 1.0


def test_a_series_stamped_ahead_of_this_clock_is_replayed_not_dead_lettered(broker: Any, tmp_path: Path) -> None:
    """Found by review: the replay turned off the daemon's floor for old samples, not its ceiling for future ones —
    a series stamped from now (or naive local times ahead of UTC) had every sample past an hour ahead dead-lettered,
    and the run reported a poor detector."""
    data = labelled_sine(tmp_path / "sine.csv")
    frame = pd.read_csv(data)
    ahead = pd.Timestamp.now(tz="UTC").floor("s") + pd.Timedelta(hours=3)  # wholly beyond limits.max_future_s
    frame["timestamp"] = pd.date_range(ahead, periods=len(frame), freq="s").strftime("%Y-%m-%dT%H:%M:%SZ")
    frame.to_csv(data, index=False)
    model = train(data, tmp_path / "pca", "pca", W, HOP, 0.4, quantile=1.0, margin=1.5)
    cfg = tmp_path / "tsmon.toml"
    cfg.write_text("[calibrator]\nenabled = false\n")
    series = read_series(data)
    r = run(model, series, time_axis(series, None),
            ReplayOptions(seconds=4, config=cfg, bootstrap=broker.bootstrap, out=tmp_path / "out"))
    assert r["replay"]["dead_letters"] == 0 and r["recall"] == 1.0 and r["alerts"] == 3


@pytest.mark.slow
def test_sigterm_stops_the_local_broker_it_started(tmp_path: Path) -> None:
    """Found by review: SIGTERM (timeout, a cancelled CI job) killed replay-eval at once, and the broker it had
    started ran on for good (or the run's topics stayed on a --bootstrap cluster). It unwinds as Ctrl-C does."""
    import signal
    import time

    data = labelled_sine(tmp_path / "sine.csv")
    model = train(data, tmp_path / "pca", "pca", W, HOP, 0.4, quantile=1.0, margin=1.5)
    proc = subprocess.Popen([sys.executable, "-m", "monitor", "replay-eval", "--model", str(model), "--data",
                             str(data), "--seconds", "60", "--out", str(tmp_path / "o")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kids: set[int] = set()
    try:
        kids = child_processes(proc)  # the broker, once started
        assert kids, "no broker started"
        time.sleep(3)  # into the replay
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        left = kids
        for _ in range(40):  # stopping takes a moment after the parent's exit
            left = {k for k in left if running(k)}
            if not left:
                break
            time.sleep(0.25)
        assert not left  # none left running (the broker stayed, its parent gone)
    finally:
        kill_all(proc, kids)


@pytest.mark.slow
def test_a_multichannel_lstm_end_to_end_points_at_the_perturbed_channel(broker: Any, tmp_path: Path) -> None:
    """Two channels, bursts on channel 0 only: the default kind (LSTM) finds both, and names channel 0."""
    from tests.conftest import synthetic_series

    path = tmp_path / "two.csv"
    synthetic_series(n=4000, anomalies=(2600, 3300)).to_csv(path, index=False)
    model = train(path, tmp_path / "lstm", "lstm", 40, 10, 0.5, embedding=8)
    series = read_series(path)
    r = run(model, series, time_axis(series, None),
            ReplayOptions(seconds=4, bootstrap=broker.bootstrap, out=tmp_path / "out"))  # calibrator on
    assert r["data"]["channels"] == ["ch0", "ch1"] and r["events"] == 2
    assert r["recall"] == 1.0, r["log"]
    true = [a for a in r["log"] if a["true"]]
    assert true and all(a["top_channel"] == "ch0" for a in true), true


@pytest.mark.slow
def test_the_cli_prints_the_json_keys_and_rejects_unlabelled_data(broker: Any, tmp_path: Path) -> None:
    data = labelled_sine(tmp_path / "sine.csv", n=1500, events=(1019,))
    model = train(data, tmp_path / "pca", "pca", W, HOP, 0.5, quantile=1.0, margin=1.5)
    holed = pd.read_csv(data)
    holed.loc[1300:1302, "value"] = np.nan  # a hole in the recording: written as `nan` it made invalid JSON,
    holed.to_csv(data, index=False)  # and the daemon dead-lettered the whole chunk holding it
    base = [sys.executable, "-m", "monitor", "replay-eval", "--model", str(model), "--bootstrap", broker.bootstrap]
    proc = subprocess.run([*base, "--data", str(data), "--seconds", "2", "--out", str(tmp_path / "o"), "--json"],
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    keys = {"recall", "precision", "false_alerts_per_hour", "mean_delay_s", "p90_delay_s", "alerts"}
    assert keys <= set(doc) and keys <= set(doc["baseline"]) and doc["recall"] == 1.0
    assert (doc["replay"]["rows_skipped_nonfinite"], doc["replay"]["dead_letters"]) == (3, 0)
    # the calibrator counts the series' own time by default: the configured 30 s, whatever the replay speed
    assert doc["replay"]["calibrator_clock"] == "data" and doc["replay"]["calibrator_interval_data_s"] == 30.0
    assert doc["replay"]["calibrator_interval_wall_s"] is None
    # the table: its warnings are said (the 3 rows skipped for NaN went unsaid), and a short part not as "0.0 h"
    proc = subprocess.run([*base, "--data", str(data), "--seconds", "2", "--out", str(tmp_path / "t")],
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0 and "rows_skipped_nonfinite" in proc.stderr, proc.stderr[-2000:]
    shown = " ".join(proc.stdout.split())
    assert "control_key_unset" not in proc.stderr and " min after the first 15%" in shown
    proc = subprocess.run([*base, "--data", str(data), "--calibrator-clock", "hourly", "--out", str(tmp_path / "h")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1 and "--calibrator-clock must be data or wall" in proc.stderr
    assert not (tmp_path / "h").exists()  # refused before anything was fitted or written
    (tmp_path / "a_file").write_text("x")  # an --out that cannot be a folder: said before the replay, not after it
    proc = subprocess.run([*base, "--data", str(data), "--out", str(tmp_path / "a_file")], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 1 and "is a file, not a directory" in proc.stderr and "replay_eval_plan" not in proc.stderr
    pd.read_csv(data).drop(columns="label").to_csv(tmp_path / "plain.csv", index=False)
    proc = subprocess.run([*base, "--data", str(tmp_path / "plain.csv")], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0
    assert "needs labels" in proc.stderr


def test_the_plans_defaults_follow_the_models_window_and_the_datas_period(tmp_path: Path) -> None:
    """Tolerance one window of data time unless given (0 included), gap_ms 3 periods but never under windows.gap_ms,
    about 250 ms of data a message, and the period the median of the intervals between distinct times."""
    from dataclasses import replace

    from monitor.replay_eval import plan

    series = read_series(labelled_sine(tmp_path / "sine.csv"))
    det, training = train_detector(series_dataset(replace(series, labels=None), W, HOP, 0.4), "pca", {},
                                   TrainConfig(seed=0, device="cpu"))
    model = artifact.save(det, tmp_path / "pca", training)
    ts = time_axis(series, None)  # 1 Hz
    p = plan(model, series, ts, ReplayOptions(out=tmp_path / "o1"), None)
    assert (p.period_ms, p.tolerance_ms, p.gap_ms, p.chunk) == (1000.0, W * 1000.0, 3000.0, 1)
    p = plan(model, series, ts, ReplayOptions(out=tmp_path / "o2", tolerance_s=0.0), 10_000.0)
    assert (p.tolerance_ms, p.gap_ms) == (0.0, 10_000.0)
    pairs = ts[0] + 2000.0 * (np.arange(len(ts)) // 2)  # every time stamped twice: a step of 0 between each pair
    assert plan(model, series, pairs, ReplayOptions(out=tmp_path / "o3"), None).period_ms == 2000.0
    fast = plan(model, series, ts[0] + 10.0 * np.arange(len(ts)), ReplayOptions(out=tmp_path / "o4"), None)
    assert (fast.period_ms, fast.chunk) == (10.0, 25)  # 250 ms of 100 Hz data a message
