"""LSTM sequence autoencoder (default kind), in the classic ECG5000 form but batched and multichannel.

Encoder: LSTM(channels → hidden) → LSTM(hidden → embedding); the last hidden state is the code.
Decoder: the code repeated over the window → LSTM(embedding → embedding) → LSTM(embedding → hidden)
→ Linear(hidden → channels). ``hidden`` defaults to 2 × embedding, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.base import AEOutput, Autoencoder, ModelConfig, linear_flops, lstm_flops
from models.errors import ModelConfigError


@dataclass(frozen=True, slots=True)
class LSTMAEConfig(ModelConfig):
    embedding: int = 64
    hidden: int = 0  # 0 → 2 × embedding
    dropout: float = 0.0  # between the stacked layers

    def validate(self) -> None:
        ModelConfig.validate(self)
        if self.embedding < 1 or self.hidden < 0:
            raise ModelConfigError("lstm: embedding must be >= 1 and hidden >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError(f"lstm: dropout must be in [0, 1), got {self.dropout}")

    @property
    def hidden_size(self) -> int:
        return self.hidden or 2 * self.embedding


class LSTMAE(Autoencoder):
    """LSTM autoencoder.

    >>> m = LSTMAE(LSTMAEConfig(window=8, channels=2, embedding=4))
    >>> m(torch.zeros(3, 8, 2)).recon.shape
    torch.Size([3, 8, 2])
    """

    kind = "lstm"

    def __init__(self, config: LSTMAEConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        e, h, c = config.embedding, config.hidden_size, config.channels
        self.enc1 = nn.LSTM(c, h, batch_first=True)
        self.enc2 = nn.LSTM(h, e, batch_first=True)
        self.dec1 = nn.LSTM(e, e, batch_first=True)
        self.dec2 = nn.LSTM(e, h, batch_first=True)
        self.out = nn.Linear(h, c)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> AEOutput:
        h, _ = self.enc1(x)
        _, (code, _) = self.enc2(self.drop(h))
        code = code[-1]  # [batch, embedding]
        z = code.unsqueeze(1).expand(-1, x.shape[1], -1)
        h, _ = self.dec1(z)
        h, _ = self.dec2(self.drop(h))
        return AEOutput(recon=self.out(h), code=code)

    def flops_per_window(self) -> int:
        cfg = self.config
        e, h, c, t = cfg.embedding, cfg.hidden_size, cfg.channels, cfg.window
        return (
            lstm_flops(c, h, t)
            + lstm_flops(h, e, t)
            + lstm_flops(e, e, t)
            + lstm_flops(e, h, t)
            + linear_flops(h, c, t)
        )
