"""tsmon models: autoencoder family, training, artifacts, datasets and evaluation (no daemon code).

Usable from a notebook::

    from models import load_ecg5000, build, TrainConfig, train_detector
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tsmon")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

from models.artifact import load, save
from models.data import Dataset, load_ecg5000, read_series, series_dataset
from models.detector import Detector, Scores, Threshold
from models.errors import ArtifactError, DataError, ModelConfigError, TsmonError
from models.registry import KINDS, build
from models.train import TrainConfig, fit

__all__ = [
    "KINDS", "ArtifactError", "DataError", "Dataset", "Detector", "ModelConfigError", "Scores",
    "Threshold", "TrainConfig", "TsmonError", "__version__", "build", "fit", "load", "load_ecg5000",
    "read_series", "save", "series_dataset",
]
