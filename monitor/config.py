"""Daemon configuration: the schema of every setting, and loading it from its sources.

Owns the config contract: defaults < TOML file < ``TSMON_<SECTION>__<KEY>`` environment variables < CLI
overrides (dotted keys), validated once here with pydantic; every problem found becomes one line
``section.key: message`` of a single :class:`ConfigError`. Inside the daemon the result is a frozen
:class:`Config`; only :meth:`KafkaConfig.consumer_kwargs` / :meth:`KafkaConfig.producer_kwargs` reveal secrets.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from datetime import date, datetime, time
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from models.errors import ConfigError, did_you_mean
from models.files import read_limited
from monitor import logs
from monitor.globs import Budget, covers
from monitor.records import Limits

log = logs.get("tsmon.config")
ENV_PREFIX = "TSMON_"
_Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
# Kafka's legal topic names: a space or a comma passed `config check` and then stopped `tsmon run` with a traceback
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


def _topic_name(name: str) -> str:
    """Kafka's rule for topic names: a space or a comma passed ``config check``, then stopped ``tsmon run`` with a
    traceback from kafka-python."""
    if (problem := topic_problem(name)) is not None:
        raise ValueError(problem)
    return name


def topic_problem(name: str) -> str | None:
    """Why ``name`` is not a Kafka topic name, or None (commands that take a topic outside the config use it)."""
    if not _TOPIC.fullmatch(name) or name in (".", ".."):
        return (f"{name[:80]!r} is not a Kafka topic name: letters, digits, '.', '_' and '-' only, at most 249, "
                f"not '.' or '..'")
    return None


_Topic = Annotated[str, StringConstraints(strip_whitespace=True), AfterValidator(_topic_name)]
_HOST_PORT = re.compile(r"(?:[A-Za-z][A-Za-z0-9_]*://)?"  # SECURITY_PROTOCOL:// as the Java client takes it
                        r"(?:(?P<host>\[[0-9A-Fa-f:.%]+\]|[A-Za-z0-9._-]+)(?::(?P<port>\d{1,5}))?"  # host or [IPv6]
                        r"|(?P<bare>[0-9A-Fa-f.]*:[0-9A-Fa-f.]*:[0-9A-Fa-f:.%]*))")  # bare IPv6: no port
_LINGER_MS = 5  # the producers' batching delay
_SASL_USER_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_RDKAFKA_MOST = {"session_timeout_ms": 3_600_000, "max_poll_interval_ms": 86_400_000,
                 "reconnect_backoff_max_ms": 3_600_000, "request_timeout_ms": 300_000}


def bootstrap_problem(server: str) -> str | None:
    """Why ``server`` is not a broker address the Kafka clients accept, or None."""
    m = _HOST_PORT.fullmatch(server.strip())
    if m is None or (m.group("port") is not None and not 1 <= int(m.group("port")) <= 65535):
        return f"{server!r} is not host:port (port 1-65535; IPv6 as [addr]:port, or bare without a port)"
    return None


def host_port(server: str, default_port: int = 9092) -> tuple[str, int] | None:
    """``(host, port)`` of a broker address in any form :func:`bootstrap_problem` accepts, or None."""
    m = _HOST_PORT.fullmatch(server.strip())
    if m is None or bootstrap_problem(server) is not None:
        return None
    return (m.group("host") or m.group("bare")).strip("[]"), int(m.group("port") or default_port)


def _split(value: Any) -> Any:
    """``"a:1, b:2"`` → ``["a:1", "b:2"]``: the environment and CLI flags give lists as one string, and a flag given
    twice a list of such strings (``--topic a,b`` was one topic named "a,b")."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [s.strip() for v in value for s in v.split(",") if s.strip()]
    return value


def _unset(value: Any) -> Any:
    """TOML has no null: ``""`` or ``"none"`` puts an optional setting back to None."""
    return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value


MAX_CONFIG_BYTES = 1 << 20  # a config file is a few kB: larger is not one
MAX_DURATION_S = 315_360_000  # ten years: longer waits overflow the timers (threading, apscheduler) that run them


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """``max_batch = true`` is a mistake, not 1: pydantic's lax mode would take a boolean for a number. Checked
        per key, so that the section's other problems are listed with it (a check of the whole section stopped at
        its first boolean, and the rest came one start at a time)."""
        f = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and f is not None and f.annotation in (int, float, int | None, float | None):
            raise ValueError(f"a number is needed, got {str(value).lower()}")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _duration(cls, value: Any, info: ValidationInfo) -> Any:
        """Every ``*_s`` / ``*_ms`` setting is at most ten years: a "never" of 1e10 s passed the check and then
        overflowed the daemon's timers (a scoring timeout stopped the daemon at its first batch, an interval ended
        the start in a traceback). Per key: as a rule of the section it was said only once every other key of the
        section was valid."""
        name = info.field_name or ""
        unit = 1.0 if name.endswith("_s") else 1000.0 if name.endswith("_ms") else 0.0
        if unit and isinstance(value, int | float) and not isinstance(value, bool) and value > MAX_DURATION_S * unit:
            raise ValueError(f"at most {MAX_DURATION_S * unit:.0f} (ten years), got {value:g}")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> Self:
        problems = list(self._rules())  # "key: message" lines; _problems() puts the section in front
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _rules(self) -> Iterator[str]:
        """Rules between fields, checked once every field of the section is valid on its own."""
        return iter(())


def _assignors(strategy: str) -> tuple[Any, ...]:
    """kafka-python's assignor for ``kafka.partition_assignment``: range, roundrobin or sticky — eager, as the daemon's
    rebalance handling is (kafka-python's cooperative-sticky is not offered). Its ``name`` is librdkafka's."""
    from kafka.coordinator.assignors.range import RangePartitionAssignor
    from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
    from kafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor

    chosen = {"range": RangePartitionAssignor, "roundrobin": RoundRobinPartitionAssignor,
              "sticky": StickyPartitionAssignor}[strategy]
    # range offered too: instances changed one at a time share it with those not changed yet (none in common: a
    # group refuses the newcomer), and the group takes the chosen one once every instance offers it
    return (chosen,) if chosen is RangePartitionAssignor else (chosen, RangePartitionAssignor)


