"""Sidecar: learner telemetry (Redis streams) → rolling loss and forgetting metrics (Kafka).

Its own process (``supcon-stream sidecar``), restartable without touching any learner.

Loop: discover learners → read new telemetry → :meth:`SidecarState.apply` (pure) → publish
→ persist cursors. Payload building is pure and lives in :class:`LearnerState`, so it is
unit-testable without Kafka or Redis.

INVARIANT (restart): a learner's cursor (``<prefix>:sidecar:cursor:<learner>``) is written
only after everything derived from the records up to it has been flushed to Kafka. On
(re)start the sidecar rebuilds each learner's rolling windows and forgetting history by
re-reading its stream from the beginning up to the cursor *without publishing*, then
carries on after the cursor. Publishing is therefore at-least-once: a crash between flush
and cursor write, or a flush that failed half-way, can repeat records, never lose them.

Back-pressure: while publications are pending (Kafka unreachable) no new telemetry is read;
the learner is unaffected since its stream is durable and bounded by ``telemetry_maxlen``.

Published payloads (JSON, keyed by learner name):

``<prefix>.metrics.loss`` — every ``sidecar.publish_every_s`` per learner with new steps,
and on ``end``::

    {"learner", "objective", "group", "step", "ts", "window",
     "loss_mean",            # mean loss of the last `window` non-skipped steps
     "loss_ema",             # EMA (sidecar.ema_alpha) of the same losses
     "per_class_loss",       # {label: mean of its last `window` per-class losses}
     "events_total",
     "events_per_s",         # consumed records/s over sidecar.rate_window_s (learner clock)
     "skipped_steps",
     "prequential_accuracy", # cumulative predict-then-train accuracy, null before any
     "final"}                # true on the record published for `end`

``<prefix>.metrics.forgetting`` — on every ``eval`` record, and once more on ``end``
(then ``final`` is true and the accuracy matrix holds the last task's row)::

    {"learner", "objective", "group", "step", "ts", "events_total",
     "classifier",           # the eval's primary classifier ("ncm" | "head")
     "per_class_accuracy", "best_accuracy", "forgetting",    # {label: float}
     "avg_forgetting", "avg_accuracy",                       # float | null
     "per_task_accuracy", "per_task_forgetting",             # {task: float}
     "anytime_avg_accuracy", "backward_transfer",            # float | null
     "min_task_accuracy",    # {ended task: lowest accuracy since it ended} (stability gap)
     "avg_min_accuracy",     # mean of min_task_accuracy, null before a task ends
     "ece",                  # expected calibration error of the primary classifier | null
     "accuracy_matrix",      # [{"task": ended task, "accuracy": {task: float}}, ...]
     "current_task", "evaluations",
     "final"}                # the learner's `end` was seen (and no step since)

See :mod:`pipeline.quality` for the definitions.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson
import redis
import structlog
from kafka.errors import KafkaError, MessageSizeTooLargeError

from consumers.exceptions import ConsumerError
from pipeline.config import Settings, SidecarSettings
from pipeline.quality import Ema, ForgettingTracker, PerKeyRollingMean, Rate, RollingMean
from pipeline.telemetry.channel import END, EVAL, STEP, TelemetryReader, TelemetryRecord

if TYPE_CHECKING:
    from consumers.producer import JsonProducer

log = structlog.get_logger(__name__)

Stream = Literal["loss", "forgetting"]

_BLOCK_MS = 500  # XREAD wait: bounds how long a stop request waits for the loop
_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 30.0
_FLUSH_TIMEOUT_S = 30.0
# Short: a stop request waits for it, and the runner's back-off retries it anyway.
_TOPICS_TIMEOUT_S = 5.0
_START_CURSOR = "0-0"


@dataclass(frozen=True, slots=True)
class Publication:
    """One metrics record to publish: which stream, for which learner (the Kafka key)."""

    stream: Stream
    learner: str
    payload: dict[str, Any]


def _finite(value: Any) -> float | None:
    """``value`` as a float if it is a finite number (bools excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    x = float(value)
    return x if math.isfinite(x) else None


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


class LearnerState:
    """Rolling state of one learner, fed record by record; builds the payloads."""

    def __init__(self, name: str, cfg: SidecarSettings) -> None:
        self.name = name
        self.window = cfg.window
        self.loss_mean = RollingMean(cfg.window)
        self.loss_ema = Ema(cfg.ema_alpha)
        self.per_class_loss = PerKeyRollingMean(cfg.window)
        self.rate = Rate(cfg.rate_window_s)
        self.forgetting = ForgettingTracker()
        self.objective: str | None = None
        self.group: str | None = None
        self.step: int | None = None
        self.ts: int | None = None
        self.events_total: int | None = None
        self.skipped_steps = 0
        self.prequential_correct = 0
        self.prequential_total = 0
        self.classifier: str | None = None
        self.ece: float | None = None
        self.steps_seen = 0
        self.evals_seen = 0
        self.ended = False
        self.dirty = False  # steps since the last loss publication
        self.last_loss_publish = -math.inf  # sidecar monotonic clock

    def apply(self, record: TelemetryRecord) -> list[Publication]:
        """Fold one record in; returns what it makes due (eval → forgetting, end → both)."""
        payload = record.payload
        if record.kind == STEP:
            self._apply_step(payload)
            return []
        if record.kind == EVAL:
            self._apply_eval(payload)
            return [Publication("forgetting", self.name, self.forgetting_payload())]
        if record.kind == END:
            return self._apply_end(payload)
        return []  # unknown or malformed kinds: ignored, the cursor still moves past them

    def _apply_common(self, payload: Mapping[str, Any]) -> None:
        self.objective = _opt_str(payload.get("objective")) or self.objective
        self.group = _opt_str(payload.get("group")) or self.group
        if isinstance(payload.get("step"), int):
            self.step = payload["step"]
        if isinstance(payload.get("ts"), int):
            self.ts = payload["ts"]
        if isinstance(payload.get("events_total"), int):
            self.events_total = payload["events_total"]

    def _apply_step(self, payload: Mapping[str, Any]) -> None:
        self._apply_common(payload)
        self.steps_seen += 1
        self.ended = False  # steps after an `end`: a new run of the same learner
        skipped = bool(payload.get("skipped"))
        loss = _finite(payload.get("loss"))
        if not skipped and loss is not None:
            self.loss_mean.update(loss)
            self.loss_ema.update(loss)
        per_class = payload.get("per_class_loss") or {}
        if isinstance(per_class, Mapping):
            finite = {str(k): _finite(v) for k, v in per_class.items()}
            self.per_class_loss.update({k: v for k, v in finite.items() if v is not None})
        if isinstance(payload.get("skipped_total"), int):
            self.skipped_steps = payload["skipped_total"]
        elif skipped:
            self.skipped_steps += 1
        batch_events = _finite(payload.get("batch_events"))
        ts = payload.get("ts")
        if batch_events is not None and isinstance(ts, int):
            # The learner's clock, not ours: rebuilding after a restart or catching up on a
            # backlog must give the rate the learner had, not the speed of reading.
            self.rate.update((batch_events, ts / 1000.0))
        if isinstance(payload.get("prequential_total"), int):
            self.prequential_total = payload["prequential_total"]
            self.prequential_correct = int(payload.get("prequential_correct") or 0)
        self.dirty = True

    def _apply_eval(self, payload: Mapping[str, Any]) -> None:
        self._apply_common(payload)
        self.evals_seen += 1
        classifiers = payload.get("classifiers") or {}
        primary = _opt_str(payload.get("primary")) or "ncm"
        chosen = classifiers.get(primary)
        if chosen is None and classifiers:
            primary, chosen = next(iter(classifiers.items()))
        self.classifier = primary
        accuracy = (chosen or {}).get("per_class_accuracy") or {}
        self.ece = _finite((chosen or {}).get("ece"))
        per_class = {str(k): _finite(v) for k, v in accuracy.items()}
        class_task = {str(k): _opt_str(v) for k, v in (payload.get("class_task") or {}).items()}
        self.forgetting.update(
            {k: v for k, v in per_class.items() if v is not None},
            class_task=class_task,
            current_task=_opt_str(payload.get("current_task")),
        )

    def _apply_end(self, payload: Mapping[str, Any]) -> list[Publication]:
        self._apply_common(payload)
        self.ended = True
        self.forgetting.finish()
        out: list[Publication] = []
        if self.steps_seen:
            out.append(Publication("loss", self.name, self.loss_payload()))
            self.dirty = False
        if self.evals_seen:
            out.append(Publication("forgetting", self.name, self.forgetting_payload()))
        return out

    def loss_payload(self) -> dict[str, Any]:
        return {
            "learner": self.name,
            "objective": self.objective,
            "group": self.group,
            "step": self.step,
            "ts": self.ts,
            "window": self.window,
            "loss_mean": self.loss_mean.result(),
            "loss_ema": self.loss_ema.result(),
            "per_class_loss": self.per_class_loss.result(),
            "events_total": self.events_total,
            "events_per_s": self.rate.result(),
            "skipped_steps": self.skipped_steps,
            "prequential_accuracy": (
                self.prequential_correct / self.prequential_total
                if self.prequential_total
                else None
            ),
            "final": self.ended,
        }

    def forgetting_payload(self) -> dict[str, Any]:
        r = self.forgetting.result()
        return {
            "learner": self.name,
            "objective": self.objective,
            "group": self.group,
            "step": self.step,
            "ts": self.ts,
            "events_total": self.events_total,
            "classifier": self.classifier,
            "per_class_accuracy": r.per_class_accuracy,
            "best_accuracy": r.best_accuracy,
            "forgetting": r.forgetting,
            "avg_forgetting": r.avg_forgetting,
            "avg_accuracy": r.avg_accuracy,
            "per_task_accuracy": r.per_task_accuracy,
            "per_task_forgetting": r.per_task_forgetting,
            "anytime_avg_accuracy": r.anytime_avg_accuracy,
            "backward_transfer": r.backward_transfer,
            "min_task_accuracy": r.min_task_accuracy,
            "avg_min_accuracy": r.avg_min_accuracy,
            "ece": self.ece,
            "accuracy_matrix": [
                {"task": row.task, "accuracy": row.accuracy} for row in r.accuracy_matrix
            ],
            "current_task": r.current_task,
            "evaluations": r.evaluations,
            "final": self.ended,
        }


class SidecarState:
    """All learners' rolling state. Pure: no I/O, time is passed in."""

    def __init__(self, cfg: SidecarSettings) -> None:
        self.cfg = cfg
        self.learners: dict[str, LearnerState] = {}

    def learner(self, name: str) -> LearnerState:
        state = self.learners.get(name)
        if state is None:
            state = self.learners[name] = LearnerState(name, self.cfg)
        return state

    def apply(self, record: TelemetryRecord) -> list[Publication]:
        state = self.learner(record.learner)
        try:
            return state.apply(record)
        except (TypeError, ValueError, AttributeError) as exc:
            # Telemetry is another process's data: a bad record is skipped, never fatal.
            log.warning(
                "telemetry record skipped",
                learner=record.learner,
                id=record.id,
                kind=record.kind,
                error=f"{type(exc).__name__}: {exc}",
            )
            return []

    def due_loss(self, now: float) -> list[Publication]:
        """Loss payloads of learners with new steps whose publish period has elapsed."""
        out: list[Publication] = []
        for state in self.learners.values():
            if state.dirty and now - state.last_loss_publish >= self.cfg.publish_every_s:
                out.append(Publication("loss", state.name, state.loss_payload()))
                state.dirty = False
                state.last_loss_publish = now
        return out


class MetricsSink(Protocol):
    """Where publications go. ``send`` queues (raising if it cannot), ``flush`` makes every
    queued record durable or raises; a record queued before a failed ``flush`` stays queued
    and must not be sent again (the sink retries it on the next ``flush``)."""

    def send(self, item: Publication) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class KafkaMetricsSink:
    """Publishes to the loss and forgetting topics through a lazily created JsonProducer.

    Lazily, because the broker may be down when the sidecar starts: creating the topics
    and the producer is retried by the runner's back-off like any other publish failure.
    JsonProducer keeps unacknowledged records and recreates its client itself.
    """

    def __init__(
        self,
        settings: Settings,
        flush_timeout_s: float = _FLUSH_TIMEOUT_S,
        topics_timeout_s: float = _TOPICS_TIMEOUT_S,
    ) -> None:
        kafka = settings.kafka
        self._kafka = kafka
        self._topics = {"loss": kafka.loss_topic, "forgetting": kafka.forgetting_topic}
        self._flush_timeout_s = flush_timeout_s
        self._topics_timeout_s = topics_timeout_s
        self._producer: JsonProducer | None = None

    def _ready_producer(self) -> JsonProducer:
        if self._producer is None:
            from consumers.admin import ensure_topics
            from consumers.producer import JsonProducer

            options = self._kafka.client_options()
            ensure_topics(
                options,
                list(self._topics.values()),
                self._kafka.partitions,
                self._kafka.replication_factor,
                timeout_s=self._topics_timeout_s,
            )
            self._producer = JsonProducer(options)
        return self._producer

    def send(self, item: Publication) -> None:
        self._ready_producer().send(
            self._topics[item.stream], orjson.dumps(item.payload), key=item.learner.encode()
        )

    def flush(self) -> None:
        if self._producer is not None:
            self._producer.flush(timeout_s=self._flush_timeout_s)

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            # close() flushes first and raises if records are still undelivered; the cursor
            # was not advanced past them, so a restart re-derives and re-publishes them.
            try:
                producer.close(timeout_s=5.0)
            except Exception as exc:  # noqa: BLE001 - shutting down; logged, not fatal
                log.warning("metrics producer closed with undelivered records", error=str(exc))


class SidecarRunner:
    """The I/O around :class:`SidecarState`: Redis reads, Kafka publishes, cursors."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        sink: MetricsSink,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.cfg = settings.sidecar
        self._client = client
        self._reader = TelemetryReader(client, settings.redis.key_prefix)
        self._sink = sink
        self._clock = clock
        self.state = SidecarState(self.cfg)
        self._cursors: dict[str, str] = {}  # read position, per learner
        self._saved: dict[str, str] = {}  # position last persisted to Redis
        self._pending: deque[Publication] = deque()  # not yet handed to the sink
        self._unflushed: list[Stream] = []  # handed to the sink, flush not yet confirmed
        self._next_discover = -math.inf
        self._next_progress = clock() + self.cfg.progress_every_s
        self._backoff = _BACKOFF_MIN_S
        self._stop = threading.Event()
        self.records_read = 0
        self.published = {"loss": 0, "forgetting": 0}
        self.dropped = 0  # publications Kafka can never accept (see _flush_pending)

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
        records = self._reader.read(self._cursors, block_ms=_BLOCK_MS, count=self.cfg.read_count)
        for record in records:
            self._pending.extend(self.state.apply(record))
            self._cursors[record.learner] = record.id
        self.records_read += len(records)
        self._pending.extend(self.state.due_loss(self._clock()))
        self._flush_pending()
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
        scratch = SidecarState(self.cfg)
        replayed = 0
        if saved != _START_CURSOR:
            after = _START_CURSOR
            while True:
                batch = self._reader.read_range(learner, after, saved, count=self.cfg.read_count)
                for record in batch:
                    scratch.apply(record)  # publications discarded: already published
                replayed += len(batch)
                if len(batch) < self.cfg.read_count:
                    break
                after = batch[-1].id
        state = scratch.learner(learner)
        # Steps folded in before the restart but not yet published wait for the next step.
        state.dirty = False
        self.state.learners[learner] = state
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
            pending=len(self._pending) + len(self._unflushed),
            dropped=self.dropped,
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
        )


def redis_client(settings: Settings) -> redis.Redis:
    r = settings.redis
    return redis.Redis.from_url(
        r.url,
        username=r.username,
        password=r.password.get_secret_value() if r.password else None,
        # XREAD blocks up to _BLOCK_MS: the socket must wait at least that long.
        socket_timeout=max(r.socket_timeout_s, _BLOCK_MS / 1000 + 1.0),
        socket_connect_timeout=r.socket_timeout_s,
        **r.tls_options(),
    )


def run_sidecar(settings: Settings, stop: threading.Event) -> None:
    """Follow every learner's telemetry and publish metrics until ``stop`` is set."""
    client = redis_client(settings)
    sink = KafkaMetricsSink(settings)
    runner = SidecarRunner(settings, client, sink)
    try:
        runner.run(stop)
    finally:
        sink.close()
        client.close()
