"""Series files, windows and splits; the vendored ECG5000."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.data import load_ecg5000, make_windows, read_series, series_dataset, suspect_stamps
from models.errors import ArtifactError, DataError
from models.train import TrainConfig
from models.workflow import spec_for_eval, train_detector
from tests.conftest import synthetic_series


def test_windows_are_aligned_to_their_last_sample() -> None:
    v = np.arange(10, dtype="float32")[:, None]
    w, ends = make_windows(v, 4, 3)
    assert w.shape == (3, 4, 1) and ends.tolist() == [3, 6, 9]
    assert w[1, :, 0].tolist() == [3, 4, 5, 6]


def test_read_csv_and_parquet_agree(tmp_path: Path) -> None:
    df = synthetic_series(500)
    df.to_csv(tmp_path / "s.csv", index=False)
    df.to_parquet(tmp_path / "s.parquet")
    a, b = read_series(tmp_path / "s.csv"), read_series(tmp_path / "s.parquet")
    assert a.channels == b.channels == ["ch0", "ch1"]
    np.testing.assert_allclose(a.values, b.values)
    assert a.labels is not None and a.labels.sum() == 0  # anomalies start after 500
    assert a.timestamps is not None and a.timestamps[0] == np.datetime64("2024-01-01T00:00:00")


def test_a_header_with_spaces_and_rows_ending_in_a_delimiter_read_as_written(tmp_path: Path) -> None:
    """Two silent misreads (the models review): "timestamp, temp, label" made " label" a channel (the anomalies
    trained on as normal, the file then "unlabelled") and " timestamp" too; a delimiter ending each data row made
    pandas take the first column for the index and shift every name (timestamps read from a channel). A row with
    a value past the header is an error, not a column dropped. Names given for such a file are stripped too."""
    rows = [f"{1_700_000_000_000 + 1000 * i}, {np.sin(i / 5):.4f}, {int(50 <= i < 60)}" for i in range(100)]
    spaced = tmp_path / "spaced.csv"
    spaced.write_text(" timestamp, temp, label\n" + "\n".join(rows) + "\n")
    s = read_series(spaced)
    assert s.channels == ["temp"] and s.timestamps is not None and s.labels is not None and s.labels.sum() == 10
    named = read_series(spaced, value_cols=[" temp"], timestamp_col=" timestamp", label_col="label ")
    assert named.channels == ["temp"] and named.labels is not None and (named.values == s.values).all()
    trailing = tmp_path / "trailing.csv"
    trailing.write_text("timestamp,a,sample\n" + "\n".join(f"{1_700_000_000_000 + i},{i / 10},{i}," for i in range(50)))
    t = read_series(trailing)
    assert t.channels == ["a"] and t.values[3, 0] == pytest.approx(0.3) and t.timestamps is not None
    upper = tmp_path / "upper.csv"  # only a column named exactly `sample` (a row number) is left out
    upper.write_text("Sample\n" + "\n".join(str(i % 7) for i in range(50)) + "\n")
    assert read_series(upper).channels == ["Sample"]
    longer = tmp_path / "longer.csv"
    longer.write_text("timestamp,a\n1700000000000,0.1,9\n1700000000001,0.2\n")
    with pytest.raises(DataError, match="longer.csv: some rows hold more fields than the header"):
        read_series(longer)


def test_epoch_ms_timestamps(tmp_path: Path) -> None:
    pd.DataFrame({"ts": [1_700_000_000_000, 1_700_000_001_000], "v": [1.0, 2.0]}).to_csv(tmp_path / "e.csv", index=False)
    s = read_series(tmp_path / "e.csv")
    assert s.channels == ["v"] and str(s.timestamps[1]).startswith("2023-11-14T22:13:21")


def test_offsets_that_change_at_summer_time_are_read_in_utc(tmp_path: Path) -> None:
    """A file crossing a daylight-saving change (+01:00 rows, then +02:00 rows) failed: mixed time zones."""
    stamps = ["2024-03-31T01:59:00+01:00", "2024-03-31T03:00:00+02:00", "2024-03-31T03:01:00+02:00"]
    pd.DataFrame({"time": stamps, "v": [1.0, 2.0, 3.0]}).to_csv(tmp_path / "dst.csv", index=False)
    s = read_series(tmp_path / "dst.csv")
    assert s.timestamps is not None
    assert [str(t)[:19] for t in s.timestamps] == ["2024-03-31T00:59:00", "2024-03-31T01:00:00", "2024-03-31T01:01:00"]


@pytest.mark.parametrize("out_of_order", ["error", "drop"])
def test_a_row_without_a_timestamp_is_an_error_naming_it(tmp_path: Path, out_of_order: str) -> None:
    """With --out-of-order drop an empty timestamp dropped every later row (4 000 → 700, 'dropped: 0' in score);
    without it the error blamed a row that "repeats or goes back"."""
    df = synthetic_series(1000)
    df["timestamp"] = pd.date_range("2024-01-01", periods=1000, freq="s").astype(str)
    df.loc[700, "timestamp"] = None
    df.to_csv(tmp_path / "hole.csv", index=False)
    with pytest.raises(DataError, match=r"row 700 has no timestamp"):
        read_series(tmp_path / "hole.csv", out_of_order=out_of_order)


def test_nan_windows_are_dropped_and_counted(tmp_path: Path) -> None:
    df = synthetic_series(2000)
    df.loc[100, "ch1"] = np.nan
    df.loc[200, "ch0"] = np.inf
    df.to_csv(tmp_path / "n.csv", index=False)
    ds = series_dataset(read_series(tmp_path / "n.csv"), window=40, hop=10)
    assert ds.summary["dropped_nonfinite"] == 8  # 4 windows cover each bad sample
    assert ds.summary["test_windows_dropped_nonfinite"] == 0
    df.loc[1800, "ch0"] = np.nan  # in the test part, and in a labelled window: counted apart (eval reports it)
    df.loc[1800, "label"] = 1
    df.to_csv(tmp_path / "n.csv", index=False)
    ds = series_dataset(read_series(tmp_path / "n.csv"), window=40, hop=10)
    assert (ds.summary["test_windows_dropped_nonfinite"], ds.summary["test_anomalies_dropped_nonfinite"]) == (4, 4)
    assert np.isfinite(ds.train).all() and np.isfinite(ds.val).all() and np.isfinite(ds.test).all()


def test_split_is_chronological_and_trains_on_normal_windows_only(series_csv: Path) -> None:
    ds = series_dataset(read_series(series_csv), window=40, hop=10, train_fraction=0.7)
    assert ds.summary["split_sample"] == 2800
    assert ds.test_ends is not None and ds.test_ends.min() >= 2800
    # the anomaly at 2600 lies in the training part: its windows are excluded from training
    assert ds.summary["train"] + ds.summary["val"] < (2800 - 40) // 10 + 1


def test_the_summary_names_where_the_validation_windows_start(tmp_path: Path) -> None:
    pd.DataFrame({"v": np.arange(1000.0)}).to_csv(tmp_path / "s.csv", index=False)
    ds = series_dataset(read_series(tmp_path / "s.csv"), window=40, hop=10, train_fraction=0.5)
    # 47 windows end before sample 500 (39, 49, …, 499); the last round(0.2 × 47) = 9 validate, the first of
    # them is window 38: samples 380 … 419. Training windows end before it: 35 (the last, 340 … 379); windows
    # 35–37 shared samples with it and trained the model whose validation errors set the threshold
    assert (ds.summary["train"], ds.summary["val"], ds.summary["train_dropped_overlapping"]) == (35, 9, 3)
    assert ds.summary["val_start_sample"] == 380 and ds.val[0, 0, 0] == 380.0 and ds.train[-1, -1, 0] == 379.0


@pytest.mark.parametrize("content, message", [
    ("a,b\nx,y\n", "not numeric"),
    ("timestamp,label\n2024-01-01,0\n", "no value columns"),
    ("v,label\n1.0,2\n", "only 0 and 1"),
    ("", "cannot read"),
])
def test_bad_files_give_clear_errors(tmp_path: Path, content: str, message: str) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(DataError, match=message):
        read_series(p)


def test_missing_file_and_column(tmp_path: Path, series_csv: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_series(tmp_path / "none.csv")
    with pytest.raises(DataError, match="'zz' not found"):
        read_series(series_csv, ["zz"])


def test_ecg5000_protocols() -> None:
    classic = load_ecg5000("classic")
    assert classic.train.shape == (2335, 140, 1) and len(classic.val) == 291
    assert len(classic.test) == 2374 and classic.test_labels.sum() == 2081
    ucr = load_ecg5000("ucr")
    assert len(ucr.test) == 4500 and len(ucr.train) + len(ucr.val) == 292
    with pytest.raises(DataError, match="protocol"):
        load_ecg5000("random")


def test_label_as_value_and_unsorted_timestamps_are_refused(tmp_path: Path, series_csv: Path) -> None:
    with pytest.raises(DataError, match="timestamp/label"):
        read_series(series_csv, ["label"])
    df = synthetic_series(100)
    df.iloc[::-1].to_csv(tmp_path / "rev.csv", index=False)
    with pytest.raises(DataError, match="strictly increase"):
        read_series(tmp_path / "rev.csv")


def test_a_beat_window_whose_peak_was_decided_across_a_gap_is_set_aside() -> None:
    """A review: with pre under the rule's lookahead, a beat window just after a gap holds none, but its R peak was
    decided on samples before it; the daemon, restarted at the gap, never cuts that window, and offline scored it."""
    from models.beats import BeatRule
    from models.data import gap_windows

    rule = BeatRule(window=200, pre=20, refractory=40, baseline=30, level=0.0)  # lookahead 70
    stamps = (np.arange(1000) * 5 + np.where(np.arange(1000) >= 300, 60_000, 0)).astype("datetime64[ms]")
    ends = np.array([100 + 199, 300 + 199, 350 + 199])  # windows from 100, 300 and 350: none holds the gap itself
    assert not gap_windows(stamps, ends, 200, 1000.0)[0].any()
    held, longest = gap_windows(stamps, ends, 200, 1000.0, rule.to_dict())
    assert held.tolist() == [False, True, False] and longest == pytest.approx(60.005)  # 300 + 20 − 70 < 300
    late = BeatRule(window=200, pre=190, refractory=40, baseline=30, level=0.0)  # 9 samples after the peak
    assert gap_windows(stamps, np.array([238, 250]), 200, 1000.0, late.to_dict())[0].tolist() == [False, True]


def test_windows_that_hold_a_gap_are_set_aside(tmp_path: Path) -> None:
    """Found by the ML user pass: windows cut across gaps in the timestamps, which the daemon never scores, were
    trained on and scored offline without a word. They are set aside and counted (the CLI warns: windows_span_gaps)."""
    from models.data import gap_windows, series_dataset

    def spanning(stamps: np.ndarray | None, ends: np.ndarray, window: int) -> tuple[int, float]:
        held, longest = gap_windows(stamps, ends, window)
        assert held.shape == ends.shape
        return int(held.sum()), longest

    stamps = (np.arange(100) * 1000 + np.where(np.arange(100) >= 50, 10_000, 0)).astype("datetime64[ms]")
    ends = np.arange(9, 100, 5)  # window 10, hop 5: only the window of samples 45..54 holds the 11 s interval
    assert spanning(stamps.astype("datetime64[ns]"), ends, 10) == (1, 11.0)
    assert gap_windows(stamps.astype("datetime64[ns]"), ends, 10)[0][9]  # (ends[9] = 54)
    assert spanning(None, ends, 10) == (0, 0.0)
    assert spanning(np.arange(100).astype("datetime64[s]").astype("datetime64[ns]"), ends, 10) == (0, 0.0)
    # review: 4 s at 1 Hz is no gap to replay-eval or the daemon (5 s), and a longer gap after the last window is
    # held by none
    jittered = (np.arange(100) * 1000 + np.where(np.arange(100) >= 50, 3000, 0)
                + np.where(np.arange(100) >= 99, 60_000, 0)).astype("datetime64[ms]").astype("datetime64[ns]")
    assert spanning(jittered, np.arange(9, 95, 5), 10) == (0, 0.0)
    tail = (np.arange(100) * 1000 + np.where(np.arange(100) >= 50, 10_000, 0)
            + np.where(np.arange(100) >= 99, 60_000, 0)).astype("datetime64[ms]").astype("datetime64[ns]")
    assert spanning(tail, np.arange(9, 95, 5), 10) == (1, 11.0)  # not the 61 s one past the last window
    df = synthetic_series(400)
    df.to_csv(tmp_path / "even.csv", index=False)
    even = series_dataset(read_series(tmp_path / "even.csv"), 40, 10)
    for at, where in ((100, "train"), (300, "test")):
        gapped = df.assign(timestamp=pd.to_datetime(df["timestamp"])
                           + pd.to_timedelta(np.where(df.index >= at, 3600, 0), "s"))
        gapped.to_csv(tmp_path / "gap.csv", index=False)
        ds = series_dataset(read_series(tmp_path / "gap.csv"), 40, 10)
        assert ds.summary["windows_spanning_gaps"] == 3 and ds.summary["longest_gap_s"] > 3600, where  # 3 hold it
        held = [at + 9, at + 19, at + 29]  # the ends of the windows that hold the interval before sample `at`
        values = read_series(tmp_path / "gap.csv").values
        if where == "train":  # none of them trained on (they are not validation windows either, the part's end)
            assert len(ds.train) == len(even.train) - 3
            for end in held:  # (the training windows are normalised later: here they are the file's values)
                assert not (ds.train == values[end - 39 : end + 1]).all(axis=(1, 2)).any(), end
        else:  # nor tested: the daemon never scores them
            assert len(ds.test) == len(even.test) - 3 and not np.isin(held, ds.test_ends).any()
            assert ds.summary["test_windows_spanning_gaps"] == 3
            # a NaN in a window that also holds the gap is counted once, as NaN (review: the counts added up to 20
            # windows of 17), and the events' span still starts at the test part's first window
            nan = gapped.assign(ch0=np.where(gapped.index == 325, np.nan, gapped["ch0"]))  # in 1 of the 3
            nan.to_csv(tmp_path / "nan.csv", index=False)
            s = series_dataset(read_series(tmp_path / "nan.csv"), 40, 10).summary
            after = sum(1 for e in range(39, 400, 10) if e - 39 >= 200)
            assert (s["test_windows_dropped_nonfinite"], s["test_windows_spanning_gaps"]) == (4, 2)
            assert s["test"] + s["test_windows_dropped_nonfinite"] + s["test_windows_spanning_gaps"] == after
            assert s["test_span"] == [200, 399]  # windows 200..239 to 360..399


def test_a_value_past_float32_reads_as_inf_without_numpys_warning(tmp_path: Path) -> None:
    """Found by the ML user pass: 1e39 printed numpy's raw overflow warning (a line of pandas source) beside the
    structured warning of the windows it drops (under pytest's filterwarnings = error, raised)."""
    df = synthetic_series(100)
    df.loc[10, "ch0"] = 1e39
    df.to_csv(tmp_path / "big.csv", index=False)
    values = read_series(tmp_path / "big.csv").values
    assert np.isinf(values[10, 0]) and np.isfinite(np.delete(values, 10, axis=0)).all()


def test_a_second_label_or_timestamp_column_is_not_taken_as_a_channel(tmp_path: Path) -> None:
    """Found by the ML user pass: with both ``label`` and ``is_anomaly``, the second became a channel (the answer fed
    to the model), and so did a second timestamp column; the channels must then be named."""
    df = synthetic_series(100)
    df.assign(is_anomaly=df["label"]).to_csv(tmp_path / "two.csv", index=False)
    with pytest.raises(DataError, match=r"\['is_anomaly'\] look like a label or a timestamp .* --value-col"):
        read_series(tmp_path / "two.csv")
    assert read_series(tmp_path / "two.csv", ["ch0", "ch1"]).channels == ["ch0", "ch1"]  # named: fine
    df.assign(ts=range(100)).to_csv(tmp_path / "ts.csv", index=False)
    with pytest.raises(DataError, match=r"\['ts'\]"):
        read_series(tmp_path / "ts.csv")


def test_drop_skips_a_far_future_typo_and_a_resent_block_not_the_rows_after_them(tmp_path: Path) -> None:
    df = synthetic_series(400, anomalies=(150, 350))
    typo = df.copy()
    typo.loc[100, "timestamp"] = pd.Timestamp("2204-01-01")  # one stamp typed two centuries ahead
    resent = pd.concat([typo.iloc[:300], typo.iloc[250:260], typo.iloc[300:]])  # ten rows sent again
    resent.to_csv(tmp_path / "s.csv", index=False)
    s = read_series(tmp_path / "s.csv", out_of_order="drop")
    assert s.dropped_out_of_order == 11  # the typo and the ten copies; against the running maximum: 309
    assert s.labels is not None and s.labels.sum() == df["label"].sum() == 60  # the labelled bursts later on are kept
    assert s.rows is not None and s.rows[99:101].tolist() == [99, 101]  # file rows: the typo's is the one skipped
    assert s.rows[297:300].tolist() == [298, 299, 310]  # the copies (file rows 300-309) skipped


def test_numeric_timestamps_in_another_unit_are_refused_or_doubted(tmp_path: Path) -> None:
    df = synthetic_series(200)
    df["timestamp"] = 1_704_067_200_000_000 + np.arange(200) * 1_000_000  # epoch microseconds
    df.to_csv(tmp_path / "us.csv", index=False)
    with pytest.raises(DataError, match="row 0: 1704067200000000 is not epoch milliseconds .*microseconds or nano"):
        read_series(tmp_path / "us.csv")  # read as ms: year 55 969, wrapped into 2190 silently
    arrow = df.assign(timestamp=pd.array(df["timestamp"], dtype="int64[pyarrow]"))  # Parquet can give these back
    arrow.to_parquet(tmp_path / "us.parquet")
    with pytest.raises(DataError, match="row 0: 1704067200000000 is not epoch milliseconds"):
        read_series(tmp_path / "us.parquet")
    df["timestamp"] = 1_704_067_200 + np.arange(200)  # epoch seconds
    df.to_csv(tmp_path / "s.csv", index=False)
    assert "epoch seconds" in (suspect_stamps(read_series(tmp_path / "s.csv")) or "")
    df["timestamp"] = 1_704_067_200_000 + np.arange(200) * 1000  # epoch milliseconds: fine
    df.to_csv(tmp_path / "ms.csv", index=False)
    assert suspect_stamps(read_series(tmp_path / "ms.csv")) is None
    df["timestamp"] = pd.date_range("1985-01-01", periods=200, freq="s")  # dates written out: taken as they are
    df.to_csv(tmp_path / "iso.csv", index=False)
    assert suspect_stamps(read_series(tmp_path / "iso.csv")) is None


def test_a_windows_file_that_labels_nothing_is_an_error(tmp_path: Path) -> None:
    df = synthetic_series(300).drop(columns="label")
    df.to_csv(tmp_path / "s.csv", index=False)
    (tmp_path / "w.json").write_text('[["2030-01-01T00:00:00", "2030-01-02T00:00:00"]]')
    with pytest.raises(DataError, match=r"none of the 1 anomaly window.* 2030-01-01T00:00:00 .. 2030-01-02T00:00:00, "
                                        r"the series 2024-01-01T00:00:00 .. 2024-01-01T00:04:59"):
        read_series(tmp_path / "s.csv", windows=tmp_path / "w.json")
    (tmp_path / "w.json").write_text('[["2024-01-01T00:01:00", "2024-01-01T00:01:09"]]')
    assert read_series(tmp_path / "s.csv", windows=tmp_path / "w.json").labels.sum() == 10
    (tmp_path / "w.json").write_text("[]")  # no anomaly in this series: all normal
    assert read_series(tmp_path / "s.csv", windows=tmp_path / "w.json").labels.sum() == 0


def test_nab_windows_label_a_compressed_or_parquet_copy_of_the_series(tmp_path: Path) -> None:
    """NAB's combined_windows.json entry was picked by the data file's full name: nyc_taxi.csv.gz or
    nyc_taxi.parquet found no entry for realKnownCause/nyc_taxi.csv ("has no entries"), and could not be labelled.
    Two entries for the series, or none, are still an error."""
    import json

    df = synthetic_series(300).drop(columns="label")
    windows = tmp_path / "combined_windows.json"
    windows.write_text(json.dumps({"realKnownCause/nyc_taxi.csv": [["2024-01-01T00:01:00", "2024-01-01T00:01:09"]],
                                   "realKnownCause/nyc_taxi_2.csv": [], "other/ec2.csv": []}))
    df.to_csv(tmp_path / "nyc_taxi.csv", index=False)
    plain = read_series(tmp_path / "nyc_taxi.csv", windows=windows).labels
    assert plain is not None and plain.sum() == 10
    for name in ("nyc_taxi.csv.gz", "nyc_taxi.CSV.BZ2", "nyc_taxi.csv.xz"):
        df.to_csv(tmp_path / name, index=False, compression={".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}[
            Path(name.lower()).suffix])
        assert np.array_equal(read_series(tmp_path / name, windows=windows).labels, plain), name
    df.to_parquet(tmp_path / "nyc_taxi.parquet")
    assert np.array_equal(read_series(tmp_path / "nyc_taxi.parquet", windows=windows).labels, plain)
    df.to_csv(tmp_path / "nyc.csv.gz", index=False)
    with pytest.raises(DataError, match="has no entries for 'nyc.csv.gz'"):
        read_series(tmp_path / "nyc.csv.gz", windows=windows)
    windows.write_text(json.dumps({"a/nyc_taxi.csv": [], "b/nyc_taxi.parquet": []}))
    with pytest.raises(DataError, match="has several entries for 'nyc_taxi.csv.gz'"):
        read_series(tmp_path / "nyc_taxi.csv.gz", windows=windows)


def test_files_as_other_tools_write_them(tmp_path: Path) -> None:
    import decimal

    df = synthetic_series(300, anomalies=(100,))
    # a timestamp index (set_index, then to_parquet): it was invisible — no order check, no timestamps
    df.iloc[[20, 10]] = df.iloc[[10, 20]].to_numpy()
    df.set_index("timestamp").to_parquet(tmp_path / "idx.parquet")
    with pytest.raises(DataError, match="strictly increase"):
        read_series(tmp_path / "idx.parquet")
    df = synthetic_series(300, anomalies=(100,))
    df[df["ch0"] > -2].to_parquet(tmp_path / "rows.parquet")  # a filtered frame's row numbers: no channel
    assert read_series(tmp_path / "rows.parquet").channels == ["ch0", "ch1"]
    df.set_index("timestamp").rename_axis(None).to_parquet(tmp_path / "unnamed.parquet")  # an unnamed time index
    s = read_series(tmp_path / "unnamed.parquet")
    assert s.channels == ["ch0", "ch1"] and s.timestamps is not None  # (it was a channel of epoch nanoseconds)
    df.assign(seen=df["timestamp"]).to_parquet(tmp_path / "dt.parquet")  # a datetime column is no number
    with pytest.raises(DataError, match="'seen' is not numeric"):
        read_series(tmp_path / "dt.parquet")
    df.to_csv(tmp_path / "i.csv")  # pandas' index written too, as "Unnamed: 0"
    assert read_series(tmp_path / "i.csv").channels == ["ch0", "ch1"]  # the row counter was a channel
    df[["ch0"]].to_csv(tmp_path / "noheader.csv", index=False, header=False)
    with pytest.raises(DataError, match="needs a header row"):
        read_series(tmp_path / "noheader.csv")  # its first sample was the column's name
    pd.DataFrame(df[["ch0", "ch1"]].to_numpy()).to_csv(tmp_path / "numbered.csv", index=False)  # header "0,1"
    assert read_series(tmp_path / "numbered.csv").channels == ["0", "1"]
    (tmp_path / "counts.csv").write_text("0\n5\n3\n7\n")  # one headerless column starting at 0
    with pytest.raises(DataError, match="needs a header row"):
        read_series(tmp_path / "counts.csv")
    (tmp_path / "two.csv").write_text("0.5,0.5\n1,1\n2,2\n")  # headerless, first row repeats a value
    with pytest.raises(DataError, match="needs a header row"):
        read_series(tmp_path / "two.csv")  # (pandas named its columns 0.5 and 0.5.1: no longer all numbers)
    df[["timestamp", "ch0", "ch1"]].rename(columns={"ch1": "ch0"}).to_csv(tmp_path / "dup.csv.gz", index=False)
    with pytest.raises(DataError, match=r"names column\(s\) \['ch0'\] more than once"):
        read_series(tmp_path / "dup.csv.gz")  # it was two channels, ch0 and ch0.1
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table([df["ch0"], df["ch1"]], names=["ch0", "ch0"]), tmp_path / "dup.parquet")
    with pytest.raises(DataError, match=r"dup\.parquet: the header names column\(s\) \['ch0'\] more than once"):
        read_series(tmp_path / "dup.parquet")  # pyarrow's "Multiple matches for FieldRef.Name(ch0) in …"
    (tmp_path / "blank.csv").write_text(",,ch0\n" + "".join(f"{i},{i},{i % 7}\n" for i in range(50)))
    assert read_series(tmp_path / "blank.csv").channels == ["ch0"]  # two blank names (Unnamed: 0, 1) are no repeat:
    # a leading run of them is a pandas index of two levels; an empty column after a trailing delimiter is none
    (tmp_path / "trail.csv").write_text("ch0,ch1,\n" + "".join(f"{i},{i % 7},\n" for i in range(50)))
    assert read_series(tmp_path / "trail.csv").channels == ["ch0", "ch1"]
    (tmp_path / "pipe.csv").write_text("flow|lpm\n" + "".join(f"{i % 7}.5\n" for i in range(50)))
    assert read_series(tmp_path / "pipe.csv").channels == ["flow|lpm"]  # one channel of that name: not a delimiter
    (tmp_path / "gap.csv").write_text("ch0,,ch1\n" + "".join(f"{i},{i % 5},{i % 7}\n" for i in range(50)))
    with pytest.raises(DataError, match=r"column\(s\) 2 have no name in the header"):  # a channel without a name
        read_series(tmp_path / "gap.csv")
    assert read_series(tmp_path / "gap.csv", value_cols=["ch0", "ch1"]).channels == ["ch0", "ch1"]
    pd.DataFrame(df[["ch0"]].to_numpy()).to_parquet(tmp_path / "zero.parquet")  # Parquet's names are names
    assert read_series(tmp_path / "zero.parquet").channels == ["0"]
    df.assign(ch0=df["ch0"].round(4).astype(str)).to_parquet(tmp_path / "text.parquet")  # numbers stored as text
    assert read_series(tmp_path / "text.parquet").values[:, 0] == pytest.approx(df["ch0"].round(4), abs=1e-6)
    df.assign(ch0=[decimal.Decimal(str(round(v, 4))) for v in df["ch0"]]).to_parquet(tmp_path / "dec.parquet")
    assert read_series(tmp_path / "dec.parquet").values[:, 0] == pytest.approx(df["ch0"].round(4), abs=1e-6)
    for suffix, how in ((".csv.GZ", "gzip"), (".csv.bz2", "bz2"), (".csv.xz", "xz")):
        df.to_csv(tmp_path / f"c{suffix}", index=False, compression=how)
        assert read_series(tmp_path / f"c{suffix}").labels.sum() == 30


