"""A trained model ready to score raw windows: model + normalisation + threshold, on a device.

``Detector.score`` is the one scoring entry point for the CLI, evaluation and the daemon: raw float32
``[batch, window, channels]`` in, error views (numpy) out, computed in inference mode in chunks.

``downsample`` = k > 1: windows are cut at the stream's own rate (``window`` samples) and averaged over
blocks of k samples before the model sees them (``window / k`` steps, e.g. 360 Hz ECG scored at 90 Hz);
per-timestep errors and reconstructions are repeated back to the stream's rate, so every caller still
deals in windows of the stream's own samples.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from models.base import Autoencoder, error_views
from models.errors import DataError
from models.scaling import Scaler
from models.train import resolve_device

QUANTILE_LEVELS = (0.5, 0.9, 0.95, 0.99, 0.995, 0.999)
# Default threshold quantile of the validation errors. Not 0.99: "normal" validation data is rarely
# clean — in ECG5000's the error doubles between q0.95 and q0.99 (atypical beats labelled normal), so a
# high quantile lands inside that tail. The daemon debounces alerts over consecutive windows on top.
DEFAULT_QUANTILE = 0.95


Windows = TypeVar("Windows", np.ndarray, torch.Tensor)


def check_downsample(window: int, k: int) -> None:
    """A window of ``window`` samples can be averaged in blocks of ``k``: :class:`DataError` if not."""
    if k < 1 or window % k:
        raise DataError(f"--downsample must be >= 1 and divide the window ({window}), got {k}")


def pool(x: Windows, k: int) -> Windows:
    """``[n, W, C]`` at the stream's rate → ``[n, W / k, C]``: the mean of every k samples (numpy or torch)."""
    if k == 1:
        return x
    check_downsample(x.shape[1], k)
    return x.reshape(x.shape[0], x.shape[1] // k, k, x.shape[2]).mean(2)


@dataclass(frozen=True, slots=True)
class Scores:
    """Reconstruction errors of a batch of windows (normalised units)."""

    window: np.ndarray  # [batch]
    channel: np.ndarray  # [batch, channels]
    timestep: np.ndarray  # [batch, window]


def check_threshold_options(quantile: float, margin: float) -> None:
    """A default threshold's quantile must be in (0, 1] and its margin finite and > 0 (NaN passed ``<= 0``)."""
    if not (0.0 < quantile <= 1.0 and 0.0 < margin < math.inf):
        raise DataError(f"threshold quantile must be in (0, 1] and margin finite and > 0, got {quantile} and {margin}")


@dataclass(frozen=True, slots=True)
class Threshold:
    """Default threshold = ``quantile`` of the validation errors × ``margin``."""

    quantile: float
    margin: float
    value: float

    @staticmethod
    def from_errors(errors: np.ndarray, quantile: float = DEFAULT_QUANTILE, margin: float = 1.0) -> Threshold:
        check_threshold_options(quantile, margin)
        return Threshold(quantile, margin, float(np.quantile(errors, quantile)) * margin)  # in float64: a float32
        # quantile × 1e308 overflowed with a RuntimeWarning


def exact_float32() -> None:
    """float32 on CUDA is IEEE float32: torch lets cuDNN's convolutions and RNNs use TF32 (a 10-bit mantissa) by
    default, so a "float32" GPU scored an LSTM or conv model off the float32 its CPU-trained threshold came from, and
    the reduced-precision check at start compared against TF32. Process-wide; set wherever a detector is put on CUDA
    (``Detector.to``): `tsmon bench scorer`, `score`, `eval` and the threshold `train` derives scored in TF32 while the
    daemon served IEEE float32, so the benchmark measured another computation than the one served (and its efficiency
    set a TF32 model against an IEEE GEMM). A reduced precision is asked for by ``daemon.precision``, not by this."""
    if hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"):  # those settings (torch 2.9 on; an
        # older torch has a module torch.backends.cudnn.rnn of its own, so that name tells nothing)
        torch.backends.cudnn.rnn.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:  # before them, TF32 is one switch for all of cuDNN
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """CUDA autocast to ``precision``; nothing for float32 or off CUDA (CPU autocast leaves the LSTM in float32)."""
    if precision == "float32" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=getattr(torch, precision))


def served_precision(device: torch.device, kind: str, precision: str) -> str:
    """The precision a model of ``kind`` on ``device`` is scored in when ``precision`` is asked for: float32 off CUDA,
    and float16 for an LSTM asked for bfloat16: under autocast cuDNN's RNNs run in float16 whatever the dtype asked
    (ATen's AutocastRNN.cpp casts to half), so "bfloat16" served an LSTM with float16's range under that name."""
    if device.type != "cuda":
        return "float32"
    return "float16" if precision == "bfloat16" and kind == "lstm" else precision


