"""What the consumer thread knows of the partitions it is assigned: fetch positions, lag, and
how its buffered records follow rebalances.

:class:`PartitionTracker` belongs to :class:`~consumers.source.KafkaBatchSource`'s consumer
thread. Each poll's records go through :meth:`PartitionTracker.ingest` into the source's
:class:`~consumers.batcher.MicroBatcher`, less those below a partition's start floor (covered
by the learner's checkpoint; :mod:`consumers.start_position`).

Rebalances: the clients' callbacks only record what happened (kafka-python runs its listener
on its network thread, librdkafka inside ``consume``; neither may commit there). The consumer
thread then reconciles after every ``poll`` (:meth:`PartitionTracker.reconcile`): buffered
records of partitions that are no longer assigned are dropped (nothing of theirs was
committed, so their next owner reads them again). A partition revoked and re-assigned to this
same member is NOT dropped: kafka-python 3.x keeps its fetch position across the rebalance, so
dropping its buffered records would skip them until the next restart (seen in tests).
librdkafka instead restarts such a partition from the committed offset: ``ingest`` sees the
position go back and drops the copies it would otherwise deliver twice.

Other threads read :attr:`~PartitionTracker.assigned`, the rebalance times and
:attr:`~PartitionTracker.lag` under the source's stats lock, which the tracker takes when it
changes them (and the counters it bumps: ``polled``, ``skipped``, ``revoked_dropped``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from consumers.batcher import MicroBatcher
from consumers.client import ConsumerClient, Polled
from consumers.events import TopicPartitionKey
from consumers.group import partition_labels
from consumers.start_position import StartPosition


class PartitionTracker:
    """Assignment, next fetch position and lag per partition of one consumer (see the module
    docstring). ``lock`` and ``counters`` are the source's stats lock and counters."""

    def __init__(
        self,
        batcher: MicroBatcher,
        start: StartPosition,
        log: Any,
        lock: threading.Lock,
        counters: Counter[str],
    ) -> None:
        self._batcher = batcher
        self._start = start
        self._log = log
        self._lock = lock
        self._counters = counters
        self._positions: dict[TopicPartitionKey, int] = {}  # consumer thread only
        # Written by the consumer thread under ``lock``; read by others under it.
        self.assigned: frozenset[TopicPartitionKey] = frozenset()
        self.lag: dict[TopicPartitionKey, int] = {}
        # time.monotonic() of the last completed join and of the last revoke (or loss).
        self.assigned_at: float | None = None
        self.revoked_at: float | None = None

    def ingest(self, polled: Polled) -> None:
        """Buffer what a poll returned (its rebalance already reconciled)."""
        polled_count = skipped = 0
        for key, records in polled:
            first = records[0].offset
            expected = self._positions.get(key)
            if expected is not None and first < expected:
                # The fetch position went back (re-fetch from the committed offset after a
                # rebalance): drop the buffered copies of what is coming again.
                dropped = self._batcher.drop_from(key, first)
                self._log.info(
                    "fetch position went back; dropped buffered copies",
                    partition=key[1],
                    expected=expected,
                    got=first,
                    dropped=dropped,
                )
            polled_count += len(records)
            self._positions[key] = records[-1].offset + 1
            floor = self._start.floor.get(key, -1)
            kept = records
            if floor > first:  # covered by the learner's restored checkpoint: trained on
                kept = [r for r in records if r.offset >= floor]
                skipped += len(records) - len(kept)
            self._batcher.add(kept)
        with self._lock:
            self._counters["polled"] += polled_count
            self._counters["skipped"] += skipped

    def reconcile(self, consumer: ConsumerClient) -> set[TopicPartitionKey]:
        """Act on a rebalance that happened during poll() (see the module docstring).

        Returns the partitions just sought to their start position: what the same poll
        returned for them came from the old position and must be dropped.
        """
        events = consumer.drain_rebalances()
        for kind, partitions in events:
            if partitions:
                self._log.info("partitions " + kind, partitions=partition_labels(partitions))
        current = consumer.assignment()
        if not events and current == self.assigned:
            return set()
        sought = self.seek_start(consumer, current)
        gone = [key for key in self._positions if key not in current]
        dropped = self._batcher.drop_partitions(gone)
        for key in gone:
            del self._positions[key]
        if gone:
            self._log.info(
                "dropped buffered records of partitions no longer assigned",
                partitions=partition_labels(gone),
                dropped=dropped,
            )
        with self._lock:
            self.assigned = current
            for kind, _ in events:  # oldest first: the last one tells the state
                if kind == "assigned":
                    self.assigned_at = time.monotonic()
                else:
                    self.revoked_at = time.monotonic()
            self._counters["revoked_dropped"] += dropped
            for key in gone:
                self.lag.pop(key, None)
        return sought

    def seek_start(
        self, consumer: ConsumerClient, assigned: frozenset[TopicPartitionKey]
    ) -> set[TopicPartitionKey]:
        """Seek partitions assigned for the first time to their resume offset."""

        def drop(key: TopicPartitionKey) -> int:
            self._positions.pop(key, None)
            return self._batcher.drop_partitions([key])

        return self._start.seek(consumer, assigned, drop)

    def update_lag(self, consumer: ConsumerClient) -> None:
        lag: dict[TopicPartitionKey, int] = {}
        for key, position in self._positions.items():
            highwater = consumer.highwater(key)
            if highwater is not None:
                lag[key] = max(0, highwater - position)
        with self._lock:
            self.lag.update(lag)
