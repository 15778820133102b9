"""The sidecar process: learner telemetry (Redis streams) → rolling metrics (Kafka).

Its own process (``supcon-stream sidecar``), restartable without touching any learner. Loop:
discover learners → read new telemetry → :meth:`SidecarState.apply` (pure, in
:mod:`pipeline.sidecar.state`, which also documents the published payloads) → publish →
persist cursors.

INVARIANT (restart): a learner's cursor (``<prefix>:sidecar:cursor:<learner>``) is written
only after everything derived from the records up to it has been flushed to Kafka. On
(re)start the sidecar rebuilds each learner's rolling windows and forgetting history by
re-reading its stream from the beginning up to the cursor *without publishing*, then
carries on after the cursor. Publishing is therefore at-least-once: a crash between flush
and cursor write, or a flush that failed half-way, can repeat records, never lose them.

Back-pressure: while publications are pending (Kafka unreachable) no new telemetry is read;
the learner is unaffected since its stream is durable and bounded by ``telemetry_maxlen``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

import redis
import structlog
from kafka.errors import KafkaError, MessageSizeTooLargeError

from consumers.exceptions import ConsumerError
from memory_bank.redis_client import make_redis_client
from pipeline.config import Settings
from pipeline.http_endpoints import EndpointServer, liveness_route, serve_metrics_and_healthz
from pipeline.sidecar.exposition import SidecarExposition
from pipeline.sidecar.sink import KafkaMetricsSink, MetricsSink
from pipeline.sidecar.state import Publication, SidecarState, Stream
from pipeline.telemetry.channel import TelemetryReader

log = structlog.get_logger(__name__)

_BLOCK_MS = 500  # XREAD wait: bounds how long a stop request waits for the loop
_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 30.0
_START_CURSOR = "0-0"


class SidecarRunner:
    """The I/O around :class:`SidecarState`: Redis reads, Kafka publishes, cursors."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        sink: MetricsSink,
        clock: Callable[[], float] = time.monotonic,
        exposition: SidecarExposition | None = None,
    ) -> None:
        self.settings = settings
        self.exposition = exposition
        self.cfg = settings.sidecar
        self._client = client
        self._reader = TelemetryReader(client, settings.redis.key_prefix)
        self._sink = sink
        self._clock = clock
        self.state = SidecarState(self.cfg, settings.slo)
        self._cursors: dict[str, str] = {}  # read position, per learner
        self._saved: dict[str, str] = {}  # position last persisted to Redis
        self._pending: deque[Publication] = deque()  # not yet handed to the sink
        self._unflushed: list[Stream] = []  # handed to the sink, flush not yet confirmed
        self._next_discover = -math.inf
        self._next_progress = clock() + self.cfg.progress_every_s
        self._backoff = _BACKOFF_MIN_S
        self._stop = threading.Event()
        self.records_read = 0
        self.published = {"loss": 0, "forgetting": 0, "alerts": 0}
        self.dropped = 0  # publications Kafka can never accept (see _flush_pending)
        self.last_pass = clock()  # liveness: a pass of the loop ended (or failed) then

    def cursor_key(self, learner: str) -> str:
        return f"{self.settings.redis.key_prefix}:sidecar:cursor:{learner}"

    def run(self, stop: threading.Event) -> None:
        log.info(
            "sidecar starting",
            loss_topic=self.settings.kafka.loss_topic,
            forgetting_topic=self.settings.kafka.forgetting_topic,
            learners=list(self.cfg.learners) or "discover",
        )
        self._stop = stop
        while not stop.is_set():
            try:
                self.run_once()
                self._backoff = _BACKOFF_MIN_S
            except redis.RedisError as exc:
                self._failed("redis", exc)
            except (ConsumerError, KafkaError) as exc:
                self._failed("kafka", exc)
            except Exception as exc:  # noqa: BLE001 - a bug must not stop the metrics for good
                self._failed("unexpected", exc, exc_info=True)
        self.shutdown()

    def run_once(self) -> None:
        """One pass: (re)discover, publish what is pending, read, apply, publish, persist."""
        now = self._clock()
        if now >= self._next_discover:
            self.discover()
            self._next_discover = now + self.cfg.rediscover_every_s
        if self._pending or self._unflushed:
            # Back-pressure: nothing new is read until the backlog is out.
            self._flush_pending()
        if not self._cursors:
            # No learner yet: XREAD with no stream returns at once; do not spin.
            self._stop.wait(_BLOCK_MS / 1000)
        entries = self._reader.read(self._cursors, block_ms=_BLOCK_MS, count=self.cfg.read_count)
        made: list[Publication] = []
        for entry in entries:
            made.extend(self.state.apply(entry))
            self._cursors[entry.learner] = entry.id
        self.records_read += len(entries)
        made.extend(self.state.due_loss(self._clock()))
        self._pending.extend(made)
        if self.exposition is not None:
            # Prometheus sees the state even while Kafka is unreachable.
            self.exposition.observe(made, self.state.learners)
            self.exposition.sync(self.state.learners)
        self._flush_pending()
        self.last_pass = self._clock()
        self._maybe_log_progress()

    def discover(self) -> None:
        names = list(self.cfg.learners) or self._reader.discover()
        for name in names:
            if name not in self._cursors:
                self._rebuild(name)

    def _rebuild(self, learner: str) -> None:
        """Replay the stream up to the saved cursor into fresh state, publishing nothing."""
        raw = self._client.get(self.cursor_key(learner))
        saved = raw.decode() if isinstance(raw, bytes) else (raw or _START_CURSOR)
        # Built aside and installed only when complete, so a Redis error half-way leaves
        # nothing applied twice when the next discovery retries.
        scratch = SidecarState(self.cfg, self.settings.slo)
        replayed = 0
        if saved != _START_CURSOR:
            after = _START_CURSOR
            while True:
                batch = self._reader.read_range(learner, after, saved, count=self.cfg.read_count)
                for entry in batch:
                    scratch.apply(entry)  # publications discarded: already published
                replayed += len(batch)
                if len(batch) < self.cfg.read_count:
                    break
                after = batch[-1].id
        state = scratch.learner(learner)
        # Steps folded in before the restart but not yet published wait for the next step.
        state.dirty = False
        self.state.learners[learner] = state
        if self.exposition is not None:
            self.exposition.rebuilt(learner, state)
        self._cursors[learner] = saved
        self._saved[learner] = saved
        log.info(
            "following learner",
            learner=learner,
            cursor=saved,
            rebuilt_records=replayed,
            evals=state.evals_seen,
            steps=state.steps_seen,
        )

    def _flush_pending(self) -> None:
        # An item leaves `_pending` only once the sink accepted it, so a send failure half
        # way through neither loses nor duplicates anything on the next attempt.
        while self._pending:
            item = self._pending[0]
            try:
                self._sink.send(item)
            except (MessageSizeTooLargeError, TypeError, ValueError) as exc:
                # A record Kafka can never take would block every later one: drop it, loudly.
                self.dropped += 1
                log.error(
                    "metrics record dropped",
                    stream=item.stream,
                    learner=item.learner,
                    error=f"{type(exc).__name__}: {exc}",
                )
                self._pending.popleft()
                continue
            self._unflushed.append(self._pending.popleft().stream)
        if self._unflushed:
            self._sink.flush()
            for stream in self._unflushed:
                self.published[stream] += 1
            self._unflushed.clear()
        # INVARIANT: cursors move only once everything derived up to them is durable.
        self._save_cursors()

    def _save_cursors(self) -> None:
        changed = {k: v for k, v in self._cursors.items() if self._saved.get(k) != v}
        if not changed:
            return
        pipe = self._client.pipeline(transaction=False)
        for learner, cursor in changed.items():
            pipe.set(self.cursor_key(learner), cursor)
        pipe.execute()
        self._saved.update(changed)

    def _failed(self, what: str, exc: Exception, exc_info: bool = False) -> None:
        log.warning(
            "sidecar error; retrying",
            source=what,
            error=f"{type(exc).__name__}: {exc}",
            pending=len(self._pending) + len(self._unflushed),
            retry_in_s=self._backoff,
            exc_info=exc if exc_info else None,
        )
        self._stop.wait(self._backoff)
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX_S)
        self.last_pass = self._clock()  # retrying is progress; a hung call is not

    def _maybe_log_progress(self) -> None:
        now = self._clock()
        if now < self._next_progress:
            return
        self._next_progress = now + self.cfg.progress_every_s
        log.info(
            "sidecar progress",
            learners=len(self.state.learners),
            records=self.records_read,
            published_loss=self.published["loss"],
            published_forgetting=self.published["forgetting"],
            published_alerts=self.published["alerts"],
            pending=len(self._pending) + len(self._unflushed),
            dropped=self.dropped,
            malformed=self.state.malformed,
            steps={n: s.step for n, s in self.state.learners.items()},
        )

    def shutdown(self) -> None:
        """Last attempt to publish what is pending and save cursors; never raises."""
        try:
            self._flush_pending()
        except Exception as exc:  # noqa: BLE001 - shutting down; the cursor was not advanced
            log.warning(
                "sidecar stopped with unpublished metrics; they will be re-derived on restart",
                pending=len(self._pending),
                error=str(exc),
            )
        log.info(
            "sidecar stopped",
            records=self.records_read,
            published_loss=self.published["loss"],
            published_forgetting=self.published["forgetting"],
            published_alerts=self.published["alerts"],
        )


