"""``tsmon replay-eval``: a labelled series through the running daemon, scored by event beside PCA."""

from __future__ import annotations

import math
import signal
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.table import Table

from models import artifact
from models.data import read_series
from models.errors import DataError
from monitor import logs
from monitor.commands.model_cmds import LabelCol, TsCol, ValueCols, WindowsOpt, model_columns
from monitor.commands.options import bootstrap_option
from monitor.commands.render import emit_json, stdout
from monitor.replay_eval import ReplayOptions, run, time_axis

ROWS = (("event recall", "recall"), ("event precision", "precision"), ("alerts", "alerts"),
        ("alerts / hour", "alerts_per_hour"), ("false alerts / hour", "false_alerts_per_hour"),
        ("false alerts / day", "false_alerts_per_day"), ("mean delay (s)", "mean_delay_s"),
        ("p90 delay (s)", "p90_delay_s"), ("events detected", "events_detected"),
        ("… inside an alert already open", "events_inside_open_alert"), ("share of time in alert", "time_in_alert"))


def replay_eval(
    model: Annotated[Path, typer.Option("--model", help="Artifact directory of the model to evaluate.")],
    data: Annotated[Path, typer.Option("--data", help="Labelled CSV/Parquet series.")],
    windows: WindowsOpt = None,
    value_col: ValueCols = None,
    timestamp_col: TsCol = None,
    label_col: LabelCol = None,
    sample_rate: Annotated[float | None, typer.Option(help="Hz, for a file without timestamps.")] = None,
    train_fraction: Annotated[float | None, typer.Option(
        help="Leading share for fitting, not scored (only its validation windows are replayed); default: the "
             "model's own split on its training file (never below it there), else 0.15.")] = None,
    baseline: Annotated[Path | None, typer.Option(help="Baseline artifact; default: PCA fitted on the model's "
                                                       "training windows.")] = None,
    speed: Annotated[float | None, typer.Option(help="Replay speed, × real time (default: take --seconds).")] = None,
    seconds: Annotated[float, typer.Option(help="Wall time the replay takes when --speed is not given.")] = 30.0,
    chunk: Annotated[int, typer.Option(help="Samples per message (0: about 250 ms of data).")] = 0,
    tolerance: Annotated[float | None, typer.Option(
        help="Seconds after a labelled event an alert's first over-threshold window may begin and still count "
             "for it (default: one window).")] = None,
    gap_ms: Annotated[float | None, typer.Option(
        help="Gap that restarts windows (default: 3 × the sampling interval, at least windows.gap_ms).")] = None,
    config: Annotated[Path | None, typer.Option(help="Daemon settings to evaluate (TOML); topics, models and "
                                                     "the broker are the run's own.")] = None,
    bootstrap: Annotated[str | None, bootstrap_option("Use this Kafka instead of a local broker.")] = None,
    stream: Annotated[str | None, typer.Option(help="Stream id (default: the file's name).")] = None,
    calibrator_clock: Annotated[str | None, typer.Option(
        help="data: recalibrate every calibrator.interval_s of the series' own time (production's cadence, the "
             "same every run); wall: every interval_s / speed of wall time (at least 0.2 s). Default: the "
             "--config's calibrator.clock if it sets one, else data.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Directory for report.json, timeline.png and the baseline.")]
    = Path("replay-eval"),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Replay a labelled series through the daemon and score its alerts by event, beside the PCA baseline."""
    # "not > 0" and "not >= 0": NaN passed "<= 0" (--tolerance nan scored every alert false; --seconds nan wrote
    # "speed": NaN into report.json, which is no JSON); infinity is no pace either
    if (speed is not None and not 0 < speed < math.inf) or not 0 < seconds < math.inf or chunk < 0 \
            or (tolerance is not None and not 0 <= tolerance < math.inf):
        raise DataError("--speed and --seconds must be finite numbers > 0, --chunk and --tolerance >= 0")
    if sample_rate is not None and not 0 < sample_rate < math.inf:  # 0 with a timestamped file passed unsaid
        raise DataError(f"--sample-rate must be a finite number of Hz > 0, got {sample_rate}")
    if train_fraction is not None and not 0 < train_fraction < 1:
        raise DataError("--train-fraction must be in (0, 1)")
    names = artifact.read_manifest(model)["channels"]  # by name, in the model's order (given in another: swapped)
    series = read_series(data, model_columns(names, value_col), timestamp_col, label_col, windows,
                         out_of_order="keep", model_channels=None if value_col else names)
    ts_ms = time_axis(series, sample_rate)
    opts = ReplayOptions(speed, seconds, chunk, tolerance, train_fraction, gap_ms, bootstrap, config, baseline,
                         stream, out, calibrator_clock)
    if not as_json:
        logs.quiet("WARNING")  # the table is the output; warnings stay (rows skipped for NaN went unsaid)
    # SIGTERM (timeout, a cancelled CI job, systemd) unwinds like Ctrl-C: it killed the process at once, leaving
    # the local broker running for good, or the run's topics on a --bootstrap cluster
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        report = run(model, series, ts_ms, opts)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if as_json:
        emit_json(report)
    else:
        stdout.print(_table(report))
        stdout.print(f"report {out / 'report.json'} · timeline {report['timeline']}")


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # through the run's clean-up (broker, topics), as KeyboardInterrupt goes


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _span(hours: float) -> str:
    """A duration to read ("0.0 h" for a 30 s scored part)."""
    return f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.1f} min" if hours * 60 >= 1 else f"{hours * 3600:.0f} s"


def _table(r: dict[str, Any]) -> Table:
    d, rp = r["data"], r["replay"]
    t = Table(title=f"replay-eval {Path(d['path']).name}", title_justify="left",
              caption=f"{r['events']} labelled events in the {_span(d['test_hours'])} after the first "
                      f"{d['train_fraction']:.0%} (warm-up, replayed from {d['played_from']}); "
                      f"tolerance {d['tolerance_s']:.4g} s; replayed at "
                      f"{rp['speed']:.4g}× in {rp['wall_s']} s; calibrator every "
                      f"{rp['calibrator_interval_data_s']:.4g} s of data; {rp['dead_letters']} dead letters"
                      + ("" if rp["complete"] else "; INCOMPLETE: the daemon did not take every message in time"),
              caption_justify="left")
    t.add_column("metric")
    t.add_column(f"{r['model']['kind']} (model)", justify="right")
    t.add_column("PCA baseline", justify="right")
    for label, key in ROWS:
        t.add_row(label, _fmt(r[key]), _fmt(r["baseline"][key]))
    return t


def register(app: typer.Typer) -> None:
    app.command("replay-eval")(replay_eval)
