"""The one seam between the shared source logic and a Kafka client library.

:class:`~consumers.source.KafkaBatchSource` (micro-batching, hand-off, backpressure, commits,
rebalance reconciliation) is written once against :class:`ConsumerClient`; each library has a
small adapter that does only what that library does differently:

- ``kafka-python`` (the default): :class:`~consumers.kafka_python_client.KafkaPythonClient`;
- ``confluent`` (librdkafka, the ``fast`` extra):
  :class:`~consumers.confluent_client.ConfluentClient`.

Every method is called on the source's consumer thread only (neither library's consumer is
meant to be shared between threads). Rebalance callbacks of either library only record what
happened (:class:`RebalanceRecorder`); the consumer thread acts after the ``poll`` returns,
never inside the callback (kafka-python runs it on its network thread, librdkafka inside
``consume``, where a synchronous commit could wait on the rebalance it is part of).
"""

from __future__ import annotations

import queue
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal, Protocol, get_args

from consumers.config import SourceConfig
from consumers.events import SourceRecord, TopicPartitionKey

ClientName = Literal["kafka-python", "confluent"]
CLIENT_NAMES: Final[tuple[str, ...]] = get_args(ClientName)
DEFAULT_CLIENT: Final = "kafka-python"

RebalanceEvent = tuple[str, frozenset[TopicPartitionKey]]  # ("assigned" | ..., partitions)
# What one poll returned: runs of consecutive records of one partition, in arrival order.
Polled = list[tuple[TopicPartitionKey, list[SourceRecord]]]


class CommitError(Exception):
    """A commit the broker refused or that timed out (a rebalance in progress, a moved
    coordinator); the committer retries it for the partitions still owned."""


class TransientPollError(Exception):
    """A poll that failed on something the client retries by itself (the broker or the group
    coordinator unreachable for now); the consumer thread backs off and polls again."""


class ConsumerClient(Protocol):
    """What the consumer thread asks of a Kafka client (all calls on that thread)."""

    def poll(self, timeout_s: float, max_records: int) -> Polled:
        """Up to ``max_records`` records, waiting at most ``timeout_s``; rebalance callbacks
        run in here and are recorded for :meth:`drain_rebalances`. Raises
        :class:`TransientPollError` for a retriable failure (a broker cut, say)."""
        ...

    def drain_rebalances(self) -> list[RebalanceEvent]: ...

    def assignment(self) -> frozenset[TopicPartitionKey]: ...

    def seek(self, key: TopicPartitionKey, offset: int) -> None:
        """Fetch an assigned partition from ``offset`` next (the start position, applied by
        the consumer thread after the poll that assigned the partition)."""
        ...

    def pause_all(self) -> None:
        """Stop fetching every assigned partition (idempotent; new partitions included)."""
        ...

    def resume_all(self) -> None: ...

    def commit(self, offsets: Mapping[TopicPartitionKey, int], timeout_s: float) -> None:
        """Commit synchronously; raises :class:`CommitError` when the broker did not."""
        ...

    def highwater(self, key: TopicPartitionKey) -> int | None:
        """The partition's end offset as of the last fetch response; None when unknown."""
        ...

    def connected(self) -> bool | None:
        """Whether a broker connection is up; None when the library cannot tell."""
        ...

    def close(self, timeout_s: float) -> None: ...


class RebalanceRecorder:
    """Rebalance events, recorded by a library callback and drained by the consumer thread."""

    def __init__(self) -> None:
        self._events: queue.SimpleQueue[RebalanceEvent] = queue.SimpleQueue()

    def record(self, kind: str, partitions: Iterable[Any]) -> None:
        """Any thread: ``partitions`` are objects with ``topic`` and ``partition`` attributes."""
        self._events.put((kind, frozenset((tp.topic, tp.partition) for tp in partitions)))

    def drain(self) -> list[RebalanceEvent]:
        """What happened since the last call, oldest first (consumer thread)."""
        events: list[RebalanceEvent] = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events


def check_client_name(name: str) -> str:
    if name not in CLIENT_NAMES:
        raise ValueError(f"unknown Kafka client {name!r}; expected one of {list(CLIENT_NAMES)}")
    return name


def open_client(config: SourceConfig, client_options: Mapping[str, Any]) -> ConsumerClient:
    """The subscribed client ``config.client`` names (imported only when chosen)."""
    if config.client == "confluent":
        from consumers.confluent_client import ConfluentClient

        return ConfluentClient(config, client_options)
    from consumers.kafka_python_client import KafkaPythonClient

    return KafkaPythonClient(config, client_options)
