"""The demo's data and its scorecard: ECG streams with labelled abnormal episodes, and how alerts fared.

Owns what the demo claims. Streams are built from ECG5000 beats of the model's *test* split (never seen
in training): runs of normal beats with episodes of 2–4 consecutive abnormal beats inserted so that
``anomaly_rate`` of all beats are abnormal. An alert is a true positive when its span (first
over-threshold window → resolution, or firing time while still open) overlaps a labelled episode; an
episode is detected when some alert overlaps it; the delay counts samples from the episode's first
sample to the end of the window that made the alert fire.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import BrokerError, DataError, TsmonError, describe
from models.files import write_bytes_atomically
from monitor import logs
from monitor.events import latest_alerts

EPISODE_BEATS = (2, 4)  # inclusive range of abnormal beats per episode

log = logs.get("tsmon.demo")


@dataclass
class DemoStream:
    name: str
    ts: np.ndarray  # int64 [n]
    values: np.ndarray  # float32 [n, 1]
    episodes: list[tuple[int, int]] = field(default_factory=list)  # (start_ts, end_ts) of abnormal runs


def build_streams(beats: np.ndarray, abnormal: np.ndarray, n_streams: int, beats_per_stream: int,
                  anomaly_rate: float, period_ms: int, start_ms: int, seed: int = 0) -> list[DemoStream]:
    """Concatenate beats ``[k, W, 1]`` into streams; ``abnormal`` is the per-beat label."""
    rng = np.random.default_rng(seed)
    normal_ix, abnormal_ix = np.flatnonzero(~abnormal), np.flatnonzero(abnormal)
    w = beats.shape[1]
    mean_len = (EPISODE_BEATS[0] + EPISODE_BEATS[1]) / 2
    p_start = anomaly_rate / mean_len / max(1e-9, 1 - anomaly_rate)  # episodes per normal beat
    streams = []
    for s in range(n_streams):
        order: list[int] = []
        runs: list[tuple[int, int]] = []  # (first beat, beats)
        while len(order) < beats_per_stream:
            if len(order) >= 3 and rng.random() < p_start:  # never open a stream with an anomaly
                k = int(rng.integers(EPISODE_BEATS[0], EPISODE_BEATS[1] + 1))
                runs.append((len(order), k))
                order += rng.choice(abnormal_ix, k).tolist()
            order.append(int(rng.choice(normal_ix)))
        values = beats[order].reshape(-1, beats.shape[2]).astype("float32")
        ts = start_ms + period_ms * np.arange(len(values), dtype="int64")
        eps = [(int(ts[b * w]), int(ts[(b + k) * w - 1])) for b, k in runs]
        streams.append(DemoStream(f"ecg-{s + 1:02d}", ts, values, eps))
    return streams


def scorecard(streams: list[DemoStream], alerts: list[dict[str, Any]], period_ms: int) -> dict[str, Any]:
    """Precision, recall and mean delay of anomaly alerts against the labelled episodes.

    An alert still open at the end (no ``resolved`` message) spans to the end of its stream: it is firing
    there. The delay is averaged over episodes no alert was already firing for when they began; episodes that
    fell inside an alert already firing (e.g. held by flapping) are counted apart, whatever fired after.
    """
    tp_alerts, detected, covered, delays, labelled, n_alerts, flapping = 0, 0, 0, [], 0, 0, 0
    for s in streams:
        mine = latest_alerts(alerts, s.name)  # one per alert id, as replay-eval scores them
        n_alerts += len(mine)
        flapping += sum(bool(a.get("flapping")) for a in mine)
        spans = [(a["start_ts"], a["end_ts"] or int(s.ts[-1]), a["fired_ts"]) for a in mine]
        labelled += len(s.episodes)
        tp_alerts += sum(any(lo <= e1 and hi >= e0 for e0, e1 in s.episodes) for lo, hi, _ in spans)
        for e0, e1 in s.episodes:
            fired = [f for lo, hi, f in spans if lo <= e1 and hi >= e0]
            if not fired:
                continue
            detected += 1
            if any(f < e0 for f in fired):  # an alert already firing when it began (one after it changes nothing)
                covered += 1
            else:
                delays.append((min(fired) - e0) / period_ms + 1)
    return {
        "alerts": n_alerts, "true_alerts": tp_alerts, "labelled_anomalies": labelled, "detected": detected,
        "precision": round(tp_alerts / n_alerts, 4) if n_alerts else None,
        "recall": round(detected / labelled, 4) if labelled else None,
        "mean_delay_samples": round(float(np.mean(delays)), 1) if delays else None,
        "inside_open_alert": covered, "flapping": flapping,
    }


@dataclass(frozen=True, slots=True)
class DemoOptions:
    duration_s: float = 60.0  # how long the streams play
    streams: int = 4
    rate: float = 2500.0  # samples per second per stream (ECG at 125 Hz: 20× real time)
    anomaly_rate: float = 0.05  # fraction of beats that are abnormal
    period_ms: int = 8
    seed: int = 0
    bad_records: bool = True  # also send a few malformed messages, to show the dead-letter path
    http_port: int | None = None  # the daemon's HTTP endpoints; None: the config's default (9465), 0: any free port


@dataclass
class DemoProgress:
    """What the live view reads while the demo runs."""

    total_samples: int = 0
    sent_samples: int = 0
    alerts: list[dict[str, Any]] = field(default_factory=list)
    metrics: Any = None  # monitor.metrics.Metrics once the daemon exists
    http: Any = None  # the daemon's monitor.health.HealthServer (any free port with --http-port 0)
    bootstrap: str | None = None  # the demo's broker (a free loopback port): what tsmon ctl and tail need
    done: bool = False

    @property
    def http_url(self) -> str | None:
        """Where the daemon's HTTP endpoints listen, once they do."""
        try:
            return str(self.http.url) if self.http is not None else None
        except RuntimeError:  # not listening yet
            return None


