"""``tsmon bench …``: benchmarks that print a table (or ``--json``) of ratios measured in one run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from models import artifact
from models.detector import Detector, Threshold
from models.registry import DEFAULT_KIND, KINDS, build
from models.scaling import Scaler
from models.train import resolve_device
from models.benchmark import bench_scorer
from monitor.commands.model_cmds import parse_params
from monitor.commands.render import bench_table, stdout


def _untrained(kind: str, window: int, channels: int, params: dict[str, Any]) -> Detector:
    """A model of ``kind`` with random weights: speed does not depend on training."""
    model = build(kind, {**params, "window": window, "channels": channels})
    if kind == "pca":
        model.fit(np.random.default_rng(0).normal(size=(256, window, channels)).astype("float32"))
    scaler = Scaler(tuple([0.0] * channels), tuple([1.0] * channels))
    return Detector(model, scaler, Threshold(0.99, 1.0, 1.0), {}, "l1", [f"ch{i}" for i in range(channels)], window)


def scorer(
    model: Annotated[Path | None, typer.Option("--model", help="Artifact (default: an untrained model of --kind).")] = None,
    kind: Annotated[str, typer.Option(help=f"Kind when no artifact: {', '.join(KINDS)}, or 'all'.")] = DEFAULT_KIND,
    window: Annotated[int, typer.Option(help="Window when no artifact.")] = 140,
    channels: Annotated[int, typer.Option(help="Channels when no artifact.")] = 1,
    param: Annotated[list[str] | None, typer.Option(help="Hyper-parameter key=value when no artifact.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batched size (default 2048 CPU, 4096 CUDA).")] = None,
    seconds: Annotated[float, typer.Option(help="Measuring time per figure (split over 5 interleaved rounds).")] = 5.0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (a list for --kind all).")] = False,
) -> None:
    """Windows/s at batch 1 (the classic loop) vs batched, against the machine's GEMM rate."""
    dev = resolve_device(device)
    if model is not None:
        dets = [artifact.load(model, str(dev))]
    else:
        kinds = list(KINDS) if kind == "all" else [kind]
        dets = [_untrained(k, window, channels, parse_params(param)).to(dev) for k in kinds]
    results = [bench_scorer(d, batch_size, seconds) for d in dets]
    if as_json:
        sys.stdout.write(json.dumps(results[0] if len(results) == 1 else results, indent=2) + "\n")
        return
    for r in results:
        stdout.print(bench_table(r))


def register(app: typer.Typer) -> None:
    app.command()(scorer)
