"""``tsmon bench …``: benchmarks that print a table (or ``--json``) of ratios measured in one run."""

from __future__ import annotations

import math
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
from monitor.commands.options import MAX_COUNT, MAX_STREAMS, MAX_WINDOW, not_with
from monitor.commands.render import bench_table, emit_json, stdout, value_table
from monitor.scorer import PRECISIONS


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
    window: Annotated[int, typer.Option(help="Window when no artifact.", max=MAX_WINDOW)] = 140,
    channels: Annotated[int, typer.Option(help="Channels when no artifact.")] = 1,
    param: Annotated[list[str] | None, typer.Option(help="Hyper-parameter key=value when no artifact.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batched size (default 2048 CPU, 4096 CUDA).")] = None,
    seconds: Annotated[float, typer.Option(help="Measuring time per figure (split over 5 interleaved rounds).")] = 5.0,
    daemon_batch: Annotated[int, typer.Option(help="The daemon's micro-batch size (batch.max_batch).")] = 256,
    precision: Annotated[str, typer.Option(help="float32, bfloat16 or float16 (autocast on CUDA only).")] = "float32",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (a list for --kind all).")] = False,
) -> None:
    """Windows/s at batch 1 (the classic loop) vs batched and the daemon's micro-batch, against the GEMM rate."""
    dev = resolve_device(device)
    if model is not None:
        not_with({"--kind": kind != DEFAULT_KIND, "--window": window != 140, "--channels": channels != 1,
                  "--param": param}, "for an untrained model only: the artifact of --model sets them")
        dets = [artifact.load(model, str(dev))]
    else:
        kinds = list(KINDS) if kind == "all" else [kind]
        dets = [_untrained(k, window, channels, parse_params(param)).to(dev) for k in kinds]
    if precision not in PRECISIONS or daemon_batch < 1:
        raise DataError(f"--precision must be one of {', '.join(PRECISIONS)} and --daemon-batch >= 1")
    if (batch_size is not None and batch_size < 1) or not 0 < seconds < math.inf:  # a traceback from torch
        raise DataError(f"--batch-size must be >= 1 and --seconds a number > 0 (got {batch_size}, {seconds})")
    results = [bench_scorer(d, batch_size, seconds, daemon_batch=daemon_batch, precision=precision) for d in dets]
    if as_json:
        emit_json(results[0] if len(results) == 1 else results)
        return
    for r in results:
        stdout.print(bench_table(r))


def pipeline(
    model: Annotated[Path, typer.Option("--model", help="Artifact to serve.")] = Path("artifacts/ecg5000-lstm"),
    streams: Annotated[int, typer.Option(help="Streams (keys) in the topic.", max=MAX_STREAMS)] = 8,
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
        *([("consume + parse (confluent-kafka)", f"{r['consume_confluent_samples_per_s']:,}"),
           ("pipeline broker → alerts (kafka.client = confluent)", f"{r['pipeline_confluent_samples_per_s']:,}")]
          if r["consume_confluent_samples_per_s"] is not None else []),
        ("ratio = pipeline / min(consume, scorer)", f"{r['ratio']:.3f}"),
        ("ratio against the all-cores scorer", f"{r['ratio_vs_all_cores_scorer']:.3f}")], ("stage", "samples/s"))
    stdout.print(t)
    for w in r["warnings"]:
        stdout.print(f"[yellow]warning:[/] {w}")


