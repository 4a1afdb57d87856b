"""``tsmon replay-eval``: play a labelled series through the running daemon and score its alerts by event.

Owns the evaluation run. The series is replayed into a topic at a chosen speed and consumed by the daemon's
own code — broker, windows, micro-batches, calibrator, alert state, sink — then the alerts are read back from
the sink topic and scored against the labels (:mod:`monitor.events`). The PCA baseline runs in the same
daemon on the same data, as a second stream (``NAME.baseline``), fitted on the very windows the model was
trained on: both see the same broker, timing and calibrator schedule.

The split is chronological and stated: the first part of the series (the model's own training split when
it was trained on this file, else ``train_fraction``, 15 % by default as NAB's probationary period) is for
fitting, and events and alerts are scored on the rest. Of the first part only its validation windows are
played (its last 20 % of normal, finite windows: the model's threshold and its best epoch were chosen on
them, and neither the model nor the baseline was fitted on them) — the windows fill and the calibrator
gets its first evidence; alerts that fire there count for nothing. Both detectors get the same data, also
when the model was not trained on this file (it then loses most of the first part; the baseline is fitted
on it all the same). The windows a model was fitted on are not played: their in-sample errors are lower
than any it will see later, and a calibrator fed them walks the threshold down to where the first unseen
data keeps an alert open, which never feeds the calibrator again.

Time-based settings follow the data's clock: gaps and alert periods are in data time, and so, by default, is
the calibrator's schedule (``calibrator_clock`` "data", unless the ``--config`` sets ``calibrator.clock``):
each stream is recalibrated every ``calibrator.interval_s`` of its own data, as in production, at any replay
speed, and the run is the same from one replay to the next. With "wall" the wall-clock interval is divided
by the replay speed instead — down to one recalibration every 0.2 s of wall time, so a fast replay
recalibrates less often per hour of data (the report states the clock and the interval it got, in data
time).
"""

from __future__ import annotations

import contextlib
import glob
import json
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from models import artifact
from models.beats import rule_of
from models.data import Series, increasing_rows, series_dataset
from models.errors import BrokerError, DataError, describe
from models.files import check_writable, write_bytes_atomically
from models.workflow import baseline
from monitor import logs
from monitor.alerts import iso
from monitor.events import Span, labelled_events, latest_alerts, replayed_events, score_alerts, warmup_events
from monitor.replay import stamped

log = logs.get("tsmon.replay_eval")

# the local broker speaks plaintext: a config's security settings (for the user's cluster) made every client
# fail to bootstrap, reported after ~30 s as "cannot reach" the local broker
LOCAL_PLAINTEXT = {"kafka.security_protocol": "PLAINTEXT", **{f"kafka.{k}": "none" for k in (
    "sasl_mechanism", "sasl_username", "sasl_password", "ssl_cafile", "ssl_certfile", "ssl_keyfile")}}
DEFAULT_START_MS = 1_700_000_000_000  # files without timestamps start here (fixed: alert ids repeat run to run)
PROBATION = 0.15  # leading share of a series that is not scored, when the model was not trained on the file
MAX_WALL_S = 7 * 86400.0  # the longest replay --speed may ask for
MIN_INTERVAL_S = 0.2  # the calibrator never runs more often than this in wall time, whatever the speed
BASELINE_SUFFIX = ".baseline"
CLOCKS = ("data", "wall")  # what the replay's calibrator may count: the series' own time or the wall's


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    speed: float | None = None  # data seconds per wall second; None: the replay takes ``seconds``
    seconds: float = 30.0
    chunk: int = 0  # samples per message; 0: about 250 ms of data, at least 1, at most 1000
    tolerance_s: float | None = None  # None: one window of the model in data time
    train_fraction: float | None = None  # None: the model's own split on its training file, else PROBATION
    gap_ms: float | None = None  # None: 3 × the median sampling interval, at least windows.gap_ms
    bootstrap: str | None = None  # None: a local broker for the run
    config: Path | None = None  # the daemon settings to evaluate (alerts, calibrator, batch …)
    baseline: Path | None = None  # None: fit PCA on the model's training windows
    stream: str | None = None  # stream id; None: the data file's stem
    out: Path = Path("replay-eval")
    calibrator_clock: str | None = None  # data: interval_s of the series' own time; wall: interval_s / speed;
    # None: the --config's calibrator.clock if it sets one, else data


