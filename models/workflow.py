"""Train-and-evaluate recipes shared by the CLI and tests: train a detector, fit the PCA baseline,
and evaluate both on the same test split."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from models.data import Dataset, load_ecg5000, read_series, series_dataset
from models.detector import DEFAULT_QUANTILE, Detector, Threshold, error_quantiles
from models.errors import DataError
from models.evaluate import event_metrics, report
from models.registry import build
from models.scaling import Scaler
from models.train import EpochStats, TrainConfig, fit


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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["value_cols"] = list(self.value_cols)
        return d


def load_dataset(spec: DataSpec) -> Dataset:
    if spec.source == "ecg5000":
        return load_ecg5000(spec.protocol, spec.seed)
    series = read_series(spec.source, list(spec.value_cols) or None, spec.timestamp_col, spec.label_col)
    hop = spec.hop or max(1, spec.window // 4)
    return series_dataset(series, spec.window, hop, spec.train_fraction)


def spec_for_eval(manifest: dict[str, Any], source: str, protocol: str | None) -> DataSpec:
    """The data spec to evaluate a trained model on ``source`` without touching its training data.

    Same ECG5000 protocol and seed as training (another protocol would test on training beats); a series
    file is split chronologically as in training: the model is tested on the part after the split and
    the PCA baseline is fitted on the part before it (for the training file, the model's own split).
    """
    trained = manifest.get("training", {}).get("data", {})
    if source == "ecg5000":
        if trained.get("source") != "ecg5000":
            raise DataError("this model was not trained on ecg5000; evaluate it on its own kind of data")
        proto = protocol or trained.get("protocol", "classic")
        if proto != trained.get("protocol"):
            raise DataError(f"model was trained with protocol {trained.get('protocol')!r}; evaluating with "
                            f"{proto!r} would test on training beats — retrain with --protocol {proto}")
        return DataSpec("ecg5000", proto, int(trained.get("seed", 42)))
    return DataSpec(source, window=int(manifest["window"]), hop=int(manifest["hop"]),
                    value_cols=tuple(manifest["channels"]) if trained.get("value_cols") else (),
                    timestamp_col=trained.get("timestamp_col"), label_col=trained.get("label_col"),
                    train_fraction=float(trained.get("train_fraction", 0.5)))


def train_detector(data: Dataset, kind: str, params: dict[str, Any], cfg: TrainConfig,
                   threshold_quantile: float = DEFAULT_QUANTILE, threshold_margin: float = 1.0,
                   normalisation: str = "standard",
                   on_epoch: Callable[[EpochStats], None] | None = None) -> tuple[Detector, dict[str, Any]]:
    """Fit normalisation on ``data.train``, train a ``kind`` model, derive quantiles and threshold on val."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    scaler = Scaler.fit(data.train, normalisation)
    model = build(kind, {**params, "window": data.window, "channels": len(data.channels)})
    result = fit(model, scaler.transform(data.train), scaler.transform(data.val), cfg, on_epoch)
    det = Detector(model, scaler, Threshold(threshold_quantile, threshold_margin, 0.0), {}, cfg.loss,
                   list(data.channels), data.hop).to(result.device)
    val_err = det.score(data.val).window
    det.quantiles = error_quantiles(val_err)
    det.threshold = Threshold.from_errors(val_err, threshold_quantile, threshold_margin)
    training = {"data": {**data.summary, "value_cols": list(data.channels)}, "config": _cfg_dict(cfg),
                "result": result.to_dict()}
    return det, training


def _cfg_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)


def baseline(data: Dataset, detector: Detector) -> Detector:
    """The PCA baseline fitted on the same training windows, thresholded the same way."""
    cfg = TrainConfig(loss=detector.loss, device=str(detector.device), seed=0)
    det, _ = train_detector(data, "pca", {}, cfg, detector.threshold.quantile, detector.threshold.margin,
                            detector.scaler.method)
    return det


def evaluate(detector: Detector, data: Dataset, with_baseline: bool = True) -> dict[str, Any]:
    """Metrics of ``detector`` on ``data.test`` (and of the PCA baseline beside it)."""
    if data.test_labels is None:
        raise DataError("evaluation needs labels: give the data a 0/1 label column (--label-col)")
    if len(data.test) == 0:
        raise DataError("no test windows left after the training split")
    scores = detector.score(data.test).window
    out: dict[str, Any] = {"model": detector.kind, **report(data.test_labels, scores, detector.threshold.value),
                           "test_windows": len(data.test), "test_anomalies": int(data.test_labels.sum())}
    if data.series is not None and data.series.labels is not None and data.test_ends is not None:
        flagged = data.test_ends[~(scores <= detector.threshold.value)]
        span = (int(data.test_ends[0]) - data.window + 1, int(data.test_ends[-1]))
        out["events"] = event_metrics(data.series.labels, flagged, data.window, tolerance=data.window, span=span)
    if with_baseline:
        out["baseline"] = evaluate(baseline(data, detector), data, with_baseline=False)
    return out


__all__ = ["DataSpec", "baseline", "evaluate", "load_dataset", "spec_for_eval", "train_detector"]