def test_no_normal_training_windows_is_explained(tmp_path: Path) -> None:
    df = synthetic_series(300)
    df["label"] = 1
    df.to_csv(tmp_path / "all.csv", index=False)
    with pytest.raises(DataError, match="0 normal training window"):
        series_dataset(read_series(tmp_path / "all.csv"), window=40, hop=10)


def test_eval_takes_a_files_columns_by_the_models_names_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    """A file without the model's names was evaluated by position (a warning, then full metrics on whatever
    columns came first), where README and `tsmon score` say a missing name is an error."""
    from models.workflow import load_dataset

    manifest = {"window": 8, "hop": 2, "channels": ["temp", "rpm"], "training": {"data": {"value_cols": []}}}
    named, other = tmp_path / "named.csv", tmp_path / "other.csv"
    named.write_text("timestamp,rpm,extra,temp\n1,2,3,4\n")
    other.write_text("timestamp,x,y\n1,2,3\n")
    assert spec_for_eval(manifest, str(named), None).value_cols == ("temp", "rpm")
    with pytest.raises(DataError, match="'temp' not found"):
        load_dataset(spec_for_eval(manifest, str(other), None))


def test_eval_cuts_a_models_windows_by_its_windowing_not_its_training_summary(tmp_path: Path) -> None:
    """A beat model whose training summary has no `align` (replay-eval saved its `baseline-pca` so) was evaluated on
    sliding windows every `hop` samples, not the beat windows its `windowing` (score, inspect, the daemon) cuts:
    other windows, other metrics (ROC-AUC 0.92 instead of 1.0), without a word. A summary that says another
    alignment than the windowing is an error, as before."""
    from models.beats import BeatRule

    rule = BeatRule(window=80, pre=48, refractory=16, baseline=12, level=0.3).to_dict()
    manifest = {"window": 80, "hop": 100, "channels": ["lead"], "windowing": rule,
                "training": {"data": {"value_cols": ["lead"]}}}  # no align
    (tmp_path / "ecg.csv").write_text("lead\n0\n")
    spec = spec_for_eval(manifest, str(tmp_path / "ecg.csv"), None)
    assert (spec.align, spec.rule, spec.beat()) == ("beats", rule, rule)
    sliding = {**manifest, "windowing": {"kind": "sliding"}, "hop": 20}
    assert spec_for_eval(sliding, str(tmp_path / "ecg.csv"), None).beat() is None
    assert spec_for_eval({k: v for k, v in sliding.items() if k != "windowing"}, str(tmp_path / "ecg.csv"),
                         None).beat() is None  # an artifact from before beat windows
    with pytest.raises(ArtifactError, match="align is sliding but the windowing is"):
        spec_for_eval({**manifest, "training": {"data": {"align": "sliding"}}}, str(tmp_path / "ecg.csv"), None)