class KafkaConfig(_Section):
    client: Literal["kafka-python", "confluent"] = Field(
        "kafka-python", description="client of the input and output topics; confluent = librdkafka "
                                    "(pip install 'tsmon[confluent]')")
    bootstrap_servers: list[_Name] = Field(["127.0.0.1:9092"], min_length=1, description="broker host:port list")
    group_id: _Name = Field("tsmon", min_length=1, description="consumer group sharing the input partitions")
    client_id: str = Field("tsmon", min_length=1, description="client id shown in broker logs")
    topics: list[_Topic] = Field(["tsmon.input"], description="input topics (unless topic_pattern is set)")
    topic_pattern: str | None = Field(None, description="regex of input topics; replaces topics when set")
    partition_assignment: Literal["range", "roundrobin", "sticky"] = Field(
        "range", description="how the group shares the input partitions: range (per topic, from the first instance "
                             "on: with several topics the first instances get more), roundrobin (across topics), "
                             "sticky (as even, moving the fewest partitions between instances when they come "
                             "and go; kafka-python only); range is offered beside the others, so a group changes "
                             "instance by instance and takes the new one once every instance has it")
    metadata_max_age_ms: int = Field(300_000, ge=1000, le=3_600_000, description="how often the topic metadata is "
                                     "read again: a new topic matching topic_pattern, or partitions added to an "
                                     "input topic, are found at most this long after they appear (librdkafka's "
                                     "limit: 1 h)")
    alerts_topic: _Topic = Field("tsmon.alerts", description="topic alert events go to")
    dead_letter_topic: _Topic = Field("tsmon.dead-letter", description="topic for unusable input")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="where reading starts with no committed offset (a new group, a new partition or "
        "topic) or one not in the log (deleted by retention: logged as input_offset_out_of_range); latest skips "
        "what is there")
    session_timeout_ms: int = Field(6000, ge=500, description="a consumer silent this long is dropped")
    heartbeat_interval_ms: int = Field(1000, ge=100, description="below session_timeout_ms (best ≤ 1/3 of it)")
    max_poll_interval_ms: int = Field(300_000, ge=1000, description="longest gap between polls")
    max_poll_records: int = Field(500, ge=1, description="records one poll returns at most")
    fetch_max_wait_ms: int = Field(500, ge=1, le=500, description="longest a broker may hold a fetch without new "
                                                                  "data; lower it where the broker always holds it "
                                                                  "(e.g. Tansu) and latency matters")
    request_timeout_ms: int = Field(30_000, gt=500, lt=540_000,
                                    description="kafka-python needs fetch_max_wait_ms (500) < it < 540000")
    delivery_timeout_ms: int = Field(120_000, ge=1000, le=86_400_000, description="an alert, event or dead letter "
                                     "the broker has not acknowledged by then is sent again by tsmon (the input "
                                     "paused meanwhile); at least request_timeout_ms + 5 (the producer's linger)")
    reconnect_backoff_max_ms: int = Field(10_000, ge=50, description="reconnects to a lost broker back off "
                                                                       "exponentially from 50 ms up to this")
    bootstrap_timeout_ms: int = Field(30_000, ge=1000, le=3_600_000, description="how long a start waits for a "
                                      "broker to answer (each bootstrap address probed: connection, TLS handshake, "
                                      "a Kafka request) before it stops and names what failed")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="how clients talk to the brokers: TLS and/or SASL authentication")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = Field(
        None, description="required by the SASL_* protocols")
    sasl_username: str | None = Field(None, description="for PLAIN and SCRAM")
    sasl_password: SecretStr | None = Field(None, description="for PLAIN and SCRAM; masked when printed")
    ssl_cafile: str | None = Field(None, description="CA bundle (PEM) to verify the brokers")
    ssl_certfile: str | None = Field(None, description="client certificate (PEM) for mutual TLS")
    ssl_keyfile: str | None = Field(None, description="client private key (PEM) for mutual TLS")
    ssl_check_hostname: bool = Field(True, description="verify that broker certificates match the host")
    producer_acks: Literal["all", "1", "0"] = Field("all", description="broker acks an alert needs")
    enable_idempotence: bool = Field(False, description="idempotent producer; needs producer_acks all")
    replication_factor: int = Field(-1, ge=-1, le=32767, description="replicas of the alerts, dead-letter, "
                                    "control, audit and state topics when tsmon creates them (they are left alone if they exist); -1: the "
                                    "brokers' default.replication.factor (Kafka >= 2.4)")

    _lists = field_validator("bootstrap_servers", "topics", mode="before")(_split)
    _optional = field_validator("topic_pattern", "sasl_mechanism", "sasl_username", "sasl_password", "ssl_cafile",
                                "ssl_certfile", "ssl_keyfile", mode="before")(_unset)  # "" too: a missing secret

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_ports(cls, value: list[str]) -> list[str]:
        """What the clients accept — ``[SCHEME://]host[:port]``, IPv6 in brackets or bare — checked here: a port
        that is not a number crashed ``tsmon run`` (and ctl, replay) with a traceback from deep in kafka-python."""
        for server in value:
            if (problem := bootstrap_problem(server)) is not None:
                raise ValueError(problem)
        return value

    @field_validator("topic_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @field_validator("producer_acks", mode="before")
    @classmethod
    def _acks(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        return "all" if value == "-1" else value

    def _rules(self) -> Iterator[str]:
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            yield f"heartbeat_interval_ms: must be less than session_timeout_ms ({self.session_timeout_ms})"
        if self.delivery_timeout_ms < self.request_timeout_ms + _LINGER_MS:  # kafka-python refuses to start
            yield (f"delivery_timeout_ms: must be at least request_timeout_ms + {_LINGER_MS} "
                   f"({self.request_timeout_ms + _LINGER_MS})")
        if self.replication_factor == 0:
            yield "replication_factor: 0 replicas is no topic; give -1 (the brokers' default) or >= 1"
        if self.enable_idempotence and self.producer_acks != "all":
            yield 'enable_idempotence: an idempotent producer needs producer_acks = "all"'
        if not self.topics and self.topic_pattern is None:
            yield "topics: give at least one topic, or a topic_pattern"
        sasl = self.security_protocol.startswith("SASL_")
        if sasl and self.sasl_mechanism is None:
            yield f"sasl_mechanism: required with security_protocol {self.security_protocol}"
        for key in ("sasl_username", "sasl_password"):
            if sasl and self.sasl_mechanism in _SASL_USER_MECHANISMS and getattr(self, key) is None:
                yield f"{key}: required with sasl_mechanism {self.sasl_mechanism}"
        for key in ("sasl_mechanism", "sasl_username", "sasl_password"):
            if not sasl and getattr(self, key) is not None:
                yield f"{key}: needs security_protocol SASL_PLAINTEXT or SASL_SSL"
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if not self.security_protocol.endswith("SSL") and getattr(self, key) is not None:
                yield f"{key}: needs security_protocol SSL or SASL_SSL"
        if self.client == "confluent":  # what librdkafka refuses, said here rather than as a failed start
            if self.sasl_mechanism == "OAUTHBEARER":
                yield "sasl_mechanism: OAUTHBEARER is not supported with client = \"confluent\" (no token source)"
            if self.partition_assignment == "sticky":  # librdkafka's is cooperative: the daemon's revoke is eager
                yield "partition_assignment: sticky is kafka-python's; use range or roundrobin with client = \"confluent\""
            if self.max_poll_interval_ms < self.session_timeout_ms:
                yield (f"max_poll_interval_ms: librdkafka needs it at least session_timeout_ms "
                       f"({self.session_timeout_ms}) with client = \"confluent\"")
            if self.max_poll_records > 1_000_000:
                yield "max_poll_records: at most 1000000 with client = \"confluent\""
            for key, most in _RDKAFKA_MOST.items():  # beyond them librdkafka refuses the client (or cut it short)
                if getattr(self, key) > most:
                    yield f"{key}: at most {most} with client = \"confluent\" (librdkafka's range)"
            if self.topic_pattern is not None and "(?" in self.topic_pattern:
                yield ("topic_pattern: librdkafka's regular expressions have no (?...) groups (lookarounds, "
                       "non-capturing groups, flags) with client = \"confluent\"; list the topics instead")
            if self.topic_pattern is not None and (escape := re.search(r"\\[dD]", self.topic_pattern)):
                # no such class there (\w, \s, \b are GNU's and work): "\d" matched no topic and the daemon waited
                # with no input, no error
                yield (f"topic_pattern: librdkafka's regular expressions (POSIX) have no {escape[0]} with client = "
                       "\"confluent\"; write a bracket class such as [0-9]")

    def subscription(self) -> dict[str, Any]:
        """Keyword arguments of ``KafkaConsumer.subscribe``: the pattern if set, else the topics."""
        return {"pattern": self.topic_pattern} if self.topic_pattern else {"topics": list(self.topics)}

    def client_kwargs(self) -> dict[str, Any]:
        """What every kafka-python client needs: brokers, client id, security (admin and group-less readers)."""
        return {"bootstrap_servers": list(self.bootstrap_servers), "client_id": self.client_id,
                "request_timeout_ms": self.request_timeout_ms, "reconnect_backoff_ms": 50,
                "reconnect_backoff_max_ms": self.reconnect_backoff_max_ms,
                "bootstrap_timeout_ms": self.bootstrap_timeout_ms, **self._security_kwargs()}

    def consumer_kwargs(self) -> dict[str, Any]:
        """kafka-python ``KafkaConsumer`` settings; offsets are committed by the daemon, never automatically."""
        keys = ("group_id", "auto_offset_reset", "session_timeout_ms", "heartbeat_interval_ms",
                "max_poll_interval_ms", "max_poll_records", "fetch_max_wait_ms", "metadata_max_age_ms")
        return {**self.client_kwargs(), **{k: getattr(self, k) for k in keys}, "enable_auto_commit": False,
                "partition_assignment_strategy": _assignors(self.partition_assignment)}

    def producer_kwargs(self) -> dict[str, Any]:
        """kafka-python ``KafkaProducer`` settings for the alerts and dead-letter topics."""
        acks: str | int = "all" if self.producer_acks == "all" else int(self.producer_acks)
        # max_block_ms: send() waits at most this for metadata or buffer room; the sink keeps what it refuses.
        # Five requests in flight (kafka-python's default). One (ordered retries) was tried and reverted: in the
        # CI run after it an alert stayed unacknowledged for good after a cancelled request (stalled 40 s, to the
        # stop), where with five such a request had been retried within about a second; cause not established.
        return {**self.client_kwargs(), "acks": acks, "enable_idempotence": self.enable_idempotence,
                "linger_ms": _LINGER_MS, "max_block_ms": 2000, "delivery_timeout_ms": self.delivery_timeout_ms}

    def check_files(self) -> None:
        """The TLS files must be readable files here: a CA path that does not exist passed config check, and
        the client then failed after 30 s with "Unable to bootstrap", naming no file."""
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(self, key)
            if value is not None and not (os.path.isfile(value) and os.access(value, os.R_OK)):
                raise ConfigError(f"kafka.{key}: {value} is not a readable file")

    def _security_kwargs(self) -> dict[str, Any]:
        """Only the settings that apply to the protocol; the password is revealed here and nowhere else."""
        self.check_files()
        kwargs: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL_"):
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            if self.sasl_username is not None:
                kwargs["sasl_plain_username"] = self.sasl_username
            if self.sasl_password is not None:
                kwargs["sasl_plain_password"] = self.sasl_password.get_secret_value()
        if self.security_protocol.endswith("SSL"):
            kwargs["ssl_check_hostname"] = self.ssl_check_hostname
            kwargs.update({k: v for k in ("ssl_cafile", "ssl_certfile", "ssl_keyfile") if (v := getattr(self, k))})
        return kwargs


class ModelRoute(_Section):
    model_config = ConfigDict(populate_by_name=True)  # TOML key "for"; for_windows works too

    pattern: str = Field("*", min_length=1, description="fnmatch glob on the stream id; first match wins")
    path: Path = Field(description="model artifact directory")
    hop: int | None = Field(None, ge=1, description="window hop in samples, for sliding-window models (a beat model's "
                                                    "route refuses one), at most the model's window; none = the "
                                                    "artifact's hop")
    gap_ms: float | None = Field(None, gt=0, description="a longer gap restarts these streams' windows; "
                                                         "none = windows.gap_ms")
    for_windows: int | None = Field(None, ge=1, alias="for", description="anomalous windows in a row that open an "
                                                                         "episode on these streams; none = alerts.for")
    resolve_after: int | None = Field(None, ge=1, description="normal windows in a row that resolve it; "
                                                              "none = alerts.resolve_after")
    name: str | None = Field(None, min_length=1, description="display name, unique across routes (two routes to one "
                                                            "artifact need one each); none = the directory name")
    gap_periods: float | None = Field(None, gt=1, description="an interval longer than this many of these streams' "
                                      "sample periods is a gap too (e.g. 2.5 for device-clock ECG beside "
                                      "receipt-stamped sensors); none = windows.gap_periods")

    _optional = field_validator("hop", "gap_ms", "for_windows", "resolve_after", "name", "gap_periods",
                                mode="before")(_unset)

    @field_validator("path", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("give the artifact directory")
        return value

    @property
    def display_name(self) -> str:
        return self.name or self.path.name or str(self.path)

    def matches(self, stream: str) -> bool:
        return fnmatch.fnmatchcase(stream, self.pattern)


class WindowsConfig(_Section):
    gap_ms: float | None = Field(5000.0, gt=0, description="a longer gap restarts a stream; none = never")
    gap_periods: float | None = Field(None, gt=1, description="an interval longer than this many of the stream's "
                                      "sample periods (learnt, and relearnt when the rate drifts) is a gap too, for "
                                      "regular streams stamped by the device's sample clock (e.g. 2.5: two missing "
                                      "samples; a 130 ms dropout of a 100 Hz stream was spliced into windows and "
                                      "paged); none = gap_ms alone (receipt-time stamps, bursty or irregular streams)")

    clock_step_s: float | None = Field(60.0, gt=0, description="a stream whose new samples stay behind its last one "
                                       "for this long of their own time (consecutive records, in order among "
                                       "themselves, produced over half of it at least) had its clock set back: it "
                                       "restarts at the new time (an open "
                                       "alert is resolved; a `clock_step` event); none = never: they are "
                                       "dead-lettered until its clock passes the old time (up to limits.max_future_s)")

    _optional = field_validator("gap_ms", "gap_periods", "clock_step_s", mode="before")(_unset)


class BatchConfig(_Section):
    max_batch: int = Field(256, ge=1, le=65536, description="windows scored in one model call at most")
    max_delay_ms: float = Field(50.0, ge=0, description="longest a window waits for its batch to fill")
    latency_target_ms: float | None = Field(
        None, gt=0, description="p99 sample-to-decision latency to aim for: batches adapt (at once when the scorer "
                                "is idle, larger under load); none = fixed max_batch / max_delay_ms")
    max_pending: int | None = Field(None, ge=1, description="windows waiting to be scored (in flight included) "
                                                            "before input is paused, resumed below half; none = "
                                                            "4 × max_batch (revoke and shutdown score them all)")

    _optional = field_validator("latency_target_ms", "max_pending", mode="before")(_unset)

    def _rules(self) -> Iterator[str]:
        if self.max_pending is not None and self.max_pending < self.max_batch:
            yield f"max_pending: must be at least max_batch ({self.max_batch})"

    @property
    def pending_limit(self) -> int:
        return self.max_pending if self.max_pending is not None else 4 * self.max_batch


class CalibratorConfig(_Section):
    enabled: bool = Field(True, description="adapt thresholds per stream to recent normal errors")
    quantile: float | None = Field(None, gt=0, le=0.999, description="none = each stream's own model's threshold "
                                   "quantile; at most 0.999, the calibrator's highest (calibrator.MAX_QUANTILE: a "
                                   "higher one was taken as 0.999 without a word)")
    margin: float | None = Field(None, gt=0, description="threshold = margin × the quantile of recent errors; none = "
                                 "each stream's own model's threshold margin (its --threshold-margin; 1.0 by default)")
    window: int = Field(2000, ge=10, description="recent normal errors kept per stream")
    min_samples: int = Field(200, ge=1, description="errors needed before adapting (≤ window)")
    max_change: float = Field(0.2, gt=0, le=1, description="largest relative change per recalibration")
    min_change: float = Field(0.005, ge=0, lt=1, description="smaller relative moves are not a new version; "
                                                                   "below max_change")
    floor: float = Field(0.5, gt=0, le=1, description="never below floor × the artifact threshold")
    ceiling: float = Field(4.0, ge=1, description="never above ceiling × the artifact threshold")
    interval_s: float = Field(30.0, gt=0, description="seconds between recalibrations")
    clock: Literal["wall", "data"] = Field(
        "wall", description="whose seconds interval_s counts: wall = the host's; data = the streams' own "
                            "timestamps (replays and backfills: the same recalibrations at any speed)")

    _optional = field_validator("quantile", "margin", mode="before")(_unset)

    def _rules(self) -> Iterator[str]:
        if self.min_samples > self.window:
            yield f"min_samples: must be at most window ({self.window})"
        if self.min_change >= self.max_change:
            yield f"min_change: must be less than max_change ({self.max_change})"


class AlertsConfig(_Section):
    model_config = ConfigDict(populate_by_name=True)  # TOML key "for"; for_windows works too

    for_windows: int = Field(2, ge=1, alias="for", description="anomalous windows in a row that open an episode")
    resolve_after: int = Field(2, ge=1, description="normal windows in a row that resolve it")
    flap_period_ms: float = Field(60_000.0, gt=0, description="period in which episodes are counted for flapping")
    flap_max: int = Field(4, ge=2, le=1000, description="episodes per flap_period_ms that mark a stream as flapping")
    major_ratio: float = Field(1.5, ge=1, description="score/threshold from which an alert is major")
    critical_ratio: float = Field(3.0, description="score/threshold from which it is critical; above major_ratio")
    max_hold_windows: int = Field(1000, ge=1, description="windows an open episode may hold commits back")

    def _rules(self) -> Iterator[str]:
        if self.critical_ratio <= self.major_ratio:
            yield f"critical_ratio: must be greater than major_ratio ({self.major_ratio})"


class QualityConfig(_Section):
    flatline_rel_std: float = Field(1e-3, ge=0, description="std at most this × training std is flat-lined "
                                  "(0: only a channel that is exactly constant)")
    rate_tolerance: float = Field(0.25, gt=0, lt=1, description="relative sample-period drift that is reported")
    cooldown_ms: float = Field(60_000.0, ge=0, description="one data_quality event per stream and kind per this")
    silent_after_s: float | None = Field(600.0, gt=0, description="a stream that sent nothing for this long (and "
                                         "10 of its usual waits between records) is reported silent; none = never")

    _optional = field_validator("silent_after_s", mode="before")(_unset)


class LimitsConfig(_Section):
    max_bytes: int = Field(1 << 20, ge=1, description="largest input message")
    max_samples: int = Field(10_000, ge=1, description="most samples in one chunk message")
    max_channels: int = Field(256, ge=1, description="most channels per sample")
    max_stream_len: int = Field(256, ge=1, description="longest stream id")
    max_streams: int = Field(10_000, ge=1, description="streams held at once; records of more are dead-lettered")
    idle_evict_s: float | None = Field(3600.0, gt=0, description="a stream silent this long is snapshotted and "
                                                                 "dropped from memory; none = never")
    max_future_s: float | None = Field(3600.0, gt=0, description="samples stamped further ahead of this host's "
                                                                 "clock are dead-lettered (timestamp_in_future): one "
                                                                 "such sample refused every later one until its time "
                                                                 "came; none = no check")

    earliest_ts: str | None = Field("2000-01-01T00:00:00Z", description="samples stamped before this time (ISO-8601 "
                                    "with a zone) are dead-lettered (timestamp_too_early): epoch seconds sent as "
                                    "milliseconds read as January 1970; none = no check")

    _optional = field_validator("idle_evict_s", "max_future_s", mode="before")(_unset)

    @field_validator("earliest_ts", mode="before")
    @classmethod
    def _instant(cls, value: Any) -> Any:
        """A TOML datetime or an ISO-8601 string with a zone; kept as the string it was given."""
        value = _unset(value)
        if isinstance(value, date | time):  # a TOML datetime; a bare date or time said "Input should be a valid string"
            value = value.isoformat()
        elif isinstance(value, int | float):  # (an epoch time too); pydantic reports a ValueError, not a TypeError
            raise ValueError(  # noqa: TRY004
                f"an ISO-8601 time with a zone is needed (e.g. 2000-01-01T00:00:00Z), not "
                f"{str(value).lower() if isinstance(value, bool) else repr(value)}")
        if isinstance(value, str):
            text = value.strip()
            try:
                parsed = datetime.fromisoformat(text)
            except ValueError:
                raise ValueError(f"not an ISO-8601 time with a date and a zone (e.g. 2000-01-01T00:00:00Z): "
                                 f"{value!r}") from None
            if parsed.tzinfo is None:  # a date alone: its Z was refused too (fromisoformat takes no zone there)
                example = f"{text}Z" if len(text) > 10 else f"{text}T00:00:00Z"
                raise ValueError(f"give a zone (e.g. {example}): {value!r} would be read in each host's own")
            value = text
        return value

    @property
    def earliest_ms(self) -> int | None:
        """``earliest_ts`` in epoch milliseconds."""
        return None if self.earliest_ts is None else int(datetime.fromisoformat(self.earliest_ts).timestamp() * 1000)

    def to_limits(self) -> Limits:
        return Limits(**self.model_dump(exclude={"max_streams", "idle_evict_s", "max_future_s", "earliest_ts"}))


class DaemonConfig(_Section):
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    commit_interval_ms: float = Field(1000.0, gt=0, description="how often finished offsets are committed")
    shutdown_timeout_s: float = Field(10.0, gt=0, description="SIGTERM to exit, at most (drain, commit, close)")
    scoring_timeout_s: float = Field(60.0, gt=0, description="a micro-batch not scored by then is stuck (a hung GPU "
                                     "or worker): nothing is committed past it and the process exits 1 for its "
                                     "supervisor to restart it")
    sink_timeout_s: float = Field(5.0, gt=0, description="longest wait for the broker to acknowledge output "
                                                         "before input pauses")
    retry_max_s: float = Field(10.0, gt=0, description="longest wait between commit retries while the broker "
                                                       "or the sink fails")
    poll_timeout_ms: int = Field(100, ge=1, description="longest one poll blocks")
    max_unacked: int = Field(10_000, ge=1, description="output messages awaiting the broker's acknowledgement "
                                                       "that bring the next commit (and its flush) forward")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for scoring; none = usable CPUs − 1 (≥ 1): "
                                      "the CPUs it may run on, fewer under a cgroup CPU limit")
    scoring: Literal["auto", "thread", "process"] = Field(
        "auto", description="where the forward pass runs; auto = a process of its own on CPU, a thread on CUDA")
    precision: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="scoring precision; reduced ones run under autocast and are checked at start")
    precision_tolerance: float = Field(0.02, gt=0, description="largest score difference to float32 allowed at "
                                                               "start, as a share of max(score, threshold)")
    warmup: bool = Field(True, description="score batches of 1, max_batch / 8 and max_batch windows per model "
                                           "before consuming (kernels, allocator, the batcher's cost model)")
    log_format: Literal["json", "console"] | None = Field(None, description="none = console on a terminal")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="least severe level logged")

    _optional = field_validator("log_format", "torch_threads", mode="before")(_unset)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"use auto, cpu, cuda or cuda:N, not {value!r}")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    def _rules(self) -> Iterator[str]:
        if self.precision != "float32" and not self.warmup:  # the check runs in the warm-up: it was skipped
            yield f"warmup: precision {self.precision} is checked against float32 in the warm-up; keep it on"


