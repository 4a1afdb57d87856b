"""tsmon models: autoencoder family, training, artifacts, datasets and evaluation (no daemon code).

Usable from a notebook::

    from models import load_ecg5000, build, TrainConfig, fit
    from models.workflow import train_detector
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("tsmon")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

# Imported on first use (PEP 562): ``from models.errors import ...`` runs this file, and importing torch and
# pandas here made every tsmon command — `tsmon ctl`, `tsmon status`, `--help` — wait ~3 s (5 s under load) first.
_LAZY = {
    "load": "models.artifact", "save": "models.artifact",
    "Dataset": "models.data", "load_ecg5000": "models.data", "read_series": "models.data",
    "series_dataset": "models.data",
    "Detector": "models.detector", "Scores": "models.detector", "Threshold": "models.detector",
    "ArtifactError": "models.errors", "DataError": "models.errors", "ModelConfigError": "models.errors",
    "TsmonError": "models.errors",
    "KINDS": "models.registry", "build": "models.registry",
    "TrainConfig": "models.train", "fit": "models.train",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "KINDS", "ArtifactError", "DataError", "Dataset", "Detector", "ModelConfigError", "Scores",
    "Threshold", "TrainConfig", "TsmonError", "__version__", "build", "fit", "load", "load_ecg5000",
    "read_series", "save", "series_dataset",
]