def test_eval_reads_the_columns_training_used_else_the_usual_names(tmp_path: Path) -> None:
    """README (tsmon eval): "The labels and timestamps are read from the columns training used, else the usual
    names". A model trained with --timestamp-col event_time --label-col fault, evaluated on a file with
    timestamp/label, failed: "timestamp column 'event_time' not found" (tsmon score took the same file). The
    columns training used come first; a --label-col given to eval is still strict."""
    from models.workflow import load_dataset

    df = synthetic_series(600, anomalies=(520,))
    manifest = {"window": 20, "hop": 5, "channels": ["ch0", "ch1"],
                "training": {"data": {"timestamp_col": "event_time", "label_col": "fault", "train_fraction": 0.5}}}
    usual, own = tmp_path / "usual.csv", tmp_path / "own.csv"
    df.to_csv(usual, index=False)
    df.rename(columns={"timestamp": "event_time", "label": "fault"}).assign(label=0).to_csv(own, index=False)
    assert load_dataset(spec_for_eval(manifest, str(usual), None)).test_labels.sum() > 0
    assert load_dataset(spec_for_eval(manifest, str(own), None)).test_labels.sum() > 0  # fault, not label (all 0)
    with pytest.raises(DataError, match="label column 'fault' not found"):  # named here: strict
        load_dataset(spec_for_eval(manifest, str(usual), None, label_col="fault"))


