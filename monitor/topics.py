"""Small admin and reading helpers over kafka-python, for the demo, the benchmark and tests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from models.errors import BrokerError, ConfigError, describe, did_you_mean
from monitor import logs

log = logs.get("tsmon.topics")
RETRY_FIRST_S, RETRY_MAX_S = 0.2, 2.0  # a failed poll of a TopicReader is tried again after these, doubling
METADATA_MAX_AGE_MS = 1000  # how soon a TopicReader sees a topic created after it started


def ensure_topics(bootstrap: str | list[str], topics: dict[str, int], configs: dict[str, dict[str, str]] | None = None,
                  replication_factor: int = -1, **client: Any) -> set[str]:
    """Create the topics that do not exist yet, with the given partition counts and topic configs; returns the
    topics that existed before (those this principal may describe).

    ``client``: further ``KafkaAdminClient`` settings (security). ``replication_factor`` -1 asks for the
    brokers' ``default.replication.factor`` (1 on a single local broker); a topic that exists is left alone.
    """
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    try:
        admin = KafkaAdminClient(**{"request_timeout_ms": 10_000, **client}, bootstrap_servers=bootstrap)
    except KafkaError as exc:
        raise BrokerError(f"cannot reach {bootstrap}: {exc}") from None
    missing: list[Any] = []
    existing: set[str] = set()
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(t, n, replication_factor, topic_configs=(configs or {}).get(t, {})) for t, n in topics.items()
                   if t not in existing]
        if missing:
            admin.create_topics(missing)
    except TopicAlreadyExistsError:
        pass
    except KafkaError as exc:  # not authorised to create, a broker older than Kafka 2.4 (replication -1), ...
        if not topics:  # asked only what exists (tsmon replay): nothing was to be created
            raise BrokerError(f"cannot list the topics at {bootstrap}: {describe(exc)}") from None
        names = ", ".join(t.name for t in missing) or ", ".join(topics)
        raise BrokerError(f"cannot create topic(s) {names}: {describe(exc)} (create them beforehand, "
                          f"or allow Create on the cluster; a broker older than Kafka 2.4 needs "
                          f"kafka.replication_factor >= 1)") from None
    finally:
        admin.close()
    return existing


def require_inputs(topics: list[str], existing: set[str], servers: str, setting: str = "kafka.topics",
                   why: str = "the daemon does not create its input topics") -> None:
    """The input topics must exist before the group subscribes to them: a consumer's metadata request has a broker
    that auto-creates topics create a misspelt one, empty, and the daemon then waited on it for good, ready and
    healthy, while the real topic went unread (Kafka Streams refuses to start the same way). ``tsmon replay``
    likewise: its producer's first send created the misspelt topic, and the series went where no daemon reads."""
    missing = [t for t in topics if t not in existing]
    if not missing:
        return
    close = {t: did_you_mean(t, existing) for t in missing}
    named = ", ".join(f"{t!r}" + (f" (did you mean {close[t]!r}?)" if close[t] else "") for t in missing)
    raise ConfigError(f"{setting}: no topic {named} at {servers}: create it first, correct the name, or give "
                      f"this principal Describe on it ({why})")


def within(client: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """``client`` settings whose bootstrap and requests give up after ``timeout_s`` (kafka-python waits 30 s to
    bootstrap whatever the caller's own limit: a command-line tool said nothing for that long, the broker hung)."""
    ms = max(1000, int(timeout_s * 1000))
    return {**client, "request_timeout_ms": min(int(client.get("request_timeout_ms", ms)), ms),
            "bootstrap_timeout_ms": ms}


def partition_reader(client: dict[str, Any], topic: str, at_end: bool, if_missing: tuple[int, ...] = (0,),
                     timeout_s: float = 30.0) -> tuple[Any, list[Any]]:
    """A consumer without a group, assigned every partition of ``topic`` (``if_missing`` while the topic is
    unknown) at its beginning or its end, the position resolved now: from then on nothing is missed.

    ``client``: :meth:`KafkaConfig.client_kwargs`. Returns the consumer and its partitions. A broker that
    fails, or cannot give a position within ``timeout_s``, raises BrokerError.
    """
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    try:
        consumer = KafkaConsumer(**client, group_id=None, enable_auto_commit=False)
    except KafkaError as exc:
        raise BrokerError(f"cannot reach {client.get('bootstrap_servers')}: {describe(exc)}") from None
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or if_missing)]
        consumer.assign(tps)
        if tps:  # none: the topic is gone (a broker that lost its topics), nothing to read
            (consumer.seek_to_end if at_end else consumer.seek_to_beginning)(*tps)
        end = time.monotonic() + timeout_s
        for tp in tps:
            if consumer.position(tp, timeout_ms=max(1, int((end - time.monotonic()) * 1000))) is None:
                raise BrokerError(f"cannot read {topic}: no position for partition {tp.partition} "
                                  f"within {timeout_s:g} s")
    except KafkaError as exc:
        consumer.close()
        raise BrokerError(f"cannot read {topic}: {describe(exc)}") from None
    except BaseException:
        consumer.close()
        raise
    return consumer, tps


