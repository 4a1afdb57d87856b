"""Datasets for training and evaluation: the vendored ECG5000 and any CSV/Parquet series.

A :class:`Dataset` is already cut into windows ``[n, window, channels]`` and split into normal training
windows, normal validation windows (for the threshold) and labelled test windows. Series are split
chronologically; windows with NaN/inf are dropped and counted, never scored.
"""

from __future__ import annotations

import bisect
import decimal
import gzip
import hashlib
import io
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import structlog

from models import beats
from models.errors import DataError, short_repr
from models.files import read_limited

ECG5000_SHA256 = {
    "ECG5000_TRAIN.tsv.gz": "df86ac15d7e283e731db6be7865f5004b65bc639014cb8b9753c26e24a9092a1",
    "ECG5000_TEST.tsv.gz": "0192997dd1793880633bfb34ae3ad5129c09a8e0f210c469225451b92cdd8548",
}
PROTOCOLS = ("classic", "ucr")
ECG5000_WINDOW = 140  # samples per beat
TIMESTAMP_NAMES = ("timestamp", "ts", "time", "date", "datetime")
LABEL_NAMES = ("label", "is_anomaly", "anomaly")
MAX_WINDOWS_BYTES = 64 << 20  # a list of labelled windows (NAB's, all 58 series: 30 kB)


@dataclass(frozen=True)
class Series:
    """A multichannel series read from a file: values ``[samples, channels]`` plus optional columns."""

    values: np.ndarray
    channels: list[str]
    timestamps: np.ndarray | None = None  # datetime64[ns] or None (then the row index is the time)
    labels: np.ndarray | None = None  # int8 0/1 per sample
    sha256: str = ""
    path: str = ""
    dropped_out_of_order: int = 0  # rows skipped because their timestamp repeated or went back
    rows: np.ndarray | None = None  # file row of each sample when rows were skipped (else sample i is row i)
    numeric_stamps: bool = False  # the timestamps were numbers, read as epoch milliseconds
    windows_sha256: str = ""  # of the labels a windows file gave it
    timestamp_col: str | None = None  # the columns read (replay-eval's baseline records them, as train does)
    label_col: str | None = None


@dataclass(frozen=True)
class Dataset:
    """Windows split for training (normal), validation (normal) and test (labelled)."""

    name: str
    window: int
    hop: int
    channels: list[str]
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray | None
    summary: dict[str, Any] = field(default_factory=dict)
    series: Series | None = None  # set for file data
    test_ends: np.ndarray | None = None  # index of each test window's last sample in ``series``
    windowing: dict[str, Any] = field(default_factory=lambda: {"kind": "sliding"})  # see models.beats
    test_positions: np.ndarray | None = None  # each test window's place among all the series' windows (NaN ones too)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _ecg5000_table(name: str) -> np.ndarray:
    raw = (resources.files("models") / "datasets" / "ecg5000" / name).read_bytes()
    data = gzip.decompress(raw)
    if sha256_bytes(data) != ECG5000_SHA256[name]:
        raise DataError(f"vendored ECG5000 file {name} is corrupt (sha256 mismatch); reinstall tsmon")
    return pd.read_csv(io.BytesIO(data), sep="\t", header=None).to_numpy("float32")


def load_ecg5000(protocol: str = "classic", seed: int = 42) -> Dataset:
    """ECG5000 beats as 140-sample windows; class 1 is normal, every other class an anomaly.

    ``classic``: TRAIN+TEST merged, normal beats split 80/10/10 (train/val/test) with ``seed``, every
    abnormal beat in test. ``ucr``: normal beats of TRAIN split 80/20 (train/val), test = all of TEST.
    """
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown ECG5000 protocol {protocol!r}: use {' or '.join(PROTOCOLS)}")
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    tr, te = _ecg5000_table("ECG5000_TRAIN.tsv.gz"), _ecg5000_table("ECG5000_TEST.tsv.gz")
    rng = np.random.default_rng(seed)
    if protocol == "classic":
        both = np.concatenate([tr, te])
        normal, abnormal = both[both[:, 0] == 1, 1:], both[both[:, 0] != 1, 1:]
        idx = rng.permutation(len(normal))
        n_tr, n_va = int(0.8 * len(normal)), int(0.1 * len(normal))
        train, val = normal[idx[:n_tr]], normal[idx[n_tr : n_tr + n_va]]
        test = np.concatenate([normal[idx[n_tr + n_va :]], abnormal])
        labels = np.r_[np.zeros(len(normal) - n_tr - n_va), np.ones(len(abnormal))]
    else:
        normal = tr[tr[:, 0] == 1, 1:]
        idx = rng.permutation(len(normal))
        n_tr = int(0.8 * len(normal))
        train, val = normal[idx[:n_tr]], normal[idx[n_tr:]]
        test, labels = te[:, 1:], (te[:, 0] != 1).astype("float64")
    summary = {"source": "ecg5000", "sha256": dict(ECG5000_SHA256), "protocol": protocol, "seed": seed, "train": len(train),
               "val": len(val), "test": len(test), "test_anomalies": int(labels.sum())}
    return Dataset("ecg5000", ECG5000_WINDOW, ECG5000_WINDOW, ["ecg"], train[..., None], val[..., None], test[..., None],
                   labels.astype("int8"), summary)