def test_a_model_that_reconstructs_its_validation_windows_exactly_is_refused(tmp_path: Path) -> None:
    # its threshold would be 0: saved, then refused by every command that loads it
    path = tmp_path / "constant.csv"
    pd.DataFrame({"timestamp": np.arange(400) * 1000, "a": np.zeros(400), "b": np.ones(400)}).to_csv(path, index=False)
    ds = series_dataset(read_series(path), window=16, hop=4)
    with pytest.raises(DataError, match="reconstructs the validation windows exactly"):
        train_detector(ds, "pca", {}, TrainConfig(device="cpu"))


def test_test_windows_lie_wholly_after_the_split(tmp_path: Path) -> None:
    """Windows ending after the split were test, reaching back into the samples the model was fitted,
    stopped and thresholded on: an anomaly wholly before the split counted as a test detection."""
    from models.data import Series

    values = np.sin(np.arange(3000) / 5.0)[:, None].astype("float32")
    labels = np.zeros(3000, "int8")
    labels[1975:1986] = 1  # before the split at 2000
    ds = series_dataset(Series(values, ["v"], labels=labels), window=40, hop=10, train_fraction=2 / 3)
    assert ds.summary["split_sample"] == 2000
    starts = ds.test_ends - 40 + 1
    assert starts.min() >= 2000 and ds.test_labels is not None and ds.test_labels.sum() == 0