SEARCH_CHUNK = 20_000  # messages read at a time by search_newest (shared by the partitions), from the end back
SEARCH_CHUNK_MAX = 20_000  # a partition's chunk doubles each round from its share up to this


def search_newest(client: dict[str, Any], topic: str, needle: bytes, enough: Callable[[list[dict[str, Any]]], bool],
                  limit_s: float, quiet_s: float = 1.0, chunk: int = SEARCH_CHUNK) -> tuple[list[dict[str, Any]], int, bool]:
    """The JSON messages of ``topic`` whose bytes hold ``needle``, read from the end back in chunks until ``enough``
    is satisfied with those found and a chunk held no more of them (the messages of one alert straddle chunks, and a
    repeat can be newer than an update), the beginning is reached, or ``limit_s`` has passed (all of it: the
    connection and offsets included). Returns them (oldest first within each chunk), how many messages were read, and
    whether the search ended rather than ran out of time.

    The newest messages are what an on-call engineer looks up (the alert just paged): ``inspect --alert`` read the
    topic from its beginning into memory, and on a topic of two million messages gave "not found" after 20 s and
    1.7 GB. Each partition's chunk starts at its share of ``chunk`` and doubles each round (up to
    :data:`SEARCH_CHUNK_MAX`). The newest chunk reads on past the end offsets (Tansu gives a batch's end as its first
    record's) until ``quiet_s`` without a message, or 2 × ``quiet_s`` at most: a live topic is never quiet."""
    deadline = time.monotonic() + limit_s

    def left_ms() -> int:
        return max(1, int((deadline - time.monotonic()) * 1000))

    consumer, tps = partition_reader(client, topic, at_end=True, timeout_s=min(limit_s, 30.0))
    try:
        begin = consumer.beginning_offsets(tps, timeout_ms=left_ms()) if tps else {}
        hi = {tp: int(consumer.position(tp, timeout_ms=left_ms())) for tp in tps}
        size = max(100, chunk // max(1, len(tps)))
        found: list[dict[str, Any]] = []
        read, newest = 0, True
        while True:
            todo = [tp for tp in tps if newest or hi[tp] > begin[tp]]
            if not todo:
                return found, read, True
            lo = {tp: max(begin[tp], hi[tp] - size) for tp in todo}
            consumer.pause(*tps)
            for tp in todo:
                consumer.seek(tp, lo[tp])
            consumer.resume(*todo)
            batch: list[dict[str, Any]] = []
            last_record, reached = time.monotonic(), None
            while True:
                if time.monotonic() >= deadline:
                    return batch + found, read, False
                for tp, records in consumer.poll(timeout_ms=min(100, left_ms())).items():
                    for r in records:
                        if not newest and r.offset >= hi[tp]:
                            continue  # read by the newer chunk already
                        read, last_record = read + 1, time.monotonic()
                        if r.value is not None and needle in r.value and isinstance(doc := _json_or_none(r.value), dict):
                            batch.append(doc)
                behind = [tp for tp in todo if _position(consumer, tp, left_ms()) < hi[tp]]
                if not newest:  # (the newest chunk goes on past the end offsets)
                    consumer.pause(*[tp for tp in todo if tp not in behind])
                now = time.monotonic()
                reached = reached or (now if not behind else None)
                if reached and (not newest or now - last_record >= quiet_s or now - reached >= 2 * quiet_s):
                    break
            found = batch + found
            if not batch and enough(found):
                return found, read, True
            hi, newest, size = {**hi, **lo}, False, min(2 * size, max(size, SEARCH_CHUNK_MAX))
    finally:
        consumer.close(timeout_ms=1000)


def _position(consumer: Any, tp: Any, timeout_ms: int) -> int:
    """The consumer's position in ``tp``, or -1 when it has none within ``timeout_ms`` (an offset reset pending)."""
    position = consumer.position(tp, timeout_ms=timeout_ms)
    return -1 if position is None else int(position)


class TopicReader:
    """Reads every JSON message of a topic from the beginning, in a background thread, into :attr:`docs`.

    A poll the broker fails (a fetch error, a broker restarting) is logged and tried again until the reader is
    stopped; :meth:`settle` raises BrokerError while the last poll failed. The first failure used to end the
    reader: its callers (replay-eval's figures, ``inspect --alert``) then reported what it had read so far."""

    def __init__(self, bootstrap: str | list[str], topic: str, **client: Any) -> None:
        """``client``: further ``KafkaConsumer`` settings (security: :meth:`KafkaConfig.client_kwargs`)."""
        from kafka import KafkaConsumer

        self.docs: list[dict[str, Any]] = []
        self.error: str | None = None  # the last poll's failure; None once a poll succeeds again
        self.failures = 0
        self._topic = topic
        self._reached_end = threading.Event()  # every partition read up to its end offset at the start
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._finished = self._abandoned = False  # the thread has ended; close() left the consumer to it
        # a topic not there yet is found once it is created: once _end_offsets' partitions_for_topic found it
        # missing, kafka-python asked again only after metadata_max_age_ms (5 min; a consumer that only subscribes
        # finds it at once), and a reader started before the first alert read nothing for that long
        self._consumer = KafkaConsumer(topic, **{"metadata_max_age_ms": METADATA_MAX_AGE_MS, **client},
                                       bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                       enable_auto_commit=False, group_id=None)
        self._thread = threading.Thread(target=self._run, name=f"read-{topic}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from monitor.reading import Backoff

        retry = Backoff(RETRY_FIRST_S, RETRY_MAX_S)
        try:
            ends = self._end_offsets()
            while not self._stop.is_set():
                try:
                    polled = self._consumer.poll(timeout_ms=100)
                except Exception as exc:  # noqa: BLE001 — a fetch the broker failed: tried again until stopped
                    self.error, self.failures = describe(exc), self.failures + 1
                    wait = retry.failed(time.monotonic())
                    log.warning("topic_read_retry", topic=self._topic, error=self.error, retry_in_s=wait)
                    self._stop.wait(wait)
                    continue
                self.error = None
                retry.succeeded()
                for records in polled.values():
                    self.docs.extend(doc for r in records if (doc := _json_or_none(r.value)) is not None)
                if not self._reached_end.is_set() and all(self._position(tp) >= end for tp, end in ends.items()):
                    self._reached_end.set()
        except Exception as exc:  # noqa: BLE001 — anything but a poll: what was read is not the topic, said by settle
            self.error, self.failures = describe(exc), self.failures + 1
            log.warning("topic_read_stopped", topic=self._topic, error=self.error)
        finally:
            self._reached_end.set()  # stopped: nothing more to wait for
            with self._lock:
                self._finished, abandoned = True, self._abandoned
            if abandoned:  # close() returned while a call here waited for a broker: closed here, not under it
                self._consumer.close()

    def _end_offsets(self) -> dict[Any, int]:
        """Each partition's end offset now ({} for a topic not created yet: nothing to wait for)."""
        from kafka import TopicPartition

        try:
            parts = self._consumer.partitions_for_topic(self._topic) or set()
            return dict(self._consumer.end_offsets([TopicPartition(self._topic, p) for p in parts], timeout_ms=10_000))
        except Exception as exc:  # noqa: BLE001 — then only the quiet period tells the end (as before)
            log.debug("end_offsets_unknown", topic=self._topic, error=describe(exc))
            return {}

    def _position(self, tp: Any) -> int:
        try:
            return int(self._consumer.position(tp, timeout_ms=100))
        except Exception:  # noqa: BLE001 — not assigned yet
            return -1

    def settle(self, quiet_s: float = 1.0, limit_s: float = 15.0) -> list[dict[str, Any]]:
        """Wait until the topic is read to the end it had at the start, then until nothing new arrived for
        ``quiet_s`` (at most ``limit_s`` in all); stop; return the docs. The quiet period alone ended before a
        slow broker's first fetch (``tsmon inspect --alert``: "not found … read 0 messages", the alert there);
        it stays for brokers whose end offsets undercount (Tansu gives a batch's end as its first record's).
        While polls fail, quiet is no end: a failure that clears within ``limit_s`` costs only the wait."""
        t0 = time.monotonic()
        self._reached_end.wait(limit_s)
        seen, last_change = -1, time.monotonic()
        while time.monotonic() - t0 < limit_s:
            if len(self.docs) != seen:
                seen, last_change = len(self.docs), time.monotonic()
            elif time.monotonic() - last_change >= quiet_s and self.error is None:
                break
            time.sleep(0.05)
        whole = self._reached_end.is_set()  # (before close(), which sets it)
        self.close(wait_s=1.0)
        if self.error is not None:  # what was read is not the topic: a report from it would be wrong, not short
            raise BrokerError(f"reading topic {self._topic} failed: {self.error} ({len(self.docs)} message(s) read "
                              f"before it, {self.failures} failed poll(s))")
        if self._abandoned:  # still inside a call to the broker: it did not answer (it was returned as read whole)
            raise BrokerError(f"reading topic {self._topic}: the broker did not answer within {limit_s:g} s "
                              f"({len(self.docs)} message(s) read)")
        if not whole:  # part of a long topic was returned as all of it (inspect --alert said "not found")
            raise BrokerError(f"reading topic {self._topic}: not read to its end within {limit_s:g} s "
                              f"({len(self.docs)} message(s) read)")
        return list(self.docs)

    def close(self, wait_s: float = 5.0) -> None:
        """Stop reading. A thread still inside a call to a broker that does not answer is not waited for past
        ``wait_s``: it closes the consumer itself when the call returns (closed from here, under it, the call
        failed with "NetworkSelector closed!")."""
        self._stop.set()
        self._thread.join(wait_s)
        with self._lock:
            if not self._finished:
                self._abandoned = True
                return
        self._consumer.close()


def _json_or_none(value: bytes | None) -> Any:
    """A message's JSON document, or None for one that is not JSON (a tombstone, bytes someone else wrote): passed
    over, as tsmon tail does; one such message ended the reader, and inspect --alert then said "not found"."""
    try:
        return json.loads(value) if value is not None else None
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes ("[" * 100000)
        return None
