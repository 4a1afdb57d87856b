"""Model kinds by name: their config class and module class, and building one from a manifest."""

from __future__ import annotations

from typing import Any

import torch

from models.base import Autoencoder, ModelConfig
from models.conv import ConvAE, ConvAEConfig
from models.dense import DenseAE, DenseAEConfig
from models.errors import ModelConfigError
from models.lstm_ae import LSTMAE, LSTMAEConfig
from models.pca import PCA, PCAConfig
from models.vae import VAE, VAEConfig

KINDS: dict[str, tuple[type[ModelConfig], type[Autoencoder]]] = {
    "lstm": (LSTMAEConfig, LSTMAE),
    "dense": (DenseAEConfig, DenseAE),
    "conv": (ConvAEConfig, ConvAE),
    "vae": (VAEConfig, VAE),
    "pca": (PCAConfig, PCA),
}
DEFAULT_KIND = "lstm"
MAX_PARAMETERS = 500_000_000  # 2 GiB of float32 weights; tsmon's models hold thousands to millions


def config_for(kind: str, params: dict[str, Any]) -> ModelConfig:
    """Build the config of ``kind`` from a dict of hyper-parameters (unknown keys are an error)."""
    if kind not in KINDS:
        raise ModelConfigError(f"unknown model kind {kind!r}: choose one of {', '.join(KINDS)}")
    cfg = KINDS[kind][0].from_dict(params)
    cfg.validate()
    return cfg


def build(kind: str, params: dict[str, Any]) -> Autoencoder:
    """Instantiate an untrained model of ``kind``, sized first on the meta device: ``--embedding 1000000000``
    (or a hand-edited PCA count) asked the allocator for 32 GB and ended in a torch traceback."""
    cfg = config_for(kind, params)  # checks the kind first
    try:
        with torch.device("meta"):
            size = sum(t.numel() for t in KINDS[kind][1](cfg).state_dict().values())  # type: ignore[call-arg]
    except RuntimeError as exc:  # "Storage size calculation overflowed": past any memory
        raise ModelConfigError(f"{kind} with these hyper-parameters is too large to build: "
                               f"{str(exc).splitlines()[0][:120]}") from None
    refuse_oversized(kind, size)
    return KINDS[kind][1](cfg)  # type: ignore[call-arg]


def refuse_oversized(kind: str, size: int) -> None:
    """ModelConfigError for a model of ``size`` weights over :data:`MAX_PARAMETERS` (a PCA's fitted component
    count is known only after its fit: checked then too, else train saved what load refuses)."""
    if size > MAX_PARAMETERS:
        raise ModelConfigError(f"{kind} with these hyper-parameters holds {size:,} weights, over the {MAX_PARAMETERS:,} "
                               f"this builds ({4 * size / 2**30:.1f} GiB in float32): choose smaller sizes")


# Training defaults per kind (``tsmon train`` options override them). The LSTM's were chosen by
# validation loss on ECG5000's classic split (never its test beats) within the 5-minute CPU budget; an
# LSTM autoencoder needs a few thousand updates whatever the data size, hence ``min_steps`` (the
# classic split's 60 epochs are 4 380 steps; the 233 training beats of the ucr split get 500 epochs).
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "lstm": {"epochs": 60, "batch_size": 32, "lr": 2e-3, "patience": 10, "min_steps": 4000},
    "dense": {"epochs": 200, "batch_size": 64, "lr": 1e-3, "patience": 15},
    "conv": {"epochs": 150, "batch_size": 64, "lr": 1e-3, "patience": 15},
    "vae": {"epochs": 200, "batch_size": 64, "lr": 1e-3, "patience": 15},
    "pca": {"epochs": 1, "batch_size": 1024, "lr": 1.0, "patience": 1},
}


def train_defaults(kind: str) -> dict[str, Any]:
    if kind not in KINDS:
        raise ModelConfigError(f"unknown model kind {kind!r}: choose one of {', '.join(KINDS)}")
    return dict(TRAIN_DEFAULTS[kind])
