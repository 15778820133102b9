"""Read a slice of a topic, partitions merged in timestamp order, without a consumer group.

Used by topic playback (``supcon-stream replay topic:NAME``). A slice is, per partition, a
start offset (inclusive) and a stop offset (exclusive), resolved once from ``--from`` /
``--until`` positions (:mod:`consumers.positions`); a partition a ``partition:offset`` list
does not name runs from its beginning (``--from``) or to its end (``--until``). The end is the
high watermark when the slice is resolved, so a slice is finite even while producers write.

Records come out merged across partitions by timestamp: one is released only when every
partition still being read has a buffered record (or is finished), so pacing by timestamp
(``--speed``) sees event time move forward. A partition whose buffer grows past
:data:`MAX_BUFFERED` is paused until it drains, so memory stays bounded.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from consumers.exceptions import BrokerUnavailableError
from consumers.positions import OffsetProbe, Position

MAX_BUFFERED: Final = 10_000
STALL_TIMEOUT_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class SliceRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int


@dataclass(frozen=True)
class SliceBounds:
    """Per partition: first offset copied, first offset not copied."""

    topic: str
    start: Mapping[int, int]
    stop: Mapping[int, int]

    @property
    def total(self) -> int:
        """Offsets in the slice (records, unless the log has gaps, as compacted topics do)."""
        return sum(max(0, self.stop[p] - o) for p, o in self.start.items())

    def as_dict(self) -> dict[str, Any]:
        return {
            "start": {str(p): o for p, o in sorted(self.start.items())},
            "stop": {str(p): o for p, o in sorted(self.stop.items())},
        }


def resolve_slice(probe: OffsetProbe, start: Position, until: Position | None) -> SliceBounds:
    """Bounds of the slice [start, until) of ``probe.topic``; stops never pass the end."""
    extents = probe.extents()
    begin = {p: e.beginning for p, e in extents.items()}
    end = {p: e.end for p, e in extents.items()}
    first = {**begin, **{p: o for (_t, p), o in probe.resolve(start).items()}}
    last = dict(end)
    if until is not None:
        last.update({p: o for (_t, p), o in probe.resolve(until).items()})
    start_at = {p: max(first[p], begin[p]) for p in extents}
    stop = {p: max(start_at[p], min(last[p], end[p])) for p in extents}
    return SliceBounds(probe.topic, start_at, stop)


def read_slice(
    client_options: Mapping[str, Any],
    bounds: SliceBounds,
    poll_timeout_ms: int = 500,
    stall_timeout_s: float = STALL_TIMEOUT_S,
) -> Iterator[SliceRecord]:
    """Every record of ``bounds``, merged across partitions by (timestamp, partition, offset).

    Raises :class:`BrokerUnavailableError` when nothing arrives for ``stall_timeout_s`` while
    records are still owed (the broker went away, or the log was truncated under us).
    """
    todo = {p: o for p, o in bounds.start.items() if o < bounds.stop[p]}
    if not todo:
        return
    consumer = KafkaConsumer(
        **client_options, group_id=None, enable_auto_commit=False, auto_offset_reset="none"
    )
    try:
        parts = {p: TopicPartition(bounds.topic, p) for p in todo}
        consumer.assign(list(parts.values()))
        for p, offset in todo.items():
            consumer.seek(parts[p], offset)
        buffers: dict[int, deque[SliceRecord]] = {p: deque() for p in todo}
        reading = set(todo)  # partitions with offsets still to fetch
        last_progress = time.monotonic()
        while reading or any(buffers.values()):
            # Release while every partition still being read has a head to compare.
            while any(buffers.values()) and all(buffers[p] for p in reading):
                heads = [(b[0].timestamp_ms, p, b[0].offset) for p, b in buffers.items() if b]
                _ts, p, _o = min(heads)
                yield buffers[p].popleft()
                drained = len(buffers[p]) < MAX_BUFFERED // 2
                if drained and p in reading and parts[p] in consumer.paused():
                    consumer.resume(parts[p])
            if not reading:
                continue
            if _fetch(consumer, parts, bounds, buffers, reading, poll_timeout_ms):
                last_progress = time.monotonic()
            if reading and time.monotonic() - last_progress > stall_timeout_s:
                where = {p: consumer.position(parts[p]) for p in sorted(reading)}
                raise BrokerUnavailableError(
                    f"reading {bounds.topic} stalled for {stall_timeout_s:.0f} s at {where}"
                )
    finally:
        consumer.close(autocommit=False)


def _fetch(
    consumer: KafkaConsumer,
    parts: dict[int, TopicPartition],
    bounds: SliceBounds,
    buffers: dict[int, deque[SliceRecord]],
    reading: set[int],
    poll_timeout_ms: int,
) -> bool:
    """One poll into the buffers; finished partitions leave ``reading``. True if any came."""
    polled = consumer.poll(timeout_ms=poll_timeout_ms)
    for tp, records in polled.items():
        stop = bounds.stop[tp.partition]
        buffers[tp.partition].extend(
            SliceRecord(tp.partition, r.offset, r.key, r.value, r.timestamp)
            for r in records
            if r.offset < stop
        )
        if len(buffers[tp.partition]) > MAX_BUFFERED:
            consumer.pause(tp)
    for p in list(reading):
        if consumer.position(parts[p]) >= bounds.stop[p]:
            reading.discard(p)
            consumer.pause(parts[p])
    return bool(polled)
