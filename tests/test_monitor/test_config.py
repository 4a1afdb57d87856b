"""Daemon configuration: defaults < file < environment < flags, and every mistake reported with its key."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.coordinator.heartbeat import Heartbeat
from pydantic import ValidationError

from models.errors import ConfigError
from monitor.config import EXAMPLE_TOML, Config, ModelRoute, load_config
from monitor.records import Limits

SASL = {"kafka.security_protocol": "SASL_SSL", "kafka.sasl_mechanism": "SCRAM-SHA-512",
        "kafka.sasl_username": "tsmon", "kafka.sasl_password": "hunter2", "kafka.ssl_cafile": "/etc/ca.pem"}


def write(tmp_path: Path, text: str, name: str = "tsmon.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_lines(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return [line.strip() for line in str(excinfo.value).splitlines()[1:]]


def test_defaults() -> None:
    cfg = load_config(env={})
    assert cfg == Config()
    assert cfg.kafka.bootstrap_servers == ["127.0.0.1:9092"] and cfg.kafka.topics == ["tsmon.input"]
    assert cfg.kafka.producer_acks == "all" and cfg.kafka.sasl_password is None
    assert cfg.models == []
    assert cfg.windows.gap_ms == 5000.0 and cfg.batch.max_batch == 256 and cfg.alerts.for_windows == 2
    assert cfg.calibrator.quantile is None and cfg.daemon.device == "auto" and cfg.daemon.log_format is None
    assert cfg.limits.to_limits() == Limits()


def test_file_sets_every_section(tmp_path: Path) -> None:
    path = write(tmp_path, """
[kafka]
bootstrap_servers = "b1:9092, b2:9092"
topics = ["x", "y"]
[[models]]
pattern = "ecg-*"
path = "artifacts/ecg"
hop = 4
[[models]]
path = "artifacts/fallback"
name = "generic"
[windows]
gap_ms = "none"
[alerts]
for = 4
[limits]
max_channels = 8
[daemon]
device = "cuda:1"
log_level = "debug"
""")
    cfg = load_config(path, env={})
    assert cfg.kafka.bootstrap_servers == ["b1:9092", "b2:9092"] and cfg.kafka.topics == ["x", "y"]
    assert cfg.models[0] == ModelRoute(pattern="ecg-*", path=Path("artifacts/ecg"), hop=4)
    assert [m.display_name for m in cfg.models] == ["ecg", "generic"]
    assert cfg.route_for("ecg-7") is cfg.models[0] and cfg.route_for("eeg-1") is cfg.models[1]
    assert cfg.windows.gap_ms is None and cfg.alerts.for_windows == 4
    assert cfg.limits.to_limits() == Limits(max_channels=8)
    assert cfg.daemon.device == "cuda:1" and cfg.daemon.log_level == "DEBUG"
    assert cfg.batch.max_batch == 256  # untouched sections keep their defaults


def test_environment_coerces_strings() -> None:
    env = {"TSMON_KAFKA__BOOTSTRAP_SERVERS": "h1:9093,h2:9093", "TSMON_KAFKA__TOPICS": "a, b ,",
           "TSMON_BATCH__MAX_BATCH": "64", "TSMON_ALERTS__FOR": "3", "tsmon_calibrator__enabled": "false",
           "TSMON_CALIBRATOR__QUANTILE": "0.995", "TSMON_WINDOWS__GAP_MS": "none", "TSMON_KAFKA__PRODUCER_ACKS": "1"}
    cfg = load_config(env=env)
    assert cfg.kafka.bootstrap_servers == ["h1:9093", "h2:9093"] and cfg.kafka.topics == ["a", "b"]
    assert cfg.batch.max_batch == 64 and isinstance(cfg.batch.max_batch, int)
    assert cfg.alerts.for_windows == 3 and cfg.calibrator.enabled is False and cfg.calibrator.quantile == 0.995
    assert cfg.windows.gap_ms is None and cfg.kafka.producer_kwargs()["acks"] == 1


def test_environment_for_windows_spelling_and_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSMON_ALERTS__FOR_WINDOWS", "5")
    monkeypatch.setenv("TSMON_LOG_FORMAT", "json")  # no "__": belongs to the logging setup, not to us
    monkeypatch.setenv("TSMON_SOMETHING", "x")
    assert load_config().alerts.for_windows == 5


@pytest.mark.parametrize(("var", "needle"), [
    ("TSMON_KAFKA__BOOTSTRP_SERVERS", ("TSMON_KAFKA__BOOTSTRP_SERVERS: unknown key 'bootstrp_servers' in section "
                                       "kafka (did you mean 'bootstrap_servers'?)")),
    ("TSMON_KAFKAA__TOPICS", "TSMON_KAFKAA__TOPICS: unknown section 'kafkaa' (did you mean 'kafka'?)"),
    ("TSMON_XYZ__TOPICS", "TSMON_XYZ__TOPICS: unknown section 'xyz' (use one of kafka, windows, batch,"),
    ("TSMON_MODELS__PATH", "TSMON_MODELS__PATH: unknown section 'models'"),
    ("TSMON_ALERTS", "TSMON_ALERTS: unknown variable"),  # a section without its key was ignored
])
def test_environment_unknown_names_the_variable(var: str, needle: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(env={var: "x"})
    assert needle in str(excinfo.value)


def test_environment_value_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(env={"TSMON_BATCH__MAX_BATCH": "lots", "TSMON_KAFKA__SSL_CHECK_HOSTNAME": "maybe"})
    assert error_lines(excinfo) == [
        "kafka.ssl_check_hostname: Input should be a valid boolean, unable to interpret input",
        "batch.max_batch: Input should be a valid integer, unable to parse string as an integer",
    ]


@pytest.mark.parametrize(("env", "overrides", "expected"), [
    ({}, {}, 10),
    ({"TSMON_BATCH__MAX_BATCH": "20"}, {}, 20),
    ({"TSMON_BATCH__MAX_BATCH": "20"}, {"batch.max_batch": 30}, 30),
    ({"TSMON_BATCH__MAX_BATCH": "20"}, {"batch.max_batch": None}, 20),  # None: the flag was not given
])
def test_precedence_file_env_overrides(tmp_path: Path, env: dict, overrides: dict, expected: int) -> None:
    path = write(tmp_path, "[batch]\nmax_batch = 10\nmax_delay_ms = 7.5\n")
    cfg = load_config(path, overrides=overrides, env=env)
    assert cfg.batch.max_batch == expected
    assert cfg.batch.max_delay_ms == 7.5  # a layer changes only the keys it names


def test_overrides_dotted_keys_lists_and_alias(tmp_path: Path) -> None:
    path = write(tmp_path, '[alerts]\nfor = 2\n[kafka]\ntopics = ["file"]\n')
    overrides = {"kafka.bootstrap_servers": "h:1", "kafka.topics": ["a", "b"], "alerts.for_windows": 6,
                 "models": [{"pattern": "*", "path": "x"}]}
    cfg = load_config(path, overrides=overrides, env={"TSMON_KAFKA__TOPICS": "env"})
    assert cfg.kafka.bootstrap_servers == ["h:1"] and cfg.kafka.topics == ["a", "b"]
    assert cfg.alerts.for_windows == 6
    assert cfg.models == [ModelRoute(path=Path("x"))]


def test_all_problems_in_a_file_listed_one_per_line(tmp_path: Path) -> None:
    path = write(tmp_path, """
