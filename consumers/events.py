"""Messages and batches that flow from Kafka to the learner.

Every record keeps its topic, partition and offset so any later stage can say where it came
from. These are plain frozen dataclasses; numpy arrays inside them are not copied.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

TopicPartitionKey = tuple[str, int]


class SourceRecord(NamedTuple):
    """One raw Kafka record, before decoding.

    A named tuple rather than a frozen dataclass: the clients build one per record on the
    consumer thread's hot path, where ``tuple.__new__`` costs a sixth of a frozen dataclass's
    ``__init__`` (figures in docs/performance.md).
    """

    topic: str
    partition: int
    offset: int
    value: bytes | None
    timestamp_ms: int = -1


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A rejected record and why. Serialised to ``<prefix>.dlq`` by :func:`dead_letter_payload`.

    ``reason`` is a short machine-readable code (see ``consumers.decode.REASONS``).
    """

    reason: str
    detail: str
    source: SourceRecord


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Valid decoded events of one micro-batch, column-wise.

    ``labels[i]`` and ``tasks[i]`` are normalised to ``str`` (``3`` and ``"3"`` are the same
    class) or ``None`` for an unlabeled event. ``offsets`` maps each (topic, partition) the
    batch touched to the *next* offset to consume, i.e. the last offset in the batch + 1,
    dead-lettered records included: committing it covers every record of the batch.
    """

    ids: tuple[str, ...]
    features: np.ndarray  # float32 [n, input_dim], C-contiguous
    labels: tuple[str | None, ...]
    tasks: tuple[str | None, ...]
    timestamps_ms: np.ndarray  # int64 [n]; event ts if given, else the record's timestamp
    sources: tuple[SourceRecord, ...]  # value dropped (None) to keep memory small
    dead_letters: tuple[DeadLetter, ...] = ()
    offsets: dict[TopicPartitionKey, int] = field(default_factory=dict)
    consumed: int = 0  # records this batch accounts for (valid + dead-lettered)

    def __len__(self) -> int:
        return len(self.ids)


def restrict(batch: EventBatch, keep: Collection[TopicPartitionKey]) -> EventBatch:
    """The part of ``batch`` read from the partitions in ``keep`` (the batch itself when whole).

    A batch handed over before a rebalance may hold records of a partition this member no
    longer owns; its new owner reads them again from the committed offset, so they are
    dropped here, offsets and counts included, rather than trained twice.
    """
    if all(tp in keep for tp in batch.offsets):
        return batch
    rows = [i for i, s in enumerate(batch.sources) if (s.topic, s.partition) in keep]
    letters = tuple(d for d in batch.dead_letters if (d.source.topic, d.source.partition) in keep)
    return EventBatch(
        ids=tuple(batch.ids[i] for i in rows),
        features=batch.features[rows],
        labels=tuple(batch.labels[i] for i in rows),
        tasks=tuple(batch.tasks[i] for i in rows),
        timestamps_ms=batch.timestamps_ms[rows],
        sources=tuple(batch.sources[i] for i in rows),
        dead_letters=letters,
        offsets={tp: o for tp, o in batch.offsets.items() if tp in keep},
        consumed=len(rows) + len(letters),
    )
