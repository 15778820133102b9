"""The confluent-kafka (librdkafka) side of :class:`~consumers.client.ConsumerClient`.

Chosen with ``consumer.client: confluent`` (the ``fast`` extra). librdkafka fetches on its own
threads and hands whole batches over in C; ``consume(num_messages=...)`` returns them in one
call, and the native :func:`consumers._eventscan.message_runs` turns them into the source's
runs of :class:`~consumers.events.SourceRecord` tuples without a Python loop per record.

Settings: the project's kafka-python style connection options are translated to librdkafka's
names by :func:`librdkafka_config` (TLS and SASL included); an option it does not know is an
error rather than silently dropped.

Rebalances: ``on_assign``/``on_revoke``/``on_lost`` run inside ``consume`` on the consumer
thread. They only record (the binding then applies the assignment itself); the source
reconciles after ``consume`` returns. librdkafka restarts a re-assigned partition from its
committed offset, which the source sees as its fetch position going back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, TopicPartition

from consumers._eventscan import message_runs
from consumers.client import CommitError, Polled, RebalanceEvent, RebalanceRecorder
from consumers.config import SourceConfig
from consumers.events import SourceRecord, TopicPartitionKey
from consumers.exceptions import BrokerUnavailableError

_STATS_INTERVAL_MS: Final = 1000  # how often librdkafka reports broker states (connected())

# kafka-python connection option -> librdkafka property (values are passed through).
_RENAMED: Final[Mapping[str, str]] = {
    "client_id": "client.id",
    "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanism",
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "ssl_password": "ssl.key.password",
    "reconnect_backoff_ms": "reconnect.backoff.ms",
    "reconnect_backoff_max_ms": "reconnect.backoff.max.ms",
    # librdkafka's consumer has no request.timeout.ms; its per-request limit is this one.
    "request_timeout_ms": "socket.timeout.ms",
}


FETCH_QUEUE_BACKOFF_MS: Final = 20
CONSUME_CHUNK: Final = 300  # messages per consume() call within one poll


def librdkafka_config(client_options: Mapping[str, Any]) -> dict[str, Any]:
    """librdkafka properties for the connection options of every client.

    Raises ValueError on an option that has no librdkafka counterpart here.
    """
    conf: dict[str, Any] = {}
    for key, value in client_options.items():
        if value is None:
            continue
        if key == "bootstrap_servers":
            servers = [value] if isinstance(value, str) else list(value)
            conf["bootstrap.servers"] = ",".join(servers)
        elif key == "ssl_check_hostname":
            # librdkafka checks the broker's name against its certificate unless told "none".
            conf["ssl.endpoint.identification.algorithm"] = "https" if value else "none"
        elif key in _RENAMED:
            conf[_RENAMED[key]] = value
        else:
            raise ValueError(f"Kafka option {key!r} has no librdkafka equivalent here")
    return conf


def consumer_config(config: SourceConfig) -> dict[str, Any]:
    """The consumer properties of :meth:`SourceConfig.consumer_options`, librdkafka names."""
    return {
        "group.id": config.group_id,
        # Offsets are committed only by the learner, after a checkpoint covers them.
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": config.auto_offset_reset,
        "fetch.max.bytes": config.fetch_max_bytes,
        "max.partition.fetch.bytes": config.max_partition_fetch_bytes,
        "session.timeout.ms": config.session_timeout_ms,
        "heartbeat.interval.ms": max(100, min(3000, config.session_timeout_ms // 3)),
        "max.poll.interval.ms": config.max_poll_interval_ms,
        "enable.partition.eof": False,
        # Once its local queue passes queued.min.messages / queued.max.messages.kbytes,
        # librdkafka waits this long before fetching again (default 1 s): a consumer that
        # drains the queue faster than that then finds it empty and waits for the rest of the
        # second (docs/performance.md, "Two Kafka clients").
        "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
    }


class ConfluentClient:
    """A subscribed librdkafka consumer (created on the consumer thread).

    Raises :class:`BrokerUnavailableError` when no bootstrap server answers within the
    request timeout (librdkafka itself would only keep retrying in the background).
    """

    def __init__(self, config: SourceConfig, client_options: Mapping[str, Any]) -> None:
        self._rebalances = RebalanceRecorder()
        self._paused: set[TopicPartitionKey] = set()
        self._broker_up: bool | None = None
        self._fatal: KafkaError | None = None
        conf = {
            **librdkafka_config(client_options),
            **consumer_config(config),
            "statistics.interval.ms": _STATS_INTERVAL_MS,
            "stats_cb": self._on_stats,
            "error_cb": self._on_error,
        }
        self._consumer = Consumer(conf)
        timeout_s = int(client_options.get("request_timeout_ms", 30_000)) / 1000
        try:
            self._consumer.list_topics(config.topic, timeout=timeout_s)
        except KafkaException as exc:
            self._consumer.close()
            raise BrokerUnavailableError(
                f"cannot reach the Kafka brokers {conf['bootstrap.servers']}: {exc}"
            ) from exc
        # The assignment changes only inside these callbacks (the binding applies it right
        # after them): cached between rebalances, so the source's check after every poll
        # does not build a TopicPartition list each time.
        self._assignment: frozenset[TopicPartitionKey] | None = None
        self._consumer.subscribe(
            [config.topic],
            on_assign=lambda _c, parts: self._on_rebalance("assigned", parts),
            on_revoke=lambda _c, parts: self._on_rebalance("revoked", parts),
            on_lost=lambda _c, parts: self._on_rebalance("lost", parts),
        )

    # ---- callbacks (inside consume, on the consumer thread) -------------------------------

    def _on_rebalance(self, kind: str, parts: list[TopicPartition]) -> None:
        self._assignment = None
        self._rebalances.record(kind, parts)

    def _on_stats(self, raw: str) -> None:
        brokers = json.loads(raw).get("brokers", {})
        # Bootstrap entries carry nodeid -1; the learned brokers are the ones that count.
        states = [b.get("state") == "UP" for b in brokers.values() if b.get("nodeid", -1) >= 0]
        self._broker_up = any(states) if states else None

    def _on_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            self._broker_up = False
        if error.fatal():
            self._fatal = error

    # ---- ConsumerClient -------------------------------------------------------------------

    def poll(self, timeout_s: float, max_records: int) -> Polled:
        # In chunks: consume() builds its messages, and message_runs their records (the
        # binding's accessors called from C, runs of one partition, errored messages left
        # out: librdkafka retries those fetches), in C with the GIL held. Between chunks a
        # training thread waiting for the GIL gets it (figures in docs/performance.md).
        out: Polled = []
        chunk = min(max_records, CONSUME_CHUNK)
        messages = self._consumer.consume(num_messages=chunk, timeout=timeout_s)
        taken = 0
        while messages:
            taken += len(messages)
            out.extend(message_runs(messages, SourceRecord))
            chunk = min(max_records - taken, CONSUME_CHUNK)
            if len(messages) < CONSUME_CHUNK or chunk <= 0:
                break
            messages = self._consumer.consume(num_messages=chunk, timeout=0)
        if self._fatal is not None:
            raise KafkaException(self._fatal)
        if out:
            self._broker_up = True
        return out

    def drain_rebalances(self) -> list[RebalanceEvent]:
        return self._rebalances.drain()

    def assignment(self) -> frozenset[TopicPartitionKey]:
        if self._assignment is None:
            self._assignment = frozenset(
                (tp.topic, tp.partition) for tp in self._consumer.assignment()
            )
        return self._assignment

    def seek(self, key: TopicPartitionKey, offset: int) -> None:
        # The binding applied the assignment inside consume(), so the partition is assigned.
        self._consumer.seek(TopicPartition(key[0], key[1], offset))

    def pause_all(self) -> None:
        todo = self.assignment() - self._paused
        if todo:
            self._consumer.pause([TopicPartition(t, p) for t, p in todo])
            self._paused |= todo

    def resume_all(self) -> None:
        if not self._paused:  # the loop calls this on every pass: no assignment() then
            return
        owned = self.assignment()
        keys = self._paused & owned
        self._paused.clear()
        if keys:
            self._consumer.resume([TopicPartition(t, p) for t, p in keys])

    def commit(self, offsets: Mapping[TopicPartitionKey, int], timeout_s: float) -> None:
        # librdkafka bounds a synchronous commit by its own timeouts (socket.timeout.ms);
        # ``timeout_s`` is the kafka-python client's knob.
        del timeout_s
        parts = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            result = self._consumer.commit(offsets=parts, asynchronous=False)
        except KafkaException as exc:
            raise CommitError(str(exc)) from exc
        failed = [tp for tp in result or [] if tp.error is not None or tp.offset == OFFSET_INVALID]
        if failed:
            raise CommitError("; ".join(f"{tp.topic}:{tp.partition}: {tp.error}" for tp in failed))

    def highwater(self, key: TopicPartitionKey) -> int | None:
        try:
            _low, high = self._consumer.get_watermark_offsets(TopicPartition(*key), cached=True)
        except KafkaException:
            return None
        return int(high) if high >= 0 else None

    def connected(self) -> bool | None:
        return self._broker_up

    def close(self, timeout_s: float) -> None:
        del timeout_s  # librdkafka leaves the group within its own session limits
        self._consumer.close()
