"""The kafka-python side of :class:`~consumers.client.ConsumerClient` (the default client).

kafka-python 3.x runs the rebalance listener on its network thread, where blocking or
committing is not allowed, so the listener only records; it keeps a partition's fetch
position across a rebalance that gives the partition back to the same member.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kafka import KafkaConsumer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.structs import OffsetAndMetadata, TopicPartition

from consumers.client import (
    CommitError,
    Polled,
    RebalanceEvent,
    RebalanceRecorder,
    TransientPollError,
)
from consumers.config import SourceConfig
from consumers.events import SourceRecord, TopicPartitionKey
from consumers.exceptions import BrokerUnavailableError

_new_record = tuple.__new__  # SourceRecord without its Python-level __new__ (hot path)


class _Listener(ConsumerRebalanceListener):
    """Runs on kafka-python's network thread: only records, never blocks or commits."""

    def __init__(self, recorder: RebalanceRecorder) -> None:
        self._recorder = recorder

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self._recorder.record("revoked", revoked)

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._recorder.record("assigned", assigned)

    def on_partitions_lost(self, lost: Iterable[TopicPartition]) -> None:
        self._recorder.record("lost", lost)


class KafkaPythonClient:
    """A subscribed ``KafkaConsumer`` (created by the constructor, on the consumer thread).

    Raises :class:`BrokerUnavailableError` when no bootstrap server answers.
    """

    def __init__(self, config: SourceConfig, client_options: Mapping[str, Any]) -> None:
        try:
            self._consumer = KafkaConsumer(**client_options, **config.consumer_options())
        except KafkaTimeoutError as exc:  # NoBrokersAvailable
            raise BrokerUnavailableError(
                f"cannot reach the Kafka brokers {client_options.get('bootstrap_servers')}: {exc}"
            ) from exc
        self._rebalances = RebalanceRecorder()
        self._consumer.subscribe([config.topic], listener=_Listener(self._rebalances))

    def poll(self, timeout_s: float, max_records: int) -> Polled:
        try:
            polled = self._consumer.poll(
                timeout_ms=max(1, int(timeout_s * 1000)), max_records=max_records
            )
        except KafkaError as exc:
            # kafka-python 3.x raises a failed coordinator lookup or metadata refresh (the
            # broker cut off, say) out of poll(); its next poll() retries it.
            if exc.retriable:
                raise TransientPollError(repr(exc)) from exc
            raise
        out: Polled = []
        for tp, messages in polled.items():
            if messages:
                topic, partition = tp.topic, tp.partition
                out.append(
                    (
                        (topic, partition),
                        [
                            _new_record(
                                SourceRecord,
                                (
                                    topic,
                                    partition,
                                    m.offset,
                                    m.value,
                                    m.timestamp if m.timestamp is not None else -1,
                                ),
                            )
                            for m in messages
                        ],
                    )
                )
        return out

    def drain_rebalances(self) -> list[RebalanceEvent]:
        return self._rebalances.drain()

    def assignment(self) -> frozenset[TopicPartitionKey]:
        return frozenset((tp.topic, tp.partition) for tp in self._consumer.assignment())

    def seek(self, key: TopicPartitionKey, offset: int) -> None:
        self._consumer.seek(TopicPartition(*key), offset)

    def pause_all(self) -> None:
        for tp in self._consumer.assignment() - self._consumer.paused():
            try:
                self._consumer.pause(tp)
            except KeyError:  # revoked between the two calls
                continue

    def resume_all(self) -> None:
        for tp in self._consumer.paused():
            try:
                self._consumer.resume(tp)
            except KeyError:
                continue

    def commit(self, offsets: Mapping[TopicPartitionKey, int], timeout_s: float) -> None:
        to_commit = {
            TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()
        }
        try:
            self._consumer.commit(to_commit, timeout_ms=int(timeout_s * 1000))
        except KafkaError as exc:
            raise CommitError(repr(exc)) from exc

    def highwater(self, key: TopicPartitionKey) -> int | None:
        # Highwater comes with each fetch response; Tansu's end_offsets() is wrong by design.
        try:
            return self._consumer.highwater(TopicPartition(*key))
        except KafkaError:  # IllegalStateError: not assigned any more
            return None

    def connected(self) -> bool | None:
        """kafka-python has no public connectivity query; this reads its client (checked
        against kafka-python 3.0.x) and says "unknown" rather than guess if that changes."""
        try:
            client = self._consumer._client  # private: see the docstring
            nodes = [broker.node_id for broker in client.cluster.brokers()]
            return any(client.connected(node) for node in nodes)
        except (AttributeError, TypeError):
            return None

    def close(self, timeout_s: float) -> None:
        self._consumer.close(autocommit=False, timeout_ms=int(timeout_s * 1000))