BAD_RECORDS = [b"{not json", b'{"stream": "ecg-01", "ts": 1, "value": NaN}',
               b'{"stream": "ecg-01", "ts": 1, "values": [0.1, 0.2]}']


FALLBACK_LOG = "tsmon-demo-broker-"  # the broker log's name in the temporary directory
DEMO_BOOTSTRAP_TIMEOUT_MS = 10_000  # the daemon's wait for the demo's own broker, which has just answered


def _log_file(wanted: Path) -> Path:
    """``wanted``, emptied, or a file of its own in the temporary directory where that cannot be written (a
    read-only model directory stopped the demo before it began)."""
    try:
        wanted.write_bytes(b"")
        return wanted
    except OSError:
        fd, path = tempfile.mkstemp(prefix=FALLBACK_LOG, suffix=".log")
        os.close(fd)
        return Path(path)


def run_demo(model: str, opts: DemoOptions, progress: DemoProgress | None = None) -> dict[str, Any]:
    """Broker, topics, ECG streams, the daemon, the alerts: everything the demo does; returns the summary."""
    import threading
    import time

    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    from models import artifact
    from models.workflow import load_dataset, spec_for_eval
    from monitor.broker import LOCAL_GROUP, LocalBroker
    from monitor.config import load_config
    from monitor.daemon import Daemon
    from monitor.replay import messages
    from monitor.topics import TopicReader, ensure_topics

    progress = progress or DemoProgress()
    manifest = artifact.read_manifest(model)  # the daemon loads the weights; here only the metadata
    ds = load_dataset(spec_for_eval(manifest, "ecg5000", None))  # the model's test beats only
    w = int(manifest["window"])
    n_beats = max(10, int(opts.duration_s * opts.rate / w))  # per stream; episodes add a few
    streams = build_streams(ds.test, ds.test_labels.astype(bool), opts.streams, n_beats, opts.anomaly_rate,
                            opts.period_ms, int(time.time() * 1000) - n_beats * w * opts.period_ms, opts.seed)
    progress.total_samples = sum(len(s.ts) for s in streams)
    t_start = time.monotonic()
    broker_log = _log_file(Path(model).parent / "demo-broker.log")  # why it stopped, if it does (it wrote nowhere)
    with LocalBroker(log_file=broker_log) as broker:
        ensure_topics(broker.bootstrap, {"tsmon.input": 4, "tsmon.alerts": 1, "tsmon.dead-letter": 1})
        # its broker has just answered (the topics above): a start that cannot reach it any more is one whose broker
        # died, said after these 10 s and not after the default's 30
        overrides: dict[str, Any] = {"kafka.bootstrap_servers": broker.bootstrap, **LOCAL_GROUP,
                                     "kafka.bootstrap_timeout_ms": DEMO_BOOTSTRAP_TIMEOUT_MS,
                                     "calibrator.interval_s": 2.0, "calibrator.min_samples": 100,
                                     "models": [{"pattern": "ecg-*", "path": model}]}  # named by its directory
        if opts.http_port is not None:
            overrides["http.port"] = opts.http_port
        if os.environ.get("TSMON_CONTROL__KEY"):  # the demo reads no other environment: its figures are README's
            overrides["control.key"] = os.environ["TSMON_CONTROL__KEY"]  # (tsmon ctl against the demo needs it)
        cfg = load_config(None, overrides, env={})
        reader = TopicReader(broker.bootstrap, "tsmon.alerts")
        progress.alerts = reader.docs
        progress.bootstrap = broker.bootstrap  # never said before: tsmon ctl against the demo meant hunting for it
        log.info("demo_broker", bootstrap=broker.bootstrap,
                 use=f"tsmon ctl … --bootstrap {broker.bootstrap}, tsmon tail --bootstrap {broker.bootstrap} …")
        try:
            daemon = Daemon(cfg)
        except BrokerError:
            if broker.exited:  # it died while the daemon started: said 30 s later as "cannot reach a broker"
                reader.close()
                raise _broker_stopped(broker, broker_log, t_start, progress) from None
            raise
        progress.metrics = daemon.metrics
        progress.http = daemon.http
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=1, linger_ms=5)
        stop = threading.Event()
        player_failed: list[Exception] = []

        def play() -> None:
            try:
                send_all()
            except Exception as e:  # noqa: BLE001 - a thread's error would be a traceback on stderr
                if not (stop.is_set() or broker.exited):  # after either, its sends were given up: said below
                    player_failed.append(e)  # the run stops: a scorecard of a part of it is no result

        def send_all() -> None:
            bodies = [[m for m, _ in messages(s.name, s.ts, s.values, w)] for s in streams]  # a beat a message
            t0 = time.monotonic()
            for i in range(max(map(len, bodies))):
                for s, b in zip(streams, bodies, strict=True):
                    if i < len(b):
                        producer.send("tsmon.input", key=s.name.encode(), value=b[i])
                        progress.sent_samples += w
                if opts.bad_records and i == n_beats // 5:
                    for body in BAD_RECORDS:
                        producer.send("tsmon.input", key=b"ecg-01", value=body)
                ahead = (i + 1) * w / opts.rate - (time.monotonic() - t0)
                if stop.wait(max(0.0, ahead)):
                    break
            producer.flush()

        player = threading.Thread(target=play, name="demo-player", daemon=True)
        player.start()
        limit = time.monotonic() + opts.duration_s + 60

        def finished() -> bool:
            if broker.exited or player_failed:  # the run cannot go on, and its figures would be those of a part of
                return True  # it: a scorecard of 808 of 4 287 windows, printed after two minutes of retries, looked
                # like a result
            return (not player.is_alive() and daemon.caught_up(progress.total_samples)) or time.monotonic() > limit

        try:
            daemon.run(until=finished)
        finally:
            stop.set()
            gone = broker.exited  # nothing left to deliver to: the player, blocked in a send, is not waited for
            player.join(0.5 if gone else 10)  # (it was: 10 s, then 5 s for the producer, before the error was said)
            try:
                producer.close(timeout=0 if gone else 5)
            except Exception:  # its last sends time out when the broker is gone: that is said below
                if not (broker.exited or player_failed):
                    raise
        if broker.exited:
            reader.close()
            raise _broker_stopped(broker, broker_log, t_start, progress)
        if player_failed:
            reader.close()
            error = BrokerError if isinstance(player_failed[0], KafkaError) else TsmonError
            raise error(f"the demo could not send its streams ({describe(player_failed[0])}) after "
                        f"{progress.sent_samples:,} of {progress.total_samples:,} samples: no scorecard; "
                        f"the broker's log: {broker_log}")
        if broker_log.name.startswith(FALLBACK_LOG):
            broker_log.unlink(missing_ok=True)  # a fallback log of a run that went well: one more file each run
        alerts = reader.settle(quiet_s=1.0)
        thresholds = daemon.final_thresholds
    progress.done = True
    card = scorecard(streams, alerts, opts.period_ms)
    picture = strongest_alert_picture(alerts, Path(model).parent)
    return {
        **card,
        "streams": opts.streams, "samples": progress.total_samples, "beats": progress.total_samples // w,
        "anomaly_rate": opts.anomaly_rate, "rate_samples_per_s_per_stream": opts.rate,
        "windows_scored": int(daemon.metrics.total("tsmon_windows_scored_total")),
        "dead_letters": int(daemon.metrics.total("tsmon_dead_letters_total")),
        "data_quality_events": sum(a.get("type") == "data_quality" for a in alerts),
        "alert_messages": sum(a.get("type") == "anomaly" for a in alerts),
        "thresholds": {s: {"value": round(float(t["value"]), 4), "source": t["source"]} for s, t in thresholds.items()},
        "seconds": round(time.monotonic() - t_start, 1), "picture": picture,
    }


