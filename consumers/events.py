"""Messages and batches that flow from Kafka to the learner.

Every record keeps its topic, partition and offset so any later stage can say where it came
from. These are plain frozen dataclasses; numpy arrays inside them are not copied.
"""

from __future__ import annotations

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