def test_eval_with_every_anomalous_test_window_set_aside_says_so_naming_the_file(tmp_path: Path) -> None:
    """A model CLI pass: the only labelled event sat in windows across a gap; eval stopped with "evaluation needs
    both normal and anomalous examples", naming neither the file nor why."""
    from models.workflow import evaluate

    df = synthetic_series(1200, anomalies=(1000,))
    df["timestamp"] = pd.to_datetime(df["timestamp"]) + pd.to_timedelta(np.where(df.index >= 1015, 3600, 0), "s")
    df.to_csv(tmp_path / "gapev.csv", index=False)
    ds = series_dataset(read_series(tmp_path / "gapev.csv"), 40, 10)
    assert ds.summary["test_anomalies_spanning_gaps"] > 0 and ds.test_labels is not None
    det, _ = train_detector(ds, "pca", {}, TrainConfig(device="cpu"))
    if ds.test_labels.any():  # the burst's windows after the gap hold it too: keep only those set aside
        ds.test_labels[:] = 0
    with pytest.raises(DataError, match=r"gapev\.csv: no anomalous test window left to rank \(\d+ set aside: across"):
        evaluate(det, ds)


def test_a_threshold_margin_that_overflows_is_named_not_taken_for_nan_reconstructions(tmp_path: Path) -> None:
    """`--threshold-margin 1e308` said "the model reconstructs the validation windows as NaN (constant data?)"."""
    df = synthetic_series(1200)
    df[["ch0", "ch1"]] *= 1000  # unscaled: validation errors far above 1
    df.to_csv(tmp_path / "m.csv", index=False)
    ds = series_dataset(read_series(tmp_path / "m.csv"), 40, 10)
    with pytest.raises(DataError, match="margin 1e\\+308, overflows float32 .scores never reach it.: give a smaller"):
        train_detector(ds, "pca", {}, TrainConfig(device="cpu"), threshold_margin=1e308, normalisation="none")