def _broker_stopped(broker: Any, broker_log: Path, t_start: float, progress: DemoProgress) -> BrokerError:
    """The one line for a demo whose own broker died: no scorecard, how far it got, where the broker's log is."""
    import time

    code = broker.proc.returncode if broker.proc is not None else None
    return BrokerError(f"the demo's broker stopped (exit status {code}) after {time.monotonic() - t_start:.0f} s, "
                       f"with {progress.sent_samples:,} of {progress.total_samples:,} samples sent: no scorecard; "
                       f"its log: {broker_log}")


def strongest_alert_picture(alerts: list[dict[str, Any]], out_dir: Path) -> dict[str, str] | None:
    """Keep the strongest firing alert as JSON beside the model, and draw it (what on-call would open)."""
    from monitor import explain

    paging = [a for a in alerts if a.get("type") == "anomaly" and a.get("status") == "firing" and a.get("explain")]
    if not paging:
        return None
    top = max(paging, key=lambda a: a["ratio"])
    doc = out_dir / "demo-alert.json"
    try:  # a folder it cannot write: the run's scorecard still comes (it ended the demo with exit 1, no scorecard)
        write_bytes_atomically(doc, (json.dumps(top) + "\n").encode())
        png = explain.render(top, out_dir / "demo-alert.png")
    except (OSError, DataError) as exc:  # DataError: a folder the file system refuses (files.replace_atomically)
        log.warning("demo_alert_not_written", folder=str(out_dir), error=describe(exc))
        return None
    return {"alert_id": top["alert_id"], "json": str(doc), "png": str(png)}
