"""Scorer benchmark: the classic one-window-per-forward loop vs batched scoring, and the machine's
float32 matrix-multiply rate measured in the same run, so the figures are ratios, not absolutes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from models.detector import Detector


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(fn: Callable[[], None], device: torch.device, min_seconds: float, min_reps: int = 3) -> float:
    """Calls of ``fn`` per second, after one warm-up call, over at least ``min_seconds``."""
    fn()
    _sync(device)
    reps, start = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < min_seconds:
        fn()
        reps += 1
    _sync(device)
    return reps / (time.perf_counter() - start)


def gemm_gflops(device: torch.device, n: int | None = None, seconds: float = 1.0) -> float:
    """Achieved float32 GFLOP/s of an ``n × n`` matrix multiply on ``device``."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    return _rate(lambda: torch.mm(a, b, out=out), device, seconds) * 2 * n**3 / 1e9


def bench_scorer(det: Detector, batch_size: int | None = None, seconds: float = 2.0,
                 batch1_windows: int = 200) -> dict[str, Any]:
    """Windows/s at batch 1 vs ``batch_size``; model GFLOP/s and efficiency against the GEMM rate."""
    device = det.device
    batch_size = batch_size or (4096 if device.type == "cuda" else 512)
    gen = torch.Generator().manual_seed(0)
    one = [torch.randn(1, det.window, det.channels, generator=gen).to(device) for _ in range(8)]
    big = torch.randn(batch_size, det.window, det.channels, generator=gen).to(device)

    def batch1_loop() -> None:  # the classic loop: one window per forward pass
        for i in range(batch1_windows):
            det.score_tensor(one[i % len(one)])

    batch1 = _rate(batch1_loop, device, seconds / 2, min_reps=1) * batch1_windows
    per_batch = 1.0 / _rate(lambda: det.score_tensor(big), device, seconds)
    batched = batch_size / per_batch
    gemm = gemm_gflops(device)
    model_gflops = det.model.flops_per_window() * batched / 1e9
    return {
        "model": det.kind,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "window": det.window,
        "channels": det.channels,
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "batch1_windows_per_s": batch1,
        "batched_windows_per_s": batched,
        "ratio": batched / batch1,
        "ms_per_batch": per_batch * 1e3,
        "flops_per_window": det.model.flops_per_window(),
        "model_gflops": model_gflops,
        "gemm_gflops": gemm,
        "efficiency": model_gflops / gemm,
    }