def _pick(columns: list[str], wanted: str | None, names: tuple[str, ...], what: str) -> str | None:
    if wanted:
        if wanted not in columns:
            raise DataError(f"{what} column {wanted!r} not found; columns are {columns} (--{what}-col names another)")
        return wanted
    return next((c for c in columns if c.lower() in names), None)


MAX_EPOCH_MS = 9_223_372_036_854  # datetime64[ns]'s range (years 1677-2262) in epoch milliseconds
SUSPECT_BEFORE = np.datetime64("1990-01-01", "ns")  # numeric stamps earlier than this: another unit, or relative time


def suspect_stamps(series: Series) -> str | None:
    """Why the series' numeric timestamps look like another unit than epoch milliseconds, or None.

    Epoch seconds read as milliseconds fall in January 1970: the file was accepted, scores were stamped 1970 and a
    windows file of real dates labelled nothing.
    """
    t = series.timestamps
    if t is None or not series.numeric_stamps or not len(t) or t.max() >= SUSPECT_BEFORE:
        return None
    return (f"its numeric timestamps read as epoch milliseconds end at {np.datetime_as_string(t.max(), 's')}Z: "
            "epoch seconds, or time since the start? (multiply seconds by 1000)")


def increasing_rows(t: np.ndarray) -> np.ndarray:
    """Keep-mask of the fewest rows to drop so that ``t`` strictly increases (a longest increasing subsequence,
    O(n log n)); of equal choices the earliest rows are kept (a resent block loses its copy, a repeat its second).

    Against the running maximum, one stamp typed far in the future made every later row "go back": half a file
    was dropped, silently.

    >>> np.flatnonzero(increasing_rows(np.array([1, 2, 1000, 3, 4, 2, 5]))).tolist()
    [0, 1, 3, 4, 6]
    """
    s = (-t[::-1]).tolist()  # increasing in t, earliest first = increasing in the reversed, negated series
    tails: list[int] = []
    tail_at: list[int] = []
    prev = [-1] * len(s)
    for i, v in enumerate(s):
        k = bisect.bisect_left(tails, v)
        if k == len(tails):
            tails.append(v)
            tail_at.append(i)
        else:
            tails[k], tail_at[k] = v, i
        prev[i] = tail_at[k - 1] if k else -1
    keep = np.zeros(len(s), dtype=bool)
    i = tail_at[-1] if tail_at else -1
    while i >= 0:
        keep[len(s) - 1 - i] = True
        i = prev[i]
    return keep


COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zip": "zip", ".xz": "xz", ".zst": "zstd"}
PARQUET = (".parquet", ".pq")


def _index_as_column(df: pd.DataFrame) -> pd.DataFrame:
    """A Parquet file's index as a column when it is data: a named one (``set_index("ts")``), or a datetime one (as
    ``timestamp`` when unnamed) — invisible before, a timestamp index got no order check and no timestamps. Another
    unnamed index (the row numbers of a filtered frame) is dropped: it is no channel. Each named level of a
    MultiIndex is a column too (``set_index(["timestamp", "label"])`` lost both: its anomalies trained on as normal)."""
    if isinstance(df.index, pd.DatetimeIndex) and df.index.name is None and "timestamp" not in df.columns:
        return df.rename_axis("timestamp").reset_index()
    stamped = any(str(c).lower() in TIMESTAMP_NAMES or pd.api.types.is_datetime64_any_dtype(df[c]) for c in df.columns)
    if isinstance(df.index, pd.MultiIndex) and not stamped and "timestamp" not in df.index.names:
        names = list(df.index.names)  # an unnamed datetime level beside named ones is the timestamp too (dropped),
        # unless the frame has times of its own (an ingestion time in the index then broke a file that loaded)
        unnamed = [i for i, n in enumerate(names) if n is None and isinstance(df.index.levels[i], pd.DatetimeIndex)]
        if len(unnamed) == 1:
            names[unnamed[0]] = "timestamp"
            df = df.rename_axis(names)
    named = [n for n in df.index.names if n is not None and n not in df.columns]
    if named:
        return df.reset_index(level=named).reset_index(drop=True)
    return df.reset_index(drop=True)


def _all_of(col: pd.Series, kind: type) -> bool:
    """Is ``col`` a column of ``kind`` values (and nulls)?"""
    values = col.dropna()
    return bool(len(values)) and all(isinstance(v, kind) for v in values)


