"""Training on normal windows: batched Adam, validation split, early stopping, seeded, device-agnostic.

Pure: progress goes to an optional ``on_epoch`` callback (the CLI draws a progress bar with it).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.base import LOSSES, Autoencoder
from models.errors import DataError, ModelConfigError
from models.pca import PCA


def usable_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: the ones it may run on, fewer under a cgroup v2 CPU quota (a container's CPU
    limit: ``os.cpu_count()`` counts the node's cores, and as many threads under a 2-CPU limit are throttled)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 file (or another format): no quota known
        pass
    return n


def default_threads() -> int:
    """Torch CPU threads when none are given: the usable CPUs − 1, at least 1 (training and the daemon's scoring).
    Measured on 2 cores (4 ECG5000 LSTM epochs): 2 threads 12.7 s against 1 thread's 15.4 s idle, but 204 s against
    14.9 s beside one busy process — each step's threads wait on one another — and a first `make demo` on a
    shared machine ran 25 minutes without finishing its training."""
    return max(1, usable_cpus() - 1)


@dataclass(frozen=True, slots=True)
class TrainConfig:
    epochs: int = 60
    min_steps: int = 0  # train at least this many optimizer steps (more epochs on small data sets)
    batch_size: int = 32
    lr: float = 1e-3
    warmup: float = 0.1  # one-cycle schedule: fraction of steps warming up to ``lr``, then cosine decay
    weight_decay: float = 0.0
    patience: int = 10  # epochs without a validation improvement of ``min_delta`` before stopping
    min_delta: float = 1e-4
    loss: str = "l1"
    noise_std: float = 0.0  # denoising: Gaussian noise added to the input, the clean window is the target
    sparsity: float = 0.0  # weight of an L1 penalty on the code
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    max_seconds: float | None = None  # wall-clock budget; stops after the epoch that crosses it
    threads: int | None = None  # torch CPU threads; None = default_threads() (the result records the number used)

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ModelConfigError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or not math.isfinite(self.lr) or self.patience < 1:
            raise ModelConfigError("epochs, batch_size, patience must be >= 1 and lr a finite number > 0")
        if self.seed < 0:
            raise ModelConfigError(f"seed must be >= 0, got {self.seed}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ModelConfigError(f"the time budget (max_seconds) must be > 0, got {self.max_seconds}")
        if not (math.isfinite(self.noise_std) and math.isfinite(self.sparsity)):
            raise ModelConfigError("noise_std and sparsity must be finite")
        if not 0.0 <= self.warmup < 1.0:
            raise ModelConfigError(f"warmup must be in [0, 1), got {self.warmup}")
        if self.noise_std < 0 or self.sparsity < 0:
            raise ModelConfigError("noise_std and sparsity must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ModelConfigError(f"threads must be >= 1, got {self.threads}")


@dataclass(frozen=True, slots=True)
class EpochStats:
    epoch: int
    epochs: int
    train_loss: float
    val_loss: float
    best_val_loss: float
    seconds: float


@dataclass(slots=True)
class TrainResult:
    epochs_run: int = 0
    best_epoch: int = 0
    best_val_loss: float = math.inf
    seconds: float = 0.0
    stop_reason: str = "max_epochs"
    device: str = "cpu"
    threads: int = 1  # torch CPU threads it ran with: the same seed and data give the same weights with as many
    history: list[EpochStats] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"epochs_run": self.epochs_run, "best_epoch": self.best_epoch,
                "best_val_loss": self.best_val_loss, "seconds": round(self.seconds, 2),
                "stop_reason": self.stop_reason, "device": self.device, "threads": self.threads,
                "train_loss": [round(h.train_loss, 6) for h in self.history],
                "val_loss": [round(h.val_loss, 6) for h in self.history]}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → ``cuda`` when available, else CPU; ``cpu`` and ``cuda[:N]`` are the others (``mps``, ``meta``
    and a GPU number past the last one ended in a traceback from torch, later)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelConfigError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise ModelConfigError(f"device {name!r} is not supported: use auto, cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelConfigError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    return device


def one_cycle(opt: torch.optim.Optimizer, lr: float, steps: int, warmup: float) -> torch.optim.lr_scheduler.LRScheduler:
    """PyTorch's one-cycle schedule (lr and Adam β1 cycled), with its warm-up stretched to at least two
    steps so that very short runs do not divide by zero; a constant rate below four steps."""
    if steps < 4:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(warmup, 2.0 / steps))


def _batches(perm: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Mini-batches of ``size``; a last one of a single window joins the one before (batch norm cannot
    train on one window: 193 windows at batch 32 ended in a traceback)."""
    parts = list(torch.split(perm, size))
    if len(parts) > 1 and len(parts[-1]) == 1:
        parts[-2:] = [torch.cat(parts[-2:])]
    return parts


def _loss(model: Autoencoder, x: torch.Tensor, target: torch.Tensor, cfg: TrainConfig, kl_beta: float) -> torch.Tensor:
    out = model(x)
    diff = out.recon - target
    loss = diff.abs().mean() if cfg.loss == "l1" else diff.square().mean()
    if cfg.sparsity:
        loss = loss + cfg.sparsity * out.code.abs().mean()
    if out.kl is not None and kl_beta:
        loss = loss + kl_beta * out.kl.mean() / (x.shape[1] * x.shape[2])
    return loss


@torch.inference_mode()
def mean_error(model: Autoencoder, windows: torch.Tensor, loss: str, batch: int = 1024) -> float:
    model.eval()
    total = 0.0
    for chunk in torch.split(windows, batch):
        total += float(model.errors(chunk, loss).window.sum())
    return total / max(1, len(windows))


def fit(model: Autoencoder, train: np.ndarray, val: np.ndarray, cfg: TrainConfig,
        on_epoch: Callable[[EpochStats], None] | None = None) -> TrainResult:
    """Train ``model`` on normalised normal windows; restores the best validation weights. Runs with ``cfg.threads``
    torch CPU threads (else :func:`default_threads`), the process's count restored afterwards."""
    cfg.validate()
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"need normal windows to train and validate (got {len(train)} train, {len(val)} val)")
    before, threads = torch.get_num_threads(), cfg.threads or default_threads()
    torch.set_num_threads(threads)
    try:
        return _fit(model, train, val, cfg, on_epoch, TrainResult(threads=threads))
    finally:
        torch.set_num_threads(before)


