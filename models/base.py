"""The scoring contract every model kind implements, and the registry of kinds.

Contract: input float32 ``[batch, window, channels]`` (already normalised); the model reconstructs it and
the elementwise error gives three views — per window ``[batch]``, per channel ``[batch, channels]`` and per
timestep ``[batch, window]``. Model code is pure: no I/O, no logging, no global state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from models.errors import ModelConfigError

LOSSES = ("l1", "mse")


@dataclass(frozen=True, slots=True)
class AEOutput:
    """What a forward pass returns: the reconstruction, the code (for sparsity) and a KL term (VAE)."""

    recon: torch.Tensor
    code: torch.Tensor
    kl: torch.Tensor | None = None  # per-window KL divergence, VAE only


@dataclass(frozen=True, slots=True)
class ErrorViews:
    """Reconstruction error seen three ways (torch tensors on the model's device)."""

    window: torch.Tensor  # [batch]
    channel: torch.Tensor  # [batch, channels]
    timestep: torch.Tensor  # [batch, window]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Fields every kind shares; each kind's config subclasses it with its own hyper-parameters."""

    window: int
    channels: int = 1

    def validate(self) -> None:
        if self.window < 2:
            raise ModelConfigError(f"window must be >= 2 samples, got {self.window}")
        if self.channels < 1:
            raise ModelConfigError(f"channels must be >= 1, got {self.channels}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from JSON-like values, checking each against its field's type (int, float, bool, str or
        tuple of ints), so that a wrong type fails here with the key's name, not deep in a layer."""
        types = {f.name: str(f.type) for f in fields(cls)}
        unknown = set(d) - set(types)
        if unknown:
            raise ModelConfigError(f"unknown hyper-parameter(s) for {cls.__name__}: {sorted(unknown)}")
        return cls(**{k: _typed(k, v, types[k]) for k, v in d.items()})


def _typed(key: str, value: Any, type_name: str) -> Any:
    """``value`` as the field type named ``type_name``; :class:`ModelConfigError` when it is not one."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if type_name == "int" and is_int:
        return value
    if type_name == "float" and (is_int or isinstance(value, float)):
        return float(value)
    if (type_name == "bool" and isinstance(value, bool)) or (type_name == "str" and isinstance(value, str)):
        return value
    if type_name.startswith("tuple[int") and isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise ModelConfigError(f"hyper-parameter {key} must be {type_name}, got {value!r}")


class Autoencoder(nn.Module):
    """Base of all model kinds: subclasses implement ``forward`` and ``flops_per_window``."""

    kind: ClassVar[str]
    config: ModelConfig

    def forward(self, x: torch.Tensor) -> AEOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def flops_per_window(self) -> int:  # pragma: no cover - abstract
        """Float operations (multiply and add counted apart) of one window's forward pass."""
        raise NotImplementedError

    @property
    def min_batch(self) -> int:
        """Fewest windows a training batch may hold (2 where a batch norm normalises across the batch only)."""
        return 1

    def errors(self, x: torch.Tensor, loss: str = "l1", elbo: bool = False) -> ErrorViews:
        """Reconstruction error views of ``x`` ``[batch, window, channels]``."""
        return error_views(self(x), x, loss, elbo)


def error_views(out: AEOutput, x: torch.Tensor, loss: str = "l1", elbo: bool = False) -> ErrorViews:
    """The error views of a forward pass ``out`` of ``x`` (so that a caller needing the reconstruction
    too runs the model once)."""
    diff = out.recon - x
    e = diff.abs() if loss == "l1" else diff.square()
    window = e.mean(dim=(1, 2))
    if elbo and out.kl is not None:
        window = window + out.kl / (x.shape[1] * x.shape[2])
    return ErrorViews(window=window, channel=e.mean(dim=1), timestep=e.mean(dim=2))


def lstm_flops(inputs: int, hidden: int, steps: int) -> int:
    """Gate matmuls of one LSTM layer over ``steps`` steps (8·H·(I+H) per step, elementwise ignored)."""
    return 2 * 4 * hidden * (inputs + hidden) * steps


def linear_flops(inputs: int, outputs: int, rows: int = 1) -> int:
    return 2 * inputs * outputs * rows