class ControlConfig(_Section):
    topic: _Topic = Field("tsmon.control", description="topic operators' commands arrive on")
    audit_topic: _Topic = Field("tsmon.audit", description="every command, its ack and its effect")
    key: SecretStr | None = Field(None, description="shared HMAC-SHA256 key; none = every command is refused")
    max_age_s: float = Field(300.0, gt=0, description="commands issued longer ago (or ahead) are refused")
    poll_interval_ms: float = Field(200.0, gt=0, description="how often the daemon looks for commands")
    remember: int = Field(10_000, ge=1, description="command ids remembered to apply each command once")

    _optional = field_validator("key", mode="before")(_unset)


class StateConfig(_Section):
    enabled: bool = Field(True, description="persist and restore thresholds, controls and open alerts")
    topic: _Topic = Field("tsmon.state", description="changelog topic keyed by stream (compacted)")
    snapshot_interval_s: float = Field(30.0, gt=0, description="seconds between snapshots of changed streams")
    restore_timeout_s: float = Field(300.0, gt=0, description="longest a restore may read the changelog, broker "
                                     "errors tried again meanwhile (the input waits); then streams it did not reach "
                                     "start from their artifact")
    history: int = Field(50, ge=1, description="threshold versions kept per stream")
    recent_alerts: int = Field(20, ge=1, description="alerts per stream remembered for feedback")
    forget_after_s: float | None = Field(
        604_800.0, gt=0, description="the document of a stream unseen while its partition's input moved this long "
        "on (record time) is forgotten (a tombstone on the changelog) unless it holds a pin, a freeze or a running "
        "silence; a fired alert it holds is resolved then (stream_gone), the document forgotten this long later; "
        "none = kept for ever")

    max_documents: int = Field(50_000, ge=1, description="documents of streams not in memory kept at most (~21 kB "
                               "each in memory with full evidence, up to ~93 kB with full alert history) that hold no pin, freeze, running silence (but "
                               "one a standing silence would renew) or open alert; over it the least recently written "
                               "are forgotten as above")

    _optional = field_validator("forget_after_s", mode="before")(_unset)


