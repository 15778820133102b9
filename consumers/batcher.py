"""Micro-batching by size or latency, with no I/O and an injectable clock.

A batch is ready when ``batch_size`` records are buffered, or when the OLDEST buffered record
has waited ``max_latency_s``: a trickle of events still reaches the learner within the latency
budget, a flood is cut into full batches. Not thread-safe: the consumer thread owns it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Iterable

from consumers.events import SourceRecord, TopicPartitionKey


class MicroBatcher:
    """Buffer of raw records in arrival order, cut into batches of at most ``batch_size``."""

    def __init__(
        self,
        batch_size: int,
        max_latency_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_latency_s < 0:
            raise ValueError(f"max_latency_s must be >= 0, got {max_latency_s}")
        self.batch_size = batch_size
        self.max_latency_s = max_latency_s
        self._clock = clock
        # (arrival time, record); arrival times are non-decreasing, so the left end is oldest.
        self._buffer: deque[tuple[float, SourceRecord]] = deque()

    def __len__(self) -> int:
        return len(self._buffer)

    def add(self, records: Iterable[SourceRecord]) -> None:
        """Buffer records; they share one arrival time (the poll that returned them)."""
        now = self._clock()
        self._buffer.extend((now, record) for record in records)

    def time_until_ready(self) -> float | None:
        """Seconds until :meth:`ready` turns true without new records; None when empty.

        The consumer thread caps its poll timeout with this so a partial batch leaves on time.
        """
        if not self._buffer:
            return None
        if len(self._buffer) >= self.batch_size:
            return 0.0
        waited = self._clock() - self._buffer[0][0]
        return max(0.0, self.max_latency_s - waited)

    def ready(self) -> bool:
        remaining = self.time_until_ready()
        return remaining is not None and remaining <= 0.0

    def take(self) -> list[SourceRecord]:
        """Remove and return up to ``batch_size`` of the oldest records (maybe none)."""
        count = min(self.batch_size, len(self._buffer))
        popleft = self._buffer.popleft
        return [popleft()[1] for _ in range(count)]

    def drop_partitions(self, partitions: Collection[TopicPartitionKey]) -> int:
        """Forget buffered records of revoked partitions; returns how many were dropped.

        Safe because nothing of theirs was committed: the partition's next owner (maybe this
        consumer again) fetches them again from the committed offset.
        """
        if not partitions or not self._buffer:
            return 0
        doomed = set(partitions)
        before = len(self._buffer)
        self._buffer = deque(
            item for item in self._buffer if (item[1].topic, item[1].partition) not in doomed
        )
        return before - len(self._buffer)

    def drop_from(self, partition: TopicPartitionKey, offset: int) -> int:
        """Forget buffered records of ``partition`` at or after ``offset``; returns how many.

        Used when the consumer's fetch position went back (a rebalance re-fetching from the
        committed offset): those records are about to arrive again, and keeping both copies
        would deliver them twice.
        """
        before = len(self._buffer)
        self._buffer = deque(
            item
            for item in self._buffer
            if (item[1].topic, item[1].partition) != partition or item[1].offset < offset
        )
        return before - len(self._buffer)