[kafka]
auto_offset_reset = "newest"
session_timeout_ms = 100
[[models]]
pattern = "*"
[batch]
max_batch = 0
[calibrator]
quantile = 1.5
[daemon]
device = "gpu"
""")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    message = str(excinfo.value)
    assert message.splitlines()[0] == f"invalid configuration ({path}):"
    assert error_lines(excinfo) == [
        "kafka.auto_offset_reset: Input should be 'earliest' or 'latest'",
        "kafka.session_timeout_ms: Input should be greater than or equal to 500",
        "models[0].path: Field required",
        "batch.max_batch: Input should be greater than or equal to 1",
        "calibrator.quantile: Input should be less than or equal to 0.999",
        "daemon.device: use auto, cpu, cuda or cuda:N, not 'gpu'",
    ]
    assert "pydantic" not in message and "http" not in message


def test_a_boolean_is_not_taken_for_a_number(tmp_path: Path) -> None:
    # pydantic's lax mode made max_batch = true a batch of 1
    path = write(tmp_path, '[batch]\nmax_batch = true\n[alerts]\nfor = false\n[calibrator]\nquantile = true\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    assert error_lines(excinfo) == ["batch.max_batch: a number is needed, got true",
                                    "calibrator.quantile: a number is needed, got true",
                                    "alerts.for: a number is needed, got false"]


def test_a_key_is_checked_whatever_its_sections_other_keys_hold(tmp_path: Path) -> None:
    """A review: a boolean for a number was checked for the whole section and stopped it (only `alerts.for` was
    listed, the two other problems came on the next starts), and the ten-year limit of a duration was a rule of
    the section, said only once its other keys were valid."""
    path = write(tmp_path, '[alerts]\nfor = true\nresolve_after = 0\nflap_period_ms = "60s"\nflap_max = false\n'
                           '[limits]\nmax_future_s = 1e12\nmax_bytes = "big"\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    lines = error_lines(excinfo)
    assert sorted(line.partition(":")[0] for line in lines) == [
        "alerts.flap_max", "alerts.flap_period_ms", "alerts.for", "alerts.resolve_after", "limits.max_bytes",
        "limits.max_future_s"], lines
    assert "limits.max_future_s: at most 315360000 (ten years), got 1e+12" in lines


@pytest.mark.parametrize("value, says", [
    # the hint was the value with a Z, which fromisoformat refuses after a date alone
    ('"2000-01-01"', "give a zone (e.g. 2000-01-01T00:00:00Z): '2000-01-01'"),
    ("2000-01-01", "give a zone (e.g. 2000-01-01T00:00:00Z): '2000-01-01'"),  # a TOML date: "a valid string"
    ('"2000-01-01T06:00:00"', "give a zone (e.g. 2000-01-01T06:00:00Z)"),
    ("946684800000", "an ISO-8601 time with a zone is needed (e.g. 2000-01-01T00:00:00Z), not 946684800000"),
    ("true", "an ISO-8601 time with a zone is needed (e.g. 2000-01-01T00:00:00Z), not true"),
    ('"2000-01-01Z"', "not an ISO-8601 time with a date and a zone (e.g. 2000-01-01T00:00:00Z): '2000-01-01Z'"),
])
def test_earliest_ts_says_what_to_write(tmp_path: Path, value: str, says: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, f"[limits]\nearliest_ts = {value}\n"), env={})
    [line] = error_lines(excinfo)
    assert line.startswith(f"limits.earliest_ts: {says}"), line
    example = says.partition("(e.g. ")[2].partition(")")[0]  # the example it gives is taken
    assert load_config(write(tmp_path, f'[limits]\nearliest_ts = "{example}"\n'), env={}).limits.earliest_ts == example


def test_a_routes_setting_under_both_names_is_said_so(tmp_path: Path) -> None:
    """It was "models[0].for_windows: unknown key", though a route takes for_windows alone."""
    path = write(tmp_path, '[[models]]\npattern = "a*"\npath = "x"\nfor = 1\nfor_windows = 5\n'
                           '[[models]]\npattern = "b*"\npath = "y"\nfor_windows = 2\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    assert error_lines(excinfo) == ["models[0].for / for_windows: one setting given under both names; keep one"]


def test_unknown_keys(tmp_path: Path) -> None:
    path = write(tmp_path, '[kafka]\nbootstrp_servers = "h:1"\nzzz = 1\n[bogus]\nx = 1\n[alert]\nfor = 2\n'
                           '[[models]]\npath = "a"\nhopp = 2\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    # with the nearest name, where one is near (it said "unknown key" alone, and "unknown key" for a section)
    assert error_lines(excinfo) == ["kafka.bootstrp_servers: unknown key (did you mean 'bootstrap_servers'?)",
                                    "kafka.zzz: unknown key", "models[0].hopp: unknown key (did you mean 'hop'?)",
                                    "bogus: unknown section", "alert: unknown section (did you mean 'alerts'?)"]
    # a key above every [section] header is a key, not a section (a review of the hint: it said "unknown section")
    path = write(tmp_path, 'bootstrap_servers = ["h:1"]\nzzz = 1\n[alerts]\nfor = 2\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    assert error_lines(excinfo) == ["bootstrap_servers: unknown key here: it belongs under [kafka]", "zzz: unknown key"]


def test_cross_field_rules_between_sections_keys() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(env={}, overrides={"kafka.session_timeout_ms": 1000, "kafka.heartbeat_interval_ms": 1000,
                                       "kafka.topics": "", "calibrator.window": 100, "alerts.major_ratio": 3.0,
                                       "kafka.producer_acks": 0, "kafka.enable_idempotence": True,
                                       "kafka.replication_factor": 0})
    assert error_lines(excinfo) == [
        "kafka.heartbeat_interval_ms: must be less than session_timeout_ms (1000)",
        "kafka.replication_factor: 0 replicas is no topic; give -1 (the brokers' default) or >= 1",
        'kafka.enable_idempotence: an idempotent producer needs producer_acks = "all"',
        "kafka.topics: give at least one topic, or a topic_pattern",
        "calibrator.min_samples: must be at most window (100)",
        "alerts.critical_ratio: must be greater than major_ratio (3.0)",
    ]


def test_durations_are_at_most_ten_years() -> None:
    """A "never" of 1e10 s passed the check, then overflowed the timers: a scoring timeout stopped the daemon at its
    first batch (Future.result), an interval of 1e13 s ended the start in a traceback (apscheduler)."""
    with pytest.raises(ConfigError) as excinfo:
        load_config(env={}, overrides={"daemon.scoring_timeout_s": 1e10, "calibrator.interval_s": 1e13,
                                       "daemon.poll_timeout_ms": 10**12, "models": [{"pattern": "*", "path": "m",
                                                                                     "gap_ms": 1e300}]})
    assert error_lines(excinfo) == [
        "models[0].gap_ms: at most 315360000000 (ten years), got 1e+300",
        "calibrator.interval_s: at most 315360000 (ten years), got 1e+13",
        "daemon.scoring_timeout_s: at most 315360000 (ten years), got 1e+10",
        "daemon.poll_timeout_ms: at most 315360000000 (ten years), got 1e+12",
    ]
    assert load_config(env={}, overrides={"daemon.scoring_timeout_s": 315_360_000}).daemon.scoring_timeout_s > 0


def test_a_config_past_its_size_is_refused_a_pipe_is_read_and_a_bom_skipped(tmp_path: Path) -> None:
    """/dev/zero as --config was read until memory ran out; a config rendered into a pipe (`--config <(...)`) is
    read; a file an editor saved with a byte-order mark was "not valid TOML (line 1, column 1)"."""
    import os
    import threading

    with pytest.raises(ConfigError, match="holds more than the 1048576 bytes"):
        load_config(Path("/dev/zero"), env={})
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, env={})
    fifo = tmp_path / "rendered.toml"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=("[daemon]\nshutdown_timeout_s = 7\n",))
    writer.start()
    assert load_config(fifo, env={}).daemon.shutdown_timeout_s == 7
    writer.join(5)
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf[daemon]\nshutdown_timeout_s = 5\n")
    assert load_config(bom, env={}).daemon.shutdown_timeout_s == 5


def test_bad_toml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[kafka]\ntopics = a\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    message = str(excinfo.value)
    assert message.startswith(f"config file {path} is not valid TOML:") and "line 2" in message
    assert "\n" not in message


@pytest.mark.parametrize("server", ["127.0.0.1:notaport", "127.0.0.1:", "[::1", "127.0.0.1:99999", "h:0", "a b:9092"])
def test_a_malformed_broker_address_is_a_config_error(server: str) -> None:
    """A port that is not a number went through config check and crashed tsmon run (and ctl, replay) with a
    traceback from inside kafka-python."""
    with pytest.raises(ConfigError) as excinfo:
        load_config(env={}, overrides={"kafka.bootstrap_servers": ["127.0.0.1:9092", server]})
    line = f"kafka.bootstrap_servers: {server!r} is not host:port (port 1-65535; IPv6 as [addr]:port, or bare without a port)"
    assert error_lines(excinfo) == [line]


def test_an_error_names_every_layer_it_could_come_from(tmp_path: Path) -> None:
    """A bad value given as a command-line option was reported as "(environment)" when any TSMON_* variable was set:
    an operator looked for a variable that was not there. Options not given (None, as tsmon run passes them) are
    no source."""
    bad = {"kafka.bootstrap_servers": ["127.0.0.1:notaport"]}
    env_bad = {"TSMON_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:notaport"}
    for env, overrides, where in [({"TSMON_CONTROL__KEY": "k"}, bad, "(environment + command options)"),
                                  ({}, bad, "(command options)"),
                                  (env_bad, None, "(environment)"),
                                  (env_bad, {"kafka.topics": None}, "(environment)")]:  # an option not given
        with pytest.raises(ConfigError) as excinfo:
            load_config(env=env, overrides=overrides)
        assert str(excinfo.value).splitlines()[0] == f"invalid configuration {where}:", excinfo.value


def test_broker_addresses_the_clients_accept() -> None:
    servers = ["broker-1.example.com:9093", "nohost", "SASL_SSL://k.example:9094", "[::1]:9092", "10.0.0.7:65535",
               "::1", "fe80::1", "2001:db8::5"]  # bare IPv6: kafka-python takes it, on port 9092
    assert load_config(env={}, overrides={"kafka.bootstrap_servers": servers}).kafka.bootstrap_servers == servers


def test_missing_and_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file .*nope.toml not found"):
        load_config(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="config file .* is a directory"):
        load_config(tmp_path, env={})


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"kafka.security_protocol": "SASL_SSL"}, ["kafka.sasl_mechanism: required with security_protocol SASL_SSL"]),
    ({"kafka.security_protocol": "SASL_PLAINTEXT", "kafka.sasl_mechanism": "PLAIN", "kafka.sasl_username": "u"},
     ["kafka.sasl_password: required with sasl_mechanism PLAIN"]),
    ({"kafka.security_protocol": "SASL_SSL", "kafka.sasl_mechanism": "SCRAM-SHA-256"},
     ["kafka.sasl_username: required with sasl_mechanism SCRAM-SHA-256",
      "kafka.sasl_password: required with sasl_mechanism SCRAM-SHA-256"]),
    ({"kafka.security_protocol": "SSL", "kafka.sasl_mechanism": "PLAIN"},
     ["kafka.sasl_mechanism: needs security_protocol SASL_PLAINTEXT or SASL_SSL"]),
    ({"kafka.ssl_cafile": "/etc/ca.pem"}, ["kafka.ssl_cafile: needs security_protocol SSL or SASL_SSL"]),
])
def test_sasl_and_ssl_rules(overrides: dict, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(env={}, overrides=overrides)
    assert error_lines(excinfo) == expected


def test_sasl_settings_that_fit_are_accepted() -> None:
    overrides = {"kafka.security_protocol": "SASL_SSL", "kafka.sasl_mechanism": "OAUTHBEARER"}
    oauth = load_config(env={}, overrides=overrides)
    assert oauth.kafka.sasl_mechanism == "OAUTHBEARER"  # the token provider is code, not configuration
    assert load_config(env={}, overrides=SASL).kafka.sasl_username == "tsmon"


def test_secret_never_printed(tmp_path: Path) -> None:
    path = write(tmp_path, '[[models]]\npath = "artifacts/m"\n')
    overrides = {**SASL, "kafka.sasl_password": None}  # the password comes from the environment
    cfg = load_config(path, env={"TSMON_KAFKA__SASL_PASSWORD": "hunter2"}, overrides=overrides)
    assert cfg.kafka.sasl_password is not None and cfg.kafka.sasl_password.get_secret_value() == "hunter2"
    red = cfg.redacted()
    assert red["kafka"]["sasl_password"] == "**********"
    assert red["models"][0]["path"] == "artifacts/m" and red["alerts"]["for"] == 2
    for text in (json.dumps(red), repr(cfg), str(cfg), repr(cfg.kafka)):
        assert "hunter2" not in text
    with pytest.raises(ConfigError) as excinfo:  # a problem elsewhere does not echo the secret either
        load_config(env={}, overrides={**SASL, "batch.max_batch": -1})
    assert "hunter2" not in str(excinfo.value)


def test_kafka_kwargs_are_kafka_python_settings(tmp_path: Path) -> None:
    ca = write(tmp_path, "-----BEGIN CERTIFICATE-----\n", "ca.pem")
    kafka = load_config(env={}, overrides={**SASL, "kafka.ssl_cafile": str(ca)}).kafka
    consumer, producer = kafka.consumer_kwargs(), kafka.producer_kwargs()
    assert set(consumer) <= set(KafkaConsumer.DEFAULT_CONFIG)
    assert set(producer) <= set(KafkaProducer.DEFAULT_CONFIG)
    security = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "tsmon",
                "sasl_plain_password": "hunter2", "ssl_cafile": str(ca), "ssl_check_hostname": True}
    assert security.items() <= consumer.items() and security.items() <= producer.items()
    assert consumer["enable_auto_commit"] is False and consumer["group_id"] == "tsmon"
    assert consumer["auto_offset_reset"] == "earliest" and consumer["bootstrap_servers"] == ["127.0.0.1:9092"]
    assert producer["acks"] == "all" and producer["linger_ms"] == 5 and producer["enable_idempotence"] is False
    Heartbeat(**consumer)  # kafka-python's own session/heartbeat check accepts what we pass


def test_a_tls_file_that_is_not_there_is_named_before_any_client_starts(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """It passed config check, and the client failed 30 s later with "Unable to bootstrap", naming no file."""
    from monitor.cli import main

    kafka = load_config(env={}, overrides=SASL).kafka  # a file on another machine is fine to validate
    with pytest.raises(ConfigError, match=r"^kafka.ssl_cafile: /etc/ca.pem is not a readable file$"):
        kafka.client_kwargs()
    path = write(tmp_path, '[kafka]\nsecurity_protocol = "SSL"\nssl_certfile = "/nonexistent/client.pem"\n')
    with pytest.raises(SystemExit) as exc:
        main(["config", "check", "--config", str(path)])
    assert exc.value.code == 1 and "kafka.ssl_certfile: /nonexistent/client.pem is not a readable file" in \
        capsys.readouterr().err


def test_plaintext_kwargs_have_no_security_extras() -> None:
    kafka = Config().kafka
    for kwargs in (kafka.consumer_kwargs(), kafka.producer_kwargs()):
        assert not any(k.startswith(("sasl_", "ssl_")) for k in kwargs)
        assert kwargs["security_protocol"] == "PLAINTEXT"


def test_request_timeout_bounds_match_kafka_python() -> None:
    # KafkaConsumer raises unless fetch_max_wait_ms < request_timeout_ms < connections_max_idle_ms
    defaults = KafkaConsumer.DEFAULT_CONFIG
    assert (defaults["fetch_max_wait_ms"], defaults["connections_max_idle_ms"]) == (500, 540_000)
    for bad in (500, 540_000):
        with pytest.raises(ConfigError, match="kafka.request_timeout_ms"):
            load_config(env={}, overrides={"kafka.request_timeout_ms": bad})
    kafka = load_config(env={}, overrides={"kafka.request_timeout_ms": 501}).kafka
    assert kafka.consumer_kwargs()["request_timeout_ms"] == 501


def test_delivery_timeout_reaches_both_producers_and_is_checked_against_the_request_timeout() -> None:
    """An on-call pass: one produce request the broker never answered paused the input for 2 min 10 s, kafka-python's
    120 s delivery timeout, which tsmon neither set nor documented."""
    from monitor import confluent

    kafka = load_config(None, {"kafka.delivery_timeout_ms": 40_000, "kafka.request_timeout_ms": 20_000}, {}).kafka
    assert kafka.producer_kwargs()["delivery_timeout_ms"] == 40_000
    assert confluent.rdkafka_config(kafka.producer_kwargs())["delivery.timeout.ms"] == 40_000
    KafkaProducer(**{**kafka.producer_kwargs(), "bootstrap_servers": [], "api_version": (2, 5)}).close(timeout=0)
    with pytest.raises(ConfigError, match=r"kafka.delivery_timeout_ms: must be at least request_timeout_ms \+ 5 "
                                          r"\(30005\)"):  # kafka-python refuses less at the producer's start
        load_config(None, {"kafka.delivery_timeout_ms": 30_000}, {})


@pytest.mark.parametrize(("given", "acks"), [("all", "all"), (-1, "all"), ("-1", "all"), (1, 1), ("0", 0), (0, 0)])
def test_producer_acks(given: object, acks: object) -> None:
    assert load_config(env={}, overrides={"kafka.producer_acks": given}).kafka.producer_kwargs()["acks"] == acks


def test_topic_pattern() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(env={}, overrides={"kafka.topic_pattern": "sensors.(x"})
    assert error_lines(excinfo)[0].startswith("kafka.topic_pattern: not a valid regular expression: missing )")
    cfg = load_config(env={}, overrides={"kafka.topic_pattern": r"^sensors\..*", "kafka.topics": ""})
    assert cfg.kafka.subscription() == {"pattern": r"^sensors\..*"}
    assert Config().kafka.subscription() == {"topics": ["tsmon.input"]}
    assert set(Config().kafka.subscription()) <= set(inspect.signature(KafkaConsumer.subscribe).parameters)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_accepted(device: str) -> None:
    assert load_config(env={}, overrides={"daemon.device": device}).daemon.device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU", "cpu "])
def test_device_rejected(device: str) -> None:
    with pytest.raises(ConfigError, match="daemon.device: use auto, cpu, cuda or cuda:N"):
        load_config(env={}, overrides={"daemon.device": device})


def test_model_shortcut_from_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = {"TSMON_MODEL": "artifacts/env-model"}
    assert load_config(env=env).models == [ModelRoute(pattern="*", path=Path("artifacts/env-model"))]
    assert "config_model_variable_ignored" not in "".join(capsys.readouterr())
    path = write(tmp_path, '[[models]]\npattern = "a-*"\npath = "artifacts/file-model"\n')
    assert [m.path for m in load_config(path, env=env).models] == [Path("artifacts/file-model")]
    # the file's routes win, against the precedence: said (it was ignored without a word)
    assert "config_model_variable_ignored" in "".join(capsys.readouterr())
    flagged = load_config(env=env, overrides={"models": [{"path": "artifacts/flag-model"}]})
    assert [m.path for m in flagged.models] == [Path("artifacts/flag-model")]


def test_require_models() -> None:
    with pytest.raises(ConfigError) as excinfo:
        Config().require_models()
    assert str(excinfo.value).startswith("no model configured: add [[models]] to the config, set TSMON_MODEL")
    routes = load_config(env={"TSMON_MODEL": "m"}).require_models()
    assert routes == [ModelRoute(path=Path("m"))]


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(ValidationError):
        cfg.batch.max_batch = 1  # type: ignore[misc]


def test_example_toml_loads_and_documents_the_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, EXAMPLE_TOML), env={})
    assert cfg.require_models() == [ModelRoute(pattern="*", path=Path("artifacts/ecg5000-lstm"))]
    assert cfg.model_dump(exclude={"models"}) == Config().model_dump(exclude={"models"})
    # every key is in it, set or commented out (kafka.metadata_max_age_ms was missing)
    sections = {name: f.annotation for name, f in Config.model_fields.items() if name != "models"}
    missing = [f"{section}.{f.alias or key}" for section, model in sections.items()
               for key, f in model.model_fields.items() if not re.search(rf"^#? ?{f.alias or key} =", EXAMPLE_TOML, re.MULTILINE)]
    assert missing == []


def test_a_misspelt_environment_variable_is_an_error_not_ignored() -> None:
    for var in ("TSMON_KAFKA_TOPICS", "TSMON_BATCH_MAX_BATCH", "TSMON_KAFKATOPICS", "TSMON_CONTROLKEY"):
        with pytest.raises(ConfigError, match=f"{var}: unknown variable"):
            load_config(None, env={var: "x"})
    load_config(None, env={"TSMON_LOG_FORMAT": "json", "TSMON_LOG_LEVEL": "INFO"})  # these belong to logging


@pytest.mark.parametrize("overrides, line", [
    # a config audit: a dead-letter topic that was an input topic dead-lettered its own dead letters for ever
    ({"kafka.topics": ["sensors"], "kafka.dead_letter_topic": "sensors"},
     "kafka.dead_letter_topic: 'sensors' is an input topic (kafka.topics): tsmon would read its own output"),
    ({"control.audit_topic": "tsmon.alerts"},
     "control.audit_topic: 'tsmon.alerts' is already kafka.alerts_topic: each of tsmon's topics needs its own"),
    ({"kafka.topic_pattern": r"tsmon\..*", "kafka.topics": ""},
     "kafka.topic_pattern: it matches kafka.alerts_topic ('tsmon.alerts'): tsmon would read its own output"),
    # one turn may wait a poll and a flush: past stall_s, liveness fails a daemon waiting for its broker
    ({"daemon.sink_timeout_s": 30}, "http.stall_s: must exceed daemon.poll_timeout_ms + daemon.sink_timeout_s (30.1 s)"),
    ({"daemon.poll_timeout_ms": 30_000}, "http.stall_s: must exceed daemon.poll_timeout_ms + daemon.sink_timeout_s"),
    ({"kafka.group_id": " "}, "kafka.group_id: String should have at least 1 character"),  # librdkafka aborted
    ({"kafka.client": "confluent", "kafka.topic_pattern": r"(?!tsmon\.).*", "kafka.topics": ""},
     "kafka.topic_pattern: librdkafka's regular expressions have no (?...) groups"),
    # the confluent review: "\d" is no POSIX class, and the daemon waited with no input and no error
    ({"kafka.client": "confluent", "kafka.topic_pattern": r"sensors\.\d+", "kafka.topics": ""},
     r"kafka.topic_pattern: librdkafka's regular expressions (POSIX) have no \d"),
    ({"kafka.client": "confluent", "kafka.request_timeout_ms": 400_000},
     "kafka.request_timeout_ms: at most 300000 with client = \"confluent\" (librdkafka's range)"),
    ({"kafka.client": "confluent", "kafka.partition_assignment": "sticky"},
     "kafka.partition_assignment: sticky is kafka-python's; use range or roundrobin with client = \"confluent\""),
    # a review: a stream 20 % slower had every interval a gap for good (the drift, under the tolerance, is none)
    ({"windows.gap_periods": 1.1}, "windows.gap_periods: must exceed 1 + quality.rate_tolerance (1.25)"),
    ({"models": [{"path": "a", "gap_periods": 1.2}]}, "models[0].gap_periods: must exceed 1 + quality.rate_tolerance"),
    ({"models": [{"path": "a"}, {"pattern": "ecg-*", "path": "b", "for": 1}]},
     "models[1].pattern: 'ecg-*' is never reached: models[0] ('*') comes first and the first match wins"),
    # a pipeline owner's pass: a route after one whose glob matches every id it does
    ({"models": [{"pattern": "line1-*", "path": "a"}, {"pattern": "line1-a*", "path": "b"}]},
     "models[1].pattern: 'line1-a*' is never reached: models[0] ('line1-*') comes first"),
])
def test_settings_that_would_misbehave_together_are_refused_at_load(overrides: dict, line: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides, env={})
    assert any(got.startswith(line) for got in error_lines(excinfo)), error_lines(excinfo)
    load_config(None, {"http.enabled": False, "daemon.sink_timeout_s": 30}, env={})  # no /healthz to fail
    load_config(None, {"models": [{"pattern": "ecg-*", "path": "b"}, {"path": "a"}]}, env={})  # "*" last: fine


def test_a_route_is_never_reached_only_where_an_earlier_glob_matches_every_id_it_does() -> None:
    for narrow, wide in (("line1-a*", "line1-*"), ("a?", "a*"), ("x[a]*", "x[ab]*")):  # narrow first: both reached
        load_config(None, {"models": [{"pattern": narrow, "path": "a"}, {"pattern": wide, "path": "b"}]}, env={})
    with pytest.raises(ConfigError, match=r"'xa\*' is never reached: models\[0\] \('x\[ab\]\*'\)"):  # classes exactly
        load_config(None, {"models": [{"pattern": "x[ab]*", "path": "a"}, {"pattern": "xa*", "path": "b"}]}, env={})


def test_an_error_from_the_environment_is_not_blamed_on_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tsmon.toml"
    path.write_text("[batch]\nmax_batch = 256\n")
    with pytest.raises(ConfigError, match=r"\(.*tsmon.toml \+ environment\)"):
        load_config(path, env={"TSMON_BATCH__MAX_BATCH": "0"})


def test_the_control_key_is_masked_when_printed() -> None:
    cfg = load_config(None, {"control.key": "s3cret"}, env={})
    assert cfg.control.key is not None and cfg.control.key.get_secret_value() == "s3cret"
    assert "s3cret" not in str(cfg.redacted()) and "s3cret" not in repr(cfg)


def test_metadata_max_age_reaches_both_clients_within_librdkafkas_range() -> None:
    """How soon new topics and partitions are found (kafka-python's 5-minute default was fixed, not a setting)."""
    from monitor import confluent

    kafka = load_config(None, {"kafka.metadata_max_age_ms": 60_000}, {}).kafka
    assert kafka.consumer_kwargs()["metadata_max_age_ms"] == 60_000
    assert confluent.rdkafka_config(kafka.consumer_kwargs())["topic.metadata.refresh.interval.ms"] == 60_000
    with pytest.raises(ConfigError, match="kafka.metadata_max_age_ms"):  # librdkafka refuses more than 1 h at start
        load_config(None, {"kafka.metadata_max_age_ms": 3_600_001}, {})


def test_the_partition_assignment_reaches_both_clients() -> None:
    from monitor import confluent

    kafka = load_config(None, {"kafka.partition_assignment": "roundrobin"}, {}).kafka
    # range offered too: a group changed instance by instance keeps one protocol in common
    assert confluent.rdkafka_config(kafka.consumer_kwargs())["partition.assignment.strategy"] == "roundrobin,range"
    [assignor] = load_config(None, {}, {}).kafka.consumer_kwargs()["partition_assignment_strategy"]
    assert assignor.name == "range"  # the clients' default


def test_the_confluent_client_without_its_package_is_a_one_line_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from monitor import confluent

    monkeypatch.setattr(confluent, "available", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install 'tsmon\[confluent\]'"):
        confluent.require()
    with pytest.raises(ConfigError, match="no confluent-kafka equivalent"):
        confluent.rdkafka_config({"bootstrap_servers": ["a:1"], "api_version": (2, 0)})


@pytest.mark.parametrize("overrides, env", [
    ({"kafka.topics": ["sensor data"]}, {}), ({}, {"TSMON_CONTROL__TOPIC": "ctl topic"}), ({"state.topic": ".."}, {}),
    ({"kafka.alerts_topic": "x" * 250}, {}),
])
def test_a_topic_name_kafka_refuses_is_a_config_error(overrides: dict, env: dict) -> None:
    # they passed `config check`, then `tsmon run` stopped with kafka-python's traceback
    with pytest.raises(ConfigError, match="is not a Kafka topic name"):
        load_config(None, overrides, env)


def test_a_flag_with_commas_is_a_list_and_topics_given_later_replace_a_pattern(tmp_path: Path) -> None:
    assert load_config(None, {"kafka.topics": ["a,b", "c"]}, {}).kafka.topics == ["a", "b", "c"]  # was "a,b"
    path = tmp_path / "p.toml"
    path.write_text('[kafka]\ntopic_pattern = "^sensors\\\\..*"\n')
    assert load_config(path, {}, {}).kafka.subscription() == {"pattern": "^sensors\\..*"}
    # the flag or the environment names topics: they win over the file's pattern (which was consumed instead)
    assert load_config(path, {"kafka.topics": ["orders"]}, {}).kafka.subscription() == {"topics": ["orders"]}
    assert load_config(path, {}, {"TSMON_KAFKA__TOPICS": "orders"}).kafka.subscription() == {"topics": ["orders"]}
    # an empty variable (templated manifests export them) names no topic: the pattern stands
    assert load_config(path, {}, {"TSMON_KAFKA__TOPICS": ""}).kafka.subscription() == {"pattern": "^sensors\\..*"}


def test_sasl_credentials_can_be_unset_and_empty_ones_are_missing() -> None:
    off = {"TSMON_KAFKA__SASL_MECHANISM": "none", "TSMON_KAFKA__SASL_USERNAME": "none",
           "TSMON_KAFKA__SASL_PASSWORD": "none"}
    assert load_config(None, {}, off).kafka.sasl_password is None  # "none" was a literal password
    empty = {"TSMON_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "TSMON_KAFKA__SASL_MECHANISM": "PLAIN",
             "TSMON_KAFKA__SASL_USERNAME": "", "TSMON_KAFKA__SASL_PASSWORD": ""}  # e.g. a missing k8s secret
    with pytest.raises(ConfigError, match="sasl_password: required"):
        load_config(None, {}, empty)


def test_a_calibrator_quantile_above_what_it_uses_is_refused_and_models_typos_are_named() -> None:
    from monitor.calibrator import MAX_QUANTILE

    assert load_config(None, {"calibrator.quantile": MAX_QUANTILE}, {}).calibrator.quantile == MAX_QUANTILE
    with pytest.raises(ConfigError, match="calibrator.quantile"):  # 0.9999 was used as 0.999 without a word
        load_config(None, {"calibrator.quantile": 0.9999}, {})
    for var in ("TSMON_MODELS", "TSMON_MODEL_PATH"):  # ignored: a route given this way was never used
        with pytest.raises(ConfigError, match=f"{var}: unknown variable"):
            load_config(None, {}, {var: "artifacts/x"})


def test_replay_eval_talks_plaintext_to_its_own_broker_whatever_the_config_says(tmp_path: Path) -> None:
    from monitor.replay_eval import LOCAL_PLAINTEXT

    path = tmp_path / "sasl.toml"
    path.write_text('[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\nsasl_username = "u"\n'
                    'sasl_password = "p"\n')
    kafka = load_config(path, {"kafka.bootstrap_servers": "127.0.0.1:1", **LOCAL_PLAINTEXT}, {}).kafka
    assert kafka.security_protocol == "PLAINTEXT" and kafka.sasl_password is None  # it failed to bootstrap
    assert "sasl_plain_username" not in kafka.client_kwargs()


def test_one_setting_under_both_of_its_names_is_an_error(tmp_path: Path) -> None:
    # the file gave `for` = 5 and `for_windows` = 7 (or the environment both variables): one silently won
    path = tmp_path / "f.toml"
    path.write_text("[alerts]\nfor = 5\nfor_windows = 7\n")
    with pytest.raises(ConfigError, match="for / for_windows: one setting given under both names"):
        load_config(path, {}, {})
    # listed with every other problem (it was the only one reported: fix, run again, find the next)
    path.write_text("[kafka]\nbogus = 1\n[batch]\nmax_batch = 0\n[alerts]\nfor = 1\nfor_windows = 2\n")
    with pytest.raises(ConfigError) as listed:
        load_config(path, {}, {})
    lines = str(listed.value).splitlines()[1:]
    assert [x.strip().split(":")[0] for x in lines] == ["alerts.for / for_windows", "kafka.bogus", "batch.max_batch"]
    with pytest.raises(ConfigError, match="the same setting as another variable"):
        load_config(None, {}, {"TSMON_ALERTS__FOR": "5", "TSMON_ALERTS__FOR_WINDOWS": "7"})
    assert load_config(None, {"alerts.for_windows": 3}, {"TSMON_ALERTS__FOR": "5"}).alerts.for_windows == 3


def test_a_reduced_precision_needs_the_warm_up_that_checks_it() -> None:
    # with warmup = false the float32 comparison never ran and float16 was served unchecked
    with pytest.raises(ConfigError, match="daemon.warmup: precision float16 is checked against float32"):
        load_config(None, {"daemon.precision": "float16", "daemon.warmup": False}, {})
    assert load_config(None, {"daemon.warmup": False}, {}).daemon.warmup is False


def test_earliest_ts_takes_a_toml_datetime_a_zoned_string_or_none(tmp_path: Path) -> None:
    assert load_config(None, {}, {}).limits.earliest_ms == 946_684_800_000  # 2000-01-01 UTC
    native = write(tmp_path, "[limits]\nearliest_ts = 2020-01-01T01:00:00+01:00\n")
    assert load_config(native, {}, {}).limits.earliest_ms == 1_577_836_800_000
    assert load_config(None, {}, {"TSMON_LIMITS__EARLIEST_TS": "none"}).limits.earliest_ms is None
    for bad, why in (("2020-01-01T00:00:00", "give a zone"), ("yesterday", "not an ISO-8601 time")):
        with pytest.raises(ConfigError, match=f"limits.earliest_ts.*{why}"):
            load_config(None, {}, {"TSMON_LIMITS__EARLIEST_TS": bad})


def test_a_file_value_the_environment_overrides_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The environment wins over the file, silently: an image's TSMON_HTTP__PORT made a port set in the mounted
    file do nothing. The override is logged (key, both values; secrets masked); equal values say nothing."""
    path = write(tmp_path, '[http]\nport = 8080\nhost = "0.0.0.0"\n[kafka]\ntopics = ["a", "b"]\n'
                           'security_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\nsasl_username = "u"\n'
                           'sasl_password = "file-secret"\n')
    env = {"TSMON_HTTP__PORT": "9465", "TSMON_HTTP__HOST": "0.0.0.0", "TSMON_KAFKA__TOPICS": "a,b",
           "TSMON_KAFKA__SASL_PASSWORD": "env-secret"}
    assert load_config(path, {}, env).http.port == 9465  # the precedence itself is unchanged
    logged = capsys.readouterr()
    text = logged.out + logged.err
    assert "config_file_values_overridden" in text and "http.port" in text and "8080" in text
    assert "kafka.sasl_password" in text and "secret" not in text.replace("sasl_password", "")
    assert "http.host" not in text and "kafka.topics" not in text
    load_config(path, {}, {"TSMON_HTTP__PORT": "8080"})
    assert "overridden" not in "".join(capsys.readouterr())
    same = write(tmp_path, '[daemon]\nshutdown_timeout_s = 20.0\n[http]\nenabled = true\n[kafka]\n'
                           'bootstrap_servers = ["k1:9092", "k2:9092"]\n[limits]\nearliest_ts = 2000-01-01T00:00:00Z\n',
                 "same.toml")
    load_config(same, {}, {"TSMON_DAEMON__SHUTDOWN_TIMEOUT_S": "20", "TSMON_HTTP__ENABLED": "True",
                           "TSMON_KAFKA__BOOTSTRAP_SERVERS": "k1:9092, k2:9092",
                           "TSMON_LIMITS__EARLIEST_TS": "2000-01-01T00:00:00Z"})
    assert "overridden" not in "".join(capsys.readouterr())  # the same values, spelt otherwise


def test_silent_after_s_defaults_to_ten_minutes_and_takes_none() -> None:
    from monitor.daemon import processor_settings

    assert load_config(None, {}, {}).quality.silent_after_s == 600.0
    assert processor_settings(load_config(None, {"quality.silent_after_s": 90}, {})).silent_after_s == 90.0
    assert load_config(None, {}, {"TSMON_QUALITY__SILENT_AFTER_S": "none"}).quality.silent_after_s is None
    with pytest.raises(ConfigError, match="quality.silent_after_s"):
        load_config(None, {"quality.silent_after_s": 0}, {})


def test_gnu_classes_librdkafka_does_have_are_taken_in_a_confluent_pattern() -> None:
    """Its review, on librdkafka 2.16: \\w, \\s and \\b match (glibc's regcomp), only \\d does not."""
    cfg = load_config(None, {"kafka.client": "confluent", "kafka.topic_pattern": r"sensors\.\w+", "kafka.topics": ""},
                      env={})
    assert cfg.kafka.topic_pattern == r"sensors\.\w+"


def test_the_route_check_shares_one_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: each pair of routes had a budget of its own, and 60 long routes took 42 s to load."""
    from monitor import config

    budgets: list[object] = []
    real = config.covers

    def counted(first: str, later: str, budget: config.Budget | None = None) -> bool | None:
        budgets.append(budget)
        return real(first, later, budget)

    monkeypatch.setattr(config, "covers", counted)
    load_config(None, {"models": [{"pattern": f"r{i}-*", "path": "a"} for i in range(5)]}, env={})
    assert len(budgets) == 10 and all(b is budgets[0] for b in budgets) and budgets[0] is not None
