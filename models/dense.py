"""Fully connected autoencoder over the flattened window (optional dropout and batch-norm)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from models.base import AEOutput, Autoencoder, ModelConfig, linear_flops
from models.errors import ModelConfigError


@dataclass(frozen=True, slots=True)
class DenseAEConfig(ModelConfig):
    hidden: tuple[int, ...] = (128, 64)
    code: int = 16
    dropout: float = 0.0
    batch_norm: bool = False

    def validate(self) -> None:
        ModelConfig.validate(self)
        if self.code < 1 or any(h < 1 for h in self.hidden):
            raise ModelConfigError("dense: code and every hidden size must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError(f"dense: dropout must be in [0, 1), got {self.dropout}")


def mlp(sizes: list[int], dropout: float, batch_norm: bool) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            if batch_norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def mlp_flops(sizes: list[int]) -> int:
    return sum(linear_flops(a, b) for a, b in itertools.pairwise(sizes))


class DenseAE(Autoencoder):
    """Dense autoencoder.

    >>> DenseAE(DenseAEConfig(window=10, channels=2))(torch.zeros(4, 10, 2)).recon.shape
    torch.Size([4, 10, 2])
    """

    kind = "dense"

    def __init__(self, config: DenseAEConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        d = config.window * config.channels
        self.sizes = [d, *config.hidden, config.code]
        self.encoder = mlp(self.sizes, config.dropout, config.batch_norm)
        self.decoder = mlp(self.sizes[::-1], config.dropout, config.batch_norm)

    @property
    def min_batch(self) -> int:
        """Its batch norm sees ``[batch, features]``: one window is no batch to normalise (conv's sees the
        timesteps too and trains on one)."""
        return 2 if self.config.batch_norm else 1

    def forward(self, x: torch.Tensor) -> AEOutput:
        code = self.encoder(x.flatten(1))
        return AEOutput(recon=self.decoder(code).view_as(x), code=code)

    def flops_per_window(self) -> int:
        return 2 * mlp_flops(self.sizes)
