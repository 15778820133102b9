"""Test helpers that ship with the package: a Kafka-free event source and its contract suite.

``InMemorySource`` lets you unit-test code that consumes an
:class:`~consumers.protocols.EventSource` (a custom encoder, a training loop) with no broker.

``EventSourceContract`` is the behaviour every source must have. Subclass it in a pytest
module (``class TestMySource(EventSourceContract)``) and provide a ``source_factory`` fixture;
the same suite runs against :class:`InMemorySource` and the Kafka source.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import orjson

from consumers.decode import decode_batch
from consumers.events import DeadLetter, EventBatch, SourceRecord, TopicPartitionKey
from consumers.exceptions import SourceClosedError
from consumers.protocols import NO_OFFSETS, STAT_COUNTERS, EventSource, labelled

# Re-exported for the tests that read topics back; tools import it from consumers.reading.
from consumers.reading import read_topic_json  # noqa: F401


class InMemorySource:
    """An :class:`EventSource` over a fixed list of records, decoded in batches of ``batch_size``.

    Records come out in the given order (so in order per partition when the input is), cut
    into batches of ``batch_size``; there is no latency timer. Dead letters are kept in
    :attr:`dead_letters` instead of a DLQ topic. ``get`` returns None at once when all records
    were delivered.
    """

    def __init__(
        self,
        records: Sequence[SourceRecord],
        batch_size: int,
        input_dim: int,
        max_event_bytes: int = 65_536,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._records = list(records)
        self._batch_size = batch_size
        self._input_dim = input_dim
        self._max_event_bytes = max_event_bytes
        self._todo: list[SourceRecord] = []
        self._cursor = 0
        self._started = False
        self._stopped = False
        self._counters: Counter[str] = Counter()
        self._committed: dict[TopicPartitionKey, int] = {}
        self._positions: dict[TopicPartitionKey, int] = {}
        self._highwater: dict[TopicPartitionKey, int] = {}
        for r in self._records:
            key = (r.topic, r.partition)
            self._highwater[key] = max(self._highwater.get(key, 0), r.offset + 1)
        self.dead_letters: list[DeadLetter] = []

    def start(self, resume_offsets: Mapping[TopicPartitionKey, int] = NO_OFFSETS) -> None:
        if self._started:
            raise RuntimeError("InMemorySource.start() called twice")
        self._started = True
        floors = {(str(t), int(p)): int(o) for (t, p), o in resume_offsets.items()}
        self._todo = [
            r for r in self._records if r.offset >= floors.get((r.topic, r.partition), -1)
        ]
        self._counters["skipped"] = len(self._records) - len(self._todo)
        self._counters["polled"] = len(self._records)
        for r in self._records:  # "polled" everything up front, like a consumer with a big fetch
            key = (r.topic, r.partition)
            self._positions[key] = max(self._positions.get(key, 0), r.offset + 1)

    def get(self, timeout_s: float) -> EventBatch | None:
        self._check_open()
        if self._cursor >= len(self._todo):
            return None
        chunk = self._todo[self._cursor : self._cursor + self._batch_size]
        self._cursor += len(chunk)
        batch = decode_batch(chunk, self._input_dim, self._max_event_bytes)
        self.dead_letters.extend(batch.dead_letters)
        self._counters["batches"] += 1
        self._counters["events"] += len(batch)
        self._counters["dead_lettered"] += len(batch.dead_letters)
        return batch

    def commit(self, offsets: Mapping[TopicPartitionKey, int]) -> None:
        self._check_open()
        for (topic, partition), offset in offsets.items():
            key = (str(topic), int(partition))
            if offset > self._committed.get(key, -1):
                self._committed[key] = int(offset)
        self._counters["commits"] += 1

    def commit_sync(self, offsets: Mapping[TopicPartitionKey, int], timeout_s: float) -> bool:
        self.commit(offsets)
        return True

    def stop(self, timeout_s: float = 0.0) -> None:
        self._stopped = True

    def stats(self) -> dict[str, Any]:
        return {
            **{name: self._counters[name] for name in STAT_COUNTERS},
            "paused": False,
            "committed": labelled(self._committed),
            "lag": labelled({k: self._highwater[k] - p for k, p in self._positions.items()}),
            "queue_depth": 0,
        }

    def assignment(self) -> set[TopicPartitionKey]:
        return set(self._highwater)

    def _check_open(self) -> None:
        if self._stopped:
            raise SourceClosedError("the source is stopped")
        if not self._started:
            raise SourceClosedError("the source is not started")


# ---- contract suite -----------------------------------------------------------------------

CONTRACT_INPUT_DIM: Final = 4
CONTRACT_PARTITIONS: Final = 2
CONTRACT_PER_PARTITION: Final = 25

#: ``source_factory(payloads, batch_size) -> (source, topic)``: a NOT yet started source that
#: will read exactly ``payloads`` (``(partition, value)``, in order) from ``topic``, each
#: partition's offsets starting at 0, decoded with ``input_dim=CONTRACT_INPUT_DIM``.
SourceFactory = Callable[[Sequence[tuple[int, bytes | None]], int], tuple[EventSource, str]]


def contract_payloads() -> list[tuple[int, bytes | None]]:
    """Valid events with a few bad ones mixed in: ``not_json`` and ``empty``."""
    payloads: list[tuple[int, bytes | None]] = []
    for partition in range(CONTRACT_PARTITIONS):
        for i in range(CONTRACT_PER_PARTITION):
            if i % 10 == 7:
                payloads.append((partition, b"{not json"))
            elif partition == 1 and i == 12:
                payloads.append((partition, None))
            else:
                event = {
                    "id": f"p{partition}-{i}",
                    "ts": 1_000 + i,
                    "features": [float(i), float(partition), 0.5, -1],
                    "label": i % 3,
                }
                payloads.append((partition, orjson.dumps(event)))
    return payloads


def drain(source: EventSource, consumed: int, timeout_s: float = 30.0) -> list[EventBatch]:
    """Read batches until they account for ``consumed`` records (or the time runs out)."""
    batches: list[EventBatch] = []
    seen = 0
    deadline = time.monotonic() + timeout_s
    while seen < consumed and time.monotonic() < deadline:
        batch = source.get(1.0)
        if batch is not None:
            batches.append(batch)
            seen += batch.consumed
    return batches


def merged_offsets(batches: Sequence[EventBatch]) -> dict[TopicPartitionKey, int]:
    offsets: dict[TopicPartitionKey, int] = {}
    for batch in batches:
        for key, offset in batch.offsets.items():
            offsets[key] = max(offset, offsets.get(key, offset))
    return offsets


class EventSourceContract:
    """Behaviour shared by every EventSource; needs a ``source_factory`` fixture."""

    batch_size: int = 8

    def test_every_record_once_in_order(self, source_factory: SourceFactory) -> None:
        payloads = contract_payloads()
        source, topic = source_factory(payloads, self.batch_size)
        source.start()
        batches = drain(source, len(payloads))

        assert sum(b.consumed for b in batches) == len(payloads)
        for batch in batches:
            assert len(batch) + len(batch.dead_letters) == batch.consumed
            assert batch.features.shape == (len(batch), CONTRACT_INPUT_DIM)
        ids = [event_id for b in batches for event_id in b.ids]
        expected_ids = [
            orjson.loads(v)["id"] for _, v in payloads if v is not None and v.startswith(b'{"')
        ]
        assert Counter(ids) == Counter(expected_ids)  # each valid event exactly once

        # Per partition, valid and dead records together are 0..n-1 in delivery order.
        per_partition: dict[int, list[int]] = {}
        for batch in batches:
            rows = [*batch.sources, *(dl.source for dl in batch.dead_letters)]
            for record in sorted(rows, key=lambda r: (r.partition, r.offset)):
                assert record.topic == topic
                per_partition.setdefault(record.partition, []).append(record.offset)
        for partition in range(CONTRACT_PARTITIONS):
            assert per_partition[partition] == list(range(CONTRACT_PER_PARTITION))

        reasons = Counter(dl.reason for b in batches for dl in b.dead_letters)
        assert reasons == {"not_json": 2 * CONTRACT_PARTITIONS, "empty": 1}
        assert merged_offsets(batches) == {
            (topic, p): CONTRACT_PER_PARTITION for p in range(CONTRACT_PARTITIONS)
        }
        # Labels normalised to str, event timestamps kept.
        first = next(b for b in batches if len(b))
        assert all(label in {"0", "1", "2"} for label in first.labels)
        assert int(first.timestamps_ms.min()) >= 1_000
        assert source.get(0.5) is None  # nothing more, nothing twice
        stats = source.stats()
        assert stats["events"] == len(expected_ids)
        assert stats["dead_lettered"] == sum(reasons.values())
        assert {(topic, p) for p in range(CONTRACT_PARTITIONS)} <= source.assignment()
        source.stop(10.0)

    def test_commit_and_commit_sync(self, source_factory: SourceFactory) -> None:
        payloads = contract_payloads()
        source, _ = source_factory(payloads, self.batch_size)
        source.start()
        batches = drain(source, len(payloads))
        final = merged_offsets(batches)
        source.commit(batches[0].offsets)  # asynchronous request, served in order
        assert source.commit_sync(final, 15.0) is True
        assert source.stats()["committed"] == labelled(final)
        # A stale (lower) request is not an error and does not move the offsets back.
        assert source.commit_sync(batches[0].offsets, 15.0) is True
        assert source.stats()["committed"] == labelled(final)
        source.stop(10.0)

    def test_resume_offsets_skip_covered_records(self, source_factory: SourceFactory) -> None:
        payloads = contract_payloads()
        source, topic = source_factory(payloads, self.batch_size)
        source.start({(topic, 0): 10})
        batches = drain(source, len(payloads) - 10)
        offsets0 = [
            r.offset
            for b in batches
            for r in (*b.sources, *(dl.source for dl in b.dead_letters))
            if r.partition == 0
        ]
        assert sorted(offsets0) == list(range(10, CONTRACT_PER_PARTITION))
        assert sum(b.consumed for b in batches) == len(payloads) - 10
        assert source.get(0.5) is None
        # A source either reads the covered records and skips them, or (Kafka) seeks past
        # them and never reads them: what it read minus what it skipped is what it delivered.
        stats = source.stats()
        assert stats["polled"] - stats["skipped"] == len(payloads) - 10
        source.stop(10.0)

    def test_get_after_stop_raises(self, source_factory: SourceFactory) -> None:
        source, _ = source_factory(contract_payloads()[:3], self.batch_size)
        source.start()
        source.stop(10.0)
        try:
            source.get(0.1)
        except SourceClosedError:
            return
        raise AssertionError("get() after stop() must raise SourceClosedError")
