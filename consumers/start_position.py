"""Where each partition of a :class:`~consumers.source.KafkaBatchSource` starts reading.

The first time a partition is assigned, the consumer seeks it to its resume offset (the
restored checkpoint's offsets, or a ``--from`` position). The group's committed offset may be
ahead of the checkpoint (the newest checkpoint was corrupt and an older one was restored):
without the seek, the events between the two would never be trained. Records already fetched
from the old position are dropped, not delivered; records below a partition's resume offset
(covered by the checkpoint) are skipped.

The resume offsets are known when the source starts, or later: a restarting learner starts
the group join first (``start_joining``) and hands the offsets over once its checkpoint is
read (``set_start``), so the join overlaps torch's import and the bank load
(docs/performance.md, "Restart"). Until then the consumer thread holds what it fetched.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping
from typing import Any

from consumers.client import ConsumerClient
from consumers.events import TopicPartitionKey
from consumers.protocols import labelled, partition_label


def _keys(offsets: Mapping[TopicPartitionKey, int]) -> dict[TopicPartitionKey, int]:
    return {(str(t), int(p)): int(o) for (t, p), o in offsets.items()}


class StartPosition:
    """Resume offsets of one source. The consumer thread owns it; :meth:`set_later` may be
    called from any thread (it only stores, the consumer thread applies)."""

    def __init__(self, log: Any) -> None:
        self._log = log
        self.known = threading.Event()
        self.pending = False  # begun without offsets and not yet applied (consumer thread)
        self._late: dict[TopicPartitionKey, int] | None = None
        # Offsets below these are covered by the learner's checkpoint: skipped, not delivered.
        self.floor: dict[TopicPartitionKey, int] = {}
        self._to_seek: dict[TopicPartitionKey, int] = {}  # resume offsets not yet sought

    def set_now(self, offsets: Mapping[TopicPartitionKey, int] | None) -> None:
        """Before the consumer thread starts: ``None`` means "later" (:meth:`set_later`)."""
        if offsets is None:
            self.pending = True
            return
        self.floor = _keys(offsets)
        self._to_seek = dict(self.floor)
        self.known.set()

    def set_later(self, offsets: Mapping[TopicPartitionKey, int]) -> None:
        if self.known.is_set():
            raise RuntimeError("the start position is already set")
        self._late = _keys(offsets)
        self.known.set()
        self._log.info("start position set", resume_offsets=labelled(self._late) or None)

    def apply_late(self) -> None:
        """Consumer thread, once :attr:`known`: the handed-over offsets take effect."""
        self.floor = dict(self._late or {})
        self._to_seek = dict(self.floor)
        self.pending = False

    def seek(
        self,
        consumer: ConsumerClient,
        assigned: Collection[TopicPartitionKey],
        drop: Any,
    ) -> set[TopicPartitionKey]:
        """Seek partitions assigned for the first time to their resume offset.

        ``drop(key)`` forgets what is buffered of a partition and returns how many records.
        Returns the partitions sought: what the same poll returned for them is stale.
        """
        sought = {key for key in assigned if key in self._to_seek}
        for key in sorted(sought):
            offset = self._to_seek.pop(key)
            consumer.seek(key, offset)
            self._log.info(
                "partition positioned at its start offset",
                partition=partition_label(key),
                offset=offset,
                dropped=drop(key),
            )
        return sought
