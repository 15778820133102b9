"""Positions in a topic's log: parse ``--from`` / ``--until`` values and resolve them to offsets.

A position is one of ``earliest``, ``latest``, a time (ISO-8601, or epoch milliseconds) or an
explicit ``partition:offset`` list (``0:120,1:98``). :class:`OffsetProbe` resolves positions on
a consumer outside any group (``assign``, never ``subscribe``), so nothing it does moves a
group's committed offsets.

The end of a partition is the **high watermark a fetch reports**, not ``end_offsets()``:
Apache Kafka answers both the same, but Tansu's ``end_offsets()`` is the start of the last
batch + 1 (DESIGN.md). A time past the end means the end. Kafka says so with ``None`` from
``offsets_for_times``; a record whose timestamp is earlier than the one asked for (Tansu
answers offset 0 with timestamp -1) means the same and is treated the same, so neither
broker's answer is taken on trust.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from kafka import KafkaConsumer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from consumers.events import TopicPartitionKey
from consumers.exceptions import BrokerUnavailableError, ConsumerError

PositionKind = Literal["earliest", "latest", "time", "offsets"]
_OFFSETS = re.compile(r"^\s*\d+\s*:\s*\d+\s*(,\s*\d+\s*:\s*\d+\s*)*$")
# Epoch values below this are seconds or a typo, not milliseconds (2001-09-09 in ms).
_MIN_EPOCH_MS = 1_000_000_000_000


class PositionError(ConsumerError, ValueError):
    """A ``--from`` / ``--until`` value that is not a position."""


@dataclass(frozen=True)
class Position:
    """Where to start (or stop) reading; ``text`` is what the user wrote."""

    kind: PositionKind
    text: str
    time_ms: int | None = None
    offsets: Mapping[int, int] = field(default_factory=dict)

    def describe(self) -> str:
        if self.kind == "time" and self.time_ms is not None:
            return f"{format_ms(self.time_ms)} ({self.time_ms} ms)"
        return self.text


def format_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def parse_position(text: str, *, allow_offsets: bool = True) -> Position:
    """``earliest`` | ``latest`` | ISO-8601 time | epoch ms | ``partition:offset,...``.

    An ISO time without a zone is UTC. Raises :class:`PositionError` with one line.
    """
    raw = text.strip()
    if raw in ("earliest", "latest"):
        return Position(raw, raw)  # type: ignore[arg-type]  # narrowed by the test above
    if raw.isdigit():
        ms = int(raw)
        if ms < _MIN_EPOCH_MS:
            raise PositionError(
                f"{text!r} is not a time in epoch milliseconds (too small; seconds?)"
            )
        return Position("time", raw, time_ms=ms)
    if allow_offsets and _OFFSETS.match(raw):
        pairs = [part.split(":") for part in raw.split(",")]
        offsets: dict[int, int] = {}
        for p, o in pairs:
            if int(p) in offsets:
                raise PositionError(f"partition {int(p)} is given twice in {text!r}")
            offsets[int(p)] = int(o)
        return Position("offsets", raw, offsets=offsets)
    try:
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        kinds = "earliest, latest, an ISO-8601 time, epoch milliseconds"
        if allow_offsets:
            kinds += " or partition:offset[,partition:offset...]"
        raise PositionError(f"{text!r} is not a position: expected {kinds}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return Position("time", raw, time_ms=int(parsed.timestamp() * 1000))


@dataclass(frozen=True)
class PartitionExtent:
    """A partition's first offset and its end (the next offset to be written)."""

    beginning: int
    end: int