def precision_error(scores: np.ndarray, exact: np.ndarray, threshold: float) -> float:
    """Largest score difference to the float32 ``exact`` scores, as a share of max(|exact|, threshold)."""
    return float(np.max(np.abs(scores - exact) / np.maximum(np.abs(exact), threshold)))


def error_quantiles(errors: np.ndarray) -> dict[str, float]:
    """The manifest's quantiles of validation errors, keyed ``"0.5"`` … ``"0.999"`` and ``"max"``."""
    if len(errors) == 0 or not np.isfinite(errors).all():
        raise DataError("validation errors must be a non-empty array of finite values")
    q = {str(level): float(np.quantile(errors, level)) for level in QUANTILE_LEVELS}
    q["max"] = float(errors.max())
    return q


@dataclass
class Detector:
    """A model with its normalisation, threshold and metadata; scores raw windows."""

    model: Autoencoder
    scaler: Scaler
    threshold: Threshold
    quantiles: dict[str, float]
    loss: str = "l1"
    channel_names: list[str] = field(default_factory=list)
    hop: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    windowing: dict[str, Any] = field(default_factory=lambda: {"kind": "sliding"})  # how windows are cut
    downsample: int = 1  # samples averaged into one model step
    channel_usual: list[float] = field(default_factory=list)  # median validation error per channel ([] = unknown)

    @property
    def kind(self) -> str:
        return self.model.kind

    @property
    def names(self) -> list[str]:
        """Channel names; ``ch{i}`` where the artifact gives none."""
        return [self.channel_names[i] if i < len(self.channel_names) else f"ch{i}" for i in range(self.channels)]

    @property
    def window(self) -> int:
        """Samples of the stream per window (the model sees ``window / downsample`` steps)."""
        return self.model.config.window * self.downsample

    @property
    def channels(self) -> int:
        return self.model.config.channels

    def to(self, device: str | torch.device = "auto") -> Detector:
        """On ``device``, in eval mode; on CUDA, float32 is IEEE float32 from here on (see :func:`exact_float32`)."""
        self.device = resolve_device(device) if isinstance(device, str) else device
        if self.device.type == "cuda":
            exact_float32()
        self.model.to(self.device).eval()
        return self

    def _check(self, x: np.ndarray) -> None:
        if x.ndim != 3 or x.shape[1:] != (self.window, self.channels):
            raise DataError(f"windows must be [batch, {self.window}, {self.channels}], got {list(x.shape)}")
        if not np.isfinite(x).all():
            raise DataError("windows contain NaN or inf; drop or repair them before scoring")

    @torch.inference_mode()
    def score_tensor(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score an already-normalised tensor on ``self.device`` (the daemon's hot path)."""
        elbo = getattr(self.model.config, "score", "recon") == "elbo"
        v = self.model.errors(pool(x, self.downsample), self.loss, elbo=elbo)
        return v.window, v.channel, self._spread(v.timestep)

    def _spread(self, t: torch.Tensor) -> torch.Tensor:
        """Per-step values back at the stream's rate (each repeated ``downsample`` times along dim 1)."""
        return t if self.downsample == 1 else t.repeat_interleave(self.downsample, dim=1)

    def score(self, windows: np.ndarray, batch_size: int = 2048) -> Scores:
        """Score raw windows ``[batch, window, channels]``; raises :class:`DataError` on bad shape or NaN."""
        x = np.asarray(windows, dtype="float32")
        self._check(x)
        self.model.eval()
        parts: list[tuple[np.ndarray, ...]] = []
        for start in range(0, len(x), batch_size):
            t = torch.from_numpy(self.scaler.transform(x[start : start + batch_size])).to(self.device)
            parts.append(tuple(v.float().cpu().numpy() for v in self.score_tensor(t)))
        if not parts:
            return Scores(np.zeros(0, "float32"), np.zeros((0, self.channels), "float32"),
                          np.zeros((0, self.window), "float32"))
        w, c, t = (np.concatenate(p) for p in zip(*parts))
        return Scores(w, c, t)

    def reconstruct(self, windows: np.ndarray) -> tuple[np.ndarray, Scores]:
        """Reconstruction of raw windows, in raw units, and their scores: one forward pass (for pictures)."""
        x = np.asarray(windows, dtype="float32")
        self._check(x)
        with torch.inference_mode():
            t = pool(torch.from_numpy(self.scaler.transform(x)).to(self.device), self.downsample)
            out = self.model.eval()(t)
            v = error_views(out, t, self.loss, getattr(self.model.config, "score", "recon") == "elbo")
            recon = self.scaler.inverse(self._spread(out.recon).float().cpu().numpy())
        return recon, Scores(*(a.float().cpu().numpy() for a in (v.window, v.channel, self._spread(v.timestep))))
