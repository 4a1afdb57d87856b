"""Where the forward pass runs: a thread of the daemon's process, or a scoring process of its own.

Owns the choice and its lifecycle. The consuming thread parses JSON in Python while a batch is scored; the
CPU LSTM steps its layers from Python, handing the GIL to and from that thread around each of its ~7 torch
ops per step, so on CPU scoring runs best in a process of its own (measured with ``tsmon bench pipeline``
on 2 vCPUs: ~190k samples/s with a thread, ~270k with a process). On CUDA a kernel launch is short and
the copy is asynchronous, so a thread is enough. Both backends return, per batch, the window errors, the
channel errors and the seconds the forward pass took; results come back in submission order because
each backend has a single worker.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Protocol

import numpy as np

from models.errors import ConfigError
from monitor import heap
from monitor.scorer import Scorer, load_served

Result = tuple[np.ndarray, np.ndarray, float]
RouteSpec = tuple[str, str, str | None, int | None]  # pattern, artifact path, name, hop


Timings = dict[str, list[tuple[int, float]]]  # per model: (batch size, seconds) of the warm-up passes


class Backend(Protocol):
    def submit(self, model: str, values: np.ndarray) -> Future[Result]: ...
    def warm_up(self, sizes: list[int], tolerance: float) -> Timings: ...  # ConfigError: precision off float32
    def close(self, wait: bool = True) -> None: ...  # wait=False: a call is stuck, do not wait for it


def _timed(scorer: Scorer, model: str, values: np.ndarray) -> Result:
    t0 = time.perf_counter()
    window, channel = scorer.score_values(model, values)
    return window, channel, time.perf_counter() - t0


class ThreadBackend:
    """Scores on one worker thread of this process with the given :class:`Scorer`."""

    def __init__(self, scorer: Scorer) -> None:
        self._scorer = scorer
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tsmon-score")

    def submit(self, model: str, values: np.ndarray) -> Future[Result]:
        return self._pool.submit(_timed, self._scorer, model, values)

    def warm_up(self, sizes: list[int], tolerance: float) -> Timings:
        return self._pool.submit(self._scorer.warm_up, sizes, tolerance).result()

    def close(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)


_worker: Scorer | None = None


def _init_worker(routes: list[RouteSpec], device: str, threads: int, parent: int, precision: str) -> None:
    """In the scoring process: leave signals to the daemon, load the models, exit if the daemon dies."""
    import torch

    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon stops us through the pool, after draining
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(threads)
    _worker = Scorer([load_served(p, path, name, hop, device) for p, path, name, hop in routes], precision)
    heap.freeze()  # torch and the models: a full collection here would hold up a batch by ~0.1 s

    def orphan_watch() -> None:  # a SIGKILLed daemon cannot shut the pool down: do not linger
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=orphan_watch, daemon=True, name="tsmon-orphan-watch").start()


def _score_in_worker(model: str, values: np.ndarray) -> Result:
    assert _worker is not None, "scoring process not initialised"
    return _timed(_worker, model, values)


def _versions_in_worker() -> dict[str, str]:
    assert _worker is not None, "scoring process not initialised"
    return {name: m.version for name, m in _worker.models.items()}


def _warm_up_in_worker(sizes: list[int], tolerance: float) -> Timings:
    assert _worker is not None, "scoring process not initialised"
    return _worker.warm_up(sizes, tolerance)


class ProcessBackend:
    """Scores in one spawned process holding its own copy of the models (no GIL shared with parsing)."""

    def __init__(self, routes: list[RouteSpec], device: str, threads: int, start_timeout_s: float = 120,
                 precision: str = "float32", versions: dict[str, str] | None = None) -> None:
        """``versions``: model name → the weights version the daemon loaded. The process loads the artifacts
        again by path: one replaced in place meanwhile (``tsmon train --out`` over it, seconds at start) was
        scored by the new weights for the process's life while alerts and documents named the old version."""
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads and a CUDA context
        self._pool = ProcessPoolExecutor(1, mp_context=ctx, initializer=_init_worker,
                                         initargs=(routes, device, threads, os.getpid(), precision))
        try:
            self._pool.submit(int, 0).result(timeout=start_timeout_s)  # models load now: fail at start
            loaded = self._pool.submit(_versions_in_worker).result(timeout=start_timeout_s) if versions else {}
        except Exception as exc:  # noqa: BLE001 — whatever stopped the worker becomes one ConfigError
            self.close(wait=False)
            raise ConfigError(f"the scoring process could not start: {type(exc).__name__}: {str(exc)[:300]} (a script "
                              "that starts the daemon needs `if __name__ == '__main__':`; or set "
                              "daemon.scoring = \"thread\")") from None
        except BaseException:  # a SIGTERM meanwhile (SystemExit): the pool was left, and the interpreter's exit
            self.close(wait=False)  # waited for the worker to import torch and load its models (up to start_timeout_s)
            raise
        changed = {n: (v, loaded[n]) for n, v in (versions or {}).items() if n in loaded and loaded[n] != v}
        if changed:
            self._pool.shutdown(wait=False, cancel_futures=True)
            raise ConfigError("artifact(s) replaced while the daemon started: " + ", ".join(
                f"{n} loaded as {a}, then as {b}" for n, (a, b) in sorted(changed.items())) + "; start it again")

    def submit(self, model: str, values: np.ndarray) -> Future[Result]:
        return self._pool.submit(_score_in_worker, model, values)

    @property
    def pid(self) -> int | None:
        """The scoring process's pid (None once it is gone): its memory and CPU are exported beside the daemon's."""
        procs = [p for p in list((getattr(self._pool, "_processes", None) or {}).values()) if p.is_alive()]
        return procs[0].pid if procs else None

    def warm_up(self, sizes: list[int], tolerance: float) -> Timings:
        return self._pool.submit(_warm_up_in_worker, sizes, tolerance).result()

    def close(self, wait: bool = True) -> None:
        if not wait:  # the worker is stuck in a call: end it, nothing it could still return is wanted (SIGKILL:
            # it ignores SIGTERM, which the daemon handles for it)
            for proc in list((getattr(self._pool, "_processes", None) or {}).values()):
                proc.kill()
        self._pool.shutdown(wait=wait, cancel_futures=not wait)


def choose(mode: str, device: str) -> str:
    """``auto`` → ``process`` on CPU, ``thread`` on CUDA."""
    if mode != "auto":
        return mode
    import torch

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "thread" if cuda else "process"
