"""1-D convolutional autoencoder: strided convolutions down, transposed convolutions back up."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from models.base import AEOutput, Autoencoder, ModelConfig
from models.errors import ModelConfigError


@dataclass(frozen=True, slots=True)
class ConvAEConfig(ModelConfig):
    filters: tuple[int, ...] = (32, 16)
    kernel: int = 7
    dropout: float = 0.0
    batch_norm: bool = True

    def validate(self) -> None:
        ModelConfig.validate(self)
        if not self.filters or any(f < 1 for f in self.filters):
            raise ModelConfigError("conv: filters must be a non-empty list of positive sizes")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ModelConfigError(f"conv: kernel must be odd and >= 1, got {self.kernel}")
        if self.window < 2 ** len(self.filters):
            raise ModelConfigError(f"conv: window {self.window} too short for {len(self.filters)} stride-2 layers")


def _block(conv: nn.Module, out: int, cfg: ConvAEConfig) -> list[nn.Module]:
    layers = [conv]
    if cfg.batch_norm:
        layers.append(nn.BatchNorm1d(out))
    layers.append(nn.ReLU())
    if cfg.dropout:
        layers.append(nn.Dropout(cfg.dropout))
    return layers


class ConvAE(Autoencoder):
    """Convolutional autoencoder; the decoder output is cropped to the window length.

    >>> ConvAE(ConvAEConfig(window=30, channels=3))(torch.zeros(2, 30, 3)).recon.shape
    torch.Size([2, 30, 3])
    """

    kind = "conv"

    def __init__(self, config: ConvAEConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        k, p = config.kernel, config.kernel // 2
        chans = [config.channels, *config.filters]
        enc: list[nn.Module] = []
        for a, b in itertools.pairwise(chans):
            enc += _block(nn.Conv1d(a, b, k, stride=2, padding=p), b, config)
        dec: list[nn.Module] = []
        rev = chans[::-1]
        for a, b in itertools.pairwise(rev[:-1]):
            dec += _block(nn.ConvTranspose1d(a, b, k, stride=2, padding=p, output_padding=1), b, config)
        dec.append(nn.ConvTranspose1d(rev[-2], rev[-1], k, stride=2, padding=p, output_padding=1))
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: torch.Tensor) -> AEOutput:
        code = self.encoder(x.transpose(1, 2))
        y = self.decoder(code)
        w = x.shape[1]
        y = y[..., :w] if y.shape[-1] >= w else F.pad(y, (0, w - y.shape[-1]))
        return AEOutput(recon=y.transpose(1, 2), code=code.flatten(1))

    def flops_per_window(self) -> int:
        cfg = self.config
        chans = [cfg.channels, *cfg.filters]
        total, length = 0, cfg.window
        for a, b in itertools.pairwise(chans):
            length = (length + 1) // 2
            total += 2 * a * b * cfg.kernel * length  # encoder conv at the reduced length
        # the transposed convolutions: every one of a layer's input positions meets each kernel tap once (counted at
        # its output length, twice that, model_gflops and efficiency were 1.5 × too high). Their inputs start at the
        # code's length and double at each layer (output_padding=1), cropped only at the end: not the encoder's
        # lengths unless the window divides by 2 ** layers (window 9, 3 layers: 12 % under torch's count)
        for a, b in itertools.pairwise(chans[::-1]):
            total += 2 * a * b * cfg.kernel * length
            length *= 2
        return total