class HttpConfig(_Section):
    enabled: bool = Field(True, description="serve /metrics, /healthz, /readyz and /streams")
    host: str = Field("127.0.0.1", min_length=1, description="address to listen on")
    port: int = Field(9465, ge=0, le=65535, description="0 = any free port (logged)")
    stall_s: float = Field(30.0, gt=0, description="/healthz fails when the loop has not turned for this long")
    max_stream_labels: int = Field(500, ge=1, description="streams with their own threshold metric label")


class DriftConfig(_Section):
    enabled: bool = Field(True, description="guard threshold raises; accept a level shift as the new normal")
    window: int = Field(600, ge=20, description="recent window errors (all, normal or not) kept per stream")
    min_windows: int = Field(200, ge=10, description="errors needed before any raise is allowed (≤ window)")
    alpha: float = Field(0.01, gt=0, lt=1, description="KS test level: halves that differ are still changing")
    shift_share: float = Field(0.9, gt=0.5, le=1, description="share over threshold that is a level shift")
    max_over_share: float = Field(0.1, gt=0, lt=0.5, description="share still over a raised threshold allowed")

    def _rules(self) -> Iterator[str]:
        if self.min_windows > self.window:
            yield f"min_windows: must be at most window ({self.window})"


class Config(_Section):
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    models: list[ModelRoute] = Field(default_factory=list, description="stream → artifact routes, in order")
    windows: WindowsConfig = Field(default_factory=WindowsConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    calibrator: CalibratorConfig = Field(default_factory=CalibratorConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)

    def _rules(self) -> Iterator[str]:
        """Settings of several sections that misbehave together."""
        yield from self._topic_rules()
        yield from self._timing_rules()
        yield from self._route_rules()

    def _topic_rules(self) -> Iterator[str]:
        """tsmon's own topics apart from each other and from its input: a dead-letter topic that was an input topic
        dead-lettered its own dead letters for ever (one message in, one out), an alerts topic read as input ..."""
        own = {"kafka.alerts_topic": self.kafka.alerts_topic, "kafka.dead_letter_topic": self.kafka.dead_letter_topic,
               "control.topic": self.control.topic, "control.audit_topic": self.control.audit_topic,
               "state.topic": self.state.topic}
        seen: dict[str, str] = {}
        for key, topic in own.items():
            if topic in seen:
                yield f"{key}: {topic!r} is already {seen[topic]}: each of tsmon's topics needs its own"
            elif topic in self.kafka.topics and self.kafka.topic_pattern is None:
                yield f"{key}: {topic!r} is an input topic (kafka.topics): tsmon would read its own output"
            elif self.kafka.topic_pattern is not None and re.match(self.kafka.topic_pattern, topic):
                yield (f"kafka.topic_pattern: it matches {key} ({topic!r}): tsmon would read its own output "
                       f"(exclude it, e.g. list the input topics)")
            seen.setdefault(topic, key)

    def _timing_rules(self) -> Iterator[str]:
        # one turn of the loop blocks up to a poll and a flush: past http.stall_s /healthz (liveness) fails a daemon
        # that is only waiting for a broker away (an orchestrator then restarts it for an outage)
        turn = self.daemon.poll_timeout_ms / 1000 + self.daemon.sink_timeout_s
        if self.http.enabled and turn >= self.http.stall_s:
            yield (f"http.stall_s: must exceed daemon.poll_timeout_ms + daemon.sink_timeout_s ({turn:g} s), the "
                   f"longest one turn of the loop may wait; /healthz would fail a daemon waiting for its broker")
        # a gap under 1 + rate_tolerance periods: a stream a little slower (+20 %) had every interval a gap for good,
        # its period never relearnt (a drift under the tolerance is none): not one window more
        least = 1 + self.quality.rate_tolerance
        periods = {"windows.gap_periods": self.windows.gap_periods,
                   **{f"models[{i}].gap_periods": r.gap_periods for i, r in enumerate(self.models)}}
        for key, value in periods.items():
            if value is not None and value <= least:
                yield (f"{key}: must exceed 1 + quality.rate_tolerance ({least:g}): a stream that slows by less than "
                       f"the tolerance would have every interval taken for a gap")

    def _route_rules(self) -> Iterator[str]:
        budget = Budget()  # all the pairs together (a review: 60 long routes took 42 s to load, each pair its own)
        for i, route in enumerate(self.models):  # first match wins: a route after "*", its own pattern or one that
            # matches every id it does (line1-a* after line1-*: a pipeline owner's pass) is never used (None: not
            # worked out within its budget, taken as reached)
            before = next((j for j in range(i) if covers(self.models[j].pattern, route.pattern, budget)), None)
            if before is not None:
                yield (f"models[{i}].pattern: {route.pattern!r} is never reached: models[{before}] "
                       f"({self.models[before].pattern!r}) comes first and the first match wins")

    def redacted(self) -> dict[str, Any]:
        """JSON-able settings for logs: secrets masked, paths as strings, TOML key names."""
        return self.model_dump(mode="json", by_alias=True)

    def require_models(self) -> list[ModelRoute]:
        if not self.models:
            raise ConfigError("no model configured: add [[models]] to the config, set TSMON_MODEL=ARTIFACT, "
                              "or pass --model ARTIFACT to tsmon run")
        return self.models

    def route_for(self, stream: str) -> ModelRoute | None:
        """The first route whose pattern matches ``stream``, or None."""
        return next((route for route in self.models if route.matches(stream)), None)


_SECTIONS: dict[str, type[BaseModel]] = {
    name: field.annotation for name, field in Config.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
}
# per section: every accepted spelling of a key → its TOML name ("for_windows" → "for")
def _spellings(model: type[BaseModel]) -> dict[str, str]:
    return {**{n: f.alias or n for n, f in model.model_fields.items()},
            **{f.alias: f.alias for f in model.model_fields.values() if f.alias}}


_KEYS = {section: _spellings(model) for section, model in _SECTIONS.items()}
_ROUTE_KEYS = _spellings(ModelRoute)


def load_config(path: Path | None = None, overrides: Mapping[str, Any] | None = None,
                env: Mapping[str, str] | None = None) -> Config:
    """Defaults < TOML file ``path`` < ``TSMON_*`` variables of ``env`` (default ``os.environ``) < ``overrides``."""
    twice: list[str] = []  # a setting given under both its names: listed with the other problems
    file_layer = _canonical(_read_toml(path), twice) if path is not None else {}
    env_layer, model = _from_env(os.environ if env is None else env)
    raw = _merge(file_layer, _topics_win(file_layer, env_layer))
    if model and not file_layer.get("models"):
        raw["models"] = [{"pattern": "*", "path": model}]
    elif model:  # against the precedence (file < environment), so said: the routes are the file's
        log.warning("config_model_variable_ignored", file=str(path), model=model,
                    hint="TSMON_MODEL serves every stream only where the file has no [[models]]: edit the routes")
    given = _from_overrides(overrides or {})  # the options set (None: not given)
    raw = _merge(raw, _topics_win(raw, _canonical(given, twice)))
    if overridden := _overridden(file_layer, env_layer):  # by precedence, but a file edit then does nothing
        log.warning("config_file_values_overridden", file=str(path), by="environment", values=overridden,
                    hint="unset the TSMON_* variable (container images set some) or change it instead")
    problems = list(twice)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        problems += _problems(exc)
    if problems:
        sources = (([str(path)] if path is not None else []) + (["environment"] if env_layer else [])
                   + (["command options"] if given else []))
        where = f" ({' + '.join(sources)})" if sources else ""
        raise ConfigError(f"invalid configuration{where}:\n  " + "\n  ".join(problems)) from None
    return cfg


def _overridden(file_layer: Mapping[str, Any], env_layer: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``section.key`` → {file, environment} for every setting the file gives one value and a variable another
    (secrets masked): the environment wins, and an edit of the file does nothing without a word."""
    out = {}
    for section, values in env_layer.items():
        given = file_layer.get(section)
        if not isinstance(given, Mapping):
            continue
        for key, text in values.items():
            if key not in given or _same(given[key], str(text)):
                continue
            field = _SECTIONS[section].model_fields.get(key) or next(
                f for f in _SECTIONS[section].model_fields.values() if f.alias == key)
            secret = "SecretStr" in str(field.annotation)
            out[f"{section}.{key}"] = {"file": "***" if secret else given[key], "environment": "***" if secret else text}
    return out


def _same(value: Any, text: str) -> bool:
    """Does the variable's ``text`` say what the file's ``value`` says (20.0 and "20", true and "True", a list and
    its comma-separated items, a TOML datetime and its ISO-8601 spelling)?"""
    t = text.strip()
    try:
        if isinstance(value, bool):
            return t.lower() in (("true", "1", "yes", "on") if value else ("false", "0", "no", "off"))
        if isinstance(value, int | float):
            return float(t) == float(value)
        if isinstance(value, list):
            return _split(t) == [str(v).strip() for v in value]
        if isinstance(value, datetime):
            return datetime.fromisoformat(t) == value
    except ValueError:
        return False
    return str(value).strip() == t


def _topics_win(lower: dict[str, Any], upper: dict[str, Any]) -> dict[str, Any]:
    """A layer that names input topics and no pattern replaces a lower layer's pattern (which replaces topics):
    ``--topic orders`` over a file's ``topic_pattern`` consumed the pattern's topics, without a word."""
    kafka = upper.get("kafka")
    named = isinstance(kafka, dict) and _split(kafka.get("topics")) not in (None, [])  # an empty variable names none
    if named and "topic_pattern" not in kafka and isinstance(lower.get("kafka"), dict) \
            and lower["kafka"].get("topic_pattern"):
        return {**upper, "kafka": {**kafka, "topic_pattern": None}}
    return upper


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file {path} not found: give an existing file or leave --config out")
    raw = read_limited(path, "config file", MAX_CONFIG_BYTES, ConfigError)  # /dev/zero was read until memory ran out
    try:
        return tomllib.loads(raw.removeprefix(b"\xef\xbb\xbf").decode())  # an editor's byte-order mark: not TOML's
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _from_env(env: Mapping[str, str]) -> tuple[dict[str, Any], str | None]:
    """``TSMON_<SECTION>__<KEY>`` → ``{section: {key: value}}``, plus the ``TSMON_MODEL`` shortcut."""
    layer: dict[str, dict[str, Any]] = {}
    model, problems = None, []
    for var in sorted(env):
        name = var.upper()
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name.removeprefix(ENV_PREFIX)
        if rest == "MODEL":
            model = env[var].strip() or None
        if "__" not in rest:
            if rest.startswith("MODEL") and rest != "MODEL":  # TSMON_MODELS, TSMON_MODEL_PATH: ignored before
                problems.append(f"{var}: unknown variable (the one-route shortcut is TSMON_MODEL=ARTIFACT)")
            elif rest.lower().startswith(tuple(_SECTIONS)):  # TSMON_KAFKA_TOPICS, TSMON_KAFKATOPICS: ignored before
                # a misspelt override, not silence
                problems.append(f"{var}: unknown variable (overrides are TSMON_<SECTION>__<KEY>, with two "
                                f"underscores, e.g. TSMON_KAFKA__TOPICS)")
            continue
        section, _, key = rest.lower().partition("__")
        if section not in _SECTIONS:
            problems.append(f"{var}: unknown section {section!r}"
                            + (_nearest(section, _SECTIONS) or f" (use one of {', '.join(_SECTIONS)})"))
        elif key not in _KEYS[section]:
            problems.append(f"{var}: unknown key {key!r} in section {section}{_nearest(key, _KEYS[section])}")
        elif _KEYS[section][key] in layer.get(section, {}):  # e.g. __FOR and __FOR_WINDOWS: one won silently
            problems.append(f"{var}: the same setting as another variable of section {section}; keep one")
        else:
            layer.setdefault(section, {})[_KEYS[section][key]] = env[var]
    if problems:
        raise ConfigError("invalid environment:\n  " + "\n  ".join(problems))
    return layer, model


def _from_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"kafka.topics": [...]}`` → ``{"kafka": {"topics": [...]}}``; None means the flag was not given."""
    layer: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        for part in reversed(dotted.split(".")):
            value = {part: value}
        layer = _merge(layer, value)
    return layer


def _canonical(layer: Mapping[str, Any], twice: list[str]) -> dict[str, Any]:
    """Rename keys to their TOML names so that ``for`` in the file and ``for_windows`` in a flag meet; a setting
    given under both names (one of them silently won) goes to ``twice`` as a problem, its TOML name kept."""
    out = dict(layer)
    for section, keys in _KEYS.items():
        if isinstance(out.get(section), Mapping):
            out[section] = _renamed(out[section], keys, section, twice)
    if isinstance(out.get("models"), list):  # a route's for and for_windows: "models[0].for_windows: unknown key"
        out["models"] = [_renamed(r, _ROUTE_KEYS, f"models[{i}]", twice) if isinstance(r, Mapping) else r
                         for i, r in enumerate(out["models"])]
    return out


def _renamed(given: Mapping[str, Any], keys: Mapping[str, str], where: str, twice: list[str]) -> dict[str, Any]:
    """``given`` with its keys under their TOML names; under both names, the TOML name's value is kept and the
    setting goes to ``twice``."""
    renamed = [(keys.get(k, k), k) for k in given]
    twice += sorted({f"{where}.{new} / {old}: one setting given under both names; keep one"
                     for new, old in renamed if new != old and new in given})
    return {new: given[old] for new, old in renamed if new == old or new not in given}


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of nested dicts, ``top`` winning; lists are replaced, never concatenated; inputs untouched."""
    out = dict(base)
    for key, value in top.items():
        both = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = _merge(out[key], value) if both else value
    return out


def _nearest(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a misspelt ``name``, or nothing."""
    close = did_you_mean(name.lower(), choices)
    return f" (did you mean {close!r}?)" if close else ""


def _unknown(loc: tuple[int | str, ...], given: Any) -> str:
    """"unknown key", or section, with the nearest name a misspelling may have meant; a key written above every
    ``[section]`` header (a value, not a table) is a key, and the section it belongs to is named."""
    name = str(loc[-1])
    table = isinstance(given, Mapping) or (isinstance(given, list) and given and all(isinstance(g, Mapping) for g in given))
    if len(loc) == 1 and table:  # [name] or [[name]]
        return "unknown section" + _nearest(name, [*_SECTIONS, "models"])
    if len(loc) == 1:
        homes = [section for section, keys in _KEYS.items() if name in keys]
        return "unknown key" + (f" here: it belongs under [{homes[0]}]" if homes else "")
    keys = _ROUTE_KEYS if loc[0] == "models" else _KEYS.get(str(loc[0]), {})
    return "unknown key" + _nearest(name, keys)


def _problems(exc: ValidationError) -> list[str]:
    """One ``dotted.key: message`` line per problem; a validator's ``key: message`` lines name their key."""
    lines = []
    for err in exc.errors(include_url=False):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        message = (_unknown(err["loc"], err.get("input")) if err["type"] == "extra_forbidden"
                   else err["msg"].removeprefix("Value error, "))
        for line in message.splitlines():
            key, sep, rest = line.partition(": ")
            if err["type"] == "value_error" and sep and all(part.partition("[")[0].isidentifier()
                                                            for part in key.split(".")):
                line, where_line = rest, f"{where}.{key}".lstrip(".")
            else:
                where_line = where
            lines.append(f"{where_line}: {line}")
    return lines


EXAMPLE_TOML = '''\
# tsmon daemon configuration. Every value shown is the default unless marked "example".
# Precedence: defaults < this file < TSMON_<SECTION>__<KEY> variables < command-line flags.
# Environment example: TSMON_KAFKA__BOOTSTRAP_SERVERS=broker1:9092,broker2:9092  TSMON_ALERTS__FOR=3
# Optional settings left unset are commented out; "none" sets one back to unset. The [[models]] route
# below is an example (the daemon needs at least one).

[kafka]
client = "kafka-python"                  # or "confluent": librdkafka for the input and output topics
bootstrap_servers = ["127.0.0.1:9092"]   # or one string "host1:9092,host2:9092"
group_id = "tsmon"                       # daemons in one group share the input partitions
client_id = "tsmon"
topics = ["tsmon.input"]                 # input topics; the message key is the stream id
# topic_pattern = '^sensors\\..*'        # example: a regex of input topics, replaces topics
alerts_topic = "tsmon.alerts"
dead_letter_topic = "tsmon.dead-letter"  # unusable input messages, with a reason
auto_offset_reset = "earliest"           # where a new consumer group starts: earliest or latest
session_timeout_ms = 6000                # a consumer silent this long is dropped from the group
heartbeat_interval_ms = 1000             # below session_timeout_ms, best at most a third of it
max_poll_interval_ms = 300000            # longest gap between polls before a rebalance
max_poll_records = 500
fetch_max_wait_ms = 500                  # a fetch held this long at most (lower: latency on brokers that always hold it)
request_timeout_ms = 30000               # kafka-python needs 500 < request_timeout_ms < 540000
metadata_max_age_ms = 300000             # topic metadata read again this often: new pattern topics, added partitions
partition_assignment = "range"           # or roundrobin, sticky: how a group's instances share several topics
delivery_timeout_ms = 120000            # output unacknowledged this long is sent again (input paused meanwhile)
reconnect_backoff_max_ms = 10000         # reconnects to a lost broker back off from 50 ms up to this
bootstrap_timeout_ms = 30000             # a start waits this long for a broker to answer, then names what failed
security_protocol = "PLAINTEXT"          # PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL
# sasl_mechanism = "SCRAM-SHA-512"       # example: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER
# sasl_username = "tsmon"                # example: PLAIN and SCRAM need a username and password;
# sasl_password = "..."                  # better set TSMON_KAFKA__SASL_PASSWORD than write it here
# ssl_cafile = "/etc/tsmon/ca.pem"       # example: CA bundle that signs the broker certificates
# ssl_certfile = "/etc/tsmon/client.pem" # example: client certificate for mutual TLS
# ssl_keyfile = "/etc/tsmon/client.key"  # example: its private key
ssl_check_hostname = true
producer_acks = "all"                    # "all", 1 or 0 broker acknowledgements per alert
enable_idempotence = false               # true needs producer_acks = "all"
replication_factor = -1                  # topics tsmon creates (alerts, dead-letter, control, audit, state); -1: the brokers' default

# Routes from stream ids to model artifacts; the first route whose pattern matches wins.
[[models]]
pattern = "*"                            # example: fnmatch glob on the stream id
path = "artifacts/ecg5000-lstm"          # example: artifact directory written by `tsmon train`
# hop = 1                                # example: window hop in samples; default: the artifact's hop
# gap_ms = 900000.0                      # example: slow sensors (5-min samples); default: windows.gap_ms
# gap_periods = 2.5                      # example: device-clock ECG (a dropout is a gap); default: windows.gap_periods
# for = 1                                # example: ECG beats (one abnormal beat is the event); default: alerts.for
# resolve_after = 2                      # example: default: alerts.resolve_after
# name = "ecg"                           # example: display name; default: the directory name

[windows]
gap_ms = 5000.0                          # a longer gap between samples restarts the stream; "none" = never
# gap_periods = 2.5                      # example: an interval over 2.5 learnt sample periods is a gap too; default: off
clock_step_s = 60.0                      # samples behind the stream for this long of their own time: a clock set back

[batch]
max_batch = 256                          # windows scored in one model call at most (1..65536)
max_delay_ms = 50.0                      # longest a window waits for its batch to fill
# latency_target_ms = 100.0              # example: adaptive batches aiming at this p99 sample-to-decision latency
# max_pending = 1024                     # example: windows waiting before input pauses; default 4 × max_batch

[calibrator]
enabled = true                           # adapt each stream's threshold to its recent normal errors
# quantile = 0.99                        # example: default is each stream's model's quantile
# margin = 1.5                           # example: default is each stream's model's margin (threshold = margin x quantile)
window = 2000                            # recent normal errors kept per stream
min_samples = 200                        # errors needed before the first recalibration (<= window)
max_change = 0.2                         # largest relative change per recalibration
min_change = 0.005                       # a smaller relative move is not a new threshold version
floor = 0.5                              # never below floor x the artifact threshold
ceiling = 4.0                            # never above ceiling x the artifact threshold
interval_s = 30.0                        # seconds between recalibrations
clock = "wall"                           # or "data": interval_s of the streams' own time (replays, backfills)

[alerts]
for = 2                                  # anomalous windows in a row that open an episode
resolve_after = 2                        # normal windows in a row that resolve it
flap_period_ms = 60000.0                 # a stream that fires flap_max times
flap_max = 4                             # within flap_period_ms (stream time) is flapping
major_ratio = 1.5                        # score / threshold from which an alert is major
critical_ratio = 3.0                     # ... and critical (must exceed major_ratio)
max_hold_windows = 1000                  # an open episode holds input commits back at most this long

[quality]
flatline_rel_std = 0.001                 # channel std at most this x its training std is flat-lined
rate_tolerance = 0.25                    # relative drift of the sample period that is reported
cooldown_ms = 60000.0                    # at most one data_quality event per stream and kind per this
silent_after_s = 600.0                   # no data this long (and 10 usual waits): a "silent" event; "none" = never

[limits]
max_bytes = 1048576                      # largest input message
max_samples = 10000                      # most samples in one chunk message
max_channels = 256                       # most channels per sample
max_stream_len = 256                     # longest stream id
max_streams = 10000                      # streams held at once; a record of one more is dead-lettered
idle_evict_s = 3600.0                    # a stream silent this long is snapshotted and dropped; "none" = never
max_future_s = 3600.0                    # samples stamped further ahead of this clock are dead-lettered; "none" = no check
earliest_ts = "2000-01-01T00:00:00Z"     # samples stamped before are dead-lettered (seconds sent as ms); "none" = no check

[daemon]
device = "auto"                          # auto, cpu, cuda or cuda:N
commit_interval_ms = 1000.0              # how often finished offsets are committed
shutdown_timeout_s = 10.0                # SIGTERM to exit, at most: score, publish, commit, close
scoring_timeout_s = 60.0                 # a micro-batch not scored by then is stuck: the process exits 1
sink_timeout_s = 5.0                     # output not acknowledged within this: input pauses, retried later
retry_max_s = 10.0                       # retries while the broker or sink fails back off up to this
poll_timeout_ms = 100                    # longest one poll blocks
max_unacked = 10000                      # output messages awaiting acknowledgement that bring the commit forward
# torch_threads = 3                      # CPU scoring threads; default: usable CPUs − 1, leaving one to consume
scoring = "auto"                         # auto, thread or process (auto: process on CPU, thread on CUDA)
precision = "float32"                    # float32, bfloat16 or float16 (autocast; checked against float32 at start)
precision_tolerance = 0.02               # largest score difference to float32 allowed, share of max(score, threshold)
warmup = true                            # batches of 1, max_batch / 8 and max_batch per model before consuming
# log_format = "json"                    # example: json or console; default: console on a terminal
log_level = "INFO"                       # DEBUG, INFO, WARNING or ERROR

[control]
topic = "tsmon.control"                  # operators' commands (tsmon ctl) arrive here
audit_topic = "tsmon.audit"              # each command, its acknowledgement and its effect
# key = "..."                            # HMAC-SHA256 key; better TSMON_CONTROL__KEY. Unset: all refused
max_age_s = 300.0                        # commands issued longer ago (or ahead) than this are refused
poll_interval_ms = 200.0                 # how often the daemon looks for commands
remember = 10000                         # command ids remembered, so a replayed command applies once

[state]
enabled = true                           # persist thresholds, controls and open alerts per stream
topic = "tsmon.state"                    # changelog keyed by stream; create it with cleanup.policy=compact
snapshot_interval_s = 30.0               # snapshot of the streams that changed, this often
restore_timeout_s = 300.0                # longest a restore may read the changelog (the input waits)
history = 50                             # threshold versions kept per stream (tsmon ctl history)
recent_alerts = 20                       # alerts per stream remembered for tsmon ctl feedback
forget_after_s = 604800.0                # a stream unseen this long (7 days) is forgotten; "none" = kept for ever
max_documents = 50000                    # documents of streams not in memory kept at most (least recent forgotten)

[http]
enabled = true                           # /metrics, /healthz, /readyz, /streams
host = "127.0.0.1"                       # listen address; 0.0.0.0 to expose it (e.g. in a container)
port = 9465                              # 0 = any free port (logged at start)
stall_s = 30.0                           # /healthz fails when the loop has not turned for this long
max_stream_labels = 500                  # streams with their own tsmon_threshold label (the rest counted)

[drift]
enabled = true                           # guard raises; accept a sustained level shift as new normal
window = 600                             # recent window errors (normal or not) kept per stream
min_windows = 200                        # errors needed before a raise is allowed (<= window)
alpha = 0.01                             # KS test level between the two halves: below it, still changing
shift_share = 0.9                        # this share over the threshold for a whole window = level shift
max_over_share = 0.1                     # a raise is refused if more than this share stays over it
'''
