"""`tsmon replay` puts a CSV series into a topic in the input format: read back, it is the same series."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from kafka import KafkaConsumer

from monitor.records import SampleBlock, parse


def replayed(broker: Any, topic: str, path: Path, *args: str) -> list[Any]:
    """``tsmon replay`` of ``path`` into ``topic``, and what the topic then holds, parsed."""
    proc = subprocess.run([sys.executable, "-m", "monitor", "replay", "--input", str(path), "--topic", topic,
                           "--bootstrap-servers", broker.bootstrap, *args],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    c = KafkaConsumer(topic, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                      consumer_timeout_ms=3000)
    blocks = [parse(m.value, m.key) for m in c]
    c.close()
    return blocks


def test_replay_round_trips_a_csv(broker: Any, topic: str, tmp_path: Path) -> None:
    n = 1000
    ts = pd.date_range("2024-03-01", periods=n, freq="20ms")
    values = np.random.default_rng(0).normal(size=(n, 2)).astype("float32")
    ts = ts.delete([550, 551, 552])  # irregular spacing here: those samples go one message each
    values = np.delete(values, [550, 551, 552], axis=0)
    path = tmp_path / "press.csv"
    pd.DataFrame({"timestamp": ts, "a": values[:, 0], "b": values[:, 1]}).to_csv(path, index=False)
    blocks = replayed(broker, topic, path, "--stream", "press-7", "--chunk", "100")
    assert all(isinstance(b, SampleBlock) and b.stream == "press-7" for b in blocks)
    blocks.sort(key=lambda b: int(b.ts_ms[0]))  # one key → one partition → already in order; be explicit
    got_ts = np.concatenate([b.ts_ms for b in blocks])
    got = np.concatenate([b.values for b in blocks])
    np.testing.assert_array_equal(got_ts, ts.to_numpy().astype("datetime64[ms]").astype("int64"))
    np.testing.assert_array_equal(got, values)  # 9 significant digits: float32 exactly
    assert len(blocks) == 9 + 100  # chunks of 100, but the one holding the irregular spot goes sample by sample


def test_a_360_hz_file_goes_in_chunks_stamped_as_replay_eval_scores_them(broker: Any, topic: str,
                                                                          tmp_path: Path) -> None:
    """A review: stamps cut to whole ms (2.778 ms apart: 2, 3, 3, 2 …) read as uneven, so a 360 Hz file went one
    message a sample whatever --chunk said, stamped by truncation where replay-eval scores rounded stamps."""
    from monitor.replay import stamped

    n = 1000
    ts = pd.Timestamp("2024-03-01") + pd.to_timedelta(np.arange(n) * (1e9 / 360), unit="ns")
    path = tmp_path / "ecg.csv"
    pd.DataFrame({"timestamp": ts, "mlii": np.sin(np.arange(n) / 20)}).to_csv(path, index=False)
    blocks = replayed(broker, topic, path, "--stream", "ecg", "--chunk", "100")
    assert len(blocks) == 10
    got = np.concatenate([b.ts_ms for b in sorted(blocks, key=lambda b: int(b.ts_ms[0]))])
    np.testing.assert_array_equal(got, stamped(ts.to_numpy().astype("datetime64[ns]").astype("int64") / 1e6, 100))


def test_a_file_without_timestamps_sent_at_once_ends_now(broker: Any, topic: str, tmp_path: Path) -> None:
    """Stamped from now on, 2 000 samples a minute apart lay up to 33 h ahead of the daemon's clock, past
    limits.max_future_s (1 h): the daemon dead-letters such samples. Sent at once, the file is the recent past."""
    import time

    path = tmp_path / "slow.csv"
    pd.DataFrame({"v": np.arange(2000.0)}).to_csv(path, index=False)
    before = time.time() * 1000
    blocks = replayed(broker, topic, path, "--period-ms", "60000", "--chunk", "500")
    ts = np.concatenate([b.ts_ms for b in sorted(blocks, key=lambda b: int(b.ts_ms[0]))])
    assert len(ts) == 2000 and np.all(np.diff(ts) == 60000)
    assert before - 2000 * 60000 - 1000 <= ts[0] and ts[-1] <= time.time() * 1000
    # paced at another speed than --period-ms says (here 100 000 samples/s): still the recent past, ending now
    blocks = replayed(broker, topic + "-paced", path, "--period-ms", "60000", "--chunk", "500", "--rate", "100000",
                      "--create-topic")
    assert max(int(b.ts_ms[-1]) for b in blocks) <= time.time() * 1000


def test_replay_to_a_topic_that_does_not_exist_is_an_error_not_a_new_topic(broker: Any, topic: str,
                                                                          tmp_path: Path) -> None:
    """A misspelt --topic: the producer's first send created it (the broker creates topics on demand), the command
    said "replayed" and exited 0, and the series lay where no daemon reads. Now a one-line error naming the closest
    topic, and nothing is created; --create-topic creates it on purpose."""
    from kafka.admin import KafkaAdminClient

    path = tmp_path / "small.csv"
    pd.DataFrame({"v": np.arange(50.0)}).to_csv(path, index=False)
    typo = topic[:-1] + ("x" if topic[-1] != "x" else "y")
    proc = subprocess.run([sys.executable, "-m", "monitor", "replay", "--input", str(path), "--topic", typo,
                           "--bootstrap-servers", broker.bootstrap], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 1, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("ConfigError: --topic: no topic") and f"did you mean {topic!r}" in line
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        assert typo not in set(admin.list_topics())
    finally:
        admin.close()
    assert len(replayed(broker, typo, path, "--create-topic")) == 1
    cfg = tmp_path / "tsmon.toml"  # the name from the configuration: the error says so, not --topic
    cfg.write_text(f'[kafka]\nbootstrap_servers = ["{broker.bootstrap}"]\ntopics = ["{topic}-nope"]\n')
    proc = subprocess.run([sys.executable, "-m", "monitor", "replay", "--input", str(path), "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("ConfigError: kafka.topics: no topic"), proc.stderr
    # a daemon reading a topic_pattern picks a new matching topic up: created, as the producer would have
    cfg.write_text(f'[kafka]\nbootstrap_servers = ["{broker.bootstrap}"]\ntopic_pattern = "{topic}-p.*"\n')
    assert len(replayed(broker, f"{topic}-pat", path, "--config", str(cfg))) == 1


def test_replay_refuses_a_missing_file(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "monitor", "replay", "--input", str(tmp_path / "nope.csv"),
                           "--topic", "t"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("DataError:") and "not found" in proc.stderr


def test_replay_sends_the_models_channels_in_its_order(broker: Any, topic: str, stream_model: Path,
                                                      tmp_path: Path) -> None:
    """The input format has no channel names: a file whose columns came in another order than the model's was
    sent as it was, and the daemon scored swapped channels (every window over the threshold, no warning)."""
    ts = pd.date_range("2024-03-01", periods=200, freq="20ms")
    ch0, ch1 = np.arange(200.0), -np.arange(200.0)
    path = tmp_path / "swapped.csv"
    pd.DataFrame({"timestamp": ts, "ch1": ch1, "ch0": ch0, "note": 7.0}).to_csv(path, index=False)
    blocks = replayed(broker, topic, path, "--model", str(stream_model))
    got = np.concatenate([b.values for b in blocks if isinstance(b, SampleBlock)])
    np.testing.assert_array_equal(got, np.stack([ch0, ch1], axis=1))  # by name, in the model's order
    proc = subprocess.run([sys.executable, "-m", "monitor", "replay", "--input", str(path), "--topic", topic,
                           "--bootstrap-servers", broker.bootstrap, "--value-col", "ch1", "--value-col", "ch0"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and "channels_sent_by_position" in proc.stderr
