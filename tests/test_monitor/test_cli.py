"""CLI smoke tests: each command end to end on small data, and one-line errors."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from monitor.cli import main
from tests.conftest import synthetic_series

EVAL_KEYS = {"roc_auc", "pr_auc", "accuracy", "precision", "recall", "f1", "threshold", "balanced_accuracy", "baseline"}
BENCH_KEYS = {"batch1_windows_per_s", "batched_windows_per_s", "batch_size", "ratio", "model_gflops", "gemm_gflops",
              "efficiency"}


def _said(err: str) -> str:
    """A usage error's text without typer's box, which wraps a long message over lines."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", err).split())


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main(["--log-format", "json", *args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="module")
def dense_artifact(series_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "dense"
    with pytest.raises(SystemExit) as done:
        main(["--log-format", "json", "train", "--data", str(series_csv), "--model", "dense", "--window", "40",
              "--hop", "10", "--epochs", "30", "--train-fraction", "0.6", "--out", str(out), "--device", "cpu"])
    assert done.value.code == 0
    return out


def test_train_eval_json(dense_artifact: Path, series_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "eval", "--model", str(dense_artifact), "--data", str(series_csv), "--json")
    assert code == 0
    r = json.loads(out)
    assert EVAL_KEYS <= set(r) and EVAL_KEYS - {"baseline"} <= set(r["baseline"])
    assert r["roc_auc"] > 0.9  # two 3-sigma bursts on a clean sine
    assert r["events"]["events"] == 2 and r["events"]["event_recall"] == 1.0  # both bursts lie after the split
    assert r["events"]["mean_delay_samples"] is not None


def test_eval_table(dense_artifact: Path, series_csv: Path, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "eval", "--model", str(dense_artifact), "--data", str(series_csv))
    assert code == 0 and "PCA baseline" in out and "ROC-AUC" in out and "event recall" in out
    # a NaN in a labelled test window: the window left the metrics without a word
    holed = tmp_path / "holed.csv"
    df = pd.read_csv(series_csv)
    df.loc[3310, "ch1"] = np.nan
    df.to_csv(holed, index=False)
    code, out, err = run(capsys, "eval", "--model", str(dense_artifact), "--data", str(holed), "--json")
    result = json.loads(out)
    assert code == 0 and result["test_windows_dropped_nonfinite"] == 4 == result["test_anomalies_dropped_nonfinite"]
    assert result["baseline"]["test_windows_dropped_nonfinite"] == 4 and '"test_windows_dropped_nonfinite"' in err


def test_score_writes_one_row_per_window(dense_artifact: Path, series_csv: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scores.csv"
    code, _, _ = run(capsys, "score", "--model", str(dense_artifact), "--input", str(series_csv), "--output", str(out))
    assert code == 0
    df = pd.read_csv(out)
    assert list(df.columns[:6]) == ["window", "end_sample", "timestamp", "score", "threshold", "is_anomaly"]
    assert len(df) == (4000 - 40) // 10 + 1 and df["window"].tolist() == list(range(len(df)))
    assert df["timestamp"].iloc[0] == "2024-01-01T00:00:39.000000Z"  # aligned to the window's last sample
    assert df["end_sample"].iloc[0] == 39
    burst = df[(df["timestamp"] >= "2024-01-01T00:55:00") & (df["timestamp"] <= "2024-01-01T00:55:40")]
    assert burst["is_anomaly"].all() and (burst["error_ch0"] > burst["error_ch1"]).all()
    # offsets are converted to UTC and the Z says so (without it +02:00 read back two hours off)
    local = pd.read_csv(series_csv)
    local["timestamp"] = (pd.to_datetime(local["timestamp"]) + pd.Timedelta(hours=2)).dt.strftime(
        "%Y-%m-%dT%H:%M:%S.000+02:00")
    local.to_csv(tmp_path / "local.csv", index=False)
    code, _, _ = run(capsys, "score", "--model", str(dense_artifact), "--input", str(tmp_path / "local.csv"),
                     "--output", str(tmp_path / "local-scores.csv"))
    assert code == 0 and pd.read_csv(tmp_path / "local-scores.csv")["timestamp"].iloc[0] == df["timestamp"].iloc[0]


def test_a_run_the_time_budget_cut_leaves_its_progress_bar_where_it_stopped(series_csv: Path, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A new user's pass: the bar was set full at the end, and a run cut by --max-minutes read as finished."""
    code, out, err = run(capsys, "train", "--data", str(series_csv), "--model", "dense", "--window", "40",
                         "--epochs", "50", "--max-minutes", "0.00001", "--out", str(tmp_path / "m"))
    assert code == 0 and '"stop": "time_budget"' in err
    assert " 1/50 " in out + err and "50/50" not in out + err


def test_a_long_picture_title_is_wrapped_not_cut(dense_artifact: Path, monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    """A new user's pass: inspect's title for a window across a gap ran off both sides of the picture."""
    import models.plots
    from models.artifact import load

    titles: list[str] = []
    def save(fig: Any, out: Path) -> Path:
        titles.append(fig._suptitle.get_text())
        models.plots.plt.close(fig)
        return out

    monkeypatch.setattr(models.plots, "save_figure", save)
    det = load(dense_artifact, "cpu")
    models.plots.window_figure(det, np.zeros((det.window, det.channels), "float32"), tmp_path / "w.png",
                               "plant.csv window 245 (holds a gap: neither score nor the daemon scores it):")
    assert len(titles[0].splitlines()) == 2 and max(map(len, titles[0].splitlines())) <= 100


def test_inspect_writes_a_png(dense_artifact: Path, series_csv: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "w.png"
    code, _, _ = run(capsys, "inspect", "--model", str(dense_artifact), "--data", str(series_csv), "--index", "262",
                     "--out", str(png))
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the windows score numbered with --hop / --out-of-order drop: inspect had neither option
    last = (4000 - 40) // 5  # at hop 5 there are twice as many windows as at the model's 10
    code, _, err = run(capsys, "inspect", "--model", str(dense_artifact), "--data", str(series_csv), "--index",
                       str(last), "--hop", "5", "--out-of-order", "drop", "--out", str(png))
    assert code == 0, err
    code, _, err = run(capsys, "inspect", "--model", str(dense_artifact), "--data", str(series_csv), "--index",
                       str(last), "--out", str(png))
    assert code == 1 and "out of range" in err


def test_bench_scorer_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "bench", "scorer", "--kind", "dense", "--seconds", "0.2", "--batch-size", "64", "--json")
    assert code == 0
    r = json.loads(out)
    assert BENCH_KEYS <= set(r) and r["batch_size"] == 64 and r["efficiency"] > 0


def test_bench_memory_counts_what_a_stream_holds(capsys: pytest.CaptureFixture[str], stream_model: Path) -> None:
    code, out, _ = run(capsys, "--log-level", "WARNING", "bench", "memory", "--model", str(stream_model),
                       "--streams", "30", "--json")
    r = json.loads(out)
    assert code == 0 and r["streams"] == 30 and r["records"] == 30 * 3
    # the calibrator's evidence at capacity: (2000 + 600) float64 values (the first few counted with the stream)
    assert 0.9 * 8 * (r["calibrator_window"] + r["drift_window"]) <= r["calibrator_evidence_bytes"] < 30_000
    assert 0 < r["stream_state_bytes"] < 100_000
    # 20 recent alerts of 64 float64 scores and 50 threshold versions, full (counted not at all before; the scores
    # held as Python floats took 41 kB a stream)
    assert r["recent_alerts"] * 64 * 8 + r["threshold_versions"] * 100 <= r["alert_history_bytes"] < 32_000
    per = r["stream_state_bytes"] + r["calibrator_evidence_bytes"] + r["alert_history_bytes"]
    assert r["per_stream_bytes"] == pytest.approx(per, abs=2)
    assert r["total_mb"] == pytest.approx(r["max_streams"] * r["per_stream_bytes"] / 2**20, abs=0.1)


def test_bench_memory_table_adds_up(capsys: pytest.CaptureFixture[str], stream_model: Path) -> None:
    """The table shows every part of the per-stream sum (the alert history was in --json only: 16 + 20 ≠ 62 kB)."""
    code, out, _ = run(capsys, "--log-level", "WARNING", "bench", "memory", "--model", str(stream_model),
                       "--streams", "5")
    values = {m[1]: int(m[2]) for m in re.finditer(r"(\w+_bytes)\W+(\d+)", out)}
    assert code == 0 and {"stream_state_bytes", "calibrator_evidence_bytes", "alert_history_bytes"} < set(values)
    parts = values["stream_state_bytes"] + values["calibrator_evidence_bytes"] + values["alert_history_bytes"]
    assert values["per_stream_bytes"] == pytest.approx(parts, abs=2)


@pytest.mark.parametrize("args, expected", [
    (["eval", "--model", "/nonexistent/model"], "ArtifactError: model artifact not found"),
    (["train", "--data", "/nonexistent.csv", "--out", "/tmp/x"], "DataError: data file not found"),
    (["train", "--model", "transformer", "--out", "/tmp/x"], "ModelConfigError: unknown model kind"),
    (["train", "--data", "ecg5000", "--protocol", "random", "--out", "/tmp/x"], "DataError: unknown ECG5000 protocol"),
    # each named something else (the seed, an internal val_fraction)
    (["train", "--max-minutes", "0", "--out", "/tmp/x"], "ModelConfigError: --max-minutes must be a number of minutes"),
    (["train", "--data", "/tmp/x.csv", "--train-fraction", "1.5", "--out", "/tmp/x"],
     "DataError: --train-fraction must be in (0, 1), got 1.5"),
])
def test_errors_are_one_line(capsys: pytest.CaptureFixture[str], args: list[str], expected: str) -> None:
    code, _, err = run(capsys, *args)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith(expected)
    assert "Traceback" not in err


def test_options_of_the_other_kind_of_data_are_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``--data ecg5000 --window -5`` trained two minutes on the 140-sample beats, the option dropped without a
    word; ``--protocol ucr`` with a file likewise."""
    code, _, err = run(capsys, "train", "--data", "ecg5000", "--window", "-5", "--align", "beats", "--out", str(tmp_path))
    assert code == 2 and "Invalid value for --window / --align: series files only: ECG5000 comes cut in beats" in _said(err)
    series = tmp_path / "s.csv"
    series.write_text("value\n1\n")
    for protocol in ("ucr", "classic"):  # classic, the ECG5000 default, was taken and ignored (a docs audit)
        code, _, err = run(capsys, "train", "--data", str(series), "--protocol", protocol, "--out", str(tmp_path / "a"))
        assert code == 2 and "Invalid value for --protocol: ECG5000 only" in _said(err)
    # found by the ML user pass: each of these ran, exit 0, the options dropped without a word
    for args, message in [
            (["train", "--model", "pca", "--epochs", "5", "--noise", "0.3"],
             "Invalid value for --epochs / --noise: gradient training only: pca is fitted in closed form"),
            (["eval", "--model", str(tmp_path), "--windows", "foo.json"], "Invalid value for --windows: series files only"),
            (["inspect", "--model", str(tmp_path), "--hop", "7", "--out", str(tmp_path / "x.png")],
             "Invalid value for --hop: series files only"),
            (["bench", "scorer", "--model", str(tmp_path), "--kind", "dense", "--param", "hidden=[8]"],
             "Invalid value for --kind / --param: for an untrained model only"),
            (["train", "--data", str(series), "--beat-pre", "5", "--out", str(tmp_path / "a")],
             "Invalid value for --beat-pre: beat windows only (--align beats)"),
            # the model's own configuration error, exit 1 (the third ML user pass)
            (["train", "--model", "dense", "--embedding", "8", "--out", str(tmp_path / "a")],
             "Invalid value for --embedding: not an option of the dense model"),
            (["train", "--model", "vae", "--batch-norm", "--out", str(tmp_path / "a")],
             "Invalid value for --batch-norm/--no-batch-norm: not an option of the vae model")]:
        code, _, err = run(capsys, *args)
        assert code == 2 and message in _said(err), (args, err)
    # and (the second ML user pass) a normalisation it does not know was refused once training had begun
    code, _, err = run(capsys, "train", "--data", str(series), "--model", "pca", "--normalisation", "zscore",
                       "--out", str(tmp_path / "a"))
    assert code == 1 and "unknown normalisation 'zscore'" in err and '"training"' not in err


def test_pca_components_past_what_the_data_holds_are_said(series_csv: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The ML user pass: --param components=1000 was stored as the 80 a PCA of these windows can have, silently."""
    code, _, err = run(capsys, "train", "--data", str(series_csv), "--model", "pca", "--window", "40",
                       "--param", "components=1000", "--out", str(tmp_path / "p"))
    assert code == 0 and '"pca_components_capped"' in err and '"fitted": 80' in err
    code, _, err = run(capsys, "train", "--data", str(series_csv), "--model", "pca", "--window", "40",
                       "--param", "components=4", "--out", str(tmp_path / "p"))
    assert code == 0 and "pca_components_capped" not in err


def test_eval_refuses_another_protocol(dense_artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "eval", "--model", str(dense_artifact), "--data", "ecg5000")
    assert code == 1 and "not ecg5000 (--data, by default ecg5000): give --data FILE" in err


def test_eval_on_the_training_path_holding_other_bytes_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The file re-exported at the path training read (rows added before the split) was split at the same share
    without a word: its test part could hold samples the model was fitted on (the models review)."""
    monkeypatch.chdir(tmp_path)
    synthetic_series(1200, anomalies=(900,)).to_csv("s.csv", index=False)
    code, _, err = run(capsys, "train", "--data", "s.csv", "--model", "pca", "--window", "40", "--out", "art")
    assert code == 0, err[-300:]
    code, _, err = run(capsys, "eval", "--model", "art", "--data", "s.csv")
    assert code == 0 and "training_file_changed" not in err
    synthetic_series(1300, anomalies=(1000,)).to_csv("s.csv", index=False)
    for spelt in ("s.csv", "./s.csv"):  # the same file, however the path is written (its review)
        code, _, err = run(capsys, "eval", "--model", "art", "--data", spelt)
        assert code == 0 and "training_file_changed" in err, spelt


def test_score_with_wrong_channels(dense_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "one.csv"
    pd.DataFrame({"v": range(100)}).to_csv(p, index=False)
    code, _, err = run(capsys, "score", "--model", str(dense_artifact), "--input", str(p), "--output", str(tmp_path / "o.csv"))
    # the columns looked for are the model's channels, not ones the user named ("value column 'ch0' not found")
    assert code == 1 and "DataError:" in err and "no column 'ch0', a channel of the model (its channels: ['ch0', " \
        "'ch1']); columns are ['v']: give the file's columns for them with --value-col, in the model's order" in err
    code, _, err = run(capsys, "score", "--model", str(dense_artifact), "--input", str(p), "--value-col", "w",
                       "--output", str(tmp_path / "o.csv"))
    assert code == 1 and "value column 'w' not found" in err  # one the user named
    code, _, err = run(capsys, "replay", "--input", str(p), "--model", str(dense_artifact))  # read before any broker
    assert code == 1 and "no column 'ch0', a channel of the model" in err
    code, _, err = run(capsys, "score", "--model", str(dense_artifact), "--input", str(p), "--value-col", "v",
                       "--output", str(tmp_path / "o.csv"))
    assert code == 1 and "DataError: model expects 2 channel(s)" in err
    assert "channels_mapped_by_position" not in err  # one column for two channels: refused, not "mapped" first


def test_module_entry_point_and_version() -> None:
    r = subprocess.run([sys.executable, "-m", "monitor", "--version"], capture_output=True, text=True, check=True)
    assert r.stdout.startswith("tsmon ")
    r = subprocess.run([sys.executable, "-m", "monitor", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("train", "eval", "score", "inspect", "bench", "demo"):
        assert cmd in r.stdout


def test_train_says_how_many_rows_out_of_order_dropped(series_csv: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    typo = tmp_path / "typo.csv"
    df = pd.read_csv(series_csv)
    df.loc[1000, "timestamp"] = "2204-01-01 00:00:00"
    df.to_csv(typo, index=False)
    code, _, err = run(capsys, "train", "--data", str(typo), "--model", "pca", "--window", "40", "--hop", "10",
                       "--out-of-order", "drop", "--out", str(tmp_path / "m"))
    assert code == 0
    line = next(json.loads(x) for x in err.splitlines() if '"rows_dropped_out_of_order"' in x)
    assert line["level"] == "warning" and line["count"] == 1 and line["of"] == 4000


def test_score_reads_the_timestamp_column_the_model_was_trained_with(series_csv: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    df = pd.read_csv(series_csv).rename(columns={"timestamp": "event_time"})
    df.to_csv(tmp_path / "et.csv", index=False)
    model = tmp_path / "m"
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "et.csv"), "--timestamp-col", "event_time",
                       "--model", "pca", "--window", "40", "--hop", "10", "--out", str(model))
    assert code == 0, err
    df.iloc[[1500, 1200]] = df.iloc[[1200, 1500]].to_numpy()  # two rows swapped
    df.to_csv(tmp_path / "unsorted.csv", index=False)
    code, _, err = run(capsys, "score", "--model", str(model), "--input", str(tmp_path / "unsorted.csv"),
                       "--output", str(tmp_path / "s.csv"))
    assert code == 1 and "strictly increase" in err  # was scored in file order, without timestamps
    for other in (df.drop(columns="event_time"), df.rename(columns={"event_time": "timestamp"})):
        other.sort_values(list(other.columns[:1])).to_csv(tmp_path / "other.csv", index=False)
        code, _, err = run(capsys, "score", "--model", str(model), "--input", str(tmp_path / "other.csv"),
                           "--output", str(tmp_path / "s.csv"))  # no such column: the usual names, or none
        assert code == 0, err
    df.assign(event_time=1_704_067_200 + np.arange(len(df))).to_csv(tmp_path / "sec.csv", index=False)  # epoch s
    code, _, err = run(capsys, "score", "--model", str(model), "--input", str(tmp_path / "sec.csv"),
                       "--output", str(tmp_path / "s.csv"))
    assert code == 0 and '"timestamps_suspect"' in err and "epoch seconds" in err
    assert pd.read_csv(tmp_path / "s.csv")["timestamp"].iloc[0].startswith("1970-01-20")


def test_replay_eval_refuses_non_finite_options_and_reads_channels_by_name(
        dense_artifact: Path, series_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: NaN passed the "<= 0" checks (--tolerance nan scored every alert false; --seconds nan wrote
    "speed": NaN into report.json), and --value-col in another order than the model's channels swapped them."""
    import monitor.commands.replay_eval_cmd as cmd

    base = ["replay-eval", "--model", str(dense_artifact), "--data", str(series_csv), "--out", str(tmp_path / "o")]
    for option, value in (("--tolerance", "nan"), ("--seconds", "nan"), ("--speed", "inf"), ("--seconds", "inf")):
        code, _, err = run(capsys, *base, option, value)
        assert code == 1 and "finite numbers > 0" in err, (option, value)
    seen: dict[str, Any] = {}
    monkeypatch.setattr(cmd, "run", lambda model, series, ts, opts: seen.setdefault("series", series) and {})
    monkeypatch.setattr(cmd, "emit_json", lambda report: None)
    code, _, err = run(capsys, *base, "--value-col", "ch1", "--value-col", "ch0", "--json")
    assert code == 0 and seen["series"].channels == ["ch0", "ch1"]  # the model's order
    assert '"channels_mapped_by_position"' not in err
    code, _, err = run(capsys, *base, "--sample-rate", "0")  # passed unsaid for a timestamped file (CLI fuzzing)
    assert code == 1 and "--sample-rate must be a finite number of Hz > 0" in err


def test_replay_eval_names_a_cluster_that_does_not_answer_within_seconds(
        dense_artifact: Path, series_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """CLI fuzzing: --bootstrap at an address nobody answers said nothing for 63 s (killed by a 45 s timeout with
    empty output); it is probed first, as tsmon replay does, and named."""
    t0 = time.monotonic()
    code, _, err = run(capsys, "replay-eval", "--model", str(dense_artifact), "--data", str(series_csv),
                       "--out", str(tmp_path / "o"), "--bootstrap", "127.0.0.1:1")
    assert code == 1 and "cannot reach" in err and "127.0.0.1:1" in err and time.monotonic() - t0 < 40


def test_explicit_epochs_are_honoured(series_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run(capsys, "train", "--data", str(series_csv), "--model", "lstm", "--window", "40", "--hop", "20",
                     "--epochs", "2", "--embedding", "4", "--out", str(tmp_path / "m"), "--device", "cpu")
    assert code == 0
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["training"]["result"]["epochs_run"] == 2


def test_diverged_training_is_an_error(series_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "train", "--data", str(series_csv), "--model", "dense", "--window", "40",
                       "--epochs", "2", "--sparsity", "nan", "--out", str(tmp_path / "d"))
    assert code == 1 and "ModelConfigError" in err and not (tmp_path / "d").exists()


def test_training_loss_overflow_is_an_error_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # values near float32's limit, kept raw: the training loss overflowed to inf while the validation loss stayed
    # finite, and the inf history ended `tsmon train` in a traceback from the manifest's JSON
    n = np.arange(2000)
    data = tmp_path / "big.csv"
    pd.DataFrame({"a": (np.sin(n / 10) + np.random.default_rng(0).normal(0, 0.1, 2000)) * 1e37}).to_csv(data, index=False)
    code, _, err = run(capsys, "train", "--data", str(data), "--model", "dense", "--epochs", "2", "--normalisation",
                       "none", "--window", "20", "--hop", "10", "--out", str(tmp_path / "d"), "--device", "cpu")
    assert code == 1 and "diverged" in err and "Traceback" not in err and not (tmp_path / "d").exists()


def test_train_threads_are_given_and_recorded(series_csv: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """--threads sets training's torch threads (default: the usable CPUs − 1); the manifest and the log say how many
    ran, which the same seed needs to give the same weights again."""
    code, _, err = run(capsys, "train", "--data", str(series_csv), "--model", "dense", "--window", "20", "--hop", "10",
                       "--epochs", "1", "--threads", "3", "--out", str(tmp_path / "t"))
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert code == 0 and manifest["training"]["result"]["threads"] == 3 and manifest["training"]["config"]["threads"] == 3
    assert re.search(r"threads[=\":\s]+3\b", err), err
    code, _, err = run(capsys, "train", "--data", str(series_csv), "--model", "dense", "--threads", "0",
                       "--out", str(tmp_path / "z"))
    assert code == 2 and "--threads" in _said(err)


def test_a_threshold_that_cannot_mean_its_quantile_is_warned_of(series_csv: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A full-rank PCA reproduces its input to float32 rounding (threshold ~1e-7, logged as "threshold": 0.0, its
    scores noise: 28 alarm episodes for 3 events); --hop 600 left 1 validation window, whose error was "q0.95" (a
    hop longer than the window is refused since: --window 600 here).
    Both trained without a word."""
    code, _, err = run(capsys, "train", "--data", str(series_csv), "--model", "pca", "--window", "20", "--hop", "5",
                       "--param", "components=40", "--out", str(tmp_path / "full"))
    threshold = json.loads((tmp_path / "full" / "manifest.json").read_text())["threshold"]["value"]
    assert code == 0 and 0 < threshold < 1e-5 and "threshold_at_rounding_level" in err
    assert '"threshold": 0.0' not in err and "threshold=0.0 " not in err  # shown in significant digits
    code, _, err = run(capsys, "train", "--data", str(series_csv), "--model", "pca", "--window", "600", "--hop", "600",
                       "--out", str(tmp_path / "few"))
    assert code == 0 and "threshold_from_few_windows" in err and "threshold_at_rounding_level" not in err


def test_eval_ranks_a_window_the_model_overflows_on_first_and_train_names_it(series_csv: Path, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """3e38 is a finite float32, but the model's arithmetic overflows on it: one such sample in the test part made
    eval refuse the whole file ("a non-finite score is not a ranking"), while `tsmon score` flags those windows; in
    the validation part training failed with "validation errors must be ... finite", naming nothing."""
    code, _, _ = run(capsys, "train", "--data", str(series_csv), "--model", "pca", "--window", "40", "--hop", "20",
                     "--out", str(tmp_path / "m"))
    assert code == 0
    df = pd.read_csv(series_csv)
    df.loc[3000, "ch0"] = 3e38  # a normal stretch of the test part
    spiked = tmp_path / "spiked.csv"
    df.to_csv(spiked, index=False)
    code, out, err = run(capsys, "eval", "--model", str(tmp_path / "m"), "--data", str(spiked), "--json")
    result = json.loads(out)
    assert code == 0 and result["test_windows_nonfinite_score"] == 2 and "test_windows_nonfinite_score" in err
    assert result["baseline"]["test_windows_nonfinite_score"] == 2 and 0.5 < result["roc_auc"] <= 1.0
    df.loc[3000, "ch0"] = df.loc[2990, "ch0"]
    df.loc[1800, "ch0"] = 3e38  # in the validation part
    df.to_csv(spiked, index=False)
    code, _, err = run(capsys, "train", "--data", str(spiked), "--model", "pca", "--window", "40", "--hop", "20",
                       "--out", str(tmp_path / "v"))
    assert code == 1 and "validation window(s) score NaN or inf" in err and "3e+38" in err


def csv_with(series_csv: Path, path: Path, change: Any) -> Path:
    """A copy of the test series at ``path`` with ``change(frame)`` applied."""
    df = pd.read_csv(series_csv)
    change(df)
    df.to_csv(path, index=False)
    return path


def test_a_scale_set_by_a_few_extreme_training_samples_is_warned_of(series_csv: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """One 1e30 in the training part set the standard scale to 3.6e28: every window scored the same 1.9e-9, the
    model was blind (ROC-AUC 0.5, 0 of 3 events) and training said nothing. `robust` is not moved by it."""
    spiked = csv_with(series_csv, tmp_path / "spiked.csv", lambda df: df.loc.__setitem__((500, "ch1"), 1e30))
    args = ["train", "--data", str(spiked), "--model", "pca", "--window", "40", "--hop", "20"]
    code, _, err = run(capsys, *args, "--out", str(tmp_path / "s"))
    assert code == 0 and "scale_set_by_outliers" in err and '"ch1"' in err and '"ch0"' not in err.split("scale_set")[1]
    code, _, err = run(capsys, *args, "--normalisation", "robust", "--out", str(tmp_path / "r"))
    assert code == 0 and "scale_set_by_outliers" not in err
    # found by the ML user pass: robust scaling, as that warning advised, left the windows holding the 1e30 in
    # training: a threshold of 3e19, as blind a model and PCA baseline, and no word
    assert "threshold_set_by_outliers" in err and "at_rounding_level" not in err
    code, _, err = run(capsys, *args[:2], str(series_csv), *args[3:], "--out", str(tmp_path / "c"))
    assert code == 0 and "scale_set_by_outliers" not in err and "threshold_set_by_outliers" not in err


def test_the_rounding_level_of_an_mse_threshold_is_squared(capsys: pytest.CaptureFixture[str]) -> None:
    """Under --loss mse the threshold is in squared units: 5e-6 is an RMS error of 2e-3 — a model fitting well,
    hundreds of times float32 rounding — and it was told its scores were noise."""
    from types import SimpleNamespace

    from monitor.commands.model_cmds import _warn_threshold

    def det(loss: str, value: float) -> Any:
        return SimpleNamespace(loss=loss, scaler=SimpleNamespace(method="standard", flat_scale=(1.0,)),
                               threshold=SimpleNamespace(value=value, quantile=0.95), quantiles={"0.5": value / 2})

    for loss, value, warned in (("mse", 5e-6, False), ("mse", 5e-11, True), ("l1", 5e-6, True), ("l1", 5e-4, False)):
        _warn_threshold(det(loss, value), 100)
        out, err = capsys.readouterr()
        assert ("threshold_at_rounding_level" in out + err) == warned, (loss, value)
    # over a thousand normalised units (squared under mse): windows of outliers trained or thresholded it
    for loss, value, median, warned in (("l1", 2e3, 1e3, True), ("mse", 2e3, 1e3, False), ("mse", 2e6, 1e6, True),
                                        ("l1", 0.5, 4e-4, False)):
        _warn_threshold(SimpleNamespace(**{**vars(det(loss, value)), "quantiles": {"0.5": median}}), 100)
        out, err = capsys.readouterr()
        assert ("threshold_set_by_outliers" in out + err) == warned, (loss, value, median)


def test_channels_steady_in_training_are_named(series_csv: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The flat-line test is off for a channel steady in 1 % or more of the training windows: said at training, not
    found out when a stuck sensor goes unreported."""
    steady = csv_with(series_csv, tmp_path / "steady.csv", lambda df: df.__setitem__("ch1", 3.0))
    code, _, err = run(capsys, "train", "--data", str(steady), "--model", "pca", "--window", "40", "--hop", "20",
                       "--out", str(tmp_path / "m"))
    assert code == 0 and "channels_steady_in_training" in err and '["ch1"]' in err


def test_outputs_that_cannot_be_written_are_refused_before_the_work(series_csv: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`--out` a file, or another program's directory, was found out after training (its manifest.json replaced
    beside its notes, silently); `score --output` = `--input` replaced the data with its scores, exit 0."""
    other = tmp_path / "webapp"
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "my web app"}')
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, message in ((other, "holds no tsmon artifact"), (a_file, "is a file, not a directory")):
        code, _, err = run(capsys, "train", "--data", str(series_csv), "--model", "pca", "--window", "40",
                           "--out", str(out))
        assert code == 1 and message in err and '"training"' not in err, out  # refused before training
    assert (other / "manifest.json").read_text() == '{"name": "my web app"}'
    copy = tmp_path / "data.csv"
    copy.write_bytes(series_csv.read_bytes())
    code, _, err = run(capsys, "score", "--model", str(tmp_path / "none"), "--input", str(copy), "--output",
                       str(tmp_path / "." / "data.csv"))
    assert code == 1 and "is the --input file" in err and copy.read_bytes() == series_csv.read_bytes()


def test_eval_on_another_file(dense_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import synthetic_series

    other = tmp_path / "other.parquet"
    synthetic_series(seed=5, anomalies=(2700, 3500)).to_parquet(other)
    code, out, _ = run(capsys, "eval", "--model", str(dense_artifact), "--data", str(other), "--json")
    assert code == 0 and json.loads(out)["events"]["events"] == 2
    # labels under another name: eval had no --label-col (its error named train's option)
    renamed = tmp_path / "renamed.csv"
    synthetic_series(seed=5, anomalies=(2700, 3500)).rename(columns={"label": "fault"}).to_csv(renamed, index=False)
    code, _, err = run(capsys, "eval", "--model", str(dense_artifact), "--data", str(renamed))
    assert code == 1 and "evaluation needs labels" in err and "(--label-col)" in err
    code, out, err = run(capsys, "eval", "--model", str(dense_artifact), "--data", str(renamed), "--json",
                         "--label-col", "fault")
    assert code == 0 and json.loads(out)["events"]["events"] == 2 and "training_split_unknown" not in err
    # a manifest that lost its training part: split at 0.5 without a word, before
    import shutil

    bare = shutil.copytree(dense_artifact, tmp_path / "bare")
    manifest = json.loads((bare / "manifest.json").read_text())
    del manifest["training"]
    (bare / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run(capsys, "eval", "--model", str(bare), "--data", str(other), "--json")
    assert code == 0 and '"training_split_unknown"' in err and '"split": 0.5' in err


def test_score_and_eval_set_aside_windows_cut_across_a_gap(dense_artifact: Path, series_csv: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The ML user pass: windows across a gap in the timestamps (which the daemon never scores) were scored and
    flagged without a word; then only warned of. They are set aside, as the daemon sets them aside."""
    df = pd.read_csv(series_csv)
    df["timestamp"] = pd.to_datetime(df["timestamp"]) + pd.to_timedelta(np.where(df.index >= 3000, 3600, 0), "s")
    gap = tmp_path / "gap.csv"
    df.to_csv(gap, index=False)
    code, _, err = run(capsys, "score", "--model", str(dense_artifact), "--input", str(gap), "--output",
                       str(tmp_path / "s.csv"))
    assert code == 0 and '"windows_span_gaps"' in err and '"count": 3' in err  # window 40, hop 10
    scored = pd.read_csv(tmp_path / "s.csv")
    assert len(scored) == (4000 - 40) // 10 + 1 - 3 and not scored["window"].isin([297, 298, 299]).any()
    assert "windows_dropped_nonfinite" not in err  # (the count of windows with NaN/inf)
    code, out, err = run(capsys, "eval", "--model", str(dense_artifact), "--data", str(gap), "--json")
    assert code == 0 and '"windows_span_gaps"' in err and json.loads(out)["test_windows_spanning_gaps"] == 3
    code, out, err = run(capsys, "eval", "--model", str(dense_artifact), "--data", str(gap))  # said in the table too
    assert code == 0 and '"test_windows_spanning_gaps"' in err and "3 across a gap not scored" in out
    import models.plots

    titles: list[str] = []
    monkeypatch.setattr(models.plots, "window_figure", lambda _det, _w, out, title: titles.append(title) or out)
    for index in (298, 10):  # drawn, the one across the gap saying so
        code, _, err = run(capsys, "inspect", "--model", str(dense_artifact), "--data", str(gap), "--index",
                           str(index), "--out", str(tmp_path / "w.png"))
        assert code == 0, err
    assert "holds a gap" in titles[0] and "holds a gap" not in titles[1]
    code, _, err = run(capsys, "score", "--model", str(dense_artifact), "--input", str(series_csv), "--output",
                       str(tmp_path / "s.parquet"))  # written as CSV text before (the ML user pass)
    assert code == 0 and "windows_span_gaps" not in err
    assert len(pd.read_parquet(tmp_path / "s.parquet")) == (4000 - 40) // 10 + 1


def test_score_reorders_named_channels(dense_artifact: Path, series_csv: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    df = pd.read_csv(series_csv)
    swapped = tmp_path / "swapped.csv"
    df[["timestamp", "ch1", "label", "ch0"]].to_csv(swapped, index=False)
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert run(capsys, "score", "--model", str(dense_artifact), "--input", str(series_csv), "--output", str(a))[0] == 0
    assert run(capsys, "score", "--model", str(dense_artifact), "--input", str(swapped), "--output", str(b))[0] == 0
    pd.testing.assert_frame_equal(pd.read_csv(a), pd.read_csv(b))
    renamed = tmp_path / "renamed.csv"
    df.rename(columns={"ch0": "temp"}).to_csv(renamed, index=False)
    code, _, err = run(capsys, "score", "--model", str(dense_artifact), "--input", str(renamed), "--output", str(b))
    assert code == 1 and "no column 'ch0', a channel of the model" in err


@pytest.mark.parametrize("args, expected", [
    (["--log-format", "xml", "bench", "scorer"], 2),
    (["train", "--model", "dense", "--param", "hidden=3", "--out", "/tmp/x"], 1),
    (["train", "--device", "gpu", "--out", "/tmp/x"], 1),
    (["train", "--lr", "nan", "--out", "/tmp/x"], 1),
    (["train", "--seed", "-5", "--out", "/tmp/x"], 1),
    (["train", "--threshold-margin", "nan", "--out", "/tmp/x"], 1),  # was a traceback after training
    (["train", "--max-minutes", "0", "--out", "/tmp/x"], 1),  # was no budget at all
    (["train", "--data", "/tmp/x.csv", "--out-of-order", "keep", "--out", "/tmp/x"], 1),
    (["replay", "--input", "x.csv", "--rate", "nan"], 2),  # replayed as fast as possible
    (["replay", "--input", "x.csv", "--topic", "bad topic"], 2),  # a traceback from kafka-python
    (["train", "--param", "window=64", "--out", "/tmp/x"], 1),  # was dropped without a word
])
def test_more_bad_options(capsys: pytest.CaptureFixture[str], args: list[str], expected: int) -> None:
    code, _, err = run(capsys, *args)
    assert code == expected and "Traceback" not in err


def test_train_downsampled_then_eval_and_score(series_csv: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    base = ["train", "--data", str(series_csv), "--model", "dense", "--window", "40", "--hop", "10", "--epochs", "30",
            "--train-fraction", "0.6", "--device", "cpu"]
    code, _, err = run(capsys, *base, "--downsample", "3", "--out", str(tmp_path / "bad"))
    assert code == 1 and "divide the window (40)" in err and not (tmp_path / "bad").exists()
    code, _, err = run(capsys, *base[:4], "conv", *base[5:], "--downsample", "20", "--out", str(tmp_path / "bad"))
    assert code == 1 and "window 40 / --downsample 20 = 2 steps" in err and not (tmp_path / "bad").exists()
    code, _, _ = run(capsys, *base, "--downsample", "4", "--out", str(tmp_path / "ds4"))
    assert code == 0
    manifest = json.loads((tmp_path / "ds4" / "manifest.json").read_text())
    assert (manifest["window"], manifest["params"]["window"], manifest["downsample"]) == (40, 10, 4)
    code, out, _ = run(capsys, "eval", "--model", str(tmp_path / "ds4"), "--data", str(series_csv), "--json")
    assert code == 0 and json.loads(out)["roc_auc"] > 0.9  # the bursts survive averaging 4 samples
    code, _, _ = run(capsys, "score", "--model", str(tmp_path / "ds4"), "--input", str(series_csv), "--output",
                     str(tmp_path / "s.csv"))
    assert code == 0 and len(pd.read_csv(tmp_path / "s.csv")) == (len(pd.read_csv(series_csv)) - 40) // 10 + 1


def test_eval_takes_the_models_channels_by_name(dense_artifact: Path, series_csv: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # by position, a file with its columns in another order was evaluated on swapped channels (and one with an
    # extra numeric column failed on the window shape)
    df = pd.read_csv(series_csv)
    other = tmp_path / "other.csv"
    df.assign(extra=1.0)[["timestamp", "extra", "ch1", "label", "ch0"]].to_csv(other, index=False)
    results = [json.loads(run(capsys, "eval", "--model", str(dense_artifact), "--data", str(path), "--json")[1])
               for path in (series_csv, other)]
    assert results[0]["confusion"] == results[1]["confusion"] and results[0]["roc_auc"] == results[1]["roc_auc"]
    code, _, err = run(capsys, "eval", "--model", str(dense_artifact), "--data", str(series_csv), "--protocol", "ucr")
    assert code == 2 and "Invalid value for --protocol: ECG5000 only" in _said(err)  # it was ignored
    # found by the ML user pass: a file with its columns named otherwise could not be evaluated at all
    renamed = tmp_path / "renamed.csv"
    df.rename(columns={"ch0": "temp", "ch1": "rpm"}).to_csv(renamed, index=False)
    code, _, err = run(capsys, "eval", "--model", str(dense_artifact), "--data", str(renamed), "--json")
    assert code == 1 and "no column 'ch0', a channel of the model" in err and "--value-col" in err
    code, out, err = run(capsys, "eval", "--model", str(dense_artifact), "--data", str(renamed), "--value-col", "temp",
                         "--value-col", "rpm", "--json")
    assert code == 0 and json.loads(out)["confusion"] == results[0]["confusion"], err
    assert "channels_mapped_by_position" in err
    code, _, err = run(capsys, "eval", "--model", str(dense_artifact), "--data", str(renamed), "--value-col", "temp")
    assert code == 1 and "DataError: model expects 2 channel(s)" in err


def test_score_never_calls_a_window_normal_when_its_score_is_not_finite(dense_artifact: Path, series_csv: Path,
                                                                       tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # finite values beyond float32's range once normalised (3e38) score NaN: that was written as is_anomaly = 0
    df = pd.read_csv(series_csv)
    df.loc[3000:3005, "ch0"] = 3e38
    df.loc[1000:1005, "ch0"] = 1e38  # scores inf, which was written as "inf", not left empty
    huge, out = tmp_path / "huge.csv", tmp_path / "scores.csv"
    df.to_csv(huge, index=False)
    code, _, err = run(capsys, "score", "--model", str(dense_artifact), "--input", str(huge), "--output", str(out))
    scores = pd.read_csv(out)
    nonfinite = scores[scores["score"].isna()]
    assert code == 0 and len(nonfinite) > 0 and nonfinite["is_anomaly"].all()
    assert "inf" not in out.read_text() and scores.loc[scores["end_sample"].between(1000, 1040), "score"].isna().all()
    assert '"windows_nonfinite_score"' in err and "RuntimeWarning" not in err


def test_more_bad_input_gives_one_line(dense_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # each of these raised a traceback, or (config check) passed an artifact `tsmon run` refuses
    binary = tmp_path / "alert.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("manifest.json", "weights.safetensors"):
        (broken / name).write_bytes((dense_artifact / name).read_bytes())
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "validation_error_quantiles": [1, 2]}))
    cases: list[tuple[list[str], str]] = [
        (["inspect", "--alert", str(binary), "--out", str(tmp_path / "a.png")], "not UTF-8 text"),
        (["score", "--model", str(dense_artifact), "--input", str(binary), "--device", "mps"], "is not supported"),
        (["score", "--model", str(dense_artifact), "--input", str(binary), "--device", "meta"], "is not supported"),
        (["bench", "scorer", "--kind", "dense", "--batch-size", "-4", "--seconds", "0.1"], "--batch-size must be >= 1"),
    ]
    for args, message in cases:
        code, _, err = run(capsys, *args)
        assert code == 1 and message in err and "Traceback" not in err, args
    for timeout in ("-1", "nan", "0"):  # tracebacks from the producer, or the broker blamed for a zero wait
        code, _, err = run(capsys, "ctl", "history", "--stream", "s", "--timeout", timeout)
        assert code == 2 and "must be at least 1 second" in err and "Traceback" not in err, timeout
    code, _, err = run(capsys, "replay", "--input", str(tmp_path / "x.csv"), "--bootstrap-servers", "127.0.0.1:abc")
    assert code == 2 and "'127.0.0.1:abc' is not host:port" in _said(err)
    pattern = tmp_path / "pattern.toml"  # its topics list is the unused default: replay wrote to tsmon.input
    pattern.write_text('[kafka]\ntopic_pattern = "sensors\\\\..*"\n')
    code, _, err = run(capsys, "replay", "--input", str(tmp_path / "x.csv"), "--config", str(pattern))
    assert code == 1 and err.strip().splitlines()[-1] == ("ConfigError: give --topic: the configuration reads the "
                                                           "topics matching 'sensors\\\\..*'"), err
    monkeypatch.setenv("TSMON_MODEL", str(broken))
    code, _, err = run(capsys, "config", "check")
    assert code == 1 and "validation_error_quantiles must be an object" in err


def test_ctl_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A missing --stream is a usage error, as the README says usage errors are (it exited 1, a ConfigError)."""
    for args, message in [(["pin", "--threshold", "1"], "give --stream S (a glob is fine): '*' for every stream"),
                          (["recalibrate"], "give --stream S (a glob is fine) or --all"),
                          (["freeze", "--stream", "s", "--all"], "give --stream or --all, not both"),
                          (["history", "--exact"], "--exact needs --stream ID"),
                          (["feedback", "--alert", "a1"], "give exactly one of --false-positive or --confirmed"),
                          # values no instance could apply (they exited 1, where --timeout's exited 2)
                          (["pin", "--stream", "s", "--threshold", "nan"], "Invalid value for --threshold: must be finite and > 0"),
                          (["shadow", "--stream", "s", "--quantile", "inf"], "Invalid value for --quantile: must be in (0, 0.999]"),
                          # the calibrator's highest, as calibrator.quantile (an operator pass: q0.9999 was applied)
                          (["recalibrate", "--stream", "s", "--quantile", "0.9999"], "must be in (0, 0.999], got 0.9999"),
                          (["silence", "--stream", "s", "--for", "soon"], "Invalid value for --for: expected a duration like 90s"),
                          (["silence", "--stream", "s", "--for", "0m"], "Invalid value for --for: must be longer than 0, got '0m'"),
                          # sent, then refused by every daemon (found by the operator pass)
                          (["silence", "--stream", "s", "--for", "31d"], "Invalid value for --for: at most 30d, got '31d'"),
                          (["rollback", "--stream", "s", "--to", "-1"], "Invalid value for '--to'")]:
        code, _, err = run(capsys, "ctl", *args)
        assert code == 2 and message in _said(err) and "Traceback" not in err, (args, err)
    # the other commands' conflicting options are usage errors too (they exited 1 as configuration errors)
    for args, message in [(["tail", "--topic", "x", "--dead-letters"], "give --topic or --dead-letters, not both"),
                          (["tail", "--idle", "0"], "Invalid value for --idle: must be a number of seconds > 0"),
                          (["replay", "--input", "x.csv", "--model", "m", "--value-col", "a"],
                           "give --model (its channels, by name) or --value-col, not both")]:
        code, _, err = run(capsys, *args)
        assert code == 2 and message in _said(err) and "Traceback" not in err, (args, err)


def test_broker_topics_are_checked_before_it_starts(capsys: pytest.CaptureFixture[str]) -> None:
    for spec, message in [("a b", "'a b' is not a Kafka topic name"), ("t:0", "partitions must be a whole number"),
                          ("t:x", "partitions must be a whole number"), ("t:²", "partitions must be a whole number"),
                          (":3", "'' is not a Kafka topic name")]:
        code, _, err = run(capsys, "broker", "--port", "1", "--topic", spec)
        assert code == 2 and message in _said(err), (spec, err)
    code, _, err = run(capsys, "broker", "--port", "1", "--topic", "a:3", "--topic", "a:5")
    assert code == 2 and "'a' is given twice" in _said(err), err


def test_ctl_takes_its_broker_from_the_option_before_the_environment(capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`tsmon ctl` had no broker option: only --config or TSMON_KAFKA__BOOTSTRAP_SERVERS told it where to send."""
    import socket

    held = [socket.socket(), socket.socket()]  # two ports nothing listens on: each refuses at once. Kept bound
    for s in held:                               # to the end: freed, another test worker's server could take one
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in held]
    monkeypatch.setenv("TSMON_CONTROL__KEY", "k" * 32)
    monkeypatch.setenv("TSMON_KAFKA__BOOTSTRAP_SERVERS", f"127.0.0.1:{ports[0]}")
    try:
        code, _, err = run(capsys, "ctl", "history", "--stream", "s", "--timeout", "1",
                           "--bootstrap-servers", f"127.0.0.1:{ports[1]}")
    finally:
        for s in held:
            s.close()
    assert code == 1 and "BrokerError" in err and f"127.0.0.1:{ports[1]}" in err, err
    assert f"127.0.0.1:{ports[0]}" not in err and "(give --bootstrap-servers or --config)" in err


def test_ctl_against_a_hung_broker_answers_at_its_timeout(tmp_path: Path) -> None:
    """A broker that takes connections and never answers (SIGSTOP, a black-holed host): `tsmon ctl --timeout 2`
    said nothing for 32 s — kafka-python's 30 s bootstrap wait, whatever the command's own limit."""
    import socket
    import threading

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        hung.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(hung.accept()[0])  # taken, never answered
            except TimeoutError:
                pass

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    env = {**os.environ, "TSMON_CONTROL__KEY": "k" * 32, "TSMON_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{hung.getsockname()[1]}"}
    started = time.monotonic()
    try:  # in a process of its own: kafka-python leaves a failed bootstrap's sockets open
        p = subprocess.run([sys.executable, "-m", "monitor", "ctl", "history", "--stream", "s", "--timeout", "2"],
                           capture_output=True, text=True, timeout=60, check=False, env=env)
    finally:
        stop.set()
        acceptor.join(5)
        for s in [*held, hung]:
            s.close()
    assert p.returncode == 1 and "BrokerError" in p.stderr and "Traceback" not in p.stderr
    assert time.monotonic() - started < 20  # 32 s before: a bound, not a speed figure


def test_config_check_refuses_two_unnamed_routes_to_one_artifact(dense_artifact: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """``tsmon run`` refuses two routes with the same model name (the directory's when none is set); config
    check loaded each artifact alone and passed the file."""
    cfg = tmp_path / "two.toml"
    cfg.write_text(f'[[models]]\npattern = "ecg-*"\npath = "{dense_artifact}"\nfor = 1\n\n'
                   f'[[models]]\npattern = "*"\npath = "{dense_artifact}"\n')
    code, _, err = run(capsys, "config", "check", "--config", str(cfg))
    assert code == 1 and "model names must be unique" in err and "Traceback" not in err
    cfg.write_text(cfg.read_text().replace("for = 1\n", 'for = 1\nname = "ecg"\n'))
    code, out, _ = run(capsys, "config", "check", "--config", str(cfg))
    assert code == 0 and '"ecg"' in out


def test_config_check_warns_of_a_route_whose_lowerings_the_recent_windows_cannot_bound(
        stream_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """W/H = 20 at q0.95 needs 800 recent windows to bound a scheduled lowering, and drift.window keeps 600: the normal
    errors alone walked such a stream's threshold to 0.70-0.73 × its quantile, 39 % of the windows over (a review)."""
    cfg = tmp_path / "dense.toml"
    for window, said in ((600, True), (800, False)):
        cfg.write_text(f'[calibrator]\nquantile = 0.95\n[drift]\nwindow = {window}\n'
                       f'[[models]]\npattern = "dev-*"\npath = "{stream_model}"\nhop = 2\n')
        code, _, err = run(capsys, "config", "check", "--config", str(cfg))
        assert code == 0 and ("recent_windows_too_few" in err) is said, err
        assert not said or ("drift_window_needed" in err and "800" in err and "set drift.window to 800" in err)


def test_config_check_refuses_a_route_hop_longer_than_its_models_window(stream_model: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A pipeline owner's pass: hop = 1000 on a 64-sample model passed config check and the daemon scored 12
    windows of 12 000 samples without a word; the samples between windows are never scored."""
    window = json.loads((stream_model / "manifest.json").read_text())["window"]
    cfg = tmp_path / "hop.toml"
    for hop, code_wanted in ((window + 1, 1), (window, 0)):
        cfg.write_text(f'[[models]]\npattern = "dev-*"\npath = "{stream_model}"\nhop = {hop}\n')
        code, _, err = run(capsys, "config", "check", "--config", str(cfg))
        assert code == code_wanted, err
    cfg.write_text(f'[[models]]\npattern = "dev-*"\npath = "{stream_model}"\nhop = {window + 1}\n')
    code, _, err = run(capsys, "config", "check", "--config", str(cfg))
    assert f"route 'dev-*': hop {window + 1} is longer than {stream_model}'s window ({window} samples)" in err
    # nor from the artifact (a review): train refuses such a --hop, and an artifact that has one is refused to serve
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "none.csv"), "--model", "pca", "--window", "16",
                       "--hop", "17", "--out", str(tmp_path / "a"))
    assert code == 2 and "at most --window (16)" in _said(err)
    pd.DataFrame({"ch0": np.zeros(200), "ch1": np.ones(200)}).to_csv(tmp_path / "two.csv", index=False)
    code, _, err = run(capsys, "score", "--model", str(stream_model), "--input", str(tmp_path / "two.csv"),
                       "--hop", str(window + 1), "--output", str(tmp_path / "s.csv"))
    assert code == 2 and f"at most the model's window ({window})" in _said(err)
    import shutil

    wide = tmp_path / "wide"
    shutil.copytree(stream_model, wide)
    manifest = json.loads((wide / "manifest.json").read_text())
    (wide / "manifest.json").write_text(json.dumps({**manifest, "hop": window + 5}))
    cfg.write_text(f'[[models]]\npattern = "dev-*"\npath = "{wide}"\n')
    code, _, err = run(capsys, "config", "check", "--config", str(cfg))
    assert code == 1 and f"hop {window + 5} is longer than its window ({window} samples)" in err, err
    for command in (["score", "--input", str(tmp_path / "two.csv"), "--output", str(tmp_path / "s.csv")],
                    ["eval", "--data", str(tmp_path / "two.csv")]):  # (they skipped the samples between windows)
        code, _, err = run(capsys, command[0], "--model", str(wide), *command[1:])
        assert code == 1 and f"hop {window + 5} is longer than its window" in err, err


def test_a_bad_training_summary_in_the_manifest_gives_one_line(dense_artifact: Path, series_csv: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # each was a 40-line traceback from eval (AttributeError, ValueError, TypeError from BeatRule.fit)
    manifest = json.loads((dense_artifact / "manifest.json").read_text())
    data = manifest["training"]["data"]
    cases = [([], "training.data must be an object"), ({**data, "train_fraction": "abc"}, "training.data is unusable"),
             ({**data, "align": "beats"}, "align is beats but the windowing is")]
    for i, (bad, message) in enumerate(cases):
        broken = tmp_path / f"m{i}"
        broken.mkdir()
        (broken / "weights.safetensors").write_bytes((dense_artifact / "weights.safetensors").read_bytes())
        (broken / "manifest.json").write_text(json.dumps({**manifest, "training": {**manifest["training"], "data": bad}}))
        code, _, err = run(capsys, "eval", "--model", str(broken), "--data", str(series_csv))
        assert code == 1 and message in err and "Traceback" not in err, bad


def test_eval_of_the_training_file_by_another_path_keeps_its_label_windows(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # the labels come from a windows file; eval found it only when --data was the same string as in training
    monkeypatch.chdir(tmp_path)
    from tests.conftest import synthetic_series

    df = synthetic_series(2000)
    stamps = df["timestamp"].astype(str)
    (tmp_path / "w.json").write_text(json.dumps([[stamps[1300], stamps[1329]], [stamps[1700], stamps[1729]]]))
    df.drop(columns="label").to_csv(tmp_path / "s.csv", index=False)
    code, _, err = run(capsys, "train", "--data", "s.csv", "--windows", "w.json", "--model", "pca", "--window", "40",
                       "--out", "m")
    assert code == 0, err
    code, out, err = run(capsys, "eval", "--model", "m", "--data", "./s.csv", "--json")
    assert code == 0, err
    assert json.loads(out)["test_anomalies"] > 0
    # the windows file edited since training: eval took the new labels without a word (the ML user pass)
    saved = (tmp_path / "w.json").read_text()
    (tmp_path / "w.json").write_text(json.dumps([[stamps[1700], stamps[1729]]]))
    code, _, err = run(capsys, "eval", "--model", "m", "--data", "s.csv")
    assert code == 1 and "labels this file otherwise now than when the model was trained" in err
    code, out, err = run(capsys, "eval", "--model", "m", "--data", "s.csv", "--windows", "w.json", "--json")
    assert code == 0 and json.loads(out)["test_anomalies"] > 0, err  # named: taken as it is
    (tmp_path / "w.json").write_text(json.dumps({"other/x.csv": [], "data/s.csv": json.loads(saved)}))
    code, out, err = run(capsys, "eval", "--model", "m", "--data", "s.csv", "--json")  # the same windows, NAB's form
    assert code == 0, err
    later = str(pd.Timestamp(stamps.iloc[-1]) + pd.Timedelta(days=1))  # review: the same labels are no change
    (tmp_path / "w.json").write_text(json.dumps(json.loads(saved)[::-1] + [[later, later]]))
    code, out, err = run(capsys, "eval", "--model", "m", "--data", "s.csv", "--json")  # in another order, and one
    assert code == 0, err  # outside the series
    (tmp_path / "w.json").write_text(saved)
    # from another directory the relative path training stored is not found: said so, with the option (the ML
    # user pass: "windows file not found: w.json", as if the user had named it)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, _, err = run(capsys, "eval", "--model", "../m", "--data", "../s.csv")
    assert code == 1 and "the anomaly windows file training used, 'w.json'" in err and "--windows" in err
    code, out, err = run(capsys, "eval", "--model", "../m", "--data", "../s.csv", "--windows", "../w.json", "--json")
    assert code == 0 and json.loads(out)["test_anomalies"] > 0, err
    # labels of a column named here replace training's windows file (review: "give the labels once", or "not found")
    df.assign(fault=((df.index >= 1700) & (df.index < 1730)).astype(int)).drop(columns="label").to_csv(
        tmp_path / "f.csv", index=False)
    code, _, err = run(capsys, "train", "--data", "../f.csv", "--windows", "../w.json", "--model", "pca", "--window",
                       "40", "--value-col", "ch0", "--value-col", "ch1", "--out", "mf")
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "eval", "--model", "elsewhere/mf", "--data", "f.csv", "--label-col", "fault", "--json")
    assert code == 0 and json.loads(out)["test_anomalies"] > 0, err


def test_score_drops_rows_out_of_order_when_asked(dense_artifact: Path, series_csv: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # the error named --out-of-order drop, which score did not have
    df = pd.read_csv(series_csv)
    repeated = tmp_path / "repeated.csv"
    pd.concat([df.iloc[:100], df.iloc[99:]]).to_csv(repeated, index=False)
    out = tmp_path / "scores.csv"
    code, _, err = run(capsys, "score", "--model", str(dense_artifact), "--input", str(repeated), "--output", str(out))
    assert code == 1 and "--out-of-order drop" in err
    file = pd.read_csv(repeated)
    file.loc[2000:2010, "label"] = np.nan  # a label column with gaps: score never reads it (it failed on it)
    file.to_csv(repeated, index=False)
    code, _, err = run(capsys, "score", "--model", str(dense_artifact), "--input", str(repeated), "--output", str(out),
                       "--out-of-order", "drop")
    scores = pd.read_csv(out)
    assert code == 0 and len(scores) == (4000 - 40) // 10 + 1
    assert '"rows_dropped_out_of_order"' in err and '"count": 1' in err
    # end_sample is the file's row: past the dropped one it was the row before (the filtered series' index)
    stamps = pd.to_datetime(file["timestamp"], utc=True).dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert (stamps.iloc[scores["end_sample"]].to_numpy() == scores["timestamp"].to_numpy()).all()
    assert scores["end_sample"].iloc[-1] == len(file) - 1


def test_a_beat_model_is_evaluated_on_the_windows_score_cuts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """eval refitted the beat detector on another recording (here at 0.4 × the gain) and reported metrics on
    windows that score and the daemon, which keep the model's peak level, never cut; score blamed NaN/inf."""
    from tests.test_monitor.test_beats import ecg_like

    x, _ = ecg_like(6000, premature=(4725,))
    label = np.zeros(len(x), "int8")
    label[4700:4760] = 1
    for name, gain in (("ecg.csv", 1.0), ("low.csv", 0.4)):
        pd.DataFrame({"a": x[:, 0] * gain, "b": x[:, 1] * gain, "label": label}).to_csv(tmp_path / name, index=False)
    art = tmp_path / "beats"
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "ecg.csv"), "--model", "pca", "--align", "beats",
                       "--window", "80", "--beat-pre", "48", "--train-fraction", "0.6", "--out", str(art))
    assert code == 0, err
    code, out, err = run(capsys, "eval", "--model", str(art), "--data", str(tmp_path / "ecg.csv"), "--json")
    assert code == 0 and json.loads(out)["roc_auc"] is not None  # its own recording: the same rule either way
    # saved without align in its training summary (replay-eval's baseline was), it was evaluated on sliding windows
    from models import artifact

    det = artifact.load(art, "cpu")  # its hop, the median beat interval, is longer than its window: no matter
    assert det.hop > det.window
    bare = artifact.save(det, tmp_path / "bare", {"data": {k: v for k, v in det.meta["training"]["data"].items()
                                                           if k != "align"}})
    code, out2, err = run(capsys, "eval", "--model", str(bare), "--data", str(tmp_path / "ecg.csv"), "--json")
    assert code == 0 and {k: json.loads(out2)[k] for k in ("roc_auc", "confusion")} == \
        {k: json.loads(out)[k] for k in ("roc_auc", "confusion")}
    code, _, err = run(capsys, "eval", "--model", str(art), "--data", str(tmp_path / "low.csv"), "--json")
    assert code == 1 and "at the model's peak level" in err
    code, _, err = run(capsys, "score", "--model", str(art), "--input", str(tmp_path / "low.csv"),
                       "--output", str(tmp_path / "s.csv"))
    assert code == 1 and "no R peak at the model's level" in err and "NaN" not in err
    # a --hop with beat windows was recorded and ignored (a model CLI pass): a usage error, in train and score
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "ecg.csv"), "--model", "pca", "--align", "beats",
                       "--window", "80", "--hop", "10", "--out", str(tmp_path / "b2"))
    assert code == 2 and "--align beats cuts one window per beat" in _said(err)
    code, _, err = run(capsys, "score", "--model", str(art), "--input", str(tmp_path / "ecg.csv"), "--hop", "5",
                       "--output", str(tmp_path / "s2.csv"))
    assert code == 2 and "this model cuts one window per beat" in _said(err)
    from models.errors import ConfigError
    from monitor.scorer import load_served

    with pytest.raises(ConfigError, match="hop is for sliding-window models"):  # a daemon route's hop likewise
        load_served("ecg-*", art, None, 5, "cpu")
    assert load_served("ecg-*", art, None, None, "cpu").hop == json.loads((art / "manifest.json").read_text())["hop"]


def test_tsmon_run_logs_at_the_configured_level_and_format(stream_model: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """[daemon] log_level / log_format and their TSMON_DAEMON__* variables did nothing (only the root flags were
    read), so the images' TSMON_DAEMON__LOG_FORMAT=json had no effect and no configuration changed the level."""
    from monitor import daemon, logs

    class Started:  # the daemon's first lines, without a broker
        def __init__(self, cfg: Any) -> None:
            logs.get("tsmon.test").info("models_warmed")
            logs.get("tsmon.test").error("broker_gone")

        def install_signal_handlers(self) -> None:
            pass

        def run(self) -> None:
            pass

    monkeypatch.setattr(daemon, "Daemon", Started)
    monkeypatch.setenv("TSMON_DAEMON__LOG_LEVEL", "ERROR")
    monkeypatch.setenv("TSMON_DAEMON__LOG_FORMAT", "json")
    args = ["run", "--model", str(stream_model)]
    with pytest.raises(SystemExit):
        main(args)
    err = capsys.readouterr().err
    assert "models_warmed" not in err and '"event": "broker_gone"' in err
    with pytest.raises(SystemExit):
        main(["--log-level", "INFO", "--log-format", "console", *args])  # the root flags win
    err = capsys.readouterr().err
    assert "models_warmed" in err and '"event"' not in err


def test_scoring_in_chunks_gives_the_scores_of_one_pass(dense_artifact: Path, series_csv: Path) -> None:
    from models import artifact
    from models.data import finite_windows, make_windows
    from monitor.commands.model_cmds import _score_in_chunks

    det = artifact.load(dense_artifact, "cpu")
    values = pd.read_csv(series_csv)[["ch0", "ch1"]].to_numpy("float32")
    values[500, 1] = np.nan
    wins, _ = make_windows(values, det.window, 3)
    ok = finite_windows(wins, chunk=5)
    assert ok.sum() == len(ok) - 13 and finite_windows(wins[:0]).shape == (0,)
    whole = det.score(np.ascontiguousarray(wins[ok]))
    score, channel = _score_in_chunks(det, wins, ok, chunk=7)
    np.testing.assert_allclose(score, whole.window, rtol=1e-5)  # other batch sizes: other float32 rounding
    np.testing.assert_allclose(channel, whole.channel, rtol=1e-5)


def test_log_settings_from_flags_and_environment_are_checked_and_kept(capsys: pytest.CaptureFixture[str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from models.errors import ConfigError
    from monitor import logs

    monkeypatch.setenv("TSMON_LOG_LEVEL", "verbose")  # was taken as INFO
    code, _, err = run(capsys, "config", "reference")
    assert code == 1 and "TSMON_LOG_LEVEL='verbose': use one of" in err, err
    monkeypatch.delenv("TSMON_LOG_LEVEL")
    monkeypatch.setenv("TSMON_LOG_FORMAT", "pretty")  # was taken as json
    with pytest.raises(ConfigError, match="TSMON_LOG_FORMAT='pretty': use one of json, console"):
        logs.configure_from_flags(None, None)
    monkeypatch.delenv("TSMON_LOG_FORMAT")
    try:
        # the daemon's [daemon] level gives way to TSMON_LOG_LEVEL (run read only the config's); a table
        # command's quiet level gives way to it too, and keeps the format asked for (it reset both)
        monkeypatch.setenv("TSMON_LOG_LEVEL", "warning")
        logs.configure_from_flags(None, "console")
        logs.configure_daemon("INFO", None)
        logs.get("t").info("hidden")
        logs.quiet("ERROR")
        logs.get("t").warning("shown")
        err = capsys.readouterr().err
        assert "hidden" not in err and "shown" in err and not err.lstrip().startswith("{")  # console, not JSON
    finally:
        monkeypatch.delenv("TSMON_LOG_LEVEL", raising=False)  # else WARNING stayed for every later test here
        logs.configure_from_flags(None, None)
        root = logging.getLogger()  # the daemon's forwarding of other libraries' records: not in the next tests
        for h in [h for h in root.handlers if isinstance(h, logs._Library)]:
            root.removeHandler(h)
        logging.captureWarnings(False)


def test_inspect_alert_reads_the_topic_with_the_configs_security(broker: Any, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """It connected in plaintext whatever the config said (a TLS/SASL cluster: cannot read), and a
    SCHEME://host:port address, which the config takes, was "cannot reach". (The broker answers the probe's
    ApiVersions request, which Kafka takes before any SASL exchange.)"""
    from monitor import topics
    from monitor.commands import model_cmds

    seen: dict[str, Any] = {}

    def search(client: dict[str, Any], topic: str, needle: bytes, enough: Any, limit_s: float
               ) -> tuple[list[dict[str, Any]], int, bool]:
        seen.update(topic=topic, needle=needle, **client)  # the page, its update, a repeat of the page
        return [{"alert_id": "a1", "revision": 0, "explain": {"w": 0}}, {"alert_id": "a1", "revision": 2,
                 "explain": {"w": 2}}, {"alert_id": "a1", "revision": 0, "explain": {"w": 0}},
                {"alert_id": "a2", "revision": 4, "explain": {}}], 4, True

    monkeypatch.setattr(topics, "search_newest", search)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[kafka]\nbootstrap_servers = ["SASL_PLAINTEXT://{broker.bootstrap}"]\n'
                   'security_protocol = "SASL_PLAINTEXT"\nsasl_mechanism = "PLAIN"\n'
                   'sasl_username = "u"\nsasl_password = "p"\n')
    # the update's picture, the worst window (the first page's showed the episode before it grew)
    assert model_cmds._alert_from_topic("a1", cfg, None) == {"alert_id": "a1", "revision": 2, "explain": {"w": 2}}
    assert seen["security_protocol"] == "SASL_PLAINTEXT" and seen["sasl_plain_username"] == "u"
    assert seen["needle"] == b"a1" and seen["topic"] == "tsmon.alerts"


def test_a_stop_signal_during_the_start_ends_it_at_once(stream_model: Path) -> None:
    """Loading, warming up and bootstrapping Kafka (about 35 s when it is away) ran before the daemon installed its
    signal handlers: as a container's PID 1, which ignores a signal without a handler, a SIGTERM then was ignored
    until the grace period's SIGKILL. The start now stops at once, exit 128 + 15."""
    import os
    import select
    import signal
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on: the clients' bootstrap keeps trying
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "monitor", "run", "--bootstrap-servers", f"127.0.0.1:{port}",
                             "--topic", "t", "--model", str(stream_model)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, bufsize=0, env={**os.environ, "TSMON_DAEMON__LOG_FORMAT": "json"})
    try:
        out, deadline = [], time.monotonic() + 60
        # waiting for the broker that is not there (after the warm-up). Unbuffered: lines a buffered reader held were
        # not seen by select, and the retry's next line came only with the BrokerError 30 s on (a CI run's SIGTERM
        # then reached a process exiting: -15)
        while time.monotonic() < deadline and not any("broker_unreachable" in line for line in out):
            if select.select([proc.stdout], [], [], 1.0)[0]:
                out.append(proc.stdout.readline().decode(errors="replace"))  # type: ignore[union-attr]
        assert any("broker_unreachable" in line for line in out), out
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=20)[0].decode(errors="replace")
        assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, rest[-2000:])
        assert "stopped_while_starting" in rest and time.monotonic() - sent < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_unusable_device_is_refused_before_the_data_is_read_or_a_bar_drawn(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "train", "--device", "mps", "--out", "/tmp/never-written")
    assert code == 1 and err.strip().splitlines()[-1].startswith("ModelConfigError: device 'mps' is not supported")
    assert "train lstm" not in out + err


def _broker_options() -> dict[str, list[set[str]]]:
    """Every command (``ctl pin``…) with an option naming a broker → the spellings of each such option."""
    import typer.main

    from monitor.cli import app

    def commands(group: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
        for name, command in group.commands.items():
            if hasattr(command, "commands"):  # a group (bench, ctl, config, …)
                yield from commands(command, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", command

    named = {}
    for name, command in commands(typer.main.get_command(app)):
        opts = [set(p.opts) for p in command.params if any("bootstrap" in o for o in p.opts)]
        if opts:
            named[name] = opts
    return named


def test_every_command_that_reaches_a_broker_takes_both_spellings_of_its_address() -> None:
    """A new user following the README wrote `tsmon tail --bootstrap-servers` after `tsmon run --bootstrap-servers`:
    "No such option". Each command that names a broker takes --bootstrap and --bootstrap-servers alike."""
    named = _broker_options()
    assert {"run", "replay", "tail", "inspect", "replay-eval"} <= set(named)
    assert {name for name in named if name.startswith("ctl ")} == {
        f"ctl {c}" for c in ("recalibrate", "pin", "unpin", "freeze", "unfreeze", "silence", "unsilence", "reset-stream",
                             "feedback", "history", "rollback", "shadow", "silences")}
    for name, opts in named.items():  # any command naming a broker, a future one too
        assert opts == [{"--bootstrap", "--bootstrap-servers"}], (name, opts)


def test_every_broker_option_checks_each_address_as_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Only replay (and later ctl) checked the value itself; the others left it to the configuration, a ConfigError
    (exit 1) that named the environment as its source when any TSMON_* variable was set. A list is checked whole."""
    from monitor.commands.options import brokers

    for name in _broker_options():  # the bad value is read before any option the command requires is missed
        code, _, err = run(capsys, *name.split(), "--bootstrap-servers", "127.0.0.1:9092,127.0.0.1:notaport")
        assert code == 2 and "'127.0.0.1:notaport' is not host:port" in _said(err) and "Traceback" not in err, (name, err)
    assert brokers("k1:9092, k2:9092") == "k1:9092, k2:9092" and brokers(None) is None


def test_demo_redirected_keeps_warnings_beside_its_table_and_shows_shares_alike(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """From a new user's pass: with its output redirected (`make demo > f`, CI) the demo wrote ~160 info lines
    beside its table, which replay-eval never did; and its precision read 0.75 in one run, 0.8553 in another."""
    from monitor import logs
    from monitor.commands import demo_cmd

    def fake_run(_model: str, _opts: Any, _progress: Any) -> dict[str, Any]:
        logs.get("tsmon.demo").info("demo_step_said")
        logs.get("tsmon.demo").warning("demo_warning_said")
        return {"streams": 2, "samples": 1000, "windows_scored": 10, "anomaly_rate": 0.05, "labelled_anomalies": 4,
                "alerts": 4, "detected": 4, "precision": 0.75, "recall": 1.0, "inside_open_alert": 0,
                "mean_delay_samples": 12.0, "flapping": 0, "dead_letters": 0, "data_quality_events": 0,
                "seconds": 3.0, "thresholds": {}, "picture": None}

    monkeypatch.setattr(demo_cmd, "ensure_demo_model", lambda _path: None)
    monkeypatch.setattr(demo_cmd, "run_demo", fake_run)
    code, out, err = run(capsys, "demo", "--model", str(tmp_path / "m"))
    assert code == 0 and "demo_warning_said" in err and "demo_step_said" not in err
    assert "0.7500" in out and "1.0000" in out
    assert "alerts (episodes)" in out  # the live table counts messages: 152 there, "alerts 74" here (a new user)
    code, out, err = run(capsys, "demo", "--model", str(tmp_path / "m"), "--json")  # JSON out, the log as asked
    assert code == 0 and "demo_step_said" in err and json.loads(out)["precision"] == 0.75


def test_the_demos_live_table_names_its_http_endpoints_once_they_listen() -> None:
    """With --http-port 0 the port was only logged at info: hidden beside the live table."""
    from monitor.commands.demo_cmd import LiveView
    from monitor.demo import DemoProgress

    class Server:
        listening = False

        @property
        def url(self) -> str:
            if not self.listening:
                raise RuntimeError("HealthServer.address: not listening (call start() first)")
            return "http://127.0.0.1:43210"

    progress = DemoProgress(http=Server())
    assert progress.http_url is None and str(LiveView(progress).__rich__().title).startswith("sent 0/0 samples")
    progress.http.listening = True
    assert str(LiveView(progress).__rich__().title).startswith("http://127.0.0.1:43210 · sent 0/0 samples")
    # and its broker, a free port no one could find for tsmon ctl (a new user's pass); rows in stream time
    progress.bootstrap = "127.0.0.1:45115"
    alert = {"type": "anomaly", "status": "resolved", "flapping": False, "severity": "warning", "ratio": 1.5,
             "threshold": 0.1, "threshold_source": "artifact", "alert_id": "a" * 20, "stream": "ecg-04"}
    progress.alerts = [{**alert, "stream": "ecg-01", "end_ts": 1_700_000_011_531, "fired_ts": 1},
                       {**alert, "end_ts": 1_700_000_010_411, "fired_ts": 1}]
    table = LiveView(progress).__rich__()
    assert str(table.title).startswith("broker 127.0.0.1:45115 · http://127.0.0.1:43210 · sent")
    assert str(table.title).endswith("alert messages 2 (firing, resolved…)")
    assert list(table.columns[1].cells) == ["ecg-04", "ecg-01"]
    assert list(table.columns[6].cells) == ["a" * 20] * 2  # whole: what tsmon ctl feedback --alert needs
    from rich.console import Console  # and shown whole on an 80-column terminal (it ended "aaaaaaaaaa…")
    narrow = Console(width=80, record=True, file=io.StringIO())
    narrow.print(table)
    assert "a" * 20 in narrow.export_text()


def test_status_says_a_threshold_whose_lowering_is_held() -> None:
    """An on-call pass: a stream's threshold stayed at its artifact's, and nothing said why."""
    from monitor.commands.status_cmd import COLUMNS, stream_cells

    row = {"stream": "ecg-03", "threshold": 0.232, "threshold_source": "artifact", "threshold_version": 0}
    source = COLUMNS.index("source")
    assert stream_cells(row)[source] == "artifact v0"
    assert stream_cells({**row, "threshold_held": "q0.95 … held at 0.232 …"})[source] == "artifact v0 (lowering held)"
    # an observability review: both were in --json only; a provisional stream looked normal in the table
    assert stream_cells({**row, "raise_refused": "a level shift …", "provisional": True})[source] == \
        "artifact v0 (raise refused) (provisional)"


def test_value_columns_named_as_channels_go_to_those_channels() -> None:
    """A model CLI pass: --value-col speed --value-col temp for a model of (temp, rpm) scored speed as temp and temp
    as rpm (by position): every window anomalous. A named channel takes its column; the others fill in order."""
    from monitor.commands.model_cmds import model_columns

    assert model_columns(["temp", "rpm"], ["speed", "temp"]) == ["temp", "speed"]
    assert model_columns(["temp", "rpm"], ["rpm", "temp"]) == ["temp", "rpm"]
    assert model_columns(["temp", "rpm"], ["a", "b"]) == ["a", "b"]
    assert model_columns(["temp", "rpm"], None) == ["temp", "rpm"]
    assert model_columns(["temp", "rpm"], ["temp", "temp"]) == ["temp", "temp"]  # refused later in one line (it
    # raised StopIteration here, a review found)


def test_numbers_past_what_an_option_can_take_are_usage_errors_not_tracebacks(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """CLI fuzzing: a 1e23 --hop failed as a numpy index, a 1e20 --seed overflowed torch's generator, a 1e11 bench
    --window tried to allocate 400 GB, a URL with spaces raised http.client.InvalidURL: each a traceback."""
    for args in (["train", "--data", "x.csv", "--hop", "99999999999999999999999"],
                 ["train", "--data", "x.csv", "--seed", "99999999999999999999999"],
                 ["score", "--model", "m", "--input", "x.csv", "--hop", "99999999999999999999999"],
                 ["bench", "scorer", "--window", "99999999999"],
                 ["bench", "memory", "--streams", "99999999999999999999"]):
        code, _, err = run(capsys, *args)
        assert code == 2 and "Traceback" not in err, (args, err)
    code, _, err = run(capsys, "status", "--url", "not a url")
    assert code == 1 and "Traceback" not in err and "cannot reach the tsmon daemon" in err
    # http.port 0 in the config (any free port, logged): it said "cannot reach … http://127.0.0.1:0" (on-call pass)
    (tmp_path / "port0.toml").write_text("[http]\nport = 0\n")
    code, _, err = run(capsys, "status", "--config", str(tmp_path / "port0.toml"))
    assert code == 1 and err.strip().splitlines()[-1].startswith("ConfigError: http.port is 0") and "--url" in err
    from models.data import read_series
    from models.errors import DataError

    path = tmp_path / "wide.csv"
    path.write_text("value\n" + "9" * 100_000 + "x\n1\n")
    with pytest.raises(DataError) as exc:
        read_series(path)
    assert len(str(exc.value)) < 300  # the cell is cut (a 2 MB line before)


@pytest.mark.parametrize("args", [["ctl", "pin", "--help"], ["status", "--help"], ["--log-level", "INFO", "tail",
                                                                                       "--help"], ["broker", "--help"]])
def test_operator_commands_do_not_import_torch_or_pandas(args: list[str]) -> None:
    """Every command imported torch and pandas first: `tsmon ctl` waited ~3 s (10 s under load) before doing
    anything, and `ctl --timeout 3` against a dead broker took 11.7 s (a new user's pass)."""
    code = ("import sys\nfrom monitor.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted({'torch', 'pandas'} & set(sys.modules))\nassert not heavy, heavy\n")
    p = subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Usage: tsmon" in p.stdout


def test_the_whole_cli_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    from monitor.cli import LIGHT, command_of

    code, out, _ = run(capsys, "--help")
    assert code == 0
    for name in ("train", "eval", "score", "inspect", "broker", "run", "replay", "status", "ctl", "demo",
                 "replay-eval", "tail", "bench"):
        assert re.search(rf"│ {re.escape(name)} ", out), name
    assert command_of(["--log-level", "DEBUG", "--log-format=json", "ctl", "pin"]) == "ctl"
    assert command_of(["--version"]) is None and set(LIGHT) == {"ctl", "status", "tail", "broker"}
    assert command_of(["--help", "ctl"]) is None  # the root's help: every command
    code, out, _ = run(capsys, "--help", "ctl")
    assert code == 0 and re.search(r"│ train ", out) and re.search(r"│ ctl ", out)


def test_training_without_a_terminal_logs_its_epochs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The progress bar draws nothing without a terminal: a first run's `make demo` trained for minutes with
    nothing in its log after `training` (a new user's pass). An `epoch` line comes every EPOCH_LOG_S."""
    import io

    from rich.console import Console
    from structlog.testing import capture_logs

    from models.train import EpochStats
    from monitor.commands import render

    monkeypatch.setattr(render, "console", Console(file=io.StringIO(), force_terminal=False))  # FORCE_COLOR, -s
    monkeypatch.setattr(render, "EPOCH_LOG_S", 0.0)
    with capture_logs() as logged, render.epoch_progress(3, "train lstm") as on_epoch:
        for e in (1, 2, 3):
            on_epoch(EpochStats(e, 3, 0.5 / e, 0.4 / e, 0.4 / e, 1.0))
    epochs = [r for r in logged if r["event"] == "epoch"]
    assert [(r["epoch"], r["epochs"], r["val_loss"]) for r in epochs] == [(1, 3, 0.4), (2, 3, 0.2), (3, 3, 0.13333)]
    monkeypatch.setattr(render, "EPOCH_LOG_S", 3600.0)
    with capture_logs() as logged, render.epoch_progress(3, "train lstm") as on_epoch:
        on_epoch(EpochStats(1, 3, 0.5, 0.4, 0.4, 1.0))
    assert not [r for r in logged if r["event"] == "epoch"]  # not more often than that