def time_axis(series: Series, sample_rate_hz: float | None, start_ms: float = DEFAULT_START_MS) -> np.ndarray:
    """Epoch ms (float) of every sample: the file's timestamps, else ``start_ms`` + i / rate."""
    if series.timestamps is not None:
        if sample_rate_hz:
            raise DataError(f"{Path(series.path).name} has timestamps; --sample-rate is only for files without")
        return series.timestamps.astype("datetime64[ns]").astype("int64") / 1e6
    if not sample_rate_hz or not sample_rate_hz > 0:
        raise DataError(f"{Path(series.path).name} has no timestamp column: give its --sample-rate in Hz")
    return start_ms + np.arange(len(series.values)) * (1000.0 / sample_rate_hz)


def daemon_times(ts_ms: np.ndarray, values: np.ndarray, start: int, chunk: int) -> np.ndarray:
    """Each sample's time as the daemon stamps it (whole ms; see :func:`monitor.replay.stamped`) for the rows played
    from ``start`` with finite values, the others' rounded: events are scored on the clock of the alerts."""
    out = np.round(ts_ms).astype("float64")
    ok = np.flatnonzero(np.isfinite(values[start:]).all(axis=1)) + start
    out[ok] = stamped(ts_ms[ok], chunk)
    return out


@dataclass
class Plan:
    """Everything decided before the replay starts."""

    stream: str
    model: Path
    baseline: Path
    window: int
    hop: int
    split: int  # first sample of the test part
    start: int  # first sample played: that of the first validation window (see the module doc)
    train_fraction: float
    trained_on_file: bool
    speed: float
    chunk: int
    tolerance_ms: float
    gap_ms: float
    period_ms: float  # median sampling interval


def plan(model: Path, series: Series, ts_ms: np.ndarray, opts: ReplayOptions, windows_gap_ms: float | None) -> Plan:
    """Split, baseline, speed, chunking and tolerance for a replay of ``series`` against ``model``."""
    det = artifact.load(model, "cpu")
    base = opts.baseline
    if base is not None:  # checked before the replay: a baseline of other channels was dead-lettered throughout,
        other = artifact.load(base, "cpu")  # then failed the report with an internal shape error
        if other.channels != det.channels:
            raise DataError(f"the baseline {base} takes {other.channels} channel(s) {other.channel_names}, the model "
                            f"{det.channels} {det.channel_names}: a baseline scores the same records")
    if series.labels is None:
        raise DataError("replay-eval needs labels: a 0/1 label column (--label-col) or anomaly windows (--windows)")
    if series.values.shape[1] != det.channels:
        raise DataError(f"model expects {det.channels} channel(s) {det.channel_names}, the data gives "
                        f"{series.values.shape[1]} {series.channels}; choose them with --value-col")
    trained = det.meta.get("training", {}).get("data", {})
    same = bool(series.sha256) and trained.get("sha256") == series.sha256
    own = float(trained.get("train_fraction", PROBATION)) if same else None
    frac = opts.train_fraction or own or PROBATION
    if own is not None and frac < own:
        raise DataError(f"--train-fraction {frac:g} is below the model's own split on this file ({own:g}): the "
                        f"scored part would hold windows the model was fitted on; use {own:g} or more")
    beat = det.windowing if rule_of(det.windowing) is not None else None  # the baseline cuts the same windows
    data = series_dataset(series, det.window, det.hop, frac, beat=beat)  # the model's own split on its file
    start, split = int(data.summary["val_start_sample"]), int(data.summary["split_sample"])
    kept = series  # the rows the model was trained on (--out-of-order drop kept some): its split counts in them
    if same and trained.get("out_of_order") == "drop" and series.timestamps is not None:
        keep = increasing_rows(series.timestamps.astype("int64"))
        kept = replace(series, values=series.values[keep], timestamps=series.timestamps[keep],
                       labels=series.labels[keep] if series.labels is not None else None)
    if same and "val_start_sample" in trained:
        # labels the training run did not have can move the validation windows back into fitted ones
        own_start, own_split = int(trained["val_start_sample"]), int(trained.get("split_sample", split))
        if kept is not series:  # in the file's rows, which are played (6 training samples were replayed)
            rows = np.flatnonzero(keep)
            own_start, own_split = int(rows[min(own_start, len(rows) - 1)]), int(rows[min(own_split, len(rows) - 1)])
        start, split = max(start, own_start), max(split, own_split)  # never a fitted window scored
    opts.out.mkdir(parents=True, exist_ok=True)
    if base is None:  # fitted on the model's own training windows, also when more than them is left unscored
        fit = data if own is None or (frac == own and kept is series) else series_dataset(
            kept, det.window, det.hop, own, beat=beat)
        base = artifact.save(baseline(fit, det), opts.out / "baseline-pca",
                             {"data": {**fit.summary, "value_cols": list(series.channels),
                                       "train_fraction": fit.summary["train_fraction"],
                                       # the windows it cuts, said as train says them (eval read them from it)
                                       "align": "sliding" if beat is None else "beats",
                                       "timestamp_col": series.timestamp_col, "label_col": series.label_col}})
    steps = np.diff(ts_ms)
    steps = steps[steps > 0]
    if not len(steps):
        raise DataError(f"{Path(series.path).name}: no two samples at different times")
    period = float(np.median(steps))
    if period < 1.0:
        raise DataError(f"{Path(series.path).name}: samples {period:.3g} ms apart; tsmon's input timestamps have "
                        f"1 ms resolution (at most 1 kHz a stream)")
    span_s = (ts_ms[start:].max() - ts_ms[start:].min()) / 1000  # what is played
    speed = opts.speed or max(span_s / opts.seconds, 1e-3)
    if span_s / speed > MAX_WALL_S:  # a pace no replay keeps (1e-9: an OverflowError from the player, the broker up)
        raise DataError(f"--speed {speed:g} would replay the {span_s:.6g} s played in {span_s / speed:.3g} s of wall "
                        f"time, over {MAX_WALL_S / 86400:g} days: give a larger --speed (or a smaller --seconds)")
    chunk = opts.chunk or int(min(1000, max(1, round(250 / period))))
    gap = opts.gap_ms or max(3 * period, windows_gap_ms or 0.0)
    tol = opts.tolerance_s * 1000 if opts.tolerance_s is not None else det.window * period
    return Plan(opts.stream or Path(series.path).name.split(".")[0], model, base, det.window, det.hop,
                split, start, frac, same, speed, chunk, tol, gap, period)