def _is_number(name: str) -> bool:
    try:
        float(name)
    except ValueError:
        return False
    return True


def _iso_stamps(col: pd.Series) -> pd.Series:
    """ISO-8601 stamps in UTC, parsed as one format first (6× faster than "mixed", which held ~500 MB more for five
    million rows), row by row where a file mixes formats or offsets."""
    try:
        return pd.to_datetime(col, format="ISO8601", utc=True)
    except (ValueError, TypeError):
        return pd.to_datetime(col, format="mixed", utc=True)


def _csv_header(raw: bytes, compression: str | None) -> list[str]:
    """A CSV's first row as written (``pd.read_csv`` reads a repeated name as ``name.1``)."""
    first = pd.read_csv(io.BytesIO(raw), compression=compression, header=None, nrows=1, dtype=str,
                        keep_default_na=False)
    return [str(c) for c in first.iloc[0]]


def read_series(path: str | Path, value_cols: list[str] | None = None, timestamp_col: str | None = None,
                label_col: str | None = None, windows: str | Path | None = None,
                out_of_order: str = "error", labels_wanted: bool = True,
                preferred_timestamp: str | None = None, model_channels: Sequence[str] | None = None,
                preferred_label: str | None = None) -> Series:
    """Read a CSV (optionally gzipped) or Parquet file: optional timestamp and 0/1 label, value columns.

    ``windows``: a JSON file of labelled anomaly windows (see :func:`anomaly_windows`) that gives the labels
    instead of a label column. Rows whose timestamp repeats or goes back (``out_of_order``): ``error``,
    ``drop`` (counted in ``Series.dropped_out_of_order``), or ``keep`` (replay-eval: the daemon dead-letters
    them, as it would in production). ``labels_wanted=False``: no label column is looked for (scoring a
    file whose label column is partly empty must not fail on it). ``preferred_timestamp``: the timestamp column
    when no ``timestamp_col`` is given and the file has it (a model's, for scoring), else the usual names;
    ``preferred_label`` likewise for the label column (a model's, for evaluating).
    ``model_channels``: the value columns are a model's channels, not named by the user (a missing one is said so,
    with the option that maps the file's columns to them).
    """
    if out_of_order not in ("error", "drop", "keep"):
        raise DataError(f"out_of_order must be error, drop or keep, not {out_of_order!r}")
    p = Path(path)
    df, raw = _read_frame(p)
    if p.suffix.lower() not in PARQUET:  # a CSV's names are read without the spaces around them: so are these
        timestamp_col, label_col, preferred_timestamp, preferred_label = (
            c.strip() if isinstance(c, str) else c for c in (timestamp_col, label_col, preferred_timestamp, preferred_label))
        value_cols = [c.strip() for c in value_cols] if value_cols else value_cols
    cols = list(df.columns)
    ts = _pick(cols, timestamp_col or (preferred_timestamp if preferred_timestamp in cols else None),
               TIMESTAMP_NAMES, "timestamp")
    lab = _pick(cols, label_col or (preferred_label if preferred_label in cols else None), LABEL_NAMES,
                "label") if labels_wanted else None
    values = _value_columns(p, df, value_cols, ts, lab, model_channels)
    labels = None
    if lab is not None:
        lv = pd.to_numeric(df[lab], errors="coerce")
        if not (ok := lv.isin([0, 1])).all():  # the row named, as for the other columns
            row = int(np.flatnonzero(~ok.to_numpy())[0])
            raise DataError(f"{p}: label column {lab!r} must hold only 0 and 1 "
                            f"(row {row}: {short_repr(df[lab].iloc[row : row + 1].tolist()[0])})")
        labels = lv.to_numpy("int8")
    dropped, rows, labels_sha = 0, None, ""
    stamps, numeric = None, ts is not None and pd.api.types.is_numeric_dtype(df[ts])
    if ts is not None:
        stamps = _stamps(p, df[ts], ts, numeric)
        back = np.flatnonzero(np.diff(stamps.astype("int64")) <= 0)
        if len(back) and out_of_order == "error":
            i = int(back[0]) + 1
            raise DataError(f"{p}: timestamps must strictly increase (row {i} repeats or goes back); sort the "
                            f"file, or drop such rows with --out-of-order drop")
        if len(back) and out_of_order == "drop":
            keep = increasing_rows(stamps.astype("int64"))
            dropped, rows = int((~keep).sum()), np.flatnonzero(keep)
            df, stamps = df[keep], stamps[keep]
            labels = labels[keep] if labels is not None else None
    if windows is not None:
        if labels is not None:
            raise DataError(f"{p}: give the labels once: a label column ({lab!r}) or a windows file, not both")
        if stamps is None:
            raise DataError(f"{p}: anomaly windows are timestamps, so the file needs a timestamp column")
        labels, labels_sha = _labels_of_windows(p, windows, stamps)
    with np.errstate(over="ignore"):  # values past float32 become inf, dropped and counted with the NaN windows
        data = df[values].to_numpy("float32")  # (numpy's overflow warning printed a raw line of pandas source)
    return Series(data, values, stamps, labels, sha256_bytes(raw), str(p), dropped, rows, numeric, labels_sha, ts, lab)


