"""Hostile files and options for the offline commands (train / eval / score / inspect), from a review of them: each
ended in a traceback, a misleading line, or a silent loss (every test failed before its fix)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from models.data import read_series
from monitor.cli import main
from tests.conftest import synthetic_series
from tests.test_monitor.test_cli import _said, run  # an exception out of main() fails the test as it is


def one_line_error(code: int, err: str) -> str:
    """The error line, asserting the rule: exit 1, no traceback, one non-log line 'ErrorType: message'."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("{") and "━" not in ln]
    assert "Traceback" not in err, err[-600:]
    assert code == 1, (code, err[-600:])
    assert len(lines) == 1 and re.match(r"^\w+Error: ", lines[0]), lines
    return lines[0]


@pytest.fixture(scope="module")
def csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rev") / "s.csv"
    synthetic_series(n=800).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def pca(csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rev") / "pca"
    with pytest.raises(SystemExit) as done:
        main(["--log-format", "json", "train", "--data", str(csv), "--model", "pca", "--window", "20", "--hop", "5",
              "--out", str(out), "--device", "cpu"])
    assert done.value.code == 0
    return out


def _edited(pca: Path, tmp_path: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    art = tmp_path / "art"
    art.mkdir()
    for f in pca.iterdir():
        (art / f.name).write_bytes(f.read_bytes())
    m = json.loads((art / "manifest.json").read_text())
    edit(m)
    (art / "manifest.json").write_text(json.dumps(m))
    return art


@pytest.mark.parametrize("key", ["timestamp_col", "label_col"])
def test_eval_with_a_hand_edited_non_string_column_name_in_training_data_is_one_line(
        pca: Path, csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str) -> None:
    """manifest training.data.timestamp_col = 5 → AttributeError: 'int' object has no attribute 'strip'
    (models/data.py read_series, c.strip()), a traceback, not the one-line ArtifactError README promises for a data
    summary eval cannot use."""
    art = _edited(pca, tmp_path, lambda m: m["training"]["data"].__setitem__(key, 5))
    code, _, err = run(capsys, "eval", "--model", str(art), "--data", str(csv), "--json")
    line = one_line_error(code, err)
    assert line.startswith("ArtifactError: ") and key in line


def _loop(tmp_path: Path, name: str) -> Path:
    a, b = tmp_path / name, tmp_path / f"{name}.other"
    a.symlink_to(b)
    b.symlink_to(a)
    return a


def test_score_input_that_is_a_symlink_loop_is_one_line(pca: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`tsmon score --input LOOP` → RuntimeError: Symlink loop from ... (Path.resolve in model_cmds.score), a
    traceback. train/eval/inspect --data LOOP say 'data file not found' in one line."""
    code, _, err = run(capsys, "score", "--model", str(pca), "--input", str(_loop(tmp_path, "in.csv")),
                       "--output", str(tmp_path / "s.csv"))
    one_line_error(code, err)


def test_score_output_that_is_a_symlink_loop_is_one_line(pca: Path, csv: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "score", "--model", str(pca), "--input", str(csv),
                       "--output", str(_loop(tmp_path, "out.csv")))
    one_line_error(code, err)


def test_train_out_that_is_a_symlink_loop_is_refused_before_training(csv: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """README: `--out` is checked before training. A symlink loop passes check_writable (os.path.realpath does not
    raise, .exists() is False), the model trains, and then the save ends in `OSError: [Errno 17] File exists`."""
    code, _, err = run(capsys, "train", "--data", str(csv), "--model", "pca", "--window", "20",
                       "--out", str(_loop(tmp_path, "art")), "--device", "cpu")
    assert '"event": "training"' not in err, "trained before refusing --out: " + err.splitlines()[-1]
    line = one_line_error(code, err)
    assert line.startswith("DataError: "), line


def test_a_negative_window_is_blamed_on_window_not_on_hop(csv: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`tsmon train --window -5` (no --hop) says 'Invalid value for --hop: at most --window (-5)': the hop check
    (hop 0 > window -5) runs before the window is checked, and names an option the user never gave."""
    code, _, err = run(capsys, "train", "--data", str(csv), "--model", "pca", "--window", "-5",
                       "--out", str(tmp_path / "a"), "--device", "cpu")
    said = _said(err)
    assert code in (1, 2)
    assert "--hop" not in said, said
    assert "window" in said


ALERT = {"alert_id": "a1", "stream": "s", "severity": "warning", "ratio": 2.5,
         "explain": {"version": 1, "start_ts": 0, "end_ts": 3, "window": 4, "step": 1, "channels": ["a"],
                     "values": [[1, 2, 3, 4]], "reconstruction": [[1, 2, 3, 4]],
                     "timestep_error": [0.1, 0.2, 0.3, 0.4], "channel_error": [0.25], "score": 0.25,
                     "threshold": 0.1}}
BIG = "1" + "0" * 400  # a JSON integer past float64


@pytest.mark.parametrize("key, raw", [
    ("channel_error", "[[0.25]]"),  # TypeError: unsupported format string passed to list.__format__ (explain._fmt)
    ("channel_vs_usual", "[[1.0]]"),  # TypeError in explain._contribution's labels
    ("channel_error", f"[{BIG}]"),  # OverflowError: int too large to convert to float (explain._array)
    ("threshold", BIG),  # OverflowError in explain._fmt
])
def test_inspect_alert_file_with_malformed_numbers_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               key: str, raw: str) -> None:
    """explain.check validates lengths, not that each element is a finite-convertible scalar; _array catches
    TypeError/ValueError but not OverflowError and accepts nested lists."""
    text = json.dumps(ALERT).replace(f'"{key}": [0.25]', f'"{key}": {raw}').replace('"threshold": 0.1',
                                                                                   f'"threshold": {raw}'
                                                                                   if key == "threshold"
                                                                                   else '"threshold": 0.1')
    if key == "channel_vs_usual":
        doc = json.loads(json.dumps(ALERT))
        doc["explain"]["channel_vs_usual"] = [[1.0]]
        text = json.dumps(doc)
    path = tmp_path / "alert.json"
    path.write_text(text)
    code, _, err = run(capsys, "inspect", "--alert", str(path), "--out", str(tmp_path / "a.png"))
    one_line_error(code, err)


def test_a_data_column_with_a_blank_header_cell_is_not_silently_dropped(csv: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`timestamp,ch0,,label`: pandas names the blank cell 'Unnamed: 2' and models/data.py _value_columns drops
    every 'Unnamed: …' column (meant for to_csv's index in column 0): the model trains on ch0 alone, exit 0, no
    word. It should be an error (or at least a warning) naming the column without a name."""
    text = csv.read_text().replace("timestamp,ch0,ch1,label", "timestamp,ch0,,label", 1)
    data = tmp_path / "blank.csv"
    data.write_text(text)
    out = tmp_path / "art"
    code, _, err = run(capsys, "train", "--data", str(data), "--model", "pca", "--window", "20", "--out", str(out),
                       "--device", "cpu")
    if code == 0:
        channels = json.loads((out / "manifest.json").read_text())["channels"]
        assert "Unnamed" in err, f"trained on {channels}, the unnamed column dropped without a warning"
    else:
        assert "Unnamed: 2" in one_line_error(code, err) or "name" in one_line_error(code, err)


@pytest.mark.parametrize("sep", [";", "\t"])
def test_a_csv_with_another_delimiter_is_said_so(csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 sep: str) -> None:
    """A European export `timestamp;temp;rpm;label` says "value column 'timestamp;ch0;ch1;label' is not numeric":
    one line, but about a column that does not exist rather than the delimiter (pd.read_csv without sep=None)."""
    data = tmp_path / "semi.csv"
    data.write_text(csv.read_text().replace(",", sep))
    code, _, err = run(capsys, "train", "--data", str(data), "--model", "pca", "--window", "20",
                       "--out", str(tmp_path / "a"), "--device", "cpu")
    line = one_line_error(code, err)
    assert re.search(r"delimit|separat", line), line


def test_a_parquet_multiindex_keeps_its_timestamp_and_label_levels(csv: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`df.set_index(["timestamp", "label"]).to_parquet(...)`: models/data.py _index_as_column tests
    `df.index.name`, which is None for a MultiIndex, and drops the whole index (reset_index(drop=True)). The
    labels vanish — the labelled anomalies are trained on as normal, exit 0 — and so do the timestamps (no order or
    gap check, no timestamp in scores). A single named index is a column (README, *Your series*); so should each
    named level be."""

    df = synthetic_series(n=800, anomalies=(200,))  # labelled samples 200..229, in the training part
    data = tmp_path / "multi.parquet"
    df.set_index(["timestamp", "label"]).to_parquet(data)
    out = tmp_path / "art"
    code, _, err = run(capsys, "train", "--data", str(data), "--model", "pca", "--window", "20", "--hop", "5",
                       "--out", str(out), "--device", "cpu")
    assert code == 0, err[-400:]
    summary = json.loads((out / "manifest.json").read_text())["training"]["data"]
    plain = tmp_path / "plain.parquet"
    df.to_parquet(plain)
    code, _, err = run(capsys, "train", "--data", str(plain), "--model", "pca", "--window", "20", "--hop", "5",
                       "--out", str(tmp_path / "ref"), "--device", "cpu")
    ref = json.loads((tmp_path / "ref" / "manifest.json").read_text())["training"]["data"]
    assert (summary["train"], summary["val"]) == (ref["train"], ref["val"]), (summary, ref)
    assert summary["timestamp_col"] == ref["timestamp_col"] and summary["label_col"] == ref["label_col"]
    # an unnamed datetime level beside a named one: the timestamps were dropped with it (noticed in a closing note)
    unnamed = tmp_path / "unnamed.parquet"
    df.set_index(["timestamp", "label"]).rename_axis([None, "label"]).to_parquet(unnamed)
    series = read_series(unnamed)
    assert series.timestamps is not None and series.labels is not None and series.channels == ["ch0", "ch1"]
    assert (series.timestamps == read_series(plain).timestamps).all()
    # but a frame with a time column of its own keeps it (a review: that file no longer loaded)
    own = df.rename(columns={"timestamp": "time"})
    own.index = pd.MultiIndex.from_arrays([pd.date_range("2023-01-01", periods=len(df), freq="min"), df["label"]],
                                          names=[None, "label"])
    own.drop(columns="label").to_parquet(tmp_path / "own.parquet")
    for kw in ({}, {"timestamp_col": "time"}):
        series = read_series(tmp_path / "own.parquet", **kw)
        assert series.channels == ["ch0", "ch1"] and series.labels is not None
        assert (series.timestamps == read_series(plain).timestamps).all()


DEEP = "[" * 5000 + "]" * 5000  # nested past Python's recursion limit


def test_a_deeply_nested_windows_file_is_one_line(csv: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """models/data.py anomaly_windows catches ValueError around json.loads, not RecursionError: a traceback (the
    manifest loader catches it: README *Artifacts*)."""
    windows = tmp_path / "w.json"
    windows.write_text(DEEP)
    data = tmp_path / "nolabel.csv"
    data.write_text("\n".join(",".join(r.split(",")[:3]) for r in csv.read_text().splitlines()))
    code, _, err = run(capsys, "train", "--data", str(data), "--windows", str(windows), "--model", "pca",
                       "--window", "20", "--out", str(tmp_path / "a"), "--device", "cpu")
    one_line_error(code, err)


def test_a_deeply_nested_alert_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """monitor/commands/model_cmds.py _alert_from_file catches json.JSONDecodeError only."""
    path = tmp_path / "alert.json"
    path.write_text(DEEP)
    code, _, err = run(capsys, "inspect", "--alert", str(path), "--out", str(tmp_path / "a.png"))
    one_line_error(code, err)


def test_a_deeply_nested_param_is_one_line(csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """monitor/commands/model_cmds.py parse_params catches json.JSONDecodeError only."""
    code, _, err = run(capsys, "train", "--data", str(csv), "--model", "dense", "--window", "20", "--epochs", "1",
                       "--param", f"hidden={DEEP}", "--out", str(tmp_path / "a"), "--device", "cpu")
    one_line_error(code, err)
