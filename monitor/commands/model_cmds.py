"""CLI commands of the model side: train, eval, score, inspect (a model's window, or why an alert fired)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import typer

from models import artifact, beats
from models.data import (
    ECG5000_WINDOW,
    GAP_INTERVALS,
    GAP_MIN_MS,
    PARQUET,
    WINDOW_CHUNK,
    Dataset,
    Series,
    finite_windows,
    gap_windows,
    read_series,
    suspect_stamps,
    windows_for,
)
from models.detector import DEFAULT_QUANTILE, Detector, check_downsample, check_threshold_options
from models.errors import BrokerError, DataError, ModelConfigError
from models.files import check_writable, replace_atomically
from models.registry import DEFAULT_KIND, KINDS, config_for, train_defaults
from models.scaling import check_method, outlier_scaled
from models.train import TrainConfig, resolve_device
from models.workflow import DataSpec, evaluate, load_dataset, spec_for_eval, train_detector
from monitor import logs
from monitor.alerts import significant
from monitor.commands.options import MAX_COUNT, MAX_SEED, MAX_WINDOW, bootstrap_option, not_with
from monitor.commands.render import emit_json, epoch_progress, eval_table, stdout
from monitor.config import QualityConfig
from monitor.quality import steady

log = logs.get("tsmon.cli")
MIN_VALIDATION_WINDOWS = 20  # fewer, and the threshold's quantile is one of their errors
OUTLIER_RATIO = 1000.0  # a threshold of this many spreads of the data (normalised units) comes from extreme windows
ROUNDING_ERROR = 1e-5  # a threshold under this (normalised units) is the model reproducing float32 rounding
FLATLINE_REL_STD = QualityConfig.model_fields["flatline_rel_std"].default
ALERT_SEARCH_S = 60.0  # inspect --alert: how long the alerts topic is searched, newest messages first

DataOpt = Annotated[str, typer.Option("--data", help="'ecg5000' (vendored) or a CSV/Parquet file.")]
ValueCols = Annotated[list[str] | None, typer.Option("--value-col", help="Value column (repeat for channels).")]
OutOfOrder = Annotated[str, typer.Option("--out-of-order", help="Rows whose timestamp repeats or goes back: error "
                                                                "or drop.")]
TsCol = Annotated[str | None, typer.Option(help="Timestamp column (epoch ms or ISO-8601); auto: timestamp/ts/time/date/datetime (score, inspect: the one the model was trained with).")]
LabelCol = Annotated[str | None, typer.Option(help="0/1 label column; auto: label/is_anomaly/anomaly.")]
WindowsOpt = Annotated[str | None, typer.Option("--windows", help="JSON of labelled anomaly windows, a list of "
                                                                  "start/end timestamp pairs (or NAB's "
                                                                  "combined_windows.json), instead of a label "
                                                                  "column.")]


def _applies(data: str, protocol: str | None, series_options: dict[str, Any]) -> None:
    """Options of the other kind of data are a usage error, not ignored: ``--data ecg5000 --window -5`` trained
    for two minutes on the 140-sample beats, and ``--protocol ucr`` with a file was dropped without a word."""
    if data == "ecg5000":
        not_with(series_options, f"series files only: ECG5000 comes cut in beats of {ECG5000_WINDOW} samples and "
                                 "is split by --protocol")
    else:
        not_with({"--protocol": protocol is not None},  # --protocol classic too (a docs audit: it was ignored)
                 "ECG5000 only (--data ecg5000): a file is split chronologically (tsmon train --train-fraction)")


def parse_params(pairs: list[str] | None, **named: Any) -> dict[str, Any]:
    params = {k: v for k, v in named.items() if v is not None}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ModelConfigError(f"--param must be key=value, got {pair!r}")
        if key.strip() in ("window", "channels"):  # they were dropped without a word
            raise ModelConfigError(f"--param {key.strip()} is set by the data: use --window / --value-col")
        try:
            params[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            params[key.strip()] = raw
        except RecursionError:  # nested deeper than the parser goes: a traceback
            raise ModelConfigError(f"--param {key.strip()}: its JSON value is nested too deeply") from None
    return params


def train(
    data: DataOpt = "ecg5000",
    model: Annotated[str, typer.Option(help=f"Model kind: {', '.join(KINDS)}.")] = DEFAULT_KIND,
    out: Annotated[Path, typer.Option("--out", help="Artifact directory to write.")] = Path("artifacts/model"),
    protocol: Annotated[str | None, typer.Option(help="ECG5000 split: classic (default) or ucr.")] = None,
    window: Annotated[int, typer.Option(help="Window length W (series; ECG5000 beats are 140).", max=MAX_WINDOW)] = 140,
    hop: Annotated[int, typer.Option(help="Hop H between windows (series; 0 → W/4).", max=MAX_COUNT)] = 0,
    value_col: ValueCols = None,
    timestamp_col: TsCol = None,
    label_col: LabelCol = None,
    windows: WindowsOpt = None,
    out_of_order: OutOfOrder = "error",
    align: Annotated[str, typer.Option(help="Series windows: sliding (every --hop samples) or beats (one per "
                                           "R peak, ECG).")] = "sliding",
    beat_pre: Annotated[int, typer.Option(help="beats: samples before the R peak (0: 60 % of the window).")] = 0,
    beat_refractory: Annotated[int, typer.Option(help="beats: a peak is the largest of ± this many samples "
                                                      "(0: window / 5).")] = 0,
    beat_baseline: Annotated[int, typer.Option(help="beats: half-width of the baseline mean removed before "
                                                    "finding peaks (0: 3/20 of the window).")] = 0,
    train_fraction: Annotated[float, typer.Option(help="Series: leading fraction used to train/validate.")] = 0.5,
    downsample: Annotated[int, typer.Option(help="Average every K samples of a window before the model (e.g. 4: "
                                                 "360 Hz ECG scored at 90 Hz); must divide the window.")] = 1,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Mini-batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate.")] = None,
    patience: Annotated[int | None, typer.Option(help="Early-stopping patience (epochs).")] = None,
    loss: Annotated[str, typer.Option(help="Reconstruction loss and score: l1 or mse.")] = "l1",
    noise: Annotated[float, typer.Option(help="Denoising: std of input noise (normalised units).")] = 0.0,
    sparsity: Annotated[float, typer.Option(help="Weight of the L1 penalty on the code.")] = 0.0,
    embedding: Annotated[int | None, typer.Option(help="lstm: embedding size.")] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout (lstm, dense, conv, vae).")] = None,
    batch_norm: Annotated[bool | None, typer.Option("--batch-norm/--no-batch-norm", help="dense, conv.")] = None,
    param: Annotated[list[str] | None, typer.Option(help="Other hyper-parameter key=value (JSON value).")] = None,
    threshold_quantile: Annotated[float, typer.Option(help="Quantile of validation errors for the threshold.")] = DEFAULT_QUANTILE,
    threshold_margin: Annotated[float, typer.Option(help="Threshold = quantile × margin.")] = 1.0,
    normalisation: Annotated[str, typer.Option(help="Per-channel scaling: standard, robust or none.")] = "standard",
    seed: Annotated[int, typer.Option(help="Seed for the split and training.", max=MAX_SEED)] = 42,
    device: Annotated[str, typer.Option(help="auto (cuda if available), cpu or cuda[:N].")] = "auto",
    max_minutes: Annotated[float | None, typer.Option(help="Stop training after this many minutes (> 0).")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for training (default: the usable CPUs − 1, "
                                                            "at least 1; the same seed gives the same weights with "
                                                            "as many threads on the same kind of CPU).")] = None,
) -> None:
    """Train a model on normal data only and write an artifact."""
    if max_minutes is not None and not 0 < max_minutes < math.inf:  # the option, not the library's max_seconds
        raise ModelConfigError(f"--max-minutes must be a number of minutes > 0, got {max_minutes}")
    if not 0 < train_fraction < 1:  # (the library's message named its internal val_fraction too)
        raise DataError(f"--train-fraction must be in (0, 1), got {train_fraction}")
    _applies(data, protocol, {"--window": window != ECG5000_WINDOW, "--hop": hop, "--value-col": value_col,
                              "--timestamp-col": timestamp_col, "--label-col": label_col, "--windows": windows,
                              "--out-of-order": out_of_order != "error", "--align": align != "sliding",
                              "--beat-pre": beat_pre, "--beat-refractory": beat_refractory,
                              "--beat-baseline": beat_baseline, "--train-fraction": train_fraction != 0.5})
    if align == "sliding":  # accepted and ignored (the ML user pass)
        not_with({"--beat-pre": beat_pre, "--beat-refractory": beat_refractory, "--beat-baseline": beat_baseline},
                 "beat windows only (--align beats)")
    elif align == "beats":  # one window per beat: a --hop was recorded in the manifest and ignored (a model CLI pass)
        not_with({"--hop": hop}, "sliding windows only: --align beats cuts one window per beat")
    if window < 2:  # checked first: `--window -5` was said as "Invalid value for --hop: at most --window (-5)"
        raise typer.BadParameter(f"a window is at least 2 samples, got {window}", param_hint="--window")
    # the daemon would never score the samples between its windows (a route's hop is refused likewise)
    not_with({"--hop": hop > window}, f"at most --window ({window}): the samples between windows would be skipped")
    check_method(normalisation)  # refused once training had begun, after the progress bar
    spec = DataSpec(data, protocol or "classic", seed, window, hop, tuple(value_col or ()), timestamp_col, label_col,
                    train_fraction, windows, out_of_order, align, beat_pre, beat_refractory, beat_baseline)
    if model in KINDS:  # (an unknown kind is the registry's error) the model's own error exited 1, not 2
        not_with({"--embedding": embedding is not None and model != "lstm",
                  "--dropout": dropout is not None and model == "pca",
                  "--batch-norm/--no-batch-norm": batch_norm is not None and model not in ("dense", "conv")},
                 f"not an option of the {model} model (see tsmon train --help)")
    params = parse_params(param, embedding=embedding, dropout=dropout, batch_norm=batch_norm)
    if model == "pca":  # it was accepted, and the manifest recorded a training config that never ran
        not_with({"--epochs": epochs is not None, "--batch-size": batch_size is not None, "--lr": lr is not None,
                  "--patience": patience is not None, "--noise": noise, "--sparsity": sparsity,
                  "--max-minutes": max_minutes is not None},
                 "gradient training only: pca is fitted in closed form (SVD)")
    defaults = train_defaults(model)
    if epochs is not None:
        defaults["min_steps"] = 0  # an explicit --epochs is taken as given
    cfg = TrainConfig(**{**defaults, **{k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr,
                      "patience": patience}.items() if v is not None}}, loss=loss, noise_std=noise,
                      sparsity=sparsity, seed=seed, device=device,
                      max_seconds=max_minutes * 60 if max_minutes is not None else None, threads=threads)
    _order(out_of_order)
    cfg.validate()  # before any data is read or a progress bar drawn
    check_threshold_options(threshold_quantile, threshold_margin)
    cut = ECG5000_WINDOW if data == "ecg5000" else window
    check_downsample(cut, downsample)
    try:
        config_for(model, {**params, "window": cut // downsample, "channels": 1})
    except ModelConfigError as exc:
        if downsample == 1:
            raise
        raise ModelConfigError(f"{exc} (the model sees window {cut} / --downsample {downsample} = "
                               f"{cut // downsample} steps)") from None
    artifact.check_target(out)  # before the minutes of training, not after them
    run_training(spec, model, params, cfg, out, threshold_quantile, threshold_margin, normalisation, downsample)


def _order(out_of_order: str) -> str:
    """``--out-of-order``: error or drop (``keep`` is replay-eval's, which plays the rows as they are)."""
    if out_of_order not in ("error", "drop"):
        raise DataError(f"--out-of-order must be error or drop, not {out_of_order!r}")
    return out_of_order


def _warn_read(ds: Dataset) -> None:
    """What reading the file put aside or doubts, said where it is read: rows ``--out-of-order drop`` skipped
    (an info line's summary hid them), timestamps that look like another unit."""
    if ds.summary.get("dropped_out_of_order"):
        log.warning("rows_dropped_out_of_order", count=ds.summary["dropped_out_of_order"],
                    of=ds.summary["dropped_out_of_order"] + ds.summary.get("samples", 0),
                    reason="timestamp repeats or goes back")
    _warn_stamps(ds.series)
    _warn_gaps(ds.summary.get("windows_spanning_gaps", 0), ds.summary.get("window_count", 0),
               ds.summary.get("longest_gap_s", 0.0))


def _warn_gaps(spanning: int, of: int, longest_s: float) -> None:
    """Windows cut across a gap in the timestamps are set aside, as the daemon never scores them (the ML user pass: 93
    of 1 805 windows of a NAB series held gaps of over 3 h, one 206 h, and 22 of them were flagged; trained on and
    scored before, then only warned of)."""
    if spanning:
        log.warning("windows_span_gaps", count=spanning, of=of, longest_gap_s=longest_s,
                    rule=f"an interval over {GAP_INTERVALS:g} median sample intervals and {GAP_MIN_MS / 1000:g} s",
                    consequence="set aside: not trained on, thresholded, tested or scored, as the daemon restarts its "
                    "windows at a gap (windows.gap_ms, per route gap_ms) and never scores such a window")


def _warn_stamps(series: Series | None) -> None:
    if series is not None and (why := suspect_stamps(series)):
        log.warning("timestamps_suspect", path=series.path, reason=why)


def run_training(spec: DataSpec, kind: str, params: dict[str, Any], cfg: TrainConfig, out: Path,
                 quantile: float, margin: float, normalisation: str, downsample: int = 1) -> None:
    resolve_device(cfg.device)  # a device it cannot use is one line before anything is read or drawn
    ds = load_dataset(spec)
    _warn_read(ds)
    log.info("training", kind=kind, data=ds.summary, epochs=cfg.epochs, min_steps=cfg.min_steps,
             batch_size=cfg.batch_size, downsample=downsample,
             **({"note": f"at least {cfg.min_steps} optimizer steps: more epochs on a small data set"}
                if cfg.min_steps else {}))
    with epoch_progress(cfg.epochs, f"train {kind}") as on_epoch:
        det, training = train_detector(ds, kind, params, cfg, quantile, margin, normalisation, on_epoch,
                                       downsample)
    fitted = getattr(det.model.config, "components", None)
    if kind == "pca" and isinstance(params.get("components"), int) and params["components"] > (fitted or 0):
        log.warning("pca_components_capped", asked=params["components"], fitted=fitted, reason="a PCA has at most "
                    "min(training windows, window * channels) components")  # stored as fitted, silently before
    training["data"].update(spec.to_dict())
    path = artifact.save(det, out, training)
    res = training["result"]
    log.info("trained", artifact=str(path), epochs=res["epochs_run"], best_epoch=res["best_epoch"],
             stop=res["stop_reason"], seconds=res["seconds"], device=res["device"], threads=res["threads"],
             threshold=significant(det.threshold.value))  # rounded to 6 decimals, 1.7e-7 was "0.0"
    _warn_threshold(det, len(ds.val))
    exempt = [] if det.scaler.window_spread is None else [
        n for n, s in zip(det.names, steady(det.scaler.window_spread, FLATLINE_REL_STD), strict=True) if s]
    if exempt:  # the daemon's flat-line test is off for them: said, not found out when a stuck sensor is not reported
        log.info("channels_steady_in_training", channels=exempt, consequence="steady in 1 % or more of the training "
                 "windows: the daemon does not report them flat-lined (at the default quality.flatline_rel_std)")
    if outliers := outlier_scaled(ds.train, det.scaler):
        log.warning("scale_set_by_outliers", channels=[det.names[c] for c in outliers],
                    consequence="a few extreme training samples set the standard scale: every other window looks "
                    "the same to the model; remove them (--normalisation robust keeps the other windows apart, but "
                    "the windows holding them still train and threshold the model)")


def _warn_threshold(det: Detector, validation_windows: int) -> None:
    """A threshold that will not mean what its quantile says: taken from a handful of validation windows (the
    "q0.95" of 1 window is that window's error), or at float32 rounding of the data (a model that reproduces its
    input exactly — a full-rank PCA — scores noise: 28 alarm episodes for 3 events)."""
    if validation_windows < MIN_VALIDATION_WINDOWS:
        log.warning("threshold_from_few_windows", validation_windows=validation_windows,
                    quantile=det.threshold.quantile, consequence="the quantile is one of these few errors: give more "
                    "data, a smaller --hop or a larger --train-fraction (validation: the last 20 % of its windows)")
    spread = float(np.mean(det.scaler.flat_scale)) if det.scaler.method == "none" else 1.0  # of the model's units
    power = 2 if det.loss == "mse" else 1  # mse: squared units
    value = det.threshold.value
    if value > (OUTLIER_RATIO * spread) ** power:  # a 1e30 sample under robust scaling: a threshold of 3e19
        # normalised units, a blind model (ROC-AUC 0.5) and as blind a PCA baseline, without a word
        log.warning("threshold_set_by_outliers", threshold=significant(value),
                    median_validation_error=significant(det.quantiles.get("0.5", math.nan)),
                    consequence="windows of extreme values (an outlier, "
                    "data that is not normal) trained or thresholded the model, or a channel's excursions are huge "
                    "next to its usual spread (under robust, its IQR): few windows will ever cross it; remove such "
                    "windows from the training part, or check the channel")
        return  # not "at rounding level" too: with no normalisation, the outlier's spread made that unit huge
    if value < (ROUNDING_ERROR * spread) ** power:
        log.warning("threshold_at_rounding_level", threshold=significant(det.threshold.value),
                    consequence="the model reproduces its input to float32 rounding: its scores are noise; use a "
                    "smaller model (fewer PCA components, a smaller --embedding)")


def eval_(
    model: Annotated[Path, typer.Option("--model", help="Artifact directory.")],
    data: DataOpt = "ecg5000",
    protocol: Annotated[str | None, typer.Option(help="ECG5000: must match training (default: the model's).")] = None,
    windows: WindowsOpt = None,
    value_col: ValueCols = None,
    label_col: Annotated[str | None, typer.Option(help="0/1 label column; auto: the one training used, else "
                                                       "label/is_anomaly/anomaly.")] = None,
    timestamp_col: Annotated[str | None, typer.Option(help="Timestamp column; auto: the one training used, else "
                                                           "timestamp/ts/time/date/datetime.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Evaluate a model beside the PCA baseline, at the threshold chosen on normal validation data."""
    _applies(data, protocol, {"--windows": windows, "--value-col": value_col, "--label-col": label_col,
                              "--timestamp-col": timestamp_col})
    det = artifact.load(model, device)
    spec = spec_for_eval(det.meta, data, protocol, windows, label_col)
    if data != "ecg5000" and "train_fraction" not in det.meta.get("training", {}).get("data", {}):
        log.warning("training_split_unknown", split=spec.train_fraction, consequence="the manifest does not say "
                    "where training split its data: the file is split at this share, and if the model was trained on "
                    "it, some test windows may be ones it was fitted on")  # silent before (the ML user pass)
    if timestamp_col:  # (a file whose label is named otherwise could not be evaluated: its error named --label-col,
        spec = replace(spec, timestamp_col=timestamp_col)  # an option of train only)
    if value_col:  # a file whose columns are named otherwise (score, inspect and replay-eval took it; eval could not)
        cols = model_columns(det.channel_names, value_col)
        if len(cols) != det.channels:
            raise DataError(f"model expects {det.channels} channel(s) {det.channel_names}, --value-col gives "
                            f"{len(cols)} {cols}")
        spec = replace(spec, value_cols=tuple(cols))
    ds = load_dataset(spec, model_channels=None if value_col else det.channel_names)
    trained = det.meta.get("training", {}).get("data", {})
    same_path = isinstance(trained.get("source"), str) and data != "ecg5000" \
        and os.path.abspath(data) == os.path.abspath(trained["source"])  # ./s.csv is s.csv (from where eval runs)
    if same_path and trained.get("sha256") and ds.summary.get("sha256") != trained["sha256"]:
        log.warning("training_file_changed", path=data, split=spec.train_fraction, consequence="the file at the path "
                    "training read holds other bytes now: split at the same share, its test part may hold samples "
                    "the model was fitted on (rows added or removed before the split)")  # silent before (a review)
    trained_spans = det.meta.get("training", {}).get("data", {}).get("windows_sha256")
    if spec.windows and not windows and trained_spans and ds.summary.get("windows_sha256") != trained_spans:
        raise DataError(f"the anomaly windows file training used, {spec.windows}, labels this file otherwise now "
                        "than when the model was trained: give it (or another) with --windows to evaluate with it "
                        "as it is")  # evaluated on other labels than training set aside, silently
    _warn_read(ds)
    result = evaluate(det, ds)
    dropped = result["test_windows_dropped_nonfinite"]
    if dropped:  # labelled windows among them vanished from the metrics without a word
        log.warning("test_windows_dropped_nonfinite", count=dropped,
                    anomalous=result["test_anomalies_dropped_nonfinite"], reason="NaN or inf in window",
                    consequence="not scored, not in the metrics")
    gapped = result["test_windows_spanning_gaps"]
    if gapped:  # likewise (review)
        log.warning("test_windows_spanning_gaps", count=gapped, anomalous=result["test_anomalies_spanning_gaps"],
                    reason="a gap in the timestamps inside the window (for a beat window: or across the samples its "
                           "R peak was decided on)",
                    consequence="not scored, not in the metrics (the daemon never scores such a window)")
    if result["test_windows_nonfinite_score"]:
        log.warning("test_windows_nonfinite_score", count=result["test_windows_nonfinite_score"],
                    reason="values the model overflows on", consequence="ranked above every other window, anomalous")
    if as_json:
        emit_json(result)
    else:
        why = [f"{n} {what}" for n, what in ((dropped, "with NaN/inf"), (gapped, "across a gap")) if n]
        unscored = f" (of {result['test_windows'] + dropped + gapped}: {', '.join(why)} not scored)" if why else ""
        stdout.print(eval_table(result, f"{det.kind} on {ds.name} ({ds.summary.get('protocol', 'chronological split')}, "
                                        f"{result['test_windows']} test windows scored{unscored}, "
                                        f"{result['test_anomalies']} anomalous)"))


def model_columns(names: list[str], value_col: list[str] | None) -> list[str]:
    """The file's columns for a model's channels: its names, in its order, whatever order ``--value-col`` gave them
    in; other names are mapped by position, with a warning."""
    cols = list(value_col or names)
    if set(cols) == set(names):
        return list(names)
    if len(cols) == len(names) and len(set(cols)) == len(cols):  # as many as the model has, none twice (refused
        # later, one line, as are fewer or more): taken in order
        # a column named as a channel goes to that channel; the others fill the rest in order (a model of temp, rpm
        # given --value-col speed --value-col temp scored speed as temp and temp as rpm: every window anomalous)
        named = {c: c for c in cols if c in names}
        others = iter(c for c in cols if c not in named)
        cols = [named.get(n) or next(others) for n in names]
        log.warning("channels_mapped_by_position", model=names, columns=cols,
                    mapping={c: n for c, n in zip(cols, names, strict=True) if c != n})
    return cols


def _series_windows(model_dir: Path, path: Path, value_col: list[str] | None, timestamp_col: str | None,
                    hop: int, device: str, out_of_order: str = "error",
                    ) -> tuple[Any, Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The model, the series, its windows and their ends, which are finite and which hold a gap."""
    det = artifact.load(model_dir, device)
    cols = model_columns(det.channel_names, value_col)
    # the column the model was trained with when the file has it (another was read, and the rows scored in file
    # order, unsorted), else timestamp/ts/time or none, as before
    trained_ts = det.meta.get("training", {}).get("data", {}).get("timestamp_col")
    series = read_series(path, cols, timestamp_col, None, out_of_order=_order(out_of_order),  # names a missing column
                         labels_wanted=False,  # labels are not used: a partly empty label column must not fail
                         preferred_timestamp=trained_ts, model_channels=None if value_col else det.channel_names)
    _warn_stamps(series)
    if series.values.shape[1] != det.channels:
        raise DataError(f"model expects {det.channels} channel(s) {det.channel_names}, {path} gives "
                        f"{series.values.shape[1]} {series.channels}; choose them with --value-col")
    if beats.rule_of(det.windowing) is not None:  # one window per beat: a --hop changed nothing (a model CLI pass)
        not_with({"--hop": hop}, "sliding-window models only: this model cuts one window per beat")
    not_with({"--hop": hop > det.window}, f"at most the model's window ({det.window}): the samples between windows "
                                          "would be skipped")
    wins, ends = windows_for(series.values, det.window, hop or det.hop, det.windowing)
    across, longest = gap_windows(series.timestamps, ends, det.window, windowing=det.windowing)
    finite = finite_windows(wins)
    _warn_gaps(int((across & finite).sum()), len(ends), longest)  # (those with NaN/inf are said as such)
    return det, series, wins, ends, finite, across


def _blank(x: np.ndarray) -> np.ndarray:
    """Non-finite values as NaN, which the CSV writes empty."""
    return np.where(np.isfinite(x), x, np.nan)


def _score_in_chunks(det: Any, wins: np.ndarray, ok: np.ndarray, chunk: int = WINDOW_CHUNK,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Window scores and channel errors of the finite windows, scored a chunk at a time: the copy out of the
    strided view and the per-step errors (window × 4 bytes each) stay bounded instead of growing with the file
    (hop 1 over a million samples held ~1 GB)."""
    idx = np.flatnonzero(ok)
    parts = [det.score(np.ascontiguousarray(wins[idx[i : i + chunk]])) for i in range(0, len(idx), chunk)]
    return np.concatenate([p.window for p in parts]), np.concatenate([p.channel for p in parts])


def score(
    model: Annotated[Path, typer.Option("--model", help="Artifact directory.")],
    input: Annotated[Path, typer.Option("--input", help="CSV or Parquet series.")],
    output: Annotated[Path, typer.Option("--output", help="CSV to write, one row per window (Parquet for .parquet, "
                                                       "compressed for .gz …).")] = Path("scores.csv"),
    value_col: ValueCols = None,
    timestamp_col: TsCol = None,
    hop: Annotated[int, typer.Option(help="Hop between windows (0 → the model's).", max=MAX_COUNT)] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    out_of_order: OutOfOrder = "error",
) -> None:
    """Score every window of a series; rows are aligned to each window's last sample."""
    if os.path.realpath(output) == os.path.realpath(input):  # the scores replaced the data they were scored from
        # (realpath: Path.resolve raised RuntimeError at a symlink loop, a traceback)
        raise DataError(f"--output {output} is the --input file: give another name")
    check_writable(output, "--output")
    det, series, wins, ends, finite, across = _series_windows(model, input, value_col, timestamp_col, hop, device,
                                                              out_of_order)
    ok = finite & ~across
    if len(ok) == 0:  # it said "every window contains NaN or inf" for a file with none
        why = (f"fewer than {det.window} samples" if det.windowing.get("kind") == "sliding" else
               f"no R peak at the model's level {det.windowing.get('level', 0):.4g}: another recording, other "
               f"units or another lead?")
        raise DataError(f"{input}: no window to score ({why})")
    if not ok.any():
        raise DataError(f"{input}: every window contains NaN or inf" + (" or holds a gap in the timestamps" if across.any()
                        else "") + "; nothing to score")
    score, channel = _score_in_chunks(det, wins, ok)
    kept = ends[ok]
    frame = pd.DataFrame({"window": np.flatnonzero(ok)})  # the --index of `tsmon inspect`
    frame["end_sample"] = kept if series.rows is None else series.rows[kept]  # the file's row, past dropped ones
    if series.timestamps is not None:
        # UTC, and saying so: a file with +02:00 offsets read back two hours off without the Z
        frame["timestamp"] = pd.to_datetime(series.timestamps[kept]).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    frame["score"] = _blank(score)  # empty in the CSV: inf was written
    frame["threshold"] = det.threshold.value
    frame["is_anomaly"] = (~(score <= det.threshold.value)).astype(int)  # a NaN score is not normal
    for i, name in enumerate(det.channel_names):
        frame[f"error_{name}"] = _blank(channel[:, i])
    if output.suffix.lower() in PARQUET:  # s.parquet was written as CSV text
        replace_atomically(output, lambda tmp: frame.to_parquet(tmp, index=False))
    else:  # compressed by its suffix (.gz …); a full disk left a cut CSV that parsed
        replace_atomically(output, lambda tmp: frame.to_csv(tmp, index=False))
    dropped, nonfinite = int((~finite).sum()), int((~np.isfinite(score)).sum())
    if dropped:
        log.warning("windows_dropped_nonfinite", count=dropped, reason="NaN or inf in window")
    if nonfinite:  # finite values beyond the model's range (e.g. 3e38): flagged, never called normal
        log.warning("windows_nonfinite_score", count=nonfinite, consequence="is_anomaly = 1, score empty")
    if series.dropped_out_of_order:
        log.warning("rows_dropped_out_of_order", count=series.dropped_out_of_order,
                    reason="timestamp repeats or goes back", consequence="end_sample keeps the file's row numbers")
    log.info("scored", windows=len(frame), anomalies=int(frame["is_anomaly"].sum()), dropped=dropped,
             rows_dropped_out_of_order=series.dropped_out_of_order, output=str(output))


AlertOpt = Annotated[str | None, typer.Option(
    "--alert", help="Alert message to draw instead of a model window: a JSON file (one object, or JSON lines: the "
                    "first message with an 'explain' is drawn) or an alert ID looked up on the alerts topic.")]


def inspect(
    model: Annotated[Path | None, typer.Option("--model", help="Artifact directory (or give --alert).")] = None,
    data: DataOpt = "ecg5000",
    index: Annotated[int, typer.Option("--index", help="Window index (ECG5000: in the model's test split).")] = 0,
    out: Annotated[Path, typer.Option("--out", help="PNG to write.")] = Path("window.png"),
    value_col: ValueCols = None,
    timestamp_col: TsCol = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    hop: Annotated[int, typer.Option(help="Series: hop between windows, as given to score (0 → the model's).",
                                     max=MAX_COUNT)] = 0,
    out_of_order: OutOfOrder = "error",
    alert: AlertOpt = None,
    config: Annotated[Path | None, typer.Option("--config", help="--alert ID: daemon config naming the broker "
                                                                  "and alerts topic.")] = None,
    bootstrap: Annotated[str | None, bootstrap_option("--alert ID: broker host:port (overrides the config's).")]
    = None,
) -> None:
    """Draw one window, its reconstruction, the error per timestep and the threshold; or why an alert fired."""
    if (model is None) == (alert is None):
        raise typer.BadParameter("give exactly one of --model (a model's window) or --alert (a fired alert)",
                                 param_hint="--model / --alert")
    if out.suffix.lower() != ".png":
        raise DataError(f"--out must be a .png file, got {out.name!r}")
    check_writable(out, "--out")
    if alert is not None:
        from monitor import explain

        path = explain.render(_alert_doc(alert, config, bootstrap), out)
        log.info("picture_written", path=str(path))
        return
    assert model is not None
    _applies(data, None, {"--value-col": value_col, "--timestamp-col": timestamp_col, "--hop": hop,
                          "--out-of-order": out_of_order != "error"})
    from models.plots import window_figure  # matplotlib is slow to import; only this command needs it

    if data == "ecg5000":
        det = artifact.load(model, device)
        ds = load_dataset(spec_for_eval(det.meta, data, None))
        wins, title = ds.test, "ECG5000 test beat"
        label = lambda i: "abnormal" if ds.test_labels[i] else "normal"
    else:
        det, _, all_wins, _, finite, across = _series_windows(model, Path(data), value_col, timestamp_col, hop,
                                                              device, out_of_order)  # numbered as score numbers them
        wins, title = all_wins, f"{Path(data).name} window"
        gap = "holds a gap" + (", or its R peak was decided across one" if beats.rule_of(det.windowing) else "")
        label = lambda i: f"({gap}: neither score nor the daemon scores it)" if across[i] else ""
        if 0 <= index < len(finite) and not finite[index]:
            raise DataError(f"{Path(data).name}: window {index} contains NaN or inf; it cannot be scored")
    if not 0 <= index < len(wins):
        raise DataError(f"{Path(data).name if data != 'ecg5000' else 'ECG5000'}: --index {index} out of range: "
                        f"0..{len(wins) - 1}")
    path = window_figure(det, wins[index], out, f"{title} {index} {label(index)}".strip() + ":")
    log.info("picture_written", path=str(path))


def _alert_doc(alert: str, config: Path | None, bootstrap: str | None) -> dict[str, Any]:
    """The alert message named by ``--alert``: read from a file, or by ID from the alerts topic."""
    path = Path(alert)
    if path.is_file():
        return _alert_from_file(path)
    if path.suffix.lower() in (".json", ".jsonl", ".ndjson") or "/" in alert or "\\" in alert:
        raise DataError(f"alert file {alert} not found: give an existing file or an alert ID")
    return _alert_from_topic(alert, config, bootstrap)


def _alert_from_file(path: Path) -> dict[str, Any]:
    """One JSON object (or a list of them), or JSON lines — alert messages, or ``tsmon tail``'s lines that carry
    them; the first message that carries ``explain``."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): give an alert JSON file") from None
    try:
        whole = json.loads(text)
        docs = whole if isinstance(whole, list) else [whole]
    except RecursionError:  # nested deeper than the parser goes: a traceback
        raise DataError(f"{path}: JSON nested too deeply; give one alert object or JSON lines") from None
    except json.JSONDecodeError:
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    docs.append(json.loads(line))
                except RecursionError:
                    raise DataError(f"{path}:{n}: JSON nested too deeply; give one alert object or JSON lines") from None
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{n}: not JSON ({exc.msg}); give one alert object or JSON lines") from None
    docs = [_message(d) for d in docs]
    found = [d for d in docs if isinstance(d, dict) and isinstance(d.get("explain"), dict)]
    if not found:
        raise DataError(f"{path}: no alert message with an 'explain' object among {len(docs)} message(s) "
                        "(only firing messages carry one)")
    # the latest picture of the first alert with one, as by its id (the first message drew the 1.38× page of an
    # alert whose later revision was 1.83×: an on-call pass)
    return latest_picture([d for d in found if d.get("alert_id") == found[0].get("alert_id")])


def _message(doc: Any) -> Any:
    """The alert inside a ``tsmon tail`` line (topic, partition, offset, …, value), or ``doc`` as it is."""
    if isinstance(doc, dict) and {"topic", "partition", "offset"} <= doc.keys() and isinstance(doc.get("value"), dict):
        return doc["value"]
    return doc


def latest_picture(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """Of one alert's messages with a picture, the latest update's (highest ``revision``, then the last sent): its
    worst window. The first page's showed the windows before the episode grew (a level shift not there yet)."""
    def rank(item: tuple[int, dict[str, Any]]) -> tuple[int, int]:
        r = item[1].get("revision")
        return (r if isinstance(r, int) and not isinstance(r, bool) else 0, item[0])

    return max(enumerate(messages), key=rank)[1]


def _alert_from_topic(alert_id: str, config: Path | None, bootstrap: str | None) -> dict[str, Any]:
    """The latest firing message with a picture (``explain``) of ``alert_id`` on the alerts topic."""
    from kafka.errors import KafkaError

    from monitor.config import load_config
    from monitor.reach import wait_for_brokers
    from monitor.topics import search_newest

    cfg = load_config(config, {"kafka.bootstrap_servers": bootstrap} if bootstrap else None)
    servers = ",".join(cfg.kafka.bootstrap_servers)
    topic = cfg.kafka.alerts_topic
    client = cfg.kafka.client_kwargs()  # its security settings: plaintext against a TLS/SASL cluster failed
    wait_for_brokers(cfg.kafka, 3.0, "give --bootstrap or --config")  # kafka-python: ~30 s, "Unable to bootstrap"

    def its(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [d for d in docs if d.get("alert_id") == alert_id]

    def pictured(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [d for d in its(docs) if isinstance(d.get("explain"), dict)]  # null: a repeat restored without one

    try:  # newest first: the alert just paged is at the end of a topic that may hold millions of messages
        docs, read, ended = search_newest(client, topic, alert_id.encode(), lambda found: bool(pictured(found)),
                                          limit_s=ALERT_SEARCH_S)
    except (KafkaError, OSError) as exc:
        raise BrokerError(f"cannot read topic {topic} at {servers}: {exc}") from None
    if firing := pictured(docs):
        return latest_picture(firing)
    mine = its(docs)
    if not ended:
        what = f"{len(mine)} message(s) of it but none with its picture" if mine else "no message of it"
        raise BrokerError(f"alert {alert_id}: {what} in the newest {read:,} messages of topic {topic} at {servers} "
                          f"read within {ALERT_SEARCH_S:g} s (the topic goes further back): draw it from a saved "
                          f"message instead (tsmon tail … > alerts.jsonl; --alert alerts.jsonl)")
    if mine:
        raise DataError(f"alert {alert_id} on topic {topic} at {servers} has {len(mine)} message(s) but none "
                        "carries 'explain' (fired by a tsmon without explain?)")
    raise DataError(f"alert {alert_id} not found on topic {topic} at {servers} (read {read} messages)")


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command("eval")(eval_)
    app.command()(score)
    app.command()(inspect)
