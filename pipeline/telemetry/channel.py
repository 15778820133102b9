"""The learner's local, durable telemetry channel: one Redis stream per learner.

Stream key: ``<redis.key_prefix>:telemetry:<learner_name>``. Each entry has two fields:
``kind`` (ASCII) and ``data`` (the record's JSON). The records are the types of
:mod:`pipeline.telemetry.records`; the learner writes them with :class:`TelemetryWriter`, the
sidecar reads them back with :class:`TelemetryReader`.

INVARIANT: the learner never blocks on metrics publishing. :meth:`TelemetryWriter.emit`
never raises: when Redis is unreachable it keeps a bounded number of records in memory,
retries them on a later emit (after a back-off, so a dead Redis costs at most one socket
timeout per back-off period), counts what it had to drop, and logs at most once per
``log_every_s``. Telemetry is at-least-once: a write that failed half-way may be repeated.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
import redis
import structlog

from memory_bank.redis_client import make_redis_client
from pipeline.config import RedisSettings
from pipeline.telemetry.records import TelemetryDecodeError, TelemetryRecord, decode_record

log = structlog.get_logger(__name__)

MALFORMED: Final = "malformed"


def stream_key(key_prefix: str, learner_name: str) -> str:
    return f"{key_prefix}:telemetry:{learner_name}"


def telemetry_client(settings: RedisSettings, timeout_s: float = 1.0) -> redis.Redis:
    """A Redis client for the learner's writer that fails fast.

    The writer is on the learner's hot path. With redis-py's defaults a dead Redis stalls a
    call for seconds (socket timeout, then three retries with exponential back-off); this
    client gives up after one immediate retry (which still covers a pooled connection that
    Redis closed while idle) and a short timeout.
    """
    return make_redis_client(
        settings.url,
        settings.username,
        settings.password,
        min(timeout_s, settings.socket_timeout_s),
        settings.tls_options(),
        retries=1,
    )


@dataclass(frozen=True, slots=True)
class TelemetryEntry:
    """One stream entry as read back. ``id`` is the Redis stream id (``"<ms>-<seq>"``).

    ``record`` is None for a kind this version does not know (readers ignore those: forward
    compatibility) and for an entry that could not be decoded; ``kind`` is then
    :data:`MALFORMED` and ``error`` says why. Either way the reader's cursor moves past it.
    """

    learner: str
    id: str
    kind: str
    record: TelemetryRecord | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class WriterStats:
    emitted: int  # records written to Redis
    dropped: int  # records lost: buffer overflow or unencodable payload
    buffered: int  # records waiting for Redis to come back


class TelemetryWriter:
    """Appends telemetry records to the learner's stream; never raises, never stalls long.

    Give it a client from :func:`telemetry_client`: how long one failed round trip stalls
    the caller is the client's timeout and retry policy (the writer only bounds how often
    that happens). Thread-safe: the consumer thread and the training thread may both emit.
    """

    def __init__(
        self,
        client: redis.Redis,
        key_prefix: str,
        learner_name: str,
        maxlen: int,
        *,
        buffer_limit: int = 10_000,
        log_every_s: float = 30.0,
        retry_backoff_s: tuple[float, float] = (0.5, 30.0),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.key = stream_key(key_prefix, learner_name)
        self.learner_name = learner_name
        self._client = client
        self._maxlen = maxlen
        self._buffer: deque[tuple[bytes, bytes]] = deque()
        self._buffer_limit = max(1, buffer_limit)
        self._log_every_s = log_every_s
        self._backoff_min, self._backoff_max = retry_backoff_s
        self._backoff = self._backoff_min
        self._retry_at = 0.0
        self._last_log = float("-inf")
        self._clock = clock
        self._lock = threading.Lock()
        self._emitted = 0
        self._dropped = 0
        self._failing = False

    @property
    def stats(self) -> WriterStats:
        with self._lock:
            return WriterStats(self._emitted, self._dropped, len(self._buffer))

    def emit(self, record: TelemetryRecord) -> None:
        """Queue one record and try to write everything queued. Never raises."""
        kind = record.KIND
        try:
            data = record.to_json()
        except (TypeError, orjson.JSONEncodeError) as exc:
            # A programming error in the payload must not take the learner down either.
            with self._lock:
                self._dropped += 1
                self._maybe_log(
                    "telemetry payload not serialisable; dropped", kind=kind, error=str(exc)
                )
            return
        with self._lock:
            if len(self._buffer) >= self._buffer_limit:
                # Keep the newest records: a current eval matters more than an old step.
                self._buffer.popleft()
                self._dropped += 1
            self._buffer.append((kind.encode(), data))
            if self._clock() >= self._retry_at:
                self._write_buffered()

    def flush(self) -> bool:
        """Try to write the buffer now, ignoring the back-off (shutdown, after ``end``).

        Returns True when nothing is left buffered. Never raises.
        """
        with self._lock:
            if self._buffer:
                self._write_buffered()
            return not self._buffer

    def _write_buffered(self) -> None:
        # Called with the lock held.
        pending = list(self._buffer)
        try:
            pipe = self._client.pipeline(transaction=False)
            for kind, data in pending:
                pipe.xadd(
                    self.key,
                    {"kind": kind, "data": data},
                    maxlen=self._maxlen,
                    approximate=True,  # "~": trimming whole radix nodes is much cheaper
                )
            pipe.execute()
        except Exception as exc:  # noqa: BLE001 - INVARIANT: emit never raises into the learner
            self._failing = True
            self._retry_at = self._clock() + self._backoff
            self._backoff = min(self._backoff * 2, self._backoff_max)
            self._maybe_log(
                "telemetry write failed; buffering",
                error=f"{type(exc).__name__}: {exc}",
                buffered=len(self._buffer),
                dropped=self._dropped,
            )
            return
        self._buffer.clear()
        self._emitted += len(pending)
        self._backoff = self._backoff_min
        self._retry_at = 0.0
        if self._failing:
            self._failing = False
            log.info("telemetry writes recovered", key=self.key, dropped=self._dropped)

    def _maybe_log(self, event: str, **fields: Any) -> None:
        now = self._clock()
        if now - self._last_log >= self._log_every_s:
            self._last_log = now
            log.warning(event, key=self.key, **fields)


class TelemetryReader:
    """Reads the telemetry streams of many learners (the sidecar's side)."""

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self._client = client
        self._key_prefix = key_prefix
        self._stream_prefix = stream_key(key_prefix, "")

    def key(self, learner: str) -> str:
        return stream_key(self._key_prefix, learner)

    def discover(self) -> list[str]:
        """Names of the learners that have a telemetry stream, sorted."""
        names = set()
        for raw in self._client.scan_iter(
            match=f"{self._stream_prefix}*", count=500, _type="STREAM"
        ):
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            name = key[len(self._stream_prefix) :]
            if name:
                names.add(name)
        return sorted(names)

    def read(
        self, cursors: Mapping[str, str], block_ms: int | None = None, count: int = 500
    ) -> list[TelemetryEntry]:
        """Records after each learner's cursor (``"0-0"`` = from the start), in stream order
        per learner. ``block_ms`` > 0 waits up to that long for the first record; ``None``
        or 0 returns at once (Redis reads ``BLOCK 0`` as "forever")."""
        if not cursors:
            return []
        streams = {self.key(name): last_id for name, last_id in cursors.items()}
        block = block_ms if block_ms and block_ms > 0 else None
        # redis-py's stubs type replies loosely (and RESP2 vs RESP3 differ): read them as Any.
        reply: Any = self._client.xread(streams, count=count, block=block)  # type: ignore[arg-type]
        found: list[TelemetryEntry] = []
        for raw_key, entries in reply or []:
            key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
            learner = key[len(self._stream_prefix) :]
            found.extend(decode_entry(learner, entry_id, fields) for entry_id, fields in entries)
        return found

    def read_range(
        self, learner: str, after_id: str, until_id: str, count: int = 1000
    ) -> list[TelemetryEntry]:
        """Records with ``after_id < id <= until_id`` (at most ``count``), oldest first."""
        start = "-" if after_id in ("0", "0-0") else f"({after_id}"
        entries: Any = self._client.xrange(self.key(learner), min=start, max=until_id, count=count)
        return [decode_entry(learner, entry_id, fields) for entry_id, fields in entries]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_entry(learner: str, entry_id: Any, fields: Mapping[Any, Any] | None) -> TelemetryEntry:
    """One raw stream entry (``{"kind": ..., "data": ...}``, bytes or str) as a typed entry;
    never raises: a malformed one is logged and returned with kind :data:`MALFORMED`."""
    entry = _text(entry_id)
    by_name = {_text(k): v for k, v in (fields or {}).items()}
    try:
        kind = _text(by_name["kind"])
        return TelemetryEntry(learner, entry, kind, decode_record(kind, by_name["data"]))
    except (KeyError, UnicodeDecodeError, TelemetryDecodeError) as exc:
        error = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        log.warning("malformed telemetry entry", learner=learner, id=entry, error=error)
        return TelemetryEntry(learner, entry, MALFORMED, None, error)