def _read_frame(p: Path) -> tuple[pd.DataFrame, bytes]:
    """The file as a frame with string column names, and its bytes; a header that is numbers or repeats a name is
    an error."""
    if not p.exists():
        raise DataError(f"data file not found: {p}")
    if not p.is_file():
        raise DataError(f"{p} is not a file")
    raw = p.read_bytes()
    suffix = p.suffix.lower()
    parquet = suffix in PARQUET
    try:
        if parquet:  # a name twice: pyarrow's "Multiple matches for FieldRef.Name(ch0) in timestamp: large_string"
            _refuse_repeats(p, _parquet_names(raw))
            df = _index_as_column(pd.read_parquet(io.BytesIO(raw)))
        else:  # from bytes pandas infers no compression: by the suffix, whatever its case
            with warnings.catch_warnings():  # rows longer than the header: an error, not pandas' warning
                warnings.simplefilter("error", pd.errors.ParserWarning)
                # no index column: with a delimiter ending each data row pandas took the first column for the index
                # and shifted every name one column (timestamps read from the first channel)
                df = pd.read_csv(io.BytesIO(raw), compression=COMPRESSION.get(suffix), index_col=False)
    except pd.errors.ParserWarning:
        raise DataError(f"cannot read {p}: some rows hold more fields than the header names columns") from None
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - pandas raises many types for unreadable files
        what = f" (compressed: {COMPRESSION[suffix]})" if suffix in COMPRESSION else ""
        raise DataError(f"cannot read {p}{what}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    if df.empty:
        raise DataError(f"{p} has no rows")
    head = str(df.columns[0])
    if not parquet and len(df.columns) == 1 and (sep := next((c for c in ";\t|" if c in head), None)) is not None \
            and sep in str(df.iloc[0, 0]):  # (a channel named "flow|lpm" alone is a name, its rows numbers)
        # (it was "value column 'timestamp;temp;label' is not numeric": about a column that does not exist)
        raise DataError(f"{p}: one column, {short_repr(head)}: separated by {sep!r}? tsmon reads comma-separated files")
    # a CSV's "timestamp, temp, label": " label" was read as a channel (Parquet's names are as written)
    cols = [str(c) if parquet else str(c).strip() for c in df.columns]
    df.columns = cols
    # a CSV's first row taken for names (Parquet's names are never data); pandas' own 0, 1, … are names — of two
    # columns at least: a headerless one-column file of counts starting at 0 lost its first row
    header = cols if parquet else [c.strip() for c in _csv_header(raw, COMPRESSION.get(suffix))]  # as written:
    # pandas renames repeats
    if not parquet and all(_is_number(c) for c in header) \
            and (len(header) < 2 or header != [str(i) for i in range(len(header))]):
        raise DataError(f"{p}: its first row {header[:4]} is numbers, not column names: the file needs a header row")
    _refuse_repeats(p, header)  # read as temp and temp.1: two channels, one a name no one wrote
    return df, raw


def _parquet_names(raw: bytes) -> list[str]:
    """The column names a Parquet file's schema holds, as written."""
    import pyarrow.parquet as pq

    return list(pq.read_schema(io.BytesIO(raw)).names)


def _refuse_repeats(p: Path, header: list[str]) -> None:
    """A DataError when a column name is written more than once (blank ones aside: pandas' Unnamed: n)."""
    repeated = sorted({c for c in header if c and header.count(c) > 1})
    if repeated:
        raise DataError(f"{p}: the header names column(s) {repeated} more than once: rename them")


def _value_columns(p: Path, df: pd.DataFrame, value_cols: list[str] | None, ts: str | None, lab: str | None,
                   model_channels: Sequence[str] | None) -> list[str]:
    """The channels' columns (named, or every other one), checked, and made numbers in ``df`` where they are
    numbers stored otherwise (Parquet decimals or strings)."""
    cols = list(df.columns)
    # a pandas index written with to_csv ("Unnamed: 0", the row number, first) is no channel: named, it is taken
    lead = next((i for i, c in enumerate(cols) if not str(c).startswith("Unnamed: ")), len(cols))  # index levels
    unnamed = [c for c in cols[lead:] if str(c).startswith("Unnamed: ") and df[c].notna().any()] if not value_cols else []
    if unnamed:  # a blank header cell after a named column, over data, is a column without a name: it was dropped,
        # a channel gone without a word (a leading run is a pandas index, an empty one a trailing delimiter)
        raise DataError(f"{p}: column(s) {', '.join(str(1 + cols.index(c)) for c in unnamed)} have no name in the "
                        f"header: name them, or choose the channels with --value-col")
    values = value_cols or [c for c in cols if c not in (ts, lab) and c != "sample" and not c.startswith("Unnamed: ")]
    if not values:
        raise DataError(f"{p}: no value columns (columns are {cols})")
    named_like = [c for c in values if c.lower() in LABEL_NAMES + TIMESTAMP_NAMES] if not value_cols else []
    if named_like:  # a second label column (label and is_anomaly) became a channel: the answer fed to the model
        raise DataError(f"{p}: column(s) {named_like} look like a label or a timestamp but would be read as channels "
                        f"(label {lab!r}, timestamp {ts!r}): name the channels with --value-col")
    if len(set(values)) != len(values) or set(values) & {ts, lab}:
        raise DataError(f"{p}: value columns {values} repeat a column or include the timestamp/label column")
    for c in values:
        if c not in cols:
            if model_channels is not None:  # "value column" read as one the user had named
                raise DataError(f"{p}: no column {c!r}, a channel of the model (its channels: {list(model_channels)}); "
                                f"columns are {cols}: give the file's columns for them with --value-col, in the "
                                "model's order")
            raise DataError(f"{p}: value column {c!r} not found; columns are {cols}")
        if not pd.api.types.is_numeric_dtype(df[c]):
            if df[c].dtype == object and _all_of(df[c], decimal.Decimal):  # Parquet decimals (SQL exports): numbers, not text (datetimes, bools stay refused)
                df[c] = df[c].astype("float64")
                continue
            number = pd.to_numeric(df[c], errors="coerce")
            bad = df[c][number.isna() & df[c].notna()]
            if not len(bad) and _all_of(df[c], str):  # numbers stored as text (Parquet strings): read as numbers
                df[c] = number.astype("float64")
                continue
            example = bad.iloc[0] if len(bad) else df[c].iloc[0]
            hint = _timestamp_hint(c) if ts is None and not value_cols and _iso_dates(df[c]) else ""
            raise DataError(f"{p}: value column {c!r} is not numeric (row {bad.index[0] if len(bad) else 0}: "
                            f"{short_repr(example)}){hint}")
    if ts is None and not value_cols:  # a timestamp column of another name was a channel (a pipeline owner's pass:
        # event_time trained on, the warning about outliers, and every live message dead-lettered, a channel short)
        stamps = [c for c in values if _epoch_ms_rising(df[c]) and c not in (model_channels or ())]
        if stamps:
            raise DataError(f"{p}: column {stamps[0]!r} holds rising epoch milliseconds but would be read as a "
                            f"channel{_timestamp_hint(stamps[0])}")
    return values


def _timestamp_hint(column: str) -> str:
    return f": a timestamp? give --timestamp-col {column} (or name the channels with --value-col)"


def _epoch_ms_rising(col: pd.Series) -> bool:
    """Integers of epoch milliseconds (1973 to 5138), strictly rising: a timestamp column, not a measurement."""
    if not pd.api.types.is_integer_dtype(col) or len(col) < 2:
        return False
    v = col.to_numpy()  # compared, not subtracted: a fall in unsigned integers wrapped round to a rise (a review)
    return bool(v.min() >= 100_000_000_000 and v.max() < 100_000_000_000_000 and (v[1:] > v[:-1]).all())


def _iso_dates(col: pd.Series) -> bool:
    """Its first values all read as dates (ISO 8601 and the like)."""
    head = col.dropna().head(20).astype(str)
    if head.empty or head.str.fullmatch(r"[-+0-9.eE ]+").all():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(pd.to_datetime(head, errors="coerce", utc=True, format="mixed").notna().all())


def _stamps(p: Path, col: pd.Series, ts: str, numeric: bool) -> np.ndarray:
    """The timestamp column as UTC ``datetime64[ns]``: epoch milliseconds when numbers, else ISO-8601."""
    if numeric and not col.isna().all():
        far = col[(col.abs() > MAX_EPOCH_MS) & col.notna()]  # epoch µs or ns read as ms: year 55 969 wrapped
        if len(far):  # round int64 nanoseconds into an invented date, silently
            first = far.iloc[0]  # a numpy scalar (shown as np.int64(…)), or a Python number from a pyarrow column
            first = first.item() if isinstance(first, np.generic) else first
            raise DataError(f"{p}: timestamp column {ts!r} row {far.index[0]}: {first!r} is not epoch "
                            f"milliseconds (past year 2262: microseconds or nanoseconds?)")
    try:  # in UTC: naive stamps are taken as UTC, offsets converted row by row (they change at summer time)
        stamps = (pd.to_datetime(col, unit="ms") if numeric else _iso_stamps(col)).to_numpy("datetime64[ns]")
    except (ValueError, TypeError, OverflowError) as exc:
        raise DataError(f"{p}: timestamp column {ts!r} is not epoch-ms or ISO-8601: {exc}") from None
    if np.isnat(stamps).any():  # NaT compares false with everything: --out-of-order drop lost every later row
        i = int(np.flatnonzero(np.isnat(stamps))[0])
        raise DataError(f"{p}: row {i} has no timestamp (column {ts!r} is empty there)")
    return stamps


def _labels_of_windows(p: Path, windows: str | Path, stamps: np.ndarray) -> tuple[np.ndarray, str]:
    """Per-sample labels from a windows file, and their hash (what eval compares with training's)."""
    spans = anomaly_windows(windows, p.name)
    labels = window_labels(stamps, spans)
    if spans and not labels.any():  # another zone, unit or series: anomalies trained on as normal, silently
        iso = lambda t: np.datetime_as_string(np.datetime64(t, "s"))
        raise DataError(f"{p}: none of the {len(spans)} anomaly window(s) of {windows} holds a sample: they span "
                        f"{iso(min(a for a, _ in spans))} .. {iso(max(b for _, b in spans))}, the series "
                        f"{iso(stamps[0])} .. {iso(stamps[-1])} (UTC)")
    t = stamps.astype("datetime64[ns]")
    empty = [(a, b) for a, b in spans if not ((t >= a) & (t <= b)).any()]
    if empty:  # between two samples (a window shorter than the sample period): an event no score can see, dropped
        structlog.get_logger("tsmon.data").warning(  # without a word (an event count one short)
            "anomaly_windows_without_samples", count=len(empty), of=len(spans), file=str(windows),
            first=f"{np.datetime_as_string(empty[0][0], 's')} .. {np.datetime_as_string(empty[0][1], 's')}")
    return labels, sha256_bytes(np.packbits(labels.astype(bool)).tobytes())  # the labels they give: not the order


def _series_name(name: str) -> str:
    """A data file's name without its compression suffix and, for a CSV or Parquet file, its format suffix:
    ``nyc_taxi.csv.gz`` and ``nyc_taxi.parquet`` are ``nyc_taxi``, as ``nyc_taxi.csv`` is."""
    path = Path(name)
    if path.suffix.lower() in COMPRESSION:
        path = Path(path.stem)
    return path.stem if path.suffix.lower() in (".csv", *PARQUET) else path.name


def anomaly_windows(path: str | Path, data_name: str) -> list[tuple[np.datetime64, np.datetime64]]:
    """Labelled anomaly windows ``[start, end]`` (inclusive timestamps) from a JSON file, NAB style.

    The file holds either a list of ``[start, end]`` pairs, or an object mapping data file names to such
    lists (NAB's ``combined_windows.json``: ``"realKnownCause/nyc_taxi.csv": [[...], ...]``); then the key
    whose last path component is ``data_name`` is used, else the one that names the same series in another
    format or compressed (``nyc_taxi.csv.gz``, ``nyc_taxi.parquet``).
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"windows file not found: {p}")
    try:
        doc = json.loads(read_limited(p, "windows file", MAX_WINDOWS_BYTES))  # /dev/zero: not read until memory ran out
    except RecursionError:  # nested deeper than the parser goes: a traceback
        raise DataError(f"windows file {p} is not readable JSON: nested too deeply") from None
    except ValueError as exc:
        raise DataError(f"windows file {p} is not readable JSON: {exc}") from None
    if isinstance(doc, dict):
        keys = [k for k in doc if Path(str(k)).name == data_name]
        if not keys:  # nyc_taxi.csv.gz, nyc_taxi.parquet: a copy of realKnownCause/nyc_taxi.csv found no entry
            keys = [k for k in doc if _series_name(Path(str(k)).name) == _series_name(data_name)]
        if len(keys) != 1:
            raise DataError(f"windows file {p} has {'no' if not keys else 'several'} entries for {data_name!r} "
                            f"(keys: {sorted(doc)[:5]})")
        doc = doc[keys[0]]
    if not isinstance(doc, list) or not all(isinstance(w, list) and len(w) == 2 for w in doc):
        raise DataError(f"windows file {p}: expected a list of [start, end] pairs")

    def stamp(v: object) -> np.datetime64:
        t = pd.Timestamp(v, unit="ms") if isinstance(v, int | float) and not isinstance(v, bool) else pd.Timestamp(v)
        if pd.isna(t):
            raise ValueError(f"{v!r}")
        return t.to_datetime64()

    try:
        pairs = [(stamp(a), stamp(b)) for a, b in doc]  # numbers are epoch ms, as in the series
    except (ValueError, TypeError) as exc:
        raise DataError(f"windows file {p}: a start or end is not a timestamp: {exc}") from None
    bad = [(a, b) for a, b in pairs if b < a]
    if bad:
        raise DataError(f"windows file {p}: window {bad[0][0]} .. {bad[0][1]} ends before it starts")
    return pairs


def window_labels(stamps: np.ndarray, windows: list[tuple[np.datetime64, np.datetime64]]) -> np.ndarray:
    """0/1 per sample: 1 where ``start <= timestamp <= end`` for some window."""
    t = stamps.astype("datetime64[ns]")
    labels = np.zeros(len(t), dtype="int8")
    for a, b in windows:
        labels[(t >= a) & (t <= b)] = 1
    return labels


def make_windows(values: np.ndarray, window: int, hop: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows ``[n, window, channels]`` (a strided view, no copy) and the index of each one's last sample."""
    if window < 2 or hop < 1:
        raise DataError(f"window must be >= 2 and hop >= 1 (got window={window}, hop={hop})")
    if len(values) < window:
        raise DataError(f"series has {len(values)} samples, fewer than one window of {window}")
    view = np.lib.stride_tricks.sliding_window_view(values, (window, values.shape[1]))[::hop, 0]
    ends = np.arange(window - 1, len(values), hop)
    return view, ends


WINDOW_CHUNK = 65536  # windows checked (and by tsmon score, scored) at a time: memory stays bounded


def finite_windows(windows: np.ndarray, chunk: int = WINDOW_CHUNK) -> np.ndarray:
    """Boolean mask of windows whose every value is finite; in chunks, since ``windows`` is usually a strided view
    whose full ``isfinite`` would be window × channels bytes per window."""
    return np.concatenate([np.isfinite(windows[i : i + chunk]).all(axis=(1, 2))
                           for i in range(0, len(windows), chunk)] or [np.zeros(0, bool)])


def windows_for(values: np.ndarray, window: int, hop: int,
                windowing: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A model's windows of a series (sliding, or one per beat) and the index of each one's last sample."""
    rule = beats.rule_of(windowing) if windowing else None
    return beats.beat_windows(values, rule) if rule is not None else make_windows(values, window, hop)


# a gap: an interval longer than this many median sample intervals and than GAP_MIN_MS — replay-eval's default, and
# the daemon's default windows.gap_ms (5 s) for streams that sample at least every 1.7 s
GAP_INTERVALS, GAP_MIN_MS = 3.0, 5000.0


def gap_windows(timestamps: np.ndarray | None, ends: np.ndarray, window: int, gap_ms: float | None = None,
                windowing: dict[str, Any] | None = None) -> tuple[np.ndarray, float]:
    """Which of the windows ending at ``ends`` hold a gap (see :data:`GAP_INTERVALS`; or, given ``gap_ms``, an
    interval longer than that: a replay's), and the longest such gap inside one, in seconds. The daemon restarts
    its windows at a gap and never scores such a window, so these tools set them aside too: not trained on,
    thresholded, tested or scored. A beat window (``windowing``) also depends on the samples its R peak was
    decided on, ``lookahead`` either side of it: where those reach past the window, across a gap, the daemon never
    cuts it (a peak within ``lookahead`` of a restart is not decided there)."""
    held = np.zeros(len(ends), bool)
    if timestamps is None or len(timestamps) < 3 or not len(ends):
        return held, 0.0
    steps = np.diff(timestamps.astype("datetime64[ns]").astype("int64"))  # ns
    positive = steps[steps > 0]
    if not len(positive):
        return held, 0.0
    gap = steps > (gap_ms * 1e6 if gap_ms is not None
                   else max(GAP_INTERVALS * float(np.median(positive)), GAP_MIN_MS * 1e6))
    if not gap.any():
        return held, 0.0
    rule = beats.rule_of(windowing) if windowing else None
    early, late = (0, 0) if rule is None else (max(0, rule.lookahead - rule.pre),  # samples the peak's decision
                                               max(0, rule.lookahead - (rule.window - 1 - rule.pre)))  # reads beyond
    before = np.r_[0, np.cumsum(gap)]  # gaps among the intervals before each sample
    starts = np.maximum(ends - window + 1 - early, 0)
    last = np.minimum(ends + late, len(timestamps) - 1)
    held = before[last] - before[starts] > 0
    inside = np.zeros(len(steps) + 1, "int64")  # intervals some window spans (interval i: samples i to i + 1)
    np.add.at(inside, starts, 1)
    np.add.at(inside, last, -1)
    spanned = np.cumsum(inside)[:-1] > 0
    return held, float(steps[gap & spanned].max()) / 1e9 if held.any() else 0.0


def series_dataset(series: Series, window: int, hop: int, train_fraction: float = 0.5,
                   val_fraction: float = 0.2, beat: dict[str, Any] | None = None) -> Dataset:
    """Chronological split: normal windows in the first ``train_fraction`` of samples train (their last
    ``val_fraction`` validate); windows starting after it are test. The summary names the split sample and
    the first sample of the first validation window (``val_start_sample``).

    ``beat`` (``pre``, ``refractory``, ``baseline`` in samples): one window per R peak instead of every
    ``hop`` samples (:mod:`models.beats`), the peak level fitted on the training part; or a model's fitted
    rule (its ``windowing``, with the level) to cut the same windows. ``hop`` becomes the median beat
    interval of the training part.
    """
    if not 0.0 < train_fraction < 1.0 or not 0.0 < val_fraction < 1.0:
        raise DataError("train_fraction and val_fraction must be in (0, 1)")
    split = int(len(series.values) * train_fraction)
    windowing: dict[str, Any] = {"kind": beats.SLIDING}
    if beat is not None:  # the settings to fit a rule on the training part, or a fitted rule (with its level)
        rule = (beats.BeatRule.from_dict(beat) if "level" in beat
                else beats.BeatRule.fit(series.values[:split], window, **beat))
        peaks = beats.peak_positions(series.values[:split, rule.lead], rule)
        if len(peaks) < 2:
            raise DataError(f"{Path(series.path).name}: {len(peaks)} beat(s) in the first {split} samples at the "
                            f"model's peak level {rule.level:.4g}: another recording, other units or another lead?")
        hop = int(np.median(np.diff(peaks)))
        windowing = rule.to_dict()
    wins, ends = windows_for(series.values, window, hop, windowing)
    finite = finite_windows(wins)
    across, longest = gap_windows(series.timestamps, ends, window, windowing=windowing)
    ok = finite & ~across
    if series.labels is not None:
        csum = np.r_[0, np.cumsum(series.labels)]
        win_label = (csum[ends + 1] - csum[ends + 1 - window] > 0).astype("int8")
    else:
        win_label = np.zeros(len(ends), dtype="int8")
    fit_idx = np.flatnonzero(ok & (ends < split) & (win_label == 0))
    if len(fit_idx) < 2:
        in_part = int((ends < split).sum())
        raise DataError(f"{Path(series.path).name}: {len(fit_idx)} normal training window(s) in the first {split} "
                        f"samples (window {window}, hop {hop}: {in_part} windows, {int((~finite & (ends < split)).sum())} "
                        f"with NaN/inf, {int((across & (ends < split)).sum())} across a gap in the timestamps, "
                        f"{int((win_label[ends < split] > 0).sum())} labelled); need at least 2")
    n_val = max(1, round(len(fit_idx) * val_fraction))
    # test windows lie wholly after the split: one reaching back shared samples with the windows the model
    # was fitted, stopped and thresholded on, and an anomaly before the split counted as a test detection
    after = ends - window + 1 >= split
    test_idx = np.flatnonzero(ok & after)
    val_start = int(ends[fit_idx[len(fit_idx) - n_val]]) - window + 1  # first sample of the first one
    # training windows end before it: overlapping ones shared samples with the windows the model was stopped and
    # thresholded on, biasing the validation errors (and the threshold) low
    train_idx = fit_idx[: len(fit_idx) - n_val]
    train_idx = train_idx[ends[train_idx] < val_start]
    if len(train_idx) == 0:
        raise DataError(f"{Path(series.path).name}: no training window ends before the validation windows start "
                        f"(sample {val_start}); give it more data or a larger --train-fraction")
    test_bad = ~finite & after
    summary = {"source": series.path, "sha256": series.sha256, "samples": len(series.values),
               "split_sample": split, "val_start_sample": val_start, "train_fraction": train_fraction,
               "window_count": len(ends),  # "windows" is the label windows file (DataSpec)
               "dropped_nonfinite": int((~finite).sum()), "train": len(train_idx), "val": n_val,
               "train_dropped_overlapping": len(fit_idx) - n_val - len(train_idx),
               "test": len(test_idx), "test_windows_dropped_nonfinite": int(test_bad.sum()),
               "test_anomalies_dropped_nonfinite": int((test_bad & (win_label > 0)).sum()),
               "dropped_out_of_order": series.dropped_out_of_order}
    if series.windows_sha256:  # eval tells whether the windows file training used still labels the file the same
        summary["windows_sha256"] = series.windows_sha256
    gapped = across & finite  # set aside, as the daemon does (those with NaN/inf are counted as such, not twice)
    if gapped.any():
        summary.update(windows_spanning_gaps=int(gapped.sum()), longest_gap_s=round(longest, 3),
                       test_windows_spanning_gaps=int((gapped & after).sum()),
                       test_anomalies_spanning_gaps=int((gapped & after & (win_label > 0)).sum()))
    if after.any():  # the samples the test part's windows cover, scored or set aside (the event metrics' span)
        summary["test_span"] = [int(ends[after][0]) - window + 1, int(ends[after][-1])]
    return Dataset(Path(series.path).name, window, hop, series.channels,
                   np.ascontiguousarray(wins[train_idx]),
                   np.ascontiguousarray(wins[fit_idx[len(fit_idx) - n_val :]]),
                   np.ascontiguousarray(wins[test_idx]),
                   win_label[test_idx] if series.labels is not None else None,
                   summary, series, ends[test_idx], windowing, test_idx)
