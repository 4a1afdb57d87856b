"""``tsmon demo``: the whole product on one machine — broker, ECG streams, daemon, live alerts, scorecard."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.live import Live
from rich.table import Table

from models.detector import DEFAULT_QUANTILE
from models.errors import DataError
from models.registry import DEFAULT_KIND, train_defaults
from models.train import TrainConfig
from models.workflow import DataSpec
from monitor import logs
from monitor.alerts import iso
from monitor.commands.model_cmds import run_training
from monitor.commands.render import console, emit_json, stdout, value_table
from monitor.demo import DemoOptions, DemoProgress, run_demo

log = logs.get("tsmon.demo")


class LiveView:
    """The live table: progress, counters and the latest alerts, redrawn by rich from another thread."""

    def __init__(self, progress: DemoProgress) -> None:
        self.p = progress

    def __rich__(self) -> Table:
        p, m = self.p, self.p.metrics
        total = lambda name: int(m.total(name)) if m is not None else 0
        url = f"{p.http_url} · " if p.http_url else ""
        broker = f"broker {p.bootstrap} · " if p.bootstrap else ""
        head = (f"{broker}{url}sent {p.sent_samples:,}/{p.total_samples:,} samples · scored {total('tsmon_windows_scored_total'):,}"
                f" windows · dead letters {total('tsmon_dead_letters_total')} · alert messages {len(p.alerts)} (firing, resolved…)")
        # no vertical rules: 80 columns hold every column of a row whole (an on-call pass: cut ids and times)
        t = Table(title=head, title_justify="left", expand=False, box=box.SIMPLE_HEAD, padding=0,
                  pad_edge=False)
        t.add_column("stream time", no_wrap=True, min_width=8)
        t.add_column("stream", no_wrap=True)
        for col, longest in (("status", 10), ("severity", 8), ("ratio", 5), ("threshold", 10)):
            t.add_column(col, min_width=longest)  # "rate_drift", "critical", "calibrated": wrapped, never cut
        # never cut: 80 columns showed "2aaca52c6b…", an id no one could give tsmon inspect --alert (an on-call pass)
        t.add_column("alert_id", no_wrap=True, min_width=20)
        for a in sorted(list(p.alerts)[-12:], key=_stream_time):  # in stream time (in publish order, they jumped back)
            if a.get("type") == "anomaly":
                style = "red" if a["status"] == "firing" else "green"
                status = f"[{style}]" + ("flapping" if a["flapping"] and a["status"] == "firing" else a["status"])
                t.add_row(iso(_stream_time(a))[11:19], a["stream"], status, a["severity"],
                          f"{a['ratio']:.2f}", f"{a['threshold']:.3f} {a['threshold_source']}", a["alert_id"])
            else:
                t.add_row(a["time"][11:19], a["stream"], f"[yellow]{a['kind']}", "", "", "", a["event_id"][:10])
        return t


def _stream_time(a: dict[str, Any]) -> int:
    """The stream time a message of the live table is about: an alert's end, else the latest of its firing and its
    peak (an update of a firing alert is about its peak), a data-quality event's time."""
    if a.get("type") == "anomaly":
        return int(a.get("end_ts") or max(a.get("fired_ts") or 0, a.get("peak_ts") or 0))
    return int(a.get("ts") or 0)


def ensure_demo_model(path: Path) -> None:
    """Reuse the cached ECG5000 model, or train the default one (4 to 5 minutes on 2 idle CPU cores)."""
    if (path / "manifest.json").is_file():
        return
    log.warning("training_demo_model", path=str(path), note="first run only; later runs reuse it")
    cfg = TrainConfig(**train_defaults(DEFAULT_KIND), seed=42)
    run_training(DataSpec(), DEFAULT_KIND, {}, cfg, path, DEFAULT_QUANTILE, 1.0, "standard")


def demo(
    duration: Annotated[float, typer.Option(help="Seconds the streams play.")] = 60.0,
    streams: Annotated[int, typer.Option(help="ECG streams.")] = 4,
    rate: Annotated[float, typer.Option(help="Samples per second per stream (125 Hz ECG: 2500 = 20× real time).")]
    = 2500.0,
    anomaly_rate: Annotated[float, typer.Option(help="Fraction of beats that are abnormal (episodes of 2–4).")]
    = 0.05,
    model: Annotated[Path, typer.Option(help="ECG5000 model; trained here first if missing.")]
    = Path("artifacts/ecg5000-lstm"),
    seed: Annotated[int, typer.Option(help="Seed of the stream generator.")] = 0,
    http_port: Annotated[int | None, typer.Option(
        help="Port of the daemon's HTTP endpoints (default 9465, as configured; 0: any free port, shown in the live "
             "table's title; with the output redirected, `tsmon --log-level INFO demo` logs it).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (no live table).")] = False,
) -> None:
    """Start a broker, replay ECG streams with labelled abnormal beats, run the daemon, show alerts, score them."""
    if duration <= 0 or streams < 1 or rate <= 0 or not 0 < anomaly_rate < 0.5 \
            or (http_port is not None and not 0 <= http_port <= 65535):
        raise DataError("--duration and --rate must be > 0, --streams >= 1, --anomaly-rate in (0, 0.5), "
                        "--http-port in 0..65535")
    ensure_demo_model(model)
    opts = DemoOptions(duration, streams, rate, anomaly_rate, seed=seed, http_port=http_port)
    progress = DemoProgress()
    if not as_json:  # the tables are the output, live or at the end; keep only warnings beside them (redirected,
        logs.quiet("WARNING")  # as `make demo > f`, its info lines ran to 160, which replay-eval's table never had)
    if as_json or not console.is_terminal:
        summary = run_demo(str(model), opts, progress)
    else:
        with Live(LiveView(progress), console=console, refresh_per_second=4):
            summary = run_demo(str(model), opts, progress)
    if as_json:
        emit_json(summary)
    else:
        _print_summary(summary)


def _share(x: float | None) -> str | None:
    """A precision or recall with 4 decimals always (0.75 beside 0.8553, 1.0 beside 0.9855 in another run)."""
    return None if x is None else f"{x:.4f}"


def _print_summary(s: dict[str, Any]) -> None:
    rows = [("streams", s["streams"]), ("samples", f"{s['samples']:,}"), ("windows scored", f"{s['windows_scored']:,}"),
            ("anomaly rate (beats)", s["anomaly_rate"]), ("labelled anomalies (episodes)", s["labelled_anomalies"]),
            ("alerts (episodes)", s["alerts"]), ("detected", s["detected"]), ("precision", _share(s["precision"])),
            ("recall", _share(s["recall"])), ("  of which inside an alert already firing", s["inside_open_alert"]),
            ("mean delay (samples)", s["mean_delay_samples"]),
            ("flapping alerts", s["flapping"]), ("dead letters", s["dead_letters"]),
            ("data-quality events", s["data_quality_events"]), ("seconds", s["seconds"])]
    stdout.print(value_table("tsmon demo", rows))
    pairs = sorted(s["thresholds"].items())
    stdout.print("thresholds: " + ", ".join(f"{k} {v['value']} ({v['source']})" for k, v in pairs))
    if s.get("picture"):
        p = s["picture"]
        stdout.print(f"strongest alert {p['alert_id']}: picture {p['png']} "
                     f"(again: tsmon inspect --alert {p['json']} --out alert.png)")


def register(app: typer.Typer) -> None:
    app.command()(demo)