def _fit(model: Autoencoder, train: np.ndarray, val: np.ndarray, cfg: TrainConfig,
         on_epoch: Callable[[EpochStats], None] | None, result: TrainResult) -> TrainResult:
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model.to(device)
    result.device = str(device)
    xt = torch.from_numpy(np.ascontiguousarray(train, dtype="float32")).to(device)
    xv = torch.from_numpy(np.ascontiguousarray(val, dtype="float32")).to(device)
    start = time.perf_counter()
    if isinstance(model, PCA):  # closed form: no gradient descent
        model.fit(train)
        model.to(device)
        result.best_val_loss = mean_error(model, xv, cfg.loss)
        result.epochs_run, result.stop_reason = 1, "closed_form"
        result.seconds = time.perf_counter() - start
        if on_epoch is not None:  # its one "epoch": the progress bar stayed at 0/1
            on_epoch(EpochStats(1, 1, mean_error(model, xt, cfg.loss), result.best_val_loss, result.best_val_loss,
                                result.seconds))
        return result
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if min(len(xt), cfg.batch_size) < model.min_batch:  # a traceback from torch's batch norm otherwise
        raise DataError(f"the {model.kind} model's batch norm needs batches of at least {model.min_batch} windows "
                        f"(batch size {cfg.batch_size}, {len(xt)} training windows): raise them or drop --batch-norm")
    per_epoch = len(_batches(torch.arange(len(xt)), cfg.batch_size))  # counted as the epochs will split them
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / per_epoch))
    steps = epochs * per_epoch
    patience = max(cfg.patience, round(cfg.patience * epochs / cfg.epochs))  # scaled with min_steps
    sched = one_cycle(opt, cfg.lr, steps, cfg.warmup)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    kl_beta = float(getattr(model.config, "beta", 0.0))
    best_state, since_best = copy.deepcopy(model.state_dict()), 0
    for epoch in range(1, epochs + 1):
        model.train()
        perm, total = torch.randperm(len(xt), generator=gen).to(device), 0.0
        for idx in _batches(perm, cfg.batch_size):
            target = xt[idx]
            x = target + cfg.noise_std * torch.randn_like(target) if cfg.noise_std else target
            loss = _loss(model, x, target, cfg, kl_beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        val_loss = mean_error(model, xv, cfg.loss)
        if not (math.isfinite(val_loss) and math.isfinite(total)):  # an inf training loss broke the manifest
            result.stop_reason = "diverged"
            break
        if val_loss < result.best_val_loss - cfg.min_delta:
            result.best_val_loss, result.best_epoch, since_best = val_loss, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
        stats = EpochStats(epoch, epochs, total / len(xt), val_loss, result.best_val_loss,
                           time.perf_counter() - start)
        result.history.append(stats)
        result.epochs_run = epoch
        if on_epoch:
            on_epoch(stats)
        if since_best >= patience:
            result.stop_reason = "early_stopping"
            break
        if cfg.max_seconds is not None and stats.seconds >= cfg.max_seconds:
            result.stop_reason = "time_budget"
            break
    if result.best_epoch == 0:
        raise ModelConfigError(f"training diverged in epoch {epoch} (loss NaN or inf): lower --lr or check the data")
    model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - start
    return result
