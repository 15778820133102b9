"""The boundary between the Kafka side and the learner: a source of decoded micro-batches."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final, Protocol, runtime_checkable

from consumers.events import EventBatch, TopicPartitionKey

NO_OFFSETS: Final[Mapping[TopicPartitionKey, int]] = MappingProxyType({})

# Counters every EventSource reports in ``stats()`` (0 when nothing happened).
STAT_COUNTERS: Final = (
    "polled",
    "skipped",
    "batches",
    "events",
    "dead_lettered",
    "paused_events",
    "commits",
    "commit_failures",
    "revoked_dropped",
)


def partition_label(key: TopicPartitionKey) -> str:
    """``"topic:partition"``: the key used in ``stats()`` and logs.

    Tuple keys would break JSON logging (``json.dumps`` refuses them); a colon cannot occur in
    a Kafka topic name, so the label is unambiguous.
    """
    return f"{key[0]}:{key[1]}"


def labelled(offsets: Mapping[TopicPartitionKey, int]) -> dict[str, int]:
    """``{(topic, partition): n}`` as ``{"topic:partition": n}``, sorted, for stats and logs."""
    return {partition_label(key): value for key, value in sorted(offsets.items())}


@runtime_checkable
class EventSource(Protocol):
    """Decoded micro-batches in, checkpoint-covered offsets back.

    The learner's loop is: ``get`` a batch, train, checkpoint, then ``commit`` the batch's
    ``offsets`` (INVARIANT: an offset is committed only after the checkpoint that covers it
    is durable). Delivery is at-least-once: after a crash or a rebalance, records after the
    last commit come again; ``resume_offsets`` from the restored checkpoint skip those the
    checkpoint already covers.

    ``stats()`` returns at least: ``polled`` (records read), ``skipped`` (read but below a
    resume offset; a source that seeks there reads none), ``batches``, ``events`` (valid),
    ``dead_lettered``, ``paused_events`` (times backpressure paused the source),
    ``committed`` and ``lag`` (both
    ``{"topic:partition": int}``, see :func:`partition_label`; JSON-safe), ``queue_depth``.
    """

    def start(self, resume_offsets: Mapping[TopicPartitionKey, int] = NO_OFFSETS) -> None:
        """Begin consuming; records below ``resume_offsets[(topic, partition)]`` are skipped.

        A Kafka source also starts each partition there on its first assignment, whatever
        the group committed: the restored checkpoint (or ``--from``) says where training
        resumes, not the group.
        """
        ...

    def get(self, timeout_s: float) -> EventBatch | None:
        """The next batch, or None if none came within ``timeout_s``.

        Raises :class:`~consumers.exceptions.SourceClosedError` once stopped or broken.
        """
        ...

    def commit(self, offsets: Mapping[TopicPartitionKey, int]) -> None:
        """Ask for ``offsets`` (next offset to read, per partition) to be committed; no wait."""
        ...

    def commit_sync(self, offsets: Mapping[TopicPartitionKey, int], timeout_s: float) -> bool:
        """Commit and wait; True once ``offsets`` (and every earlier request) are committed."""
        ...

    def stop(self, timeout_s: float) -> None:
        """Serve the commits already requested, then release the source. Idempotent."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters and per-partition gauges (see the class docstring); a snapshot copy."""
        ...

    def assignment(self) -> set[TopicPartitionKey]:
        """The partitions this source currently reads."""
        ...
