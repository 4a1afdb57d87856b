"""Scorer benchmark: the classic one-window-per-forward loop vs batched scoring, and the machine's
float32 matrix-multiply rate measured in the same run, so the figures are ratios, not absolutes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from models.detector import Detector, autocast, precision_error, served_precision
from models.train import default_threads


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(fn: Callable[[], None], device: torch.device, min_seconds: float) -> float:
    """Calls of ``fn`` per second over at least ``min_seconds`` (after a warm-up call)."""
    fn()
    _sync(device)
    reps, start = 0, time.perf_counter()
    while reps < 1 or time.perf_counter() - start < min_seconds:
        fn()
        reps += 1
    _sync(device)
    return reps / (time.perf_counter() - start)


def _best_interleaved(fns: list[Callable[[], None]], device: torch.device, seconds: float,
                      trials: int = 5, threads: list[int | None] | None = None) -> list[float]:
    """Best rate of each function over ``trials`` interleaved rounds: on a shared machine the best round
    is the least disturbed one, and interleaving exposes every function to the same conditions. ``threads``:
    the torch CPU threads each function runs with (None: as set)."""
    best, own = [0.0] * len(fns), torch.get_num_threads()
    for _ in range(trials):
        for k, fn in enumerate(fns):
            torch.set_num_threads((threads[k] if threads else None) or own)
            try:
                best[k] = max(best[k], _rate(fn, device, seconds / trials))
            finally:
                torch.set_num_threads(own)
    return best


def _gemm(device: torch.device, n: int | None = None, dtype: torch.dtype = torch.float32) -> tuple[Callable[[], None], int]:
    """An ``n × n`` matrix multiply in ``dtype`` on ``device`` and its FLOP count (``torch.mm`` with ``out=`` is not
    autocast: it runs in the dtype of its tensors)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b, out=out)), 2 * n**3


def bench_scorer(det: Detector, batch_size: int | None = None, seconds: float = 2.0,
                 batch1_windows: int = 200, daemon_batch: int = 256, precision: str = "float32",
                 daemon_threads: int | None = None) -> dict[str, Any]:
    """Windows/s at batch 1 vs ``batch_size``; model GFLOP/s and efficiency against the GEMM rate (in the precision
    the model runs in); and the daemon's micro-batch (``daemon_batch``, the default ``batch.max_batch``): windows/s
    and ms per batch. On CPU the micro-batch runs with the daemon's scoring threads (``daemon_threads``, default the
    usable CPUs − 1, as ``daemon.torch_threads``), the rest with torch's threads. ``precision`` other than float32
    runs the model under CUDA autocast (no effect on CPU) in the precision the daemon would serve it in (float16 for
    an LSTM asked for bfloat16: :func:`served_precision`), reported as ``precision``, with the largest score
    difference to float32 as a share of max(score, threshold)."""
    device = det.device
    batch_size = batch_size or (4096 if device.type == "cuda" else 2048)
    gen = torch.Generator().manual_seed(0)
    one = [torch.randn(1, det.window, det.channels, generator=gen).to(device) for _ in range(8)]
    big = torch.randn(batch_size, det.window, det.channels, generator=gen).to(device)
    micro = big[:daemon_batch]
    precision = served_precision(device, det.kind, precision)  # what runs, and what the figures are labelled
    exact = det.score_tensor(micro)[0].float().cpu().numpy()

    def batch1_loop() -> None:  # the classic loop: one window per forward pass
        for i in range(batch1_windows):
            det.score_tensor(one[i % len(one)])

    # the reference GEMM in the precision the model runs in: a float16 model against the float32 GEMM rate (tensor
    # cores against none) gave an efficiency that was flattering by construction, above 1 possibly
    gemm_fn, gemm_flops = _gemm(device, dtype=getattr(torch, precision))
    # the daemon scores with the usable CPUs − 1 threads on CPU (its consuming thread needs a core): its micro-batch
    # measured with every thread was up to 2 x flattering on 2 cores
    micro_threads = (daemon_threads or default_threads()) if device.type == "cpu" else torch.get_num_threads()
    with autocast(device, precision):
        b1_rate, big_rate, micro_rate, gemm_rate = _best_interleaved(
            [batch1_loop, lambda: det.score_tensor(big), lambda: det.score_tensor(micro), gemm_fn], device, seconds,
            threads=[None, None, micro_threads, None])
        got = det.score_tensor(micro)[0].float().cpu().numpy()
    diff = precision_error(got, exact, det.threshold.value)
    batch1, batched, per_batch = b1_rate * batch1_windows, big_rate * batch_size, 1.0 / big_rate
    gemm = gemm_rate * gemm_flops / 1e9
    model_gflops = det.model.flops_per_window() * batched / 1e9
    return {
        "model": det.kind,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "window": det.window, "downsample": det.downsample,
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
        "daemon_batch": len(micro),
        "daemon_batch_windows_per_s": micro_rate * len(micro),
        "daemon_batch_ms": 1e3 / micro_rate,
        "daemon_batch_threads": micro_threads,
        "precision": precision,
        "precision_max_diff": diff,
    }
