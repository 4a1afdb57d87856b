"""Scoring: which model serves a stream, and one forward pass per micro-batch on the model's device.

Owns the loaded models. Streams are routed to models by glob patterns on the stream id (first match
wins, cached per stream). A batch is normalised on the host, copied to the device once (pinned memory
and a non-blocking copy on CUDA), scored in inference mode, and only the window and channel errors come
back. A non-finite score is returned as it is: deciding what it means is the alert stage's job.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models import artifact
from models.detector import Detector
from models.errors import ConfigError
from monitor.batcher import Batch


@dataclass
class Served:
    """One model as the daemon serves it."""

    name: str
    pattern: str
    detector: Detector
    hop: int
    version: str  # first 12 hex digits of the weights' sha256: changes whenever the weights do
    gap_ms: float | None = None  # the route's own gap that restarts windows; None = the daemon-wide one

    @property
    def window(self) -> int:
        return self.detector.window

    @property
    def channels(self) -> int:
        return self.detector.channels

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.detector.kind, "version": self.version}


def load_served(pattern: str, path: Path, name: str | None, hop: int | None, device: str,
                gap_ms: float | None = None) -> Served:
    det = artifact.load(path, device)
    version = str(det.meta["weights"]["sha256"])[:12]  # artifact.load has checked the weights against it
    return Served(name or Path(path).name, pattern, det, hop or det.hop or det.window, version, gap_ms)


class Scorer:
    """Routes streams to models and scores batches."""

    def __init__(self, models: list[Served]) -> None:
        if not models:
            raise ConfigError("no model configured: add [[models]] to the config, set TSMON_MODEL=ARTIFACT, "
                              "or pass --model ARTIFACT to tsmon run")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ConfigError(f"model names must be unique, got {names}; set name = ... in [[models]]")
        self.models = {m.name: m for m in models}
        self._order = models
        self._routes: dict[str, Served | None] = {}

    def route(self, stream: str) -> Served | None:
        """The model serving ``stream`` (None if no pattern matches)."""
        if stream not in self._routes:
            self._routes[stream] = next((m for m in self._order if fnmatch.fnmatchcase(stream, m.pattern)), None)
        return self._routes[stream]

    def score(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """Window errors ``[n]`` and channel errors ``[n, C]`` of a batch (float32, may hold NaN)."""
        return self.score_values(batch.model, batch.values)

    def score_values(self, model: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        det = self.models[model].detector
        x = torch.from_numpy(det.scaler.transform(values))
        if det.device.type == "cuda":
            x = x.pin_memory().to(det.device, non_blocking=True)
        window, channel, _ = det.score_tensor(x)
        return window.float().cpu().numpy(), channel.float().cpu().numpy()