def test_a_label_that_is_not_0_or_1_is_named_with_its_row(tmp_path: Path) -> None:
    """The timestamp and value errors name the row; the label's said only "must hold only 0 and 1"."""
    path = tmp_path / "s.csv"
    path.write_text("timestamp,value,label\n1,0.1,0\n2,0.2,1\n3,0.3,\n4,0.4,0\n")
    with pytest.raises(DataError, match=r"label column 'label' must hold only 0 and 1 \(row 2: nan\)$"):
        read_series(path, labels_wanted=True)


def test_a_timestamp_column_of_another_name_is_not_taken_for_a_channel(tmp_path: Path) -> None:
    """A pipeline owner's pass: a file whose timestamp column was `event_time` trained a model with event_time as a
    channel (the only warning: extreme values), and the daemon dead-lettered every live message a channel short."""
    n = 50
    ms = 1_796_636_000_000 + 100 * np.arange(n)
    path = tmp_path / "s.csv"
    pd.DataFrame({"event_time": ms, "temp": np.sin(np.arange(n)), "count": np.arange(n)}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"column 'event_time' holds rising epoch milliseconds but would be read as "
                                        r"a channel: a timestamp\? give --timestamp-col event_time"):
        read_series(path)
    assert read_series(path, timestamp_col="event_time").channels == ["temp", "count"]  # a counter stays a channel
    assert read_series(path, value_cols=["temp"]).channels == ["temp"]
    falling = pd.DataFrame({"big": np.array([3e11, 2e11, 5e11], "uint64"), "temp": [0.0, 1.0, 2.0]})
    falling.to_csv(path, index=False)  # (as unsigned integers a fall wrapped round to a rise: a review)
    assert read_series(path).channels == ["big", "temp"]
    from models.data import _epoch_ms_rising

    assert not _epoch_ms_rising(falling["big"]) and _epoch_ms_rising(pd.Series(np.array(ms, "uint64")))
    iso = pd.to_datetime(ms, unit="ms", utc=True).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    pd.DataFrame({"event_time": iso, "temp": np.sin(np.arange(n))}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"value column 'event_time' is not numeric .*: a timestamp\? give "
                                        r"--timestamp-col event_time"):
        read_series(path)
    pd.DataFrame({"site": ["north"] * n, "temp": np.sin(np.arange(n))}).to_csv(path, index=False)
    with pytest.raises(DataError, match="not numeric") as text:
        read_series(path)
    assert "--timestamp-col" not in str(text.value)


def test_the_validation_windows_the_threshold_comes_from_hold_no_labelled_sample() -> None:
    """The threshold is the validation errors' quantile: a labelled (anomalous) sample in a validation or training
    window would raise it. Values are the sample numbers, so each window says which samples it holds."""
    from models.data import Series

    values = np.arange(3000, dtype="float32")[:, None]
    labels = np.zeros(3000, "int8")
    labels[1300:1320] = 1  # among the validation windows (samples 1200-1499: the last 20 % of those before 1500)
    labels[700:730] = 1  # and among the training windows
    ds = series_dataset(Series(values, ["v"], labels=labels), window=40, hop=10, train_fraction=0.5)
    for part in (ds.train, ds.val):
        held = part[:, :, 0].astype("int64")
        assert len(held) and not labels[held].any()
    assert ds.val[:, 0, 0].min() < 1300 < ds.val[:, -1, 0].max()  # the validation windows do span the first burst