def sidecar_client(settings: Settings) -> redis.Redis:
    """The sidecar's Redis client; it retries with its own back-off (:meth:`SidecarRunner.run`)."""
    r = settings.redis
    return make_redis_client(
        r.url,
        r.username,
        r.password,
        # XREAD blocks up to _BLOCK_MS: the socket must wait at least that long.
        max(r.socket_timeout_s, _BLOCK_MS / 1000 + 1.0),
        r.tls_options(),
        connect_timeout_s=r.socket_timeout_s,
        retries=1,
    )


def run_sidecar(settings: Settings, stop: threading.Event) -> None:
    """Follow every learner's telemetry and publish metrics until ``stop`` is set; with
    ``sidecar.http_port``, serve ``/metrics`` and ``/healthz`` meanwhile."""
    client = sidecar_client(settings)
    sink = KafkaMetricsSink(settings)
    exposition = SidecarExposition(settings.model.max_classes, settings.slo)
    runner = SidecarRunner(settings, client, sink, exposition=exposition)
    server = serve_sidecar(runner, exposition) if settings.sidecar.http_port is not None else None
    try:
        runner.run(stop)
    finally:
        if server is not None:
            server.close()
        sink.close()
        client.close()


def serve_sidecar(runner: SidecarRunner, exposition: SidecarExposition) -> EndpointServer:
    """``/metrics`` and ``/healthz`` (503 once no pass of the loop ended for
    ``health.stale_after_s``) on ``sidecar.http_host:sidecar.http_port``."""
    settings = runner.settings
    healthz = liveness_route(
        lambda: runner.last_pass,
        settings.health.stale_after_s,
        lambda: {"learners": len(runner.state.learners)},
    )
    host, port = settings.sidecar.http_host, settings.sidecar.http_port
    return serve_metrics_and_healthz(
        exposition.render, healthz, "sidecar.http_port", host, port or 0
    )
