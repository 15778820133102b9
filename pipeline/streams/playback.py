"""Replay a built-in scenario or a labeled file into the events topic.

Each event is keyed by its id, so one id always lands on the same partition (a replayed
duplicate meets its original in order, and the bank's idempotence by id does the rest).
Lines of a JSONL file are sent as they are: a line that is not a JSON object is still sent,
without a key, and the learner's consumer dead-letters it with a reason. CSV, NPZ and Parquet
files are parsed and checked up front by :func:`~pipeline.streams.files.load_labeled_file`.

Pacing is a token bucket: ``rate`` events/s on average with a burst of at most
:data:`BURST_S` seconds' worth, so a slow producer call does not make the next ones race.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from pipeline.config import Settings
from pipeline.exceptions import ConfigError
from pipeline.streams.files import load_jsonl, load_labeled_file
from pipeline.streams.scenarios import SCENARIOS, Scenario, get_scenario

if TYPE_CHECKING:
    from consumers.producer import JsonProducer

log = structlog.get_logger(__name__)

# Parsed into events up front; JSONL is not, so that its malformed lines reach the DLQ.
LABELED_SUFFIXES = frozenset({".csv", ".npz", ".parquet"})
BURST_S = 0.05
PROGRESS_EVERY_S = 5.0
FLUSH_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """What a replay produced; also passed to ``progress`` while it runs."""

    source: str
    topic: str
    sent: int
    total: int | None  # events the source holds (after ``limit``), None for files
    unkeyed: int  # lines sent without a key because they are not a JSON object with an id
    elapsed_s: float
    done: bool

    @property
    def events_per_s(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "events_per_s": round(self.events_per_s, 1)}


ProgressFn = Callable[[ReplayReport], None]


class TokenBucket:
    """Allows ``rate`` acquisitions per second on average, bursts up to ``burst``."""

    def __init__(
        self,
        rate: float,
        burst: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.rate = rate
        self.burst = max(1.0, burst)
        self._clock = clock
        self._sleep = sleep
        self._tokens = 1.0
        self._last = clock()

    def acquire(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < 1.0:
            # Sleep for the deficit only; the time actually slept is credited on the next
            # call, so oversleeping does not lower the average rate.
            self._sleep((1.0 - self._tokens) / self.rate)
            now = self._clock()
            self._tokens += (now - self._last) * self.rate
            self._last = now
        self._tokens -= 1.0


def _scenario_messages(scenario: Scenario) -> tuple[Iterator[tuple[bytes, str | None]], int]:
    def messages() -> Iterator[tuple[bytes, str | None]]:
        for event in scenario:
            yield orjson.dumps(event), str(event["id"])

    return messages(), scenario.n_events


def _key_of(line: bytes) -> str | None:
    """The event id of a JSONL line, or None when the line is not an object with an id."""
    try:
        parsed = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if isinstance(parsed, dict) and isinstance(parsed.get("id"), str | int):
        return str(parsed["id"])
    return None


def labeled_source(source: str, seed: int = 0) -> Scenario:
    """The :class:`Scenario` of a built-in scenario's name or a labeled file (JSONL, CSV, NPZ,
    Parquet), read and checked: what a caller needs to know of a stream before replaying
    it (its width, classes, tasks and length); :func:`run_replay` takes it as it is."""
    if source in SCENARIOS:
        return get_scenario(source, seed)
    if Path(source).is_file():
        return load_labeled_file(source)
    known = ", ".join(sorted(SCENARIOS))
    raise ConfigError(
        f"source {source!r} is neither a built-in scenario ({known}) nor a readable file"
    )


def open_source(
    source: str | Scenario, seed: int
) -> tuple[Iterator[tuple[bytes, str | None]], int | None]:
    """The (value, key) messages of ``source`` and their number (None for JSONL, not counted).

    ``source`` is a built-in scenario's name, a file path or an already-read
    :class:`Scenario`; a labeled file (CSV, NPZ, Parquet) is read and checked here, a JSONL
    file is only opened.
    """
    if isinstance(source, Scenario):
        return _scenario_messages(source)
    path = Path(source)
    if source not in SCENARIOS and path.is_file() and path.suffix.lower() not in LABELED_SUFFIXES:
        # load_jsonl opens eagerly: an unreadable file fails here, before any topic work.
        lines = load_jsonl(path)
        return ((line, _key_of(line)) for line in lines), None
    return _scenario_messages(labeled_source(source, seed))


@contextlib.contextmanager
def acknowledged(producer: JsonProducer) -> Iterator[JsonProducer]:
    """``producer``, closed on leaving; on a normal exit every record sent inside is first
    acknowledged by the broker (or this raises), so a report may say "done"."""
    try:
        yield producer
        # The budget scales with what the producer may still buffer (32 MiB).
        producer.flush(timeout_s=FLUSH_TIMEOUT_S)
        producer.close()
    except BaseException:
        # Already failing (or interrupted): release the client without a second long flush.
        with contextlib.suppress(Exception):
            producer.close(timeout_s=1.0)
        raise


def run_replay(
    settings: Settings,
    source: str | Scenario,
    *,
    rate: float | None = None,
    limit: int | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> ReplayReport:
    """Produce ``source`` to the events topic at ``rate`` events/s (None: unpaced); a
    :class:`Scenario` already read (:func:`labeled_source`) is produced without reading its
    file again."""
    from consumers.admin import ensure_topics
    from consumers.producer import JsonProducer

    if rate is not None and rate <= 0:
        raise ConfigError(f"replay rate must be > 0 events/s, got {rate}")
    if limit is not None and limit < 0:
        raise ConfigError(f"replay limit must be >= 0, got {limit}")
    messages, total = open_source(source, seed)
    name = source.name if isinstance(source, Scenario) else source
    if limit is not None and total is not None:
        total = min(total, limit)
    kafka = settings.kafka
    topic = kafka.events_topic
    options = kafka.client_options()
    ensure_topics(options, [topic], kafka.partitions, kafka.replication_factor, timeout_s=30.0)
    bucket = TokenBucket(rate, rate * BURST_S) if rate is not None else None
    log.info("replay starting", source=name, topic=topic, rate=rate, limit=limit, total=total)

    started = time.monotonic()
    next_progress = started + PROGRESS_EVERY_S
    sent = unkeyed = 0

    def report(done: bool) -> ReplayReport:
        elapsed = time.monotonic() - started
        return ReplayReport(name, topic, sent, total, unkeyed, round(elapsed, 3), done)

    with acknowledged(JsonProducer(options)) as producer:
        for value, key in messages:
            if limit is not None and sent >= limit:
                break
            if bucket is not None:
                bucket.acquire()
            producer.send(topic, value, key=key.encode() if key is not None else None)
            sent += 1
            unkeyed += key is None
            now = time.monotonic()
            if now >= next_progress:
                next_progress = now + PROGRESS_EVERY_S
                snapshot = report(done=False)
                log.info(
                    "replay progress",
                    sent=sent,
                    total=total,
                    events_per_s=round(snapshot.events_per_s, 1),
                )
                if progress is not None:
                    progress(snapshot)
    final = report(done=True)
    log.info("replay done", **final.as_dict())
    if progress is not None:
        progress(final)
    return final
