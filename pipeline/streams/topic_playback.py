"""Playback of a slice of an archive topic into the events topic (``replay topic:NAME``).

The slice is ``[--from, --until)`` per partition (times or ``partition:offset`` lists, see
:mod:`consumers.slice`). Every record keeps its key (so an id lands on the same partition as
before, and the bank's idempotence by id holds) and its original timestamp. Pacing:

* unpaced (default), or ``--rate`` events/s (the token bucket of ``playback``);
* ``--speed X``: X times the original pace. Record *i* is sent once
  ``(t_i - t_0) / X`` seconds have passed since the first was sent, ``t`` being the record
  timestamp (``--pace-by record``) or the event's own ``ts`` field (``--pace-by event``,
  the record timestamp where an event has none). A late producer never makes the next
  records race to catch up beyond their due time; it only sends them at once.

Progress (events, event-time position, rate) goes to the log, on stderr, every
:data:`~pipeline.streams.playback.PROGRESS_EVERY_S` seconds; the final report to stdout.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import structlog

from consumers.admin import ensure_topics
from consumers.positions import OffsetProbe, Position, format_ms
from consumers.producer import JsonProducer
from consumers.slice import SliceBounds, SliceRecord, read_slice, resolve_slice
from pipeline.config import Settings
from pipeline.exceptions import ConfigError
from pipeline.streams.playback import BURST_S, PROGRESS_EVERY_S, TokenBucket, acknowledged

log = structlog.get_logger(__name__)

TOPIC_SOURCE = "topic:"
PaceBy = Literal["record", "event"]


class SpeedPacer:
    """Holds each record until ``(t - t_first) / speed`` seconds after the first was sent."""

    def __init__(
        self,
        speed: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.speed = speed
        self._clock = clock
        self._sleep = sleep
        self._first_ms: int | None = None
        self._started = 0.0

    def wait(self, event_ms: int) -> None:
        if self._first_ms is None:
            self._first_ms, self._started = event_ms, self._clock()
            return
        due = self._started + max(0, event_ms - self._first_ms) / 1000 / self.speed
        delay = due - self._clock()
        if delay > 0:
            self._sleep(delay)


def event_time_ms(record: SliceRecord, pace_by: PaceBy) -> int:
    """The time pacing follows: the record's timestamp, or the event's ``ts`` field."""
    if pace_by == "event":
        with contextlib.suppress(orjson.JSONDecodeError):
            doc = orjson.loads(record.value)
            if isinstance(doc, dict) and type(doc.get("ts")) is int and doc["ts"] >= 0:
                return int(doc["ts"])
    return record.timestamp_ms


@dataclass(frozen=True)
class TopicPlaybackReport:
    source: str
    topic: str
    sent: int
    total: int  # offsets in the slice
    elapsed_s: float
    first_ms: int | None  # event time of the first and last record sent
    last_ms: int | None
    bounds: dict[str, Any] = field(default_factory=dict)
    done: bool = False

    @property
    def events_per_s(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "topic": self.topic,
            "sent": self.sent,
            "total": self.total,
            "elapsed_s": self.elapsed_s,
            "events_per_s": round(self.events_per_s, 1),
            "event_time_from": format_ms(self.first_ms) if self.first_ms is not None else None,
            "event_time_to": format_ms(self.last_ms) if self.last_ms is not None else None,
            "event_time_span_s": (
                round((self.last_ms - self.first_ms) / 1000, 3)
                if self.first_ms is not None and self.last_ms is not None
                else None
            ),
            "slice": self.bounds,
            "done": self.done,
        }


@dataclass(frozen=True)
class TopicPlayback:
    """What to copy and how fast (the ``replay topic:NAME`` options)."""

    source_topic: str
    start: Position
    until: Position | None = None
    rate: float | None = None
    speed: float | None = None
    pace_by: PaceBy = "record"
    limit: int | None = None


def run_topic_playback(
    settings: Settings,
    plan: TopicPlayback,
    progress: Callable[[TopicPlaybackReport], None] | None = None,
) -> TopicPlaybackReport:
    """Copy the slice into ``settings.kafka.events_topic``; returns once all is acknowledged."""
    kafka = settings.kafka
    topic = kafka.events_topic
    if plan.source_topic == topic:
        raise ConfigError(
            f"replay: {TOPIC_SOURCE}{topic} is the events topic itself; "
            "copy into another namespace with --to-prefix"
        )
    if plan.rate is not None and plan.speed is not None:
        raise ConfigError("replay: --rate and --speed exclude each other")
    options = kafka.client_options()
    with OffsetProbe(options, plan.source_topic) as probe:
        if not probe.partitions():
            raise ConfigError(f"replay: topic {plan.source_topic!r} does not exist")
        try:
            bounds = resolve_slice(probe, plan.start, plan.until)
        except ValueError as exc:
            raise ConfigError(f"replay: {exc}") from None
    ensure_topics(options, [topic], kafka.partitions, kafka.replication_factor, timeout_s=30.0)
    log.info(
        "topic playback starting",
        source=plan.source_topic,
        topic=topic,
        offsets=bounds.total,
        slice=bounds.as_dict(),
        speed=plan.speed,
        rate=plan.rate,
    )
    return _copy(options, plan, bounds, topic, progress)


def _copy(
    options: dict[str, Any],
    plan: TopicPlayback,
    bounds: SliceBounds,
    topic: str,
    progress: Callable[[TopicPlaybackReport], None] | None,
) -> TopicPlaybackReport:
    """Read, pace, produce; flush before reporting done (every record acknowledged)."""
    pacer = SpeedPacer(plan.speed) if plan.speed else None
    bucket = TokenBucket(plan.rate, plan.rate * BURST_S) if plan.rate else None
    started = time.monotonic()
    next_progress = started + PROGRESS_EVERY_S
    sent = 0
    first_ms: int | None = None
    last_ms: int | None = None

    def report(done: bool) -> TopicPlaybackReport:
        elapsed = round(time.monotonic() - started, 3)
        source = f"{TOPIC_SOURCE}{plan.source_topic}"
        return TopicPlaybackReport(
            source, topic, sent, bounds.total, elapsed, first_ms, last_ms, bounds.as_dict(), done
        )

    with acknowledged(JsonProducer(options)) as producer:
        for record in read_slice(options, bounds):
            if plan.limit is not None and sent >= plan.limit:
                break
            at = event_time_ms(record, plan.pace_by)
            if pacer is not None:
                pacer.wait(at)
            elif bucket is not None:
                bucket.acquire()
            producer.send(topic, record.value, key=record.key, timestamp_ms=record.timestamp_ms)
            sent += 1
            first_ms = at if first_ms is None else first_ms
            last_ms = at
            now = time.monotonic()
            if now >= next_progress:
                next_progress = now + PROGRESS_EVERY_S
                snap = report(done=False)
                log.info(
                    "topic playback progress",
                    sent=sent,
                    total=bounds.total,
                    event_time=format_ms(at),
                    events_per_s=round(snap.events_per_s, 1),
                )
                if progress is not None:
                    progress(snap)
    final = report(done=True)
    log.info("topic playback done", **final.as_dict())
    if progress is not None:
        progress(final)
    return final
