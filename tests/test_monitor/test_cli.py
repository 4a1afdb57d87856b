"""CLI smoke tests: each command end to end on small data, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from monitor.cli import main

EVAL_KEYS = {"roc_auc", "pr_auc", "accuracy", "precision", "recall", "f1", "threshold", "balanced_accuracy", "baseline"}
BENCH_KEYS = {"batch1_windows_per_s", "batched_windows_per_s", "batch_size", "ratio", "model_gflops", "gemm_gflops",
              "efficiency"}


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


def test_eval_table(dense_artifact: Path, series_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "eval", "--model", str(dense_artifact), "--data", str(series_csv))
    assert code == 0 and "PCA baseline" in out and "ROC-AUC" in out and "event recall" in out


def test_score_writes_one_row_per_window(dense_artifact: Path, series_csv: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scores.csv"
    code, _, _ = run(capsys, "score", "--model", str(dense_artifact), "--input", str(series_csv), "--output", str(out))
    assert code == 0
    df = pd.read_csv(out)
    assert list(df.columns[:4]) == ["timestamp", "score", "threshold", "is_anomaly"]
    assert len(df) == (4000 - 40) // 10 + 1
    assert df["timestamp"].iloc[0] == "2024-01-01 00:00:39"  # aligned to the window's last sample
    burst = df[(df["timestamp"] >= "2024-01-01 00:55:00") & (df["timestamp"] <= "2024-01-01 00:55:40")]
    assert burst["is_anomaly"].all() and (burst["error_ch0"] > burst["error_ch1"]).all()


def test_inspect_writes_a_png(dense_artifact: Path, series_csv: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "w.png"
    code, _, _ = run(capsys, "inspect", "--model", str(dense_artifact), "--data", str(series_csv), "--index", "262",
                     "--out", str(png))
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_scorer_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "bench", "scorer", "--kind", "dense", "--seconds", "0.2", "--batch-size", "64", "--json")
    assert code == 0
    r = json.loads(out)
    assert BENCH_KEYS <= set(r) and r["batch_size"] == 64 and r["efficiency"] > 0


@pytest.mark.parametrize("args, expected", [
    (["eval", "--model", "/nonexistent/model"], "ArtifactError: model artifact not found"),
    (["train", "--data", "/nonexistent.csv", "--out", "/tmp/x"], "DataError: data file not found"),
    (["train", "--model", "transformer", "--out", "/tmp/x"], "ModelConfigError: unknown model kind"),
    (["train", "--data", "ecg5000", "--protocol", "random", "--out", "/tmp/x"], "DataError: unknown ECG5000 protocol"),
])
def test_errors_are_one_line(capsys: pytest.CaptureFixture[str], args: list[str], expected: str) -> None:
    code, _, err = run(capsys, *args)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith(expected)
    assert "Traceback" not in err


def test_eval_refuses_another_protocol(dense_artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "eval", "--model", str(dense_artifact), "--data", "ecg5000")
    assert code == 1 and "not trained on ecg5000" in err


def test_score_with_wrong_channels(dense_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "one.csv"
    pd.DataFrame({"v": range(100)}).to_csv(p, index=False)
    code, _, err = run(capsys, "score", "--model", str(dense_artifact), "--input", str(p), "--output", str(tmp_path / "o.csv"))
    assert code == 1 and "DataError: model expects 2 channel(s)" in err


def test_module_entry_point_and_version() -> None:
    r = subprocess.run([sys.executable, "-m", "monitor", "--version"], capture_output=True, text=True, check=True)
    assert r.stdout.startswith("tsmon ")
    r = subprocess.run([sys.executable, "-m", "monitor", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("train", "eval", "score", "inspect", "bench", "demo"):
        assert cmd in r.stdout
