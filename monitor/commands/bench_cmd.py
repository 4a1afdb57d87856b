"""``tsmon bench …``: benchmarks that print a table (or ``--json``) of ratios measured in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from models import artifact
from models.benchmark import bench_scorer
from models.detector import Detector, Threshold
from models.errors import ArtifactError, DataError
from models.registry import DEFAULT_KIND, KINDS, build
from models.scaling import Scaler
from models.train import resolve_device
from monitor.commands.model_cmds import parse_params
from monitor.commands.render import bench_table, emit_json, stdout, value_table


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
        emit_json(results[0] if len(results) == 1 else results)
        return
    for r in results:
        stdout.print(bench_table(r))


def pipeline(
    model: Annotated[Path, typer.Option("--model", help="Artifact to serve.")] = Path("artifacts/ecg5000-lstm"),
    streams: Annotated[int, typer.Option(help="Streams (keys) in the topic.")] = 8,
    samples: Annotated[int, typer.Option(help="Samples in all.")] = 560_000,
    chunk: Annotated[int, typer.Option(help="Samples per message.")] = 140,
    max_batch: Annotated[int, typer.Option(help="Micro-batch size, for the scorer alone and the daemon.")] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Consume-and-parse vs scorer alone vs the whole daemon, on one local broker and topic: ratio = pipeline / min."""
    from monitor.bench import bench_pipeline

    _require_artifact(model)
    if streams < 1 or samples < streams * chunk or chunk < 1 or max_batch < 1:
        raise DataError("need streams >= 1, chunk >= 1, max_batch >= 1 and samples >= streams × chunk")
    r = bench_pipeline(str(model), streams, samples, chunk, max_batch, device)
    if as_json:
        emit_json(r)
        return
    t = value_table(f"tsmon bench pipeline — {r['samples']:,} samples, {r['messages']:,} messages, {r['device']}", [
        ("consume + parse (kafka-python)", f"{r['consume_samples_per_s']:,}"),
        (f"scorer alone ({r['scoring_threads']} thread(s), as in the daemon)", f"{r['scorer_samples_per_s']:,}"),
        (f"scorer alone ({r['all_cores']} threads)", f"{r['scorer_all_cores_samples_per_s']:,}"),
        ("pipeline broker → alerts", f"{r['pipeline_samples_per_s']:,}"),
        ("ratio = pipeline / min(consume, scorer)", f"{r['ratio']:.3f}"),
        ("ratio against the all-cores scorer", f"{r['ratio_vs_all_cores_scorer']:.3f}")], ("stage", "samples/s"))
    stdout.print(t)
    for w in r["warnings"]:
        stdout.print(f"[yellow]warning:[/] {w}")


def soak(
    model: Annotated[Path, typer.Option("--model", help="Artifact to serve.")] = Path("artifacts/ecg5000-lstm"),
    seconds: Annotated[float, typer.Option(help="How long the daemon runs.")] = 600.0,
    streams: Annotated[int, typer.Option(help="Streams (keys).")] = 8,
    rate: Annotated[float, typer.Option(help="Samples per second per stream.")] = 1000.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (with the RSS series).")] = False,
) -> None:
    """Resident memory of the daemon over a long run at a steady input rate: flat means within ±10 %."""
    from monitor.soak import bench_soak

    _require_artifact(model)
    if seconds <= 0 or streams < 1 or rate <= 0:
        raise DataError("need --seconds > 0, --streams >= 1 and --rate > 0")
    r = bench_soak(str(model), seconds, streams, rate)
    if as_json:
        emit_json(r)
        return
    keys = ("rss_start_mb", "rss_end_mb", "rss_max_mb", "drift_pct", "flat", "samples_sent", "samples_scored",
            "warmup_s")
    t = value_table(f"tsmon bench soak — {r['seconds']} s, {streams} streams × {rate:g} samples/s",
                    [(k, r[k]) for k in keys])
    stdout.print(t)


def memory(
    model: Annotated[Path, typer.Option("--model", help="Artifact to serve.")] = Path("artifacts/ecg5000-lstm"),
    streams: Annotated[int, typer.Option(help="Streams to measure with.")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Memory one stream holds (window state + calibrator evidence at capacity) and the total limits.max_streams
    allows."""
    from monitor.footprint import bench_memory

    _require_artifact(model)
    if streams < 1:
        raise DataError("need --streams >= 1")
    r = bench_memory(str(model), streams)
    if as_json:
        emit_json(r)
        return
    keys = ("streams", "stream_state_bytes", "calibrator_evidence_bytes", "per_stream_bytes", "max_streams",
            "total_mb")
    stdout.print(value_table(f"tsmon bench memory — {r['model']}", [(k, r[k]) for k in keys]))


def _require_artifact(model: Path) -> None:
    if not (model / "manifest.json").is_file():
        raise ArtifactError(f"no model artifact at {model} (no manifest.json); train one with tsmon train --out DIR")


def register(app: typer.Typer) -> None:
    app.command()(scorer)
    app.command()(pipeline)
    app.command()(soak)
    app.command()(memory)
