"""Train-and-evaluate recipes shared by the CLI and tests: train a detector, fit the PCA baseline,
and evaluate both on the same test split."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.beats import SLIDING, rule_of
from models.data import Dataset, load_ecg5000, read_series, series_dataset, sha256_bytes
from models.detector import DEFAULT_QUANTILE, Detector, Threshold, check_downsample, error_quantiles, pool
from models.errors import ArtifactError, DataError
from models.evaluate import event_metrics, report
from models.registry import build, refuse_oversized
from models.scaling import Scaler
from models.train import EpochStats, TrainConfig, fit

FLOAT32_MAX = float(np.finfo(np.float32).max)

@dataclass(frozen=True, slots=True)
class DataSpec:
    """How to get a :class:`Dataset`: ``source`` is ``ecg5000`` or a file path."""

    source: str = "ecg5000"
    protocol: str = "classic"
    seed: int = 42
    window: int = 140
    hop: int = 0  # 0 → window // 4 for series
    value_cols: tuple[str, ...] = ()
    timestamp_col: str | None = None
    label_col: str | None = None
    train_fraction: float = 0.5
    windows: str | None = None  # JSON file of labelled anomaly windows (instead of a label column)
    out_of_order: str = "error"  # rows whose timestamp repeats or goes back: error or drop
    align: str = "sliding"  # or "beats": one window per R peak (ECG), see models.beats
    beat_pre: int = 0  # beats: samples before the peak; 0 → 60 % of the window
    beat_refractory: int = 0  # beats: a peak is the largest of ± this; 0 → window / 5
    beat_baseline: int = 0  # beats: half-width of the baseline mean; 0 → window × 3 / 20
    rule: dict[str, Any] | None = None  # beats: a trained model's fitted rule (its level), used as it is
    # evaluating a model: the columns training used, taken when the file has them, else the usual names (given as
    # timestamp_col/label_col, a file with timestamp/label could not be evaluated: "column 'event_time' not found")
    preferred_timestamp: str | None = None
    preferred_label: str | None = None

    def beat(self) -> dict[str, Any] | None:
        """The beat-window settings for :func:`models.data.series_dataset`, or None for sliding windows."""
        if self.align == "sliding":
            return None
        if self.align != "beats":
            raise DataError(f"unknown alignment {self.align!r}: use sliding or beats")
        if self.rule is not None:  # evaluating a model: the windows score and the daemon cut, not a refit
            return dict(self.rule)
        w = self.window
        return {"pre": self.beat_pre or int(0.6 * w), "refractory": self.beat_refractory or max(1, w // 5),
                "baseline": self.beat_baseline or max(1, w * 3 // 20)}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["value_cols"] = list(self.value_cols)
        for key in ("preferred_timestamp", "preferred_label"):  # eval's, not what training read
            d.pop(key)
        return d


def load_dataset(spec: DataSpec, model_channels: Sequence[str] | None = None) -> Dataset:
    """``model_channels``: the spec's value columns are a model's channels (see :func:`read_series`)."""
    if spec.source == "ecg5000":
        return load_ecg5000(spec.protocol, spec.seed)
    series = read_series(spec.source, list(spec.value_cols) or None, spec.timestamp_col, spec.label_col,
                         spec.windows, spec.out_of_order, preferred_timestamp=spec.preferred_timestamp,
                         preferred_label=spec.preferred_label, model_channels=model_channels)
    hop = spec.hop or max(1, spec.window // 4)
    return series_dataset(series, spec.window, hop, spec.train_fraction, beat=spec.beat())


def spec_for_eval(manifest: dict[str, Any], source: str, protocol: str | None,
                  windows: str | None = None, label_col: str | None = None) -> DataSpec:
    """The data spec to evaluate a trained model on ``source`` without touching its training data.

    Same ECG5000 protocol and seed as training (another protocol would test on training beats); a series
    file is split chronologically as in training: the model is tested on the part after the split and
    the PCA baseline is fitted on the part before it (for the training file, the model's own split).
    ``windows`` (a JSON file of anomaly windows) labels the file; for the training file it defaults to
    the one training used, unless ``label_col`` names the labels.
    """
    trained = manifest.get("training", {}).get("data", {})
    if not isinstance(trained, dict):  # .get on it raised AttributeError: a traceback
        raise ArtifactError(f"manifest training.data must be an object, got {trained!r}"[:200])
    try:
        return _spec(manifest, trained, source, protocol, windows, label_col)
    except (TypeError, ValueError) as exc:  # a hand-edited summary ("train_fraction": "abc"): one line, not a traceback
        raise ArtifactError(f"manifest training.data is unusable: {exc}"[:300]) from None


def _spec(manifest: dict[str, Any], trained: dict[str, Any], source: str, protocol: str | None,
          windows: str | None, label_col: str | None = None) -> DataSpec:
    if source == "ecg5000":
        if trained.get("source") != "ecg5000":
            raise DataError(f"this model was trained on {trained.get('path') or trained.get('source') or 'other data'}, "
                            "not ecg5000 (--data, by default ecg5000): give --data FILE of its own kind")
        proto = protocol or trained.get("protocol", "classic")
        if proto != trained.get("protocol"):
            raise DataError(f"model was trained with protocol {trained.get('protocol')!r}; evaluating with "
                            f"{proto!r} would test on training beats — retrain with --protocol {proto}")
        return DataSpec("ecg5000", proto, int(trained.get("seed", 42)))
    if protocol is not None:  # it was ignored
        raise DataError("--protocol applies to ecg5000 only; a series is split as the model was trained")
    # the model's channels by name, in its order (by position, a file with its columns in another order was
    # evaluated on swapped channels, and one with other names was evaluated at all); a missing one is an error
    names = tuple(manifest["channels"])
    used = trained.get("windows") if not (windows or label_col) and _training_file(source, trained) else None
    if isinstance(used, str) and not Path(used).is_file():  # said "windows file not found", as if named here
        raise DataError(f"the anomaly windows file training used, {used!r} (the path as given to tsmon train), is "
                        "not found from here: give it with --windows")
    # the windows the model cuts are its windowing's, as score, inspect and the daemon take them: from the summary's
    # align, an artifact saved without one (replay-eval's baseline was) was evaluated on sliding windows
    windowing = manifest.get("windowing") or {"kind": SLIDING}  # artifacts before beat windows: sliding
    align = "sliding" if rule_of(windowing) is None else "beats"
    if trained.get("align", align) != align:  # a summary that says otherwise: which windows were trained on?
        raise ValueError(f"align is {trained.get('align')} but the windowing is {manifest.get('windowing')!r}")
    for key in ("timestamp_col", "label_col"):  # a hand-edited 5 failed deep in the reader (AttributeError)
        if not isinstance(trained.get(key), str | None):
            raise TypeError(f"{key} must be a column name or null, got {trained[key]!r}")
    return DataSpec(source, window=int(manifest["window"]), hop=int(manifest["hop"]),
                    value_cols=names,
                    label_col=label_col, preferred_timestamp=trained.get("timestamp_col"),
                    preferred_label=None if label_col else trained.get("label_col"),
                    train_fraction=float(trained.get("train_fraction", 0.5)),
                    windows=windows or used,
                    out_of_order=trained.get("out_of_order", "error"), align=align,
                    beat_pre=int(trained.get("beat_pre", 0)), beat_refractory=int(trained.get("beat_refractory", 0)),
                    beat_baseline=int(trained.get("beat_baseline", 0)),
                    # refitted on another recording, the peak level found beats where score and the daemon,
                    # which keep the model's, find none: eval reported metrics on windows nothing else cuts
                    rule=dict(windowing) if align == "beats" else None)


def _training_file(source: str, trained: dict[str, Any]) -> bool:
    """Is ``source`` the file the model was trained on? By its bytes (sha256), as replay-eval tells: by the path
    string, ``./s.csv`` was another file than ``s.csv`` and eval lost the labels that training used."""
    if source == trained.get("source"):
        return True
    path = Path(source)
    return bool(trained.get("sha256")) and path.is_file() and sha256_bytes(path.read_bytes()) == trained["sha256"]


def train_detector(data: Dataset, kind: str, params: dict[str, Any], cfg: TrainConfig,
                   threshold_quantile: float = DEFAULT_QUANTILE, threshold_margin: float = 1.0,
                   normalisation: str = "standard",
                   on_epoch: Callable[[EpochStats], None] | None = None,
                   downsample: int = 1) -> tuple[Detector, dict[str, Any]]:
    """Fit normalisation on ``data.train``, train a ``kind`` model, derive quantiles and threshold on val.

    ``downsample`` = k: the model sees every window averaged over blocks of k samples (``window / k`` steps).
    """
    check_downsample(data.window, downsample)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    scaler = Scaler.fit(data.train, normalisation)
    model = build(kind, {**params, "window": data.window // downsample, "channels": len(data.channels)})
    result = fit(model, pool(scaler.transform(data.train), downsample), pool(scaler.transform(data.val), downsample),
                 cfg, on_epoch)
    refuse_oversized(kind, sum(t.numel() for t in model.state_dict().values()))  # as load will
    det = Detector(model, scaler, Threshold(threshold_quantile, threshold_margin, 0.0), {}, cfg.loss,
                   list(data.channels), data.hop, windowing=dict(data.windowing),
                   downsample=downsample).to(result.device)
    val_scores = det.score(data.val)
    val_err = val_scores.window
    if not np.isfinite(val_err).all():  # finite values the model's arithmetic overflows on (|x| near float32's limit)
        bad = ~np.isfinite(val_err)
        raise DataError(f"{int(bad.sum())} of {len(val_err)} validation window(s) score NaN or inf: their values (up "
                        f"to |{float(np.abs(data.val[bad].astype('float64')).max()):.3g}|) overflow the model; "
                        "remove them from the training part or rescale the data")
    det.quantiles = error_quantiles(val_err)
    det.channel_usual = [float(v) for v in np.median(val_scores.channel, axis=0)]  # what alerts rank channels by
    det.threshold = Threshold.from_errors(val_err, threshold_quantile, threshold_margin)
    if det.threshold.value > FLOAT32_MAX:  # --threshold-margin 1e308 was said to be NaN reconstructions; above
        # float32's range no score (float32) would ever cross it
        raise DataError(f"the threshold, the validation error's q{threshold_quantile:g} × margin {threshold_margin:g}, "
                        "overflows float32 (scores never reach it): give a smaller --threshold-margin")
    if not 0.0 < det.threshold.value < math.inf:  # an artifact with it would be refused at load
        how = "exactly" if det.threshold.value == 0 else "as NaN"
        raise DataError(f"the threshold from the validation errors is {det.threshold.value}: the model "
                        f"reconstructs the validation windows {how} (constant data?)")
    training = {"data": {**data.summary, "value_cols": list(data.channels)}, "config": _cfg_dict(cfg),
                "result": result.to_dict()}
    return det, training


def _cfg_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)


def baseline(data: Dataset, detector: Detector) -> Detector:
    """The PCA baseline fitted on the same training windows, thresholded the same way."""
    cfg = TrainConfig(loss=detector.loss, device=str(detector.device), seed=0)
    det, _ = train_detector(data, "pca", {}, cfg, detector.threshold.quantile, detector.threshold.margin,
                            detector.scaler.method, downsample=detector.downsample)
    return det


def evaluate(detector: Detector, data: Dataset, with_baseline: bool = True) -> dict[str, Any]:
    """Metrics of ``detector`` on ``data.test`` (and of the PCA baseline beside it)."""
    if data.test_labels is None:
        raise DataError("evaluation needs labels: give the data a 0/1 label column (--label-col)")
    if len(data.test) == 0:
        raise DataError("no test windows left after the training split")
    y = np.asarray(data.test_labels).astype(bool)
    if y.all() or not y.any():  # said with the file and why ("needs both normal and anomalous examples" said neither)
        s = data.summary
        aside = int(s.get("test_anomalies_spanning_gaps", 0)) + int(s.get("test_anomalies_dropped_nonfinite", 0))
        which, why = ("normal", "") if y.any() else ("anomalous", f" ({aside} set aside: across a gap in the "
                                                                   f"timestamps or holding NaN/inf)" if aside else "")
        raise DataError(f"{data.name}: no {which} test window left to rank{why}; ROC-AUC and the metrics at the "
                        f"threshold need both: label more of the test part, or move --train-fraction")
    scores = detector.score(data.test).window
    # a NaN/inf score (finite values the model overflows on) is not normal: ranked above every other, as `tsmon
    # score` flags it; one such window made eval refuse the whole file ("a non-finite score is not a ranking")
    nonfinite = int((~np.isfinite(scores)).sum())
    scores = np.where(np.isfinite(scores), scores.astype("float64"), np.finfo("float64").max)
    out: dict[str, Any] = {"model": detector.kind, **report(data.test_labels, scores, detector.threshold.value),
                           "test_windows": len(data.test), "test_anomalies": int(data.test_labels.sum()),
                           "test_windows_nonfinite_score": nonfinite,
                           # windows holding NaN/inf are not scored: not in the metrics above, counted here
                           "test_windows_dropped_nonfinite": int(data.summary.get("test_windows_dropped_nonfinite", 0)),
                           "test_anomalies_dropped_nonfinite": int(data.summary.get("test_anomalies_dropped_nonfinite", 0)),
                           # and those across a gap in the timestamps, which the daemon never scores
                           "test_windows_spanning_gaps": int(data.summary.get("test_windows_spanning_gaps", 0)),
                           "test_anomalies_spanning_gaps": int(data.summary.get("test_anomalies_spanning_gaps", 0))}
    if data.series is not None and data.series.labels is not None and data.test_ends is not None:
        flagged = ~(scores <= detector.threshold.value)
        # the test part's samples, also where its first or last windows were set aside (NaN/inf, a gap): an event
        # there is missed, as the daemon, which never scores them, would miss it (it was left out of the count)
        first, last = data.summary.get("test_span") or (int(data.test_ends[0]) - data.window + 1,
                                                         int(data.test_ends[-1]))
        out["events"] = event_metrics(data.series.labels, data.test_ends, flagged, data.window,
                                      tolerance=data.window, span=(int(first), int(last)),
                                      positions=data.test_positions)
    if with_baseline:
        out["baseline"] = evaluate(baseline(data, detector), data, with_baseline=False)
    return out


__all__ = ["DataSpec", "baseline", "evaluate", "load_dataset", "spec_for_eval", "train_detector"]
