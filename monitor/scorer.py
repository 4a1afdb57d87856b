"""Scoring: which model serves a stream, and one forward pass per micro-batch on the model's device.

Owns the loaded models. Streams are routed to models by glob patterns on the stream id (first match
wins, cached per stream). A batch is normalised on the host, copied to the device once (pinned memory
and a non-blocking copy on CUDA), scored in inference mode, and only the window and channel errors come
back. A non-finite score is returned as it is: deciding what it means is the alert stage's job.

On CUDA a reduced precision (bfloat16, float16) runs the forward pass under autocast; :meth:`Scorer.warm_up`
checks it against float32 on the same windows at start and refuses to serve a model whose scores move
more than the tolerance. On CPU autocast leaves the LSTM in float32, so the CPU always scores in float32.
Warm-up also runs each batch size once before any input, so that the first real batch does not pay for
kernel selection and allocation, and returns the timings (the adaptive batcher starts from them).
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models import artifact, beats
from models.detector import Detector, autocast, exact_float32, precision_error, served_precision
from models.errors import ConfigError
from monitor import logs
from monitor.batcher import Batch

log = logs.get("tsmon.scorer")

PRECISIONS = ("float32", "bfloat16", "float16")
REGROW_AFTER = 100  # calls split at the size an out-of-memory left that fitted before trying twice that size


@dataclass
class Served:
    """One model as the daemon serves it."""

    name: str
    pattern: str
    detector: Detector
    hop: int
    version: str  # first 12 hex digits of the weights' sha256: changes whenever the weights do
    gap_ms: float | None = None  # the route's own gap that restarts windows; None = the daemon-wide one
    for_windows: int | None = None  # the route's own alert debounce; None = the daemon-wide one
    resolve_after: int | None = None
    gap_periods: float | None = None  # the route's own relative gap; None = the daemon-wide one

    @property
    def window(self) -> int:
        return self.detector.window

    @property
    def thin(self) -> int:
        """Every ``thin``-th window shares no sample with the last: ceil(window / hop) (a review: window // hop kept 10
        samples of 40 shared at hop 15, and the drift guard's KS halves ran on correlated windows)."""
        return -(-self.window // self.hop)

    @property
    def channels(self) -> int:
        return self.detector.channels

    @property
    def identity(self) -> str:
        """Name and weights version: alert ids hash it, so a rotated model's episodes never reuse an old id."""
        return f"{self.name}@{self.version}"

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.detector.kind, "version": self.version}


def load_served(pattern: str, path: Path, name: str | None, hop: int | None, device: str,
                gap_ms: float | None = None, for_windows: int | None = None,
                resolve_after: int | None = None, gap_periods: float | None = None) -> Served:
    det = artifact.load(path, device)
    if hop is not None and beats.rule_of(det.windowing) is not None:  # recorded, ignored, and it changed the
        # calibrator's thinning (the CLI refuses --hop for such a model too)
        raise ConfigError(f"[[models]] route {pattern!r}: hop is for sliding-window models; {path} cuts one window "
                          f"per beat (remove hop)")
    if beats.rule_of(det.windowing) is None and (hop or 0) > det.window:  # the samples between windows would never
        # be scored (a pipeline owner's typo, 1000 for a 64-sample window: 12 windows of 12 000 samples); an artifact's
        # own hop over its window is refused by artifact.load
        raise ConfigError(f"[[models]] route {pattern!r}: hop {hop} is longer than {path}'s window ({det.window} "
                          f"samples): the samples between its windows would never be scored")
    version = str(det.meta["weights"]["sha256"])[:12]  # artifact.load has checked the weights against it
    return Served(name or Path(path).name, pattern, det, hop or det.hop or det.window, version, gap_ms,
                  for_windows, resolve_after, gap_periods)


ROUTE_CACHE = 16_384  # stream ids whose route is remembered
MISSING = object()


@dataclass(slots=True)
class _Regrowth:
    """After an out-of-memory: calls split at ``Scorer.max_rows`` that fitted since it was set, how many of them
    before twice the size is tried (doubled each time that fails), and whether it was just doubled."""

    fitted: int = 0
    wait: int = REGROW_AFTER
    grown: bool = False


class Scorer:
    """Routes streams to models and scores batches."""

    def __init__(self, models: list[Served], precision: str = "float32") -> None:
        if not models:
            raise ConfigError("no model configured: add [[models]] to the config, set TSMON_MODEL=ARTIFACT, "
                              "or pass --model ARTIFACT to tsmon run")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ConfigError(f"model names must be unique, got {names}; set name = ... in [[models]]")
        self.models = {m.name: m for m in models}
        self._order = models
        self._routes: dict[str, Served | None] = {}
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.precision = precision
        self.max_rows: dict[str, int] = {}  # per model, the windows one call may take (lowered by an out-of-memory)
        self._regrowth: dict[str, _Regrowth] = {}  # per model whose max_rows an out-of-memory set
        if any(m.detector.device.type == "cuda" for m in models):
            exact_float32()

    def route(self, stream: str) -> Served | None:
        """The model serving ``stream`` (None if no pattern matches); the last ``ROUTE_CACHE`` answers are kept
        (ids that are refused or evicted keep arriving in a hostile or misconfigured topic)."""
        served = self._routes.pop(stream, MISSING)
        if served is MISSING:
            served = next((m for m in self._order if fnmatch.fnmatchcase(stream, m.pattern)), None)
            if len(self._routes) >= ROUTE_CACHE:
                del self._routes[next(iter(self._routes))]  # least recently used: dicts keep insertion order
        self._routes[stream] = served  # type: ignore[assignment]
        return served  # type: ignore[return-value]

    def score(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """Window errors ``[n]`` and channel errors ``[n, C]`` of a batch (float32, may hold NaN)."""
        return self.score_values(batch.model, batch.values)

    def precision_of(self, model: str) -> str:
        """The precision ``model`` is scored in: the configured one on CUDA, float32 on CPU — and float16 for an LSTM
        asked for bfloat16 (see :func:`models.detector.served_precision`)."""
        det = self.models[model].detector
        return served_precision(det.device, det.kind, self.precision)

    def score_values(self, model: str, values: np.ndarray, precision: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Window errors ``[n]`` and channel errors ``[n, C]`` of ``values``. Out of GPU memory, the windows are
        scored in halves, down to one (a shared GPU or a large ``batch.max_batch`` stopped the daemon at every
        batch, and so at every restart), and later calls keep to the size that fitted. Under a reduced precision a
        window whose score is not finite is scored again in float32: beyond float16's range (65 504 σ) a spike scored
        NaN, which is never taken for normal, but never paged either. After ``REGROW_AFTER`` split calls that fitted,
        the size is doubled again (one transient out-of-memory on a shared GPU halved the throughput for good), and
        each time that fails, the wait doubles (a GPU short for good failed a forward pass every 100 calls)."""
        precision = precision or self.precision_of(model)
        if not len(values):
            return self._score(model, values, precision)
        rows = self.max_rows.get(model, len(values)) or 1
        parts = [self._score_fitting(model, values[i : i + rows], precision) for i in range(0, len(values), rows)]
        if (regrowth := self._regrowth.get(model)) is not None and len(values) > rows:  # split, and it fitted
            regrowth.fitted += 1
            if regrowth.fitted >= regrowth.wait:  # try twice the size
                self.max_rows[model], regrowth.fitted, regrowth.grown = 2 * rows, 0, True
        window = np.concatenate([w for w, _ in parts]) if len(parts) != 1 else parts[0][0]
        channel = np.concatenate([c for _, c in parts]) if len(parts) != 1 else parts[0][1]
        if precision != "float32" and not (finite := np.isfinite(window)).all():
            window[~finite], channel[~finite] = self._score_fitting(model, values[~finite], "float32")
        return window, channel

    def _score_fitting(self, model: str, values: np.ndarray, precision: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            return self._score(model, values, precision)
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError since 2.5; the older name still stands for it
            if len(values) < 2:
                raise
            half = len(values) // 2
            self.max_rows[model] = min(self.max_rows.get(model, half), half)
            regrowth = self._regrowth.setdefault(model, _Regrowth())
            if regrowth.grown:  # twice the size failed again: wait twice as long before the next try
                regrowth.wait = min(64 * REGROW_AFTER, 2 * regrowth.wait)
            regrowth.fitted, regrowth.grown = 0, False
            log.warning("scoring_out_of_memory", model=model, windows=len(values), now=half,
                        consequence="scored in parts of at most this many windows from now on")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            a, b = (self._score_fitting(model, part, precision) for part in (values[:half], values[half:]))
            return np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])

    def _score(self, model: str, values: np.ndarray, precision: str) -> tuple[np.ndarray, np.ndarray]:
        det = self.models[model].detector
        x = torch.from_numpy(det.scaler.transform(values))
        if det.device.type == "cuda":
            x = x.pin_memory().to(det.device, non_blocking=True)
        with autocast(det.device, precision):
            window, channel, _ = det.score_tensor(x)
        return window.float().cpu().numpy(), channel.float().cpu().numpy()

    def warm_up(self, sizes: list[int], tolerance: float = 0.02, seed: int = 0) -> dict[str, list[tuple[int, float]]]:
        """Score windows of each size once per model (untimed), then once timed; returns ``{model: [(n, s)]}``.

        Under a reduced precision the same windows are scored in float32 too: a score difference above
        ``tolerance`` × max(score, threshold) is a :class:`ConfigError` (the model is not served that way).
        The windows are noise of the training data's scale (normalised N(0, 1)).
        """
        out: dict[str, list[tuple[int, float]]] = {}
        rng = np.random.default_rng(seed)
        for name, served in self.models.items():
            det = served.detector
            center = np.asarray(det.scaler.center, "float32")
            scale = np.asarray(det.scaler.scale, "float32")
            timings = []
            for n in sorted(set(sizes)):
                values = (center + scale * rng.normal(size=(n, det.window, det.channels))).astype("float32")
                self.score_values(name, values)
                t0 = time.perf_counter()
                self.score_values(name, values)
                timings.append((n, time.perf_counter() - t0))
                if (precision := self.precision_of(name)) != "float32":  # its own scores, none scored again: a model
                    # whose reduced-precision scores are NaN was taken, and every batch then scored twice
                    self._check_precision(name, values, self._score(name, values, precision)[0], tolerance)
            out[name] = timings
        return out

    def _check_precision(self, name: str, values: np.ndarray, scores: np.ndarray, tolerance: float) -> None:
        exact, _ = self.score_values(name, values, "float32")
        worst = precision_error(scores, exact, self.models[name].detector.threshold.value)
        if not worst <= tolerance:  # NaN too
            raise ConfigError(f"model {name}: {self.precision} scores differ from float32 by {worst:.2%} of "
                              f"max(score, threshold) > daemon.precision_tolerance {tolerance:.2%}; use "
                              "daemon.precision = \"float32\" (or a larger tolerance)")