class OffsetProbe:
    """A group-less consumer that answers where a topic's partitions begin and end.

    Use as a context manager; every call may raise :class:`BrokerUnavailableError`.
    """

    def __init__(
        self, client_options: Mapping[str, Any], topic: str, timeout_s: float = 30.0
    ) -> None:
        self.topic = topic
        self._timeout_s = timeout_s
        try:
            self._consumer = KafkaConsumer(
                **client_options,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                # A probe's fetches only carry the high watermark back: keep them small.
                max_partition_fetch_bytes=1024,
            )
        except KafkaError as exc:
            raise BrokerUnavailableError(f"cannot reach the Kafka brokers: {exc}") from exc
        self._extents: dict[int, PartitionExtent] | None = None

    def __enter__(self) -> OffsetProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._consumer.close(autocommit=False)

    def partitions(self) -> list[int]:
        """The topic's partitions (empty when the topic does not exist)."""
        found = self._consumer.partitions_for_topic(self.topic)
        return sorted(found) if found else []

    def extents(self) -> dict[int, PartitionExtent]:
        """Beginning and end of every partition; the end is a fetch's high watermark."""
        if self._extents is not None:
            return self._extents
        parts = [TopicPartition(self.topic, p) for p in self.partitions()]
        if not parts:
            self._extents = {}
            return self._extents
        try:
            beginnings = self._consumer.beginning_offsets(parts)
            # A near-end seek keeps the fetch tiny; its answer carries the true end.
            near_end = self._consumer.end_offsets(parts)
        except KafkaError as exc:
            raise BrokerUnavailableError(f"listing offsets of {self.topic} failed: {exc}") from exc
        self._consumer.assign(parts)
        for tp in parts:
            self._consumer.seek(tp, near_end[tp])
        ends: dict[int, int] = {}
        deadline = time.monotonic() + self._timeout_s
        while len(ends) < len(parts):
            if time.monotonic() > deadline:
                missing = sorted(tp.partition for tp in parts if tp.partition not in ends)
                raise BrokerUnavailableError(
                    f"no fetch answer from {self.topic} partitions {missing} "
                    f"within {self._timeout_s:.0f} s"
                )
            self._consumer.poll(timeout_ms=200, max_records=1)
            for tp in parts:
                highwater = self._consumer.highwater(tp)
                if highwater is not None:
                    ends[tp.partition] = highwater
        self._consumer.unsubscribe()
        self._extents = {
            tp.partition: PartitionExtent(beginnings[tp], ends[tp.partition]) for tp in parts
        }
        return self._extents

    def offsets_at(self, time_ms: int) -> dict[int, int]:
        """Per partition, the first offset whose timestamp is >= ``time_ms``, else the end."""
        extents = self.extents()
        parts = [TopicPartition(self.topic, p) for p in extents]
        try:
            found = self._consumer.offsets_for_times(dict.fromkeys(parts, time_ms))
        except KafkaError as exc:
            raise BrokerUnavailableError(f"offsets_for_times on {self.topic}: {exc}") from exc
        out: dict[int, int] = {}
        for tp in parts:
            hit = found.get(tp)
            past_end = hit is None or hit.timestamp < time_ms
            out[tp.partition] = extents[tp.partition].end if past_end else hit.offset
        return out

    def resolve(self, position: Position) -> dict[TopicPartitionKey, int]:
        """Offsets of ``position`` for every partition of the topic."""
        extents = self.extents()
        if position.kind == "earliest":
            per = {p: e.beginning for p, e in extents.items()}
        elif position.kind == "latest":
            per = {p: e.end for p, e in extents.items()}
        elif position.kind == "time":
            assert position.time_ms is not None
            per = self.offsets_at(position.time_ms)
        else:
            unknown = sorted(set(position.offsets) - set(extents))
            if unknown:
                raise PositionError(
                    f"{self.topic} has no partition {unknown} (it has {sorted(extents)})"
                )
            per = dict(position.offsets)
        return {(self.topic, p): o for p, o in sorted(per.items())}

    def beyond_end(
        self, offsets: Mapping[TopicPartitionKey, int]
    ) -> dict[TopicPartitionKey, tuple[int, int]]:
        """``{partition: (offset, end)}`` for offsets past their partition's end.

        A partition the topic no longer has counts as ending at 0.
        """
        extents = self.extents()
        out: dict[TopicPartitionKey, tuple[int, int]] = {}
        for (topic, p), offset in sorted(offsets.items()):
            if topic != self.topic:
                continue
            end = extents[p].end if p in extents else 0
            if offset > end:
                out[(topic, p)] = (offset, end)
        return out
