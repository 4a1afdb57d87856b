"""PCA reconstruction baseline, fitted by SVD — the linear model every deep model must beat."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from models.base import AEOutput, Autoencoder, ModelConfig, linear_flops
from models.errors import DataError, ModelConfigError


@dataclass(frozen=True, slots=True)
class PCAConfig(ModelConfig):
    components: int = 0  # 0 → the fewest that explain ``variance`` of the training data
    variance: float = 0.95

    def validate(self) -> None:
        ModelConfig.validate(self)
        if self.components < 0 or not 0.0 < self.variance <= 1.0:
            raise ModelConfigError("pca: components must be >= 0 and variance in (0, 1]")


class PCA(Autoencoder):
    """Projection on the top principal components of the flattened training windows.

    >>> x = np.random.default_rng(0).normal(size=(50, 6, 1)).astype("float32")
    >>> m = PCA(PCAConfig(window=6, components=6)); m.fit(x)
    >>> float(m.errors(torch.from_numpy(x)).window.max()) < 1e-5
    True
    """

    kind = "pca"

    def __init__(self, config: PCAConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        d = config.window * config.channels
        k = config.components or 1
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("components", torch.zeros(k, d))

    def fit(self, windows: np.ndarray) -> None:
        """Fit by SVD of the centred, flattened ``[n, window, channels]`` training windows."""
        x = torch.from_numpy(np.ascontiguousarray(windows, dtype="float32")).flatten(1).double()
        if x.shape[0] < 2:
            raise DataError("pca: need at least 2 training windows")
        mean = x.mean(dim=0)
        _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
        k = self.config.components
        if k == 0:
            ratio = torch.cumsum(s.square(), 0) / s.square().sum().clamp_min(1e-12)
            k = int(torch.searchsorted(ratio, torch.tensor(self.config.variance, dtype=ratio.dtype))) + 1
        k = min(k, vt.shape[0])
        self.mean = mean.float()
        self.components = vt[:k].float().contiguous()
        self.config = replace(self.config, components=k)  # the artifact records the fitted size

    def forward(self, x: torch.Tensor) -> AEOutput:
        flat = x.flatten(1) - self.mean
        code = flat @ self.components.T
        recon = code @ self.components + self.mean
        return AEOutput(recon=recon.view_as(x), code=code)

    def flops_per_window(self) -> int:
        k, d = self.components.shape
        return 2 * linear_flops(d, k)
