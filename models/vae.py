"""Variational autoencoder (dense encoder/decoder, Gaussian latent); scored by reconstruction or ELBO."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.base import AEOutput, Autoencoder, ModelConfig, linear_flops
from models.dense import mlp, mlp_flops
from models.errors import ModelConfigError


@dataclass(frozen=True, slots=True)
class VAEConfig(ModelConfig):
    hidden: tuple[int, ...] = (128, 64)
    latent: int = 8
    beta: float = 1.0  # weight of the KL term in training
    score: str = "recon"  # or "elbo": reconstruction + KL per element
    dropout: float = 0.0

    def validate(self) -> None:
        ModelConfig.validate(self)
        if self.latent < 1 or any(h < 1 for h in self.hidden) or not self.hidden:
            raise ModelConfigError("vae: latent and hidden sizes must be >= 1")
        if self.score not in ("recon", "elbo"):
            raise ModelConfigError(f"vae: score must be recon or elbo, got {self.score!r}")
        if self.beta < 0:
            raise ModelConfigError("vae: beta must be >= 0")


class VAE(Autoencoder):
    """VAE; in eval mode the decoder reads the latent mean, so scores are deterministic.

    >>> VAE(VAEConfig(window=12))(torch.zeros(5, 12, 1)).kl.shape
    torch.Size([5])
    """

    kind = "vae"

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        d = config.window * config.channels
        enc_sizes = [d, *config.hidden]
        self.encoder = nn.Sequential(mlp(enc_sizes, config.dropout, False), nn.ReLU())
        self.to_stats = nn.Linear(config.hidden[-1], 2 * config.latent)
        self.decoder = mlp([config.latent, *config.hidden[::-1], d], config.dropout, False)

    def forward(self, x: torch.Tensor) -> AEOutput:
        mu, logvar = self.to_stats(self.encoder(x.flatten(1))).chunk(2, dim=1)
        logvar = logvar.clamp(-10.0, 10.0)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(dim=1)
        return AEOutput(recon=self.decoder(z).view_as(x), code=mu, kl=kl)

    def flops_per_window(self) -> int:
        cfg = self.config
        d = cfg.window * cfg.channels
        return (
            mlp_flops([d, *cfg.hidden])
            + linear_flops(cfg.hidden[-1], 2 * cfg.latent)
            + mlp_flops([cfg.latent, *cfg.hidden[::-1], d])
        )