def latency(
    model: Annotated[Path, typer.Option("--model", help="Artifact to serve.")] = Path("artifacts/ecg5000-lstm"),
    streams: Annotated[int, typer.Option(help="Streams (keys).", max=MAX_STREAMS)] = 32,
    rate: Annotated[float, typer.Option(help="Samples per second per stream (below saturation).")] = 500.0,
    seconds: Annotated[float, typer.Option(help="Input time per policy.")] = 20.0,
    hop: Annotated[int | None, typer.Option(help="Window hop (default: the artifact's).", max=MAX_COUNT)] = None,
    chunk: Annotated[int | None, typer.Option(help="Samples per message (default: the hop).")] = None,
    max_batch: Annotated[int, typer.Option(help="batch.max_batch of both runs.")] = 256,
    max_delay_ms: Annotated[float, typer.Option(help="batch.max_delay_ms of both runs.")] = 50.0,
    target_ms: Annotated[float, typer.Option(help="batch.latency_target_ms of the adaptive run.")] = 50.0,
    fetch_max_wait_ms: Annotated[int, typer.Option(help="kafka.fetch_max_wait_ms of both runs (the local broker "
                                                        "holds every fetch this long).")] = 10,
    overload_s: Annotated[float, typer.Option(help="Seconds of input at hop 1 (back-pressure run); 0 = skip.")] = 3.0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """p50/p95/p99 sample → decision latency at a fixed rate: fixed batching vs adaptive, in one run."""
    from monitor.latency import bench_latency

    _require_artifact(model)
    if streams < 1 or rate <= 0 or seconds <= 0 or max_batch < 1 or max_delay_ms < 0 or target_ms <= 0:
        raise DataError("need --streams >= 1, --rate > 0, --seconds > 0, --max-batch >= 1, --max-delay-ms >= 0 "
                        "and --target-ms > 0")
    if 1000 / rate < 1:
        raise DataError("--rate above 1000 samples/s per stream: timestamps are whole milliseconds")
    r = bench_latency(str(model), streams, rate, seconds, hop, chunk, max_batch, max_delay_ms, target_ms, device,
                      fetch_max_wait_ms=fetch_max_wait_ms, overload_s=overload_s)
    if as_json:
        emit_json(r)
        return
    a = r["adaptive"]
    rows = [(k, r[k], a[k]) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms", "to_daemon_p50_ms", "to_daemon_p99_ms",
                                      "in_daemon_p99_ms",
                                      "batch_scoring_ms", "mean_batch", "windows", "max_pending_windows",
                                      "backpressure_pauses", "commit_retries")]
    rows += [("p99 allowed", f"{r['bound_ms']} (max_delay + 2 × batch)",
              f"{a['target_ms']} (target), {a['bound_ms']} (max_delay + 2 × batch)"),
             ("p99 within", r["within_bound"], f"{a['within_target']}, {a['within_bound']}")]
    t = value_table(f"tsmon bench latency — {streams} streams × {rate:g} samples/s, hop {r['hop']}, "
                      f"{r['offered_windows_per_s']} windows/s, {r['device']}", rows, ("", "fixed", "adaptive"))
    stdout.print(t)
    o = r["overload"]
    if o is not None:
        stdout.print(value_table(f"overload: hop 1, {o['offered_windows_per_s']:,} windows/s offered, "
                                 f"batch.max_pending {o['max_pending']}", [
                                     (k, o[k]) for k in ("windows", "mean_batch", "max_pending_windows",
                                                         "backpressure_pauses", "p99_ms", "caught_up")]))
    for w in r["warnings"]:
        stdout.print(f"[yellow]warning:[/] {w}")


def soak(
    model: Annotated[Path, typer.Option("--model", help="Artifact to serve.")] = Path("artifacts/ecg5000-lstm"),
    seconds: Annotated[float, typer.Option(help="How long the daemon runs.")] = 600.0,
    streams: Annotated[int, typer.Option(help="Streams (keys).", max=MAX_STREAMS)] = 8,
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
    streams: Annotated[int, typer.Option(help="Streams to measure with.", max=MAX_STREAMS)] = 200,
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
    keys = ("streams", "stream_state_bytes", "calibrator_evidence_bytes", "alert_history_bytes", "per_stream_bytes",
            "max_streams", "total_mb")  # the three parts, then their sum: the table adds up
    stdout.print(value_table(f"tsmon bench memory — {r['model']}", [(k, r[k]) for k in keys]))


def _require_artifact(model: Path) -> None:
    if not (model / "manifest.json").is_file():
        raise ArtifactError(f"no model artifact at {model} (no manifest.json); train one with tsmon train --out DIR")


def register(app: typer.Typer) -> None:
    app.command()(scorer)
    app.command()(pipeline)
    app.command()(latency)
    app.command()(soak)
    app.command()(memory)
