"""The log throttle (a sample of per-record events, with a count of what was left out); systemd notifications."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from monitor import logs
from monitor.logs import Throttle


@pytest.fixture
def forwarded() -> Iterator[None]:
    """kafka-python's records forwarded as `tsmon run` does, JSON, and the handler gone afterwards."""
    logs.configure("INFO", "json")
    kafka = logging.getLogger("kafka")
    for h in [h for h in kafka.handlers if isinstance(h, logs._KafkaPython)]:  # an earlier test's, with its
        kafka.removeHandler(h)  # throttle's counts: in a test worker that had run daemons, "Cancelled" was held back
    logs.forward_kafka_python()
    try:
        yield
    finally:
        for h in [h for h in kafka.handlers if isinstance(h, logs._KafkaPython)]:
            kafka.removeHandler(h)
        kafka.setLevel(logging.NOTSET)
        fetcher = logging.getLogger("kafka.consumer.fetcher")
        for h in [h for h in fetcher.handlers if isinstance(h, logs._KafkaPython)]:
            fetcher.removeHandler(h)
        fetcher.setLevel(logging.NOTSET)
        root = logging.getLogger()
        for h in [h for h in root.handlers if isinstance(h, logs._Library)]:  # every other library's, as run has it
            root.removeHandler(h)
        logs.configure_from_flags(None, None)


def test_the_throttle_keeps_a_burst_per_period_and_says_how_many_it_left_out() -> None:
    now = [0.0]
    t = Throttle(burst=3, period_s=60.0, clock=lambda: now[0])
    assert [t("dead_letter") for _ in range(5)] == [{}, {}, {}, None, None]
    assert t("stream_started") == {}  # each event its own budget
    now[0] = 59.9
    assert t("dead_letter") is None
    now[0] = 60.0
    assert t("dead_letter") == {"suppressed": 3} and t("dead_letter") == {}  # counted once, then reset
    assert [t("dead_letter") for _ in range(2)] == [{}, None]



def test_a_throttle_of_open_ended_events_remembers_a_bounded_number() -> None:
    """kafka-python's message texts are not a closed set: the throttle of them keeps at most ``max_events``, the
    expired ones going first, an event with lines left out kept until it has said so."""
    now = [0.0]
    t = Throttle(burst=1, period_s=60.0, clock=lambda: now[0], max_events=3)
    assert [t(e) for e in ("a", "a", "b", "c")] == [{}, None, {}, {}]
    now[0] = 61.0
    assert t("d") == {}  # full: b and c expired and go; a keeps its suppressed line
    assert t("a") == {"suppressed": 1}
    assert [t(e) for e in ("e", "f")] == [{}, {}]  # a, d, e full again, none expired: start afresh
    assert t("d") == {}

def test_notifications_do_nothing_outside_systemd_and_stop_quietly_when_the_socket_fails(tmp_path) -> None:
    from monitor.sdnotify import Notifier

    off = Notifier(env={})
    off.ready("x"), off.watchdog(), off.stopping()  # no NOTIFY_SOCKET: nothing at all
    assert not off.enabled
    gone = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "absent")})
    assert gone.enabled
    gone.ready("consuming")  # no listener: logged once, then off — never raised into the daemon
    assert not gone.enabled
    abstract = Notifier(env={"NOTIFY_SOCKET": "@tsmon-test"})
    assert abstract._address == "\0tsmon-test"
    abstract.close()


def test_an_error_is_described_with_its_type_once() -> None:
    """kafka-python's errors carry their class name in their message: /readyz read "commit failed:
    KafkaTimeoutError: KafkaTimeoutError: None", which told an operator nothing twice."""
    from kafka.errors import KafkaTimeoutError

    from models.errors import DataError, describe

    assert describe(KafkaTimeoutError()) == "KafkaTimeoutError"
    assert describe(KafkaTimeoutError(None)) == "KafkaTimeoutError"
    assert describe(KafkaTimeoutError("Failed to update metadata after 2.0 secs.")) == \
        "KafkaTimeoutError: Failed to update metadata after 2.0 secs."
    assert describe(DataError("bad column")) == "DataError: bad column"
    assert describe(OSError(28, "No space left on device")) == "OSError: [Errno 28] No space left on device"


def test_a_metadata_refresh_cancelled_by_its_client_closing_is_no_warning(forwarded: None, capsys) -> None:
    """kafka-python logs a metadata refresh cancelled by its client's close as an error: the restore's reader closes
    at every assignment, so every daemon start logged a warning that meant nothing. A refresh that failed stays one."""
    import json

    from kafka.errors import Cancelled

    kafka = logging.getLogger("kafka.cluster")
    kafka.error("Metadata refresh: failed %s", Cancelled())  # as kafka-python's cluster.py logs it
    kafka.error("Metadata refresh: failed %s", "KafkaConnectionError: Connection reset by peer")
    lines = [json.loads(ln) for ln in capsys.readouterr().err.splitlines()]
    assert [(d["level"], d["client_level"], d["message"]) for d in lines] == [
        ("info", "error", "Metadata refresh: failed Cancelled"),
        ("warning", "error", "Metadata refresh: failed KafkaConnectionError: Connection reset by peer")]


