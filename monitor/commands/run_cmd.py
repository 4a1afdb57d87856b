"""``tsmon run`` (the daemon) and ``tsmon replay`` (a series file into a topic)."""

from __future__ import annotations

import math
import os
import re
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from models import artifact
from models.data import read_series
from models.errors import BrokerError, ConfigError, ScoringStuck
from monitor import logs
from monitor.commands.options import bootstrap_option
from monitor.commands.render import emit_json
from monitor.config import load_config, topic_problem
from monitor.replay import finite_rows, timestamps
from monitor.replay import replay as replay_series

log = logs.get("tsmon.cli")
REPLAY_PARTITIONS = 4  # of a topic `tsmon replay --create-topic` creates (as `tsmon broker --topic`)


def run(
    config: Annotated[Path | None, typer.Option("--config", help="TOML configuration file.")] = None,
    bootstrap_servers: Annotated[str | None, bootstrap_option("host:port[,host:port] of the Kafka cluster.")] = None,
    topic: Annotated[list[str] | None, typer.Option("--topic", help="Input topic (repeat for several).")] = None,
    alerts_topic: Annotated[str | None, typer.Option(help="Topic for alerts and data-quality events.")] = None,
    dead_letter_topic: Annotated[str | None, typer.Option(help="Topic for records that cannot be used.")] = None,
    model: Annotated[Path | None, typer.Option(help="Artifact serving every stream (replaces the config's model "
                                                    "routes).")] = None,
    group_id: Annotated[str | None, typer.Option(help="Consumer group.")] = None,
) -> None:
    """Run the monitor: consume, window, score in micro-batches, calibrate, publish alerts. Stops on SIGTERM."""
    from monitor.daemon import Daemon  # torch and kafka load only for commands that need them

    overrides: dict[str, Any] = {
        "kafka.bootstrap_servers": bootstrap_servers, "kafka.topics": topic or None,
        "kafka.alerts_topic": alerts_topic, "kafka.dead_letter_topic": dead_letter_topic, "kafka.group_id": group_id,
        "models": [{"pattern": "*", "path": str(model)}] if model else None,
    }
    cfg = load_config(config, overrides)
    logs.configure_daemon(cfg.daemon.log_level, cfg.daemon.log_format)
    cfg.require_models()
    # Until the daemon's own handlers are in place (loading models, warming up, bootstrapping Kafka: up to ~35 s
    # with Kafka away) a stop ends the start at once. As a container's PID 1 a signal without a handler is
    # ignored: the runtime waited out its grace period and killed it.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop_starting)
    daemon = Daemon(cfg)
    daemon.install_signal_handlers()
    try:
        daemon.run()
    except ScoringStuck as exc:  # the stuck call holds a thread nothing can stop, which a normal exit would join
        sys.stderr.write(f"ScoringStuck: {exc}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)


def _stop_starting(signum: int, _frame: FrameType | None) -> None:
    logs.from_signal_handler("stopped_while_starting", signal=signal.Signals(signum).name)  # no structlog here
    raise SystemExit(128 + signum)  # nothing consumed yet: nothing to drain or commit


def replay(
    input: Annotated[Path, typer.Option("--input", help="CSV/CSV.gz/Parquet series (timestamp column optional).")],
    topic: Annotated[str | None, typer.Option(
        help="Topic to write to (default: the configuration's first input topic, else tsmon.input).")] = None,
    bootstrap_servers: Annotated[str | None, bootstrap_option(
        "host:port of the broker (default: the configuration's, else 127.0.0.1:9092).")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="TOML configuration: its brokers, TLS/SASL settings and input topic.")] = None,
    stream: Annotated[str | None, typer.Option(help="Stream id (default: the file name without suffix).")] = None,
    rate: Annotated[float | None, typer.Option(help="Samples per second (default: as fast as possible).")] = None,
    chunk: Annotated[int, typer.Option(help="Samples per message (1 = one message per sample).")] = 100,
    value_col: Annotated[list[str] | None, typer.Option("--value-col", help=(
        "Value column(s); default every column but the timestamp, a label column (label, is_anomaly, anomaly) "
        "and a 'sample' or pandas index (Unnamed: …)."))] = None,
    timestamp_col: Annotated[str | None, typer.Option(help="Timestamp column (default: auto-detected).")] = None,
    period_ms: Annotated[int, typer.Option(help="Sample period when the file has no timestamps.")] = 1000,
    out_of_order: Annotated[str, typer.Option(
        "--out-of-order", help="Rows whose timestamp repeats or goes back: error, drop, or keep (sent as they are: "
                               "the daemon reports them as late or duplicate)")] = "error",
    model: Annotated[Path | None, typer.Option(
        "--model", help="Artifact whose channels to send, by column name and in its order (the input format "
                        "carries no names: the daemon takes values by position).")] = None,
    create_topic: Annotated[bool, typer.Option(
        "--create-topic", help="Create the topic (4 partitions) if it does not exist; without it, a topic that "
                               "does not exist is an error (a misspelt name would have been created, unread).")] = False,
) -> None:
    """Stream a recorded series into a topic in tsmon's input format."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    from monitor.reach import wait_for_brokers
    from monitor.topics import ensure_topics, require_inputs, within

    if chunk < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--chunk")
    if rate is not None and not 0 < rate < math.inf:
        raise typer.BadParameter("must be finite and > 0", param_hint="--rate")
    if period_ms < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--period-ms")
    if topic is not None and (problem := topic_problem(topic)) is not None:  # kafka-python's check: a traceback
        raise typer.BadParameter(problem, param_hint="--topic")
    # the brokers with their TLS/SASL settings: without a config it wrote in plaintext whatever the cluster needed
    cfg = load_config(config, {"kafka.bootstrap_servers": bootstrap_servers} if bootstrap_servers else None)
    if topic is None and cfg.kafka.topic_pattern:  # its topics list is then the unused default
        raise ConfigError(f"give --topic: the configuration reads the topics matching {cfg.kafka.topic_pattern!r}")
    setting = "--topic" if topic is not None else "kafka.topics"  # the error names where the name came from
    topic = topic or cfg.kafka.topics[0]
    # a topic the daemon's pattern matches (re.match, as kafka-python) may be new: the daemon picks it up at its next
    # metadata refresh (not checked, created)
    create_topic = create_topic or bool(cfg.kafka.topic_pattern and re.match(cfg.kafka.topic_pattern, topic))
    if model is not None:
        if value_col:
            raise typer.BadParameter("give --model (its channels, by name) or --value-col, not both",
                                     param_hint="--model")
        value_col = [str(c) for c in artifact.read_manifest(model)["channels"]]
    series = read_series(input, value_col, timestamp_col, out_of_order=out_of_order,
                         model_channels=value_col if model is not None else None)
    if model is None and series.values.shape[1] > 1:  # a model trained on other columns would score the wrong ones
        log.warning("channels_sent_by_position", channels=series.channels,
                    hint="the daemon takes values by position: pass --model ART (or --value-col in its order)")
    # a file without timestamps is the recent past, ending now: stamped from now on, a long file lay hours ahead of
    # the daemon's clock (limits.max_future_s dead-letters that), paced or not — --rate need not be 1000/--period-ms
    start = int(time.time() * 1000) - len(series.values) * period_ms
    # fractional ms kept (360 Hz: 2.778 ms apart): cut to whole ms they were uneven, and went one message a sample
    ts = (series.timestamps.astype("datetime64[ns]").astype("int64") / 1e6 if series.timestamps is not None
          else timestamps(len(series.values), period_ms, start))
    ts, values, skipped = finite_rows(ts, series.values)
    if skipped:
        log.warning("rows_skipped_nonfinite", rows=skipped)
    name = stream or input.name.split(".")[0]
    wait_for_brokers(cfg.kafka, 10.0, "give --bootstrap-servers or --config")
    client = within(cfg.kafka.client_kwargs(), 10.0)
    servers = client.pop("bootstrap_servers")
    existing = ensure_topics(servers, {topic: REPLAY_PARTITIONS} if create_topic else {},
                             replication_factor=cfg.kafka.replication_factor, **client)
    if not create_topic:
        require_inputs([topic], existing, ",".join(cfg.kafka.bootstrap_servers), setting,
                       "or pass --create-topic; the daemon reads only the topics it is given")
    try:
        producer = KafkaProducer(bootstrap_servers=servers, **client, acks=1, linger_ms=10)
    except KafkaError as exc:
        raise BrokerError(f"cannot reach the broker at {', '.join(cfg.kafka.bootstrap_servers)}: {exc}") from None
    sent = replay_series(producer, topic, name, ts, values, chunk, rate)
    producer.close()
    log.info("replayed", stream=name, topic=topic, samples=sent, channels=series.channels)


config_app = typer.Typer(help="Daemon configuration: an example file, the reference, or check one.",
                         no_args_is_help=True)


@config_app.command("example")
def config_example() -> None:
    """Print a complete commented configuration file (every key at its default)."""
    from monitor.config import EXAMPLE_TOML

    sys.stdout.write(EXAMPLE_TOML)


@config_app.command("reference")
def config_reference() -> None:
    """Print every setting (type, bounds, default, environment variable, meaning) as Markdown tables."""
    from monitor.config_reference import reference_markdown

    sys.stdout.write(reference_markdown())


@config_app.command("check")
def config_check(
    config: Annotated[Path | None, typer.Option("--config", help="TOML configuration file.")] = None,
) -> None:
    """Validate a configuration (file + TSMON_* environment) and print it resolved, secrets masked."""
    cfg = load_config(config)
    cfg.kafka.check_files()  # as the clients of `tsmon run` will
    routes = cfg.require_models()
    for route in routes:
        if not (Path(route.path) / "manifest.json").is_file():
            raise ConfigError(f"models: no artifact at {route.path} (pattern {route.pattern!r})")
    from monitor.daemon import build_scorer, warn_unbounded_lowering

    # loaded whole and routed as `tsmon run` will (on CPU): a manifest alone passed before, and so did two
    # routes to one artifact without a name each, which `tsmon run` refused
    warn_unbounded_lowering(cfg, build_scorer(cfg, device="cpu"))
    emit_json(cfg.redacted())


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(replay)
    app.add_typer(config_app, name="config")
