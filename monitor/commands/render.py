"""Rich tables and progress bars for the CLI (presentation only)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from monitor import logs

if TYPE_CHECKING:
    from models.train import EpochStats

console = Console(stderr=True)
stdout = Console()
log = logs.get("tsmon.train")
EPOCH_LOG_S = 30.0  # without a terminal (CI, nohup, a pipe) the bar draws nothing: an `epoch` log line this often



def emit_json(obj: Any) -> None:
    """``--json`` output of every command: one indented document on stdout (numpy scalars as numbers)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=_jsonable) + "\n")


def value_table(title: str, rows: list[tuple[Any, ...]], head: tuple[str, ...] = ("measure", "value")) -> Table:
    """A table of labelled figures, one column per entry of ``head`` after the label, numbers right-aligned
    (bench and demo summaries)."""
    t = Table(title=title, title_justify="left")
    t.add_column(head[0])
    for name in head[1:]:
        t.add_column(name, justify="right")
    for row in rows:
        t.add_row(*(str(v) for v in row))
    return t


def _jsonable(o: Any) -> Any:
    return o.item() if isinstance(o, np.generic) else str(o)


ROWS = [("ROC-AUC", "roc_auc"), ("PR-AUC", "pr_auc"), ("accuracy", "accuracy"),
        ("balanced accuracy", "balanced_accuracy"), ("precision", "precision"), ("recall", "recall"),
        ("F1", "f1"), ("threshold", "threshold")]


@contextmanager
def epoch_progress(epochs: int, label: str) -> Iterator[Any]:
    """A progress bar over epochs with train/val loss; yields the ``on_epoch`` callback."""
    columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[losses]}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(label, total=epochs, losses="")

        logged = time.monotonic()

        def on_epoch(s: EpochStats) -> None:
            nonlocal logged
            bar.update(task, completed=s.epoch, total=s.epochs,
                       losses=f"train {s.train_loss:.4f}  val {s.val_loss:.4f}  best {s.best_val_loss:.4f}")
            if not console.is_terminal and time.monotonic() - logged >= EPOCH_LOG_S:  # a first run's demo trained
                logged = time.monotonic()  # for minutes with nothing in its log after `training` (a new user's pass)
                log.info("epoch", model=label, epoch=s.epoch, epochs=s.epochs, train_loss=round(s.train_loss, 5),
                         val_loss=round(s.val_loss, 5), best_val_loss=round(s.best_val_loss, 5))

        yield on_epoch  # an early stop or the time budget leaves the bar at the epoch reached, of the epochs allowed
        # (it was set full, and a run the budget cut read as finished: the 'trained' line says why it stopped)


def _fmt(v: Any) -> str:
    """Four decimals; a small non-zero value (a threshold of 1.7e-7 read "0.0000") in significant digits."""
    if isinstance(v, float):
        return f"{v:.3g}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"
    return "n/a" if v is None else str(v)


def eval_table(result: dict[str, Any], title: str) -> Table:
    base = result.get("baseline", {})
    t = Table(title=title)
    t.add_column("metric")
    t.add_column(f"{result['model']}", justify="right")
    if base:
        t.add_column("PCA baseline", justify="right")
    for name, key in ROWS:
        t.add_row(name, _fmt(result[key]), *([_fmt(base[key])] if base else []))
    cm, bm = result["confusion"], base.get("confusion", {})
    t.add_row("TN / FP / FN / TP", f"{cm['tn']} / {cm['fp']} / {cm['fn']} / {cm['tp']}",
              *([f"{bm['tn']} / {bm['fp']} / {bm['fn']} / {bm['tp']}"] if bm else []))
    if "events" in result:
        ev, bev = result["events"], base.get("events", {})
        for name, key in (("event recall", "event_recall"), ("event precision", "event_precision"),
                          ("mean delay (samples)", "mean_delay_samples"), ("alarm episodes", "alarm_episodes"),
                          ("events inside an open alarm", "events_inside_open_alarm")):
            t.add_row(name, _fmt(ev[key]), *([_fmt(bev.get(key))] if bev else []))
    return t


def bench_table(r: dict[str, Any]) -> Table:
    t = Table(title=f"scorer benchmark: {r['model']} on {r['device']} (window {r['window']}, {r['threads']} threads)")
    t.add_column("measure")
    t.add_column("value", justify="right")
    rows = [("batch-1 loop, windows/s", f"{r['batch1_windows_per_s']:,.0f}"),
            (f"batched ({r['batch_size']}), windows/s", f"{r['batched_windows_per_s']:,.0f}"),
            ("ratio batched / batch-1", f"{r['ratio']:.1f}×"),
            (f"ms per batch of {r['batch_size']}", f"{r['ms_per_batch']:.2f}"),
            (f"daemon micro-batch ({r['daemon_batch']}, {r['daemon_batch_threads']} thread(s)), windows/s",
             f"{r['daemon_batch_windows_per_s']:,.0f}"),
            (f"ms per micro-batch of {r['daemon_batch']}", f"{r['daemon_batch_ms']:.2f}"),
            ("precision (max score diff to float32)", f"{r['precision']} ({r['precision_max_diff']:.2%})"),
            ("MFLOP per window", f"{r['flops_per_window'] / 1e6:.2f}"),
            ("model GFLOP/s (achieved)", f"{r['model_gflops']:.1f}"),
            ("float32 GEMM GFLOP/s (same run)", f"{r['gemm_gflops']:.1f}"),
            ("efficiency (model / GEMM)", f"{r['efficiency']:.2f}")]
    for k, v in rows:
        t.add_row(k, v)
    return t