def test_kafka_python_warnings_reach_the_log_throttled_per_message(forwarded: None, capsys) -> None:
    """kafka-python logs to a NullHandler: its reasons (a certificate not trusted) were nowhere. Now errors are
    warnings and warnings info, three per message in five minutes (digits do not make a message new)."""
    import json

    kafka = logging.getLogger("kafka.net.manager")
    for backoff in (0.11, 0.38, 1.67, 6.33):  # formatted before logging, as kafka-python does
        kafka.error(f"Connection failed: Handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] (backoff {backoff})")
    kafka.warning("Bootstrap %s not ready", "bootstrap-0")
    kafka.info("Attempting bootstrap")  # below warning: not even made
    lines = [json.loads(ln) for ln in capsys.readouterr().err.splitlines()]
    assert [(d["event"], d["level"], d["client_level"]) for d in lines] == [
        ("kafka_client_log", "warning", "error")] * 3 + [("kafka_client_log", "info", "warning")]
    assert "CERTIFICATE_VERIFY_FAILED" in lines[0]["message"] and lines[3]["message"] == "Bootstrap bootstrap-0 not ready"
    assert sum(isinstance(h, logs._KafkaPython) for h in logging.getLogger("kafka").handlers) == 1  # once


def test_kafka_python_messages_of_one_template_have_budgets_of_their_own_and_never_raise(forwarded: None,
                                                                                       capsys) -> None:
    """Found by review: the budget was the template's, so refused connections during a broker restart hid the
    certificate failure after them for 5 minutes; and a write to stderr that failed raised into kafka-python's IO
    thread, which ended it (the consumer's poll then waited for good)."""
    import json
    import sys

    kafka = logging.getLogger("kafka.net.connection")
    for _ in range(4):
        kafka.error("Connection failed: %s", "KafkaConnectionError: 111 ECONNREFUSED")
    kafka.error("Connection failed: %s", "Handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    try:
        raise ValueError("boom")
    except ValueError:
        kafka.exception("Uncaught error in kafka producer I/O thread")
    lines = [json.loads(ln) for ln in capsys.readouterr().err.splitlines()]

    class Broken:
        def write(self, _text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    stderr, sys.stderr = sys.stderr, Broken()
    try:
        kafka.error("Connection failed: %s", "the log collector is gone")  # must not raise
    finally:
        sys.stderr = stderr
    messages = [d["message"] for d in lines]
    assert sum("ECONNREFUSED" in m for m in messages) == 3 and any("CERTIFICATE_VERIFY_FAILED" in m for m in messages)
    assert lines[-1]["error"] == "ValueError: boom"


def test_a_throttle_shared_by_two_threads_counts_every_line() -> None:
    """The processor's throttle is used by the loop and by the scheduler's thread (recalibration logs): its read-
    modify-write lost counts (34 343 of 40 000 under a short switch interval; the concurrency review)."""
    import sys
    import threading

    throttle = Throttle(burst=10**9, period_s=3600.0)
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        runs = [threading.Thread(target=lambda: [throttle("e") for _ in range(20_000)]) for _ in range(2)]
        for run in runs:
            run.start()
        for run in runs:
            run.join(30)
    finally:
        sys.setswitchinterval(before)
    assert throttle._seen["e"][1] == 40_000


def test_other_libraries_warnings_are_json_lines_in_the_daemons_log() -> None:
    """apscheduler (the recalibration and snapshot jobs) logs through the standard library with no handler: a
    recalibration that outlasted calibrator.interval_s wrote ``Execution of job "…" skipped: maximum number of
    running instances reached (1)`` as plain text amid the JSON lines, once per skipped run. In a process of its own:
    pytest's log capture would stand in for the standard library's last resort."""
    import json
    import subprocess
    import sys

    script = (
        "import logging\n"
        "from monitor import logs\n"
        "logs.configure_from_flags(None, None)\n"
        "logs.configure_daemon(None, 'json')\n"
        "for second in range(5):\n"
        "    logging.getLogger('apscheduler.executors.default').warning(\n"
        "        'Execution of job \"%s\" skipped: maximum number of running instances reached (%d)',\n"
        "        f'Daemon.recalibrate (next run at: 2026-12-08 01:41:4{second} UTC)', 1)\n"
        "logging.getLogger('some.library').error('failed: %s', 'why')\n"
        "import warnings\n"
        "warnings.warn('an RNN module weights are not part of single contiguous chunk', UserWarning)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    lines = [json.loads(line) for line in r.stderr.splitlines()]  # every line JSON
    assert [(d["event"], d["level"], d["logger"]) for d in lines] == [
        ("library_log", "warning", "apscheduler.executors.default")] * 3 + [("library_log", "error", "some.library"),
                                                                            ("library_log", "warning", "py.warnings")]
    assert "single contiguous chunk" in lines[4]["message"]  # Python warnings too (torch's), not plain text
    assert "maximum number of running instances" in lines[0]["message"] and lines[3]["message"] == "failed: why"


def test_a_position_out_of_range_is_a_warning_naming_the_partition(forwarded: None, capsys) -> None:
    """Retention deleted the committed offset while the daemon was down (or an operator set it past the end):
    kafka-python resets the partition to auto_offset_reset — records lost or skipped — and logs that at info only,
    which the daemon never forwarded: nothing said it. Its other info lines stay out."""
    import json

    from kafka import TopicPartition

    fetcher = logging.getLogger("kafka.consumer.fetcher")
    fetcher.info("Fetch offset %s is out of range for topic-partition %s", 1200, TopicPartition("sensors", 3))
    fetcher.info("Resetting offset for partition %s to offset %s.", TopicPartition("sensors", 3), 5000)
    fetcher.info("Truncation detected for %s at position %s; seeking to first diverging offset %s",
                 TopicPartition("sensors", 1), 900, 850)
    lines = [json.loads(ln) for ln in capsys.readouterr().err.splitlines()]
    assert [(d["event"], d["level"]) for d in lines] == [("input_offset_out_of_range", "warning"),
                                                         ("input_log_truncated", "warning")]
    assert "1200" in lines[0]["message"] and "partition=3" in lines[0]["message"]
    assert "auto_offset_reset" in lines[0]["consequence"]