def run(model: Path, series: Series, ts_ms: np.ndarray, opts: ReplayOptions) -> dict[str, Any]:
    """Replay, collect the alerts, score model and baseline; writes ``report.json`` and ``timeline.png``."""
    from monitor.config import load_config

    base_cfg = load_config(opts.config)
    check_writable(opts.out, "--out", directory=True)  # before the replay: found at its end, the figures were lost
    clock = replay_clock(opts.calibrator_clock, base_cfg)  # before plan() writes the baseline
    p = plan(model, series, ts_ms, opts, base_cfg.windows.gap_ms)
    log.info("replay_eval_plan", stream=p.stream, speed=round(p.speed, 3), split_sample=p.split,
             train_fraction=p.train_fraction, chunk=p.chunk, gap_ms=p.gap_ms, baseline=str(p.baseline))
    played = _play(p, series, ts_ms, opts, base_cfg.calibrator.interval_s, clock)
    wire = daemon_times(ts_ms, series.values, p.start, p.chunk)  # the clock of the windows and alerts
    sent = np.isfinite(series.values).all(axis=1)  # the rows replayed: a NaN tail stretched the scored part
    last = wire[p.split:][sent[p.split:]]
    test = Span(float(wire[p.split]), float(last.max() if len(last) else wire[p.split]))  # (rows whose time goes
    # back are replayed)
    labelled = labelled_events(wire, series.labels, test.start_ms)  # type: ignore[arg-type]
    events = replayed_events(labelled, wire, series.labels, sent)  # type: ignore[arg-type]
    warmup = warmup_events(wire, series.labels, test.start_ms)  # type: ignore[arg-type]
    results = {name: score_alerts(events, latest_alerts(played["alerts"], s), test, p.tolerance_ms, warmup)
               for name, s in (("model", p.stream), ("baseline", p.stream + BASELINE_SUFFIX))}
    report: dict[str, Any] = {
        **results["model"], "baseline": results["baseline"],
        "model": {"path": str(p.model), "kind": artifact.read_manifest(p.model)["kind"],
                  "trained_on_this_file": p.trained_on_file},
        "baseline_model": {"path": str(p.baseline), "kind": artifact.read_manifest(p.baseline)["kind"]},
        "data": {"path": series.path, "samples": len(ts_ms), "channels": list(series.channels),
                 "period_ms": p.period_ms, "window": p.window, "hop": p.hop, "gap_ms": p.gap_ms,
                 "split_sample": p.split, "train_fraction": p.train_fraction,
                 "played_from_sample": p.start, "played_from": iso(int(ts_ms[p.start])),
                 "test_from": iso(int(test.start_ms)), "test_to": iso(int(test.end_ms)),
                 "test_hours": (test.end_ms - test.start_ms) / 3.6e6, "tolerance_s": p.tolerance_ms / 1000,
                 "events_unplayed": len(labelled) - len(events)},
        "replay": played["summary"],
    }
    from monitor import timeline

    write_bytes_atomically(opts.out / "report.json", (json.dumps(report, indent=2) + "\n").encode())  # the figures first
    report["timeline"] = str(timeline.draw(opts.out / "timeline.png", p, series, ts_ms, played, test))
    write_bytes_atomically(opts.out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    return report


def replay_clock(asked: str | None, cfg: Any) -> str:
    """The replay calibrator's clock: the one asked for, else the config's if it sets one, else data time."""
    clock = asked or (cfg.calibrator.clock if "clock" in cfg.calibrator.model_fields_set else "data")
    if clock not in CLOCKS:
        raise DataError(f"--calibrator-clock must be {' or '.join(CLOCKS)}, not {clock!r}")
    return str(clock)


def _play(p: Plan, series: Series, ts_ms: np.ndarray, opts: ReplayOptions, interval_s: float,
          clock: str) -> dict[str, Any]:
    """Broker, topics, daemon and player; returns the alerts, the threshold changes and a summary."""
    from kafka import KafkaProducer

    from monitor.broker import LOCAL_GROUP, LocalBroker
    from monitor.config import load_config
    from monitor.daemon import Daemon
    from monitor.replay import finite_rows, messages
    from monitor.topics import TopicReader, ensure_topics

    run_id = f"tsmon-replay-eval-{uuid.uuid4().hex[:8]}"  # topics and group of this run only
    topics = {"in": f"{run_id}.input", "alerts": f"{run_id}.alerts", "dead": f"{run_id}.dead-letter"}
    data_clock = clock == "data"  # the interval counts the series' own time: as configured, at any speed
    interval = interval_s if data_clock else max(MIN_INTERVAL_S, interval_s / p.speed)
    streams = (p.stream, p.stream + BASELINE_SUFFIX)
    with contextlib.ExitStack() as stack:
        local = opts.bootstrap is None
        bootstrap = stack.enter_context(LocalBroker()).bootstrap if local else opts.bootstrap
        overrides: dict[str, Any] = {
            "kafka.bootstrap_servers": bootstrap, "kafka.topics": [topics["in"]], "kafka.topic_pattern": "none",
            "kafka.alerts_topic": topics["alerts"], "kafka.dead_letter_topic": topics["dead"],
            "kafka.group_id": run_id, "kafka.auto_offset_reset": "earliest",
            "control.topic": f"{run_id}.control", "control.audit_topic": f"{run_id}.audit",
            "control.key": uuid.uuid4().hex,  # nobody commands the run's daemon: not "every command is refused"
            "state.topic": f"{run_id}.state", "calibrator.interval_s": interval,
            "calibrator.clock": clock, "limits.idle_evict_s": "none",
            "limits.earliest_ts": "none",  # a recorded series keeps its own time, however old
            "limits.max_future_s": "none",  # or ahead: stamped from now, every later sample was dead-lettered and
            # the run reported a poor detector (recall 0.5 for 1.0, false alerts an hour halved)
            "http.enabled": False,
            "models": [{"pattern": glob.escape(streams[0]), "path": str(p.model), "name": "model", "gap_ms": p.gap_ms},
                       {"pattern": glob.escape(streams[1]), "path": str(p.baseline), "name": "baseline",
                        "gap_ms": p.gap_ms}],
        }
        if local:  # a real Kafka refuses sessions under its group.min.session.timeout.ms (6 s by default)
            overrides.update(LOCAL_GROUP)
            overrides.update(LOCAL_PLAINTEXT)  # a --config for a TLS/SASL cluster: not for this broker of its own
        cfg = load_config(opts.config, overrides)
        if not local:  # a cluster that does not answer: said in 10 s, naming the address (63 s of silence before)
            from monitor.reach import wait_for_brokers

            wait_for_brokers(cfg.kafka, 10.0, "give another --bootstrap, or none for a broker of the run's own")
        client = cfg.kafka.client_kwargs()
        servers = client.pop("bootstrap_servers")
        if not local:  # leave nothing behind on the user's cluster, whatever happens from here
            stack.callback(_delete_topics, cfg.kafka.client_kwargs(),
                           [*topics.values(), cfg.control.topic, cfg.control.audit_topic, cfg.state.topic])
        ensure_topics(servers, {t: 1 for t in topics.values()}, **client)
        reader = TopicReader(servers, topics["alerts"], **client)
        stack.callback(reader.close)
        producer = KafkaProducer(**cfg.kafka.client_kwargs(), acks=1, linger_ms=5)
        stack.callback(producer.close)
        daemon = Daemon(cfg)
        changes: dict[str, list[tuple[float, float]]] = {s: [] for s in streams}

        def on_threshold(stream: str, state: Any) -> None:
            st = daemon.processor.streams.get(stream)
            at = st.last_window_ts if st is not None and st.last_window_ts >= 0 else ts_ms[p.start]
            changes.setdefault(stream, []).append((float(at), float(state.value)))

        daemon.threshold_listeners.append(on_threshold)
        ts_played, played, skipped = finite_rows(ts_ms[p.start :], series.values[p.start :])
        if skipped:
            log.warning("rows_skipped_nonfinite", rows=skipped)
        if len(ts_played) == 0:
            raise DataError(f"nothing to replay: all {skipped} rows after the warm-up hold NaN or inf")
        bodies = [list(messages(s, ts_played, played, p.chunk)) for s in streams]
        stop, sent, failed = threading.Event(), [0], []

        def play() -> None:
            t0, i = time.monotonic(), 0
            try:
                for (a, n), (b, _) in zip(*bodies, strict=True):
                    for key, body in ((streams[0], a), (streams[1], b)):
                        producer.send(topics["in"], key=key.encode(), value=body).add_errback(failed.append)
                    i += n
                    sent[0] += 2 * n
                    ahead = (ts_played[i - 1] - ts_played[0]) / 1000 / p.speed - (time.monotonic() - t0)
                    if stop.wait(max(0.0, ahead)):
                        break
                producer.flush()
            except Exception as exc:  # noqa: BLE001 — reported by the caller, never lost with the thread
                failed.append(exc)

        player = threading.Thread(target=play, name="replay-eval-player", daemon=True)
        total = 2 * len(bodies[0])  # messages: each ends in a stream's windows or as a dead letter
        limit = time.monotonic() + (ts_played[-1] - ts_played[0]) / 1000 / p.speed * 2 + 120
        t_start = time.monotonic()
        player.start()

        def handled() -> bool:
            return daemon.metrics.total("tsmon_records_total") >= total and daemon.processor.pending == 0

        def finished() -> bool:
            return (not player.is_alive() and (handled() or bool(failed))) or time.monotonic() > limit

        try:
            daemon.run(until=finished)
        finally:
            stop.set()
            player.join(10)
        if failed:
            raise BrokerError(f"replaying into {topics['in']} failed: {describe(failed[0])}")
        complete = handled()
        alerts = reader.settle(quiet_s=1.0)
        wall = time.monotonic() - t_start
    if not complete:
        log.error("replay_eval_incomplete", messages=total, handled=int(daemon.metrics.total("tsmon_records_total")),
                  note="the figures cover only what the daemon took in time")
    return {"alerts": alerts, "thresholds": changes, "final_thresholds": daemon.final_thresholds,
            "summary": {"speed": p.speed, "wall_s": round(wall, 1), "samples_sent": sent[0], "complete": complete,
                        "rows_skipped_nonfinite": skipped,
                        "chunk": p.chunk, "windows_scored": int(daemon.metrics.total("tsmon_windows_scored_total")),
                        "dead_letters": int(daemon.metrics.total("tsmon_dead_letters_total")),
                        "calibrator_clock": cfg.calibrator.clock,  # what the daemon ran with
                        "calibrator_interval_wall_s": None if data_clock else cfg.calibrator.interval_s,
                        "calibrator_interval_data_s": cfg.calibrator.interval_s * (1 if data_clock else p.speed),
                        "bootstrap": "local broker" if opts.bootstrap is None else opts.bootstrap}}


def _delete_topics(client: dict[str, Any], topics: list[str]) -> None:
    """Best effort: a topic that cannot be deleted is logged, never an error of the evaluation."""
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(**client)
        try:
            admin.delete_topics(topics)
        finally:
            admin.close()
    except KafkaError as exc:
        log.warning("replay_eval_topics_left", topics=topics, error=describe(exc))
