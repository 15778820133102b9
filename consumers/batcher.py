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
    """Buffer of raw records in arrival order, cut into batches of at most ``batch_size``.

    Records are kept in the chunks they arrived in (one list per poll and partition, with the
    poll's arrival time), so buffering and cutting cost a slice per chunk, not work per record.
    """

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
        # (arrival time, records); arrival times are non-decreasing, so the left end is oldest.
        self._chunks: deque[tuple[float, list[SourceRecord]]] = deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, records: Iterable[SourceRecord]) -> None:
        """Buffer records; they share one arrival time (the poll that returned them)."""
        chunk = list(records)
        if chunk:
            self._chunks.append((self._clock(), chunk))
            self._size += len(chunk)

    def time_until_ready(self) -> float | None:
        """Seconds until :meth:`ready` turns true without new records; None when empty.

        The consumer thread caps its poll timeout with this so a partial batch leaves on time.
        """
        if not self._size:
            return None
        if self._size >= self.batch_size:
            return 0.0
        waited = self._clock() - self._chunks[0][0]
        return max(0.0, self.max_latency_s - waited)

    def ready(self) -> bool:
        remaining = self.time_until_ready()
        return remaining is not None and remaining <= 0.0

    def take(self) -> list[SourceRecord]:
        """Remove and return up to ``batch_size`` of the oldest records (maybe none)."""
        out: list[SourceRecord] = []
        want = self.batch_size
        while want and self._chunks:
            arrived, chunk = self._chunks[0]
            if len(chunk) <= want:
                self._chunks.popleft()
                out.extend(chunk)
                want -= len(chunk)
            else:
                out.extend(chunk[:want])
                self._chunks[0] = (arrived, chunk[want:])
                want = 0
        self._size -= len(out)
        return out

    def _keep(self, keep: Callable[[SourceRecord], bool]) -> int:
        """Keep only the records ``keep`` accepts; returns how many were dropped."""
        before = self._size
        kept: deque[tuple[float, list[SourceRecord]]] = deque()
        for arrived, chunk in self._chunks:
            rest = [r for r in chunk if keep(r)]
            if rest:
                kept.append((arrived, rest))
        self._chunks = kept
        self._size = sum(len(chunk) for _, chunk in kept)
        return before - self._size

    def drop_partitions(self, partitions: Collection[TopicPartitionKey]) -> int:
        """Forget buffered records of revoked partitions; returns how many were dropped.

        Safe because nothing of theirs was committed: the partition's next owner (maybe this
        consumer again) fetches them again from the committed offset.
        """
        if not partitions or not self._size:
            return 0
        doomed = set(partitions)
        return self._keep(lambda r: (r.topic, r.partition) not in doomed)

    def drop_from(self, partition: TopicPartitionKey, offset: int) -> int:
        """Forget buffered records of ``partition`` at or after ``offset``; returns how many.

        Used when the consumer's fetch position went back (a rebalance re-fetching from the
        committed offset): those records are about to arrive again, and keeping both copies
        would deliver them twice.
        """
        return self._keep(lambda r: (r.topic, r.partition) != partition or r.offset < offset)
