"""``supcon-stream serve``: a consumer group that answers events with the newest model bundle.

Path of a message::

    source.get()      poll → decode+validate → micro-batch (consumers/, group <prefix>.serve.<L>)
      → answer         unlabeled (or every event, serve.answer_labeled) → Predictor.predict
      → send           <prefix>.predictions, keyed by event id, with the model version
      → flush          the producer: every prediction of the batch acknowledged by the broker
      → commit         the batch's offsets
    between batches:  announcements on <prefix>.models → load, verify, switch
    meanwhile:        /metrics and /healthz on serve.http_port (``exposition.py``)

INVARIANTS
  * Offsets are committed only after the predictions of every event below them are flushed:
    without a crash, every event is answered exactly once; after a crash the events after
    the last commit are answered again (at-least-once; predictions are keyed by event id,
    so a reader can keep the last answer per id).
  * A batch is answered by one model version: a switch happens between two batches.
  * A missing, corrupt or incompatible bundle is rejected with one log line and the served
    version stays (``ModelSlot``).
  * consumed == answered + labeled_skipped + dead_lettered, for every batch.
  * The loop never waits on a scrape: it updates in-process series, HTTP threads render them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog

from consumers.events import EventBatch, TopicPartitionKey
from consumers.exceptions import BrokerUnavailableError, ProducerError
from consumers.producer import JsonProducer
from pipeline.config import Settings
from pipeline.exceptions import SupconStreamError
from pipeline.http_endpoints import EndpointServer, serve_metrics_and_healthz
from pipeline.serving.announce import Announcement, parse_announcement
from pipeline.serving.bundle import MANIFEST
from pipeline.serving.exceptions import BundleError
from pipeline.serving.exposition import ServeExposition
from pipeline.serving.predictor import Predictor
from pipeline.serving.registry import newest_loadable, version_dir

log = structlog.get_logger(__name__)

FINAL_COMMIT_TIMEOUT_S = 30.0
MODEL_WAIT_POLL_S = 1.0
PROGRESS_EVERY_S = 30.0


@dataclass(frozen=True)
class ServeLimits:
    max_events: int | None = None
    exit_when_idle_s: float | None = None


class ModelSlot:
    """The served model, and the announced version waiting to replace it between batches."""

    def __init__(
        self,
        registry: Path,
        predictor: Predictor,
        loader: Callable[[Path], Predictor] = Predictor.load,
    ) -> None:
        self.registry = registry
        self.predictor = predictor
        self._load = loader
        self._pending: Announcement | None = None
        self.switches = 0
        self.rejected: list[int] = []

    @property
    def version(self) -> int:
        return self.predictor.version

    def offer(self, ann: Announcement) -> bool:
        """Remember an announced version newer than the served and any pending one."""
        if ann.version <= self.version or ann.version in self.rejected:
            return False
        if self._pending is None or ann.version > self._pending.version:
            self._pending = ann
            return True
        return False

    def switch_if_announced(self) -> bool:
        """Load the pending version; True when it now serves. Called between two batches."""
        ann, self._pending = self._pending, None
        if ann is None:
            return False
        try:
            new = self._load(version_dir(self.registry, ann.version))
            if new.bundle.digest != ann.digest:
                raise BundleError(
                    f"digest {new.bundle.digest} differs from the announced {ann.digest}"
                )
            reason = self.predictor.compatible_with(new)
            if reason is not None:
                raise BundleError(f"incompatible: {reason}")
        except BundleError as exc:
            self.rejected.append(ann.version)
            log.warning(
                "model bundle rejected; serving keeps its version",
                version=ann.version,
                serving=self.version,
                error=str(exc),
            )
            return False
        log.info("model switched", previous=self.version, version=new.version, step=ann.step)
        self.predictor = new
        self.switches += 1
        return True


class AnnouncementReader:
    """Reads ``<prefix>.models`` from the beginning, without a group (every server sees every
    announcement); older versions are ignored by :class:`ModelSlot`. Owned by one thread."""

    def __init__(self, client_options: dict[str, Any], topic: str, learner: str) -> None:
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        self.learner = learner
        try:
            self._consumer = KafkaConsumer(
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                **client_options,
            )
        except KafkaError as exc:
            raise BrokerUnavailableError(f"cannot read {topic}: {exc}") from exc
        self._topic = topic
        self._assigned = False

    def poll(self) -> list[Announcement]:
        from kafka import TopicPartition

        if not self._assigned:
            partitions = self._consumer.partitions_for_topic(self._topic)
            if not partitions:
                return []
            tps = [TopicPartition(self._topic, p) for p in sorted(partitions)]
            self._consumer.assign(tps)
            self._consumer.seek_to_beginning(*tps)
            self._assigned = True
        found = []
        for records in self._consumer.poll(timeout_ms=0).values():
            for record in records:
                try:
                    ann = parse_announcement(orjson.loads(record.value or b"null"))
                except orjson.JSONDecodeError:
                    ann = None
                if ann is not None and ann.learner == self.learner:
                    found.append(ann)
        return found

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._consumer.close()


@dataclass
class ServeCounters:
    consumed: int = 0
    answered: int = 0
    labeled_skipped: int = 0
    dead_lettered: int = 0
    batches: int = 0


def registry_of(settings: Settings) -> Path:
    return settings.serve.model_dir or settings.export.dir / serve_learner(settings)


def serve_learner(settings: Settings) -> str:
    return settings.serve.learner or settings.learner_name


def pinned(model_dir: Path) -> bool:
    """``serve.model_dir`` names one bundle (not a registry): serve it, ignore announcements."""
    return (model_dir / MANIFEST).is_file()


def wait_for_model(
    registry: Path, wait_s: float, stop: threading.Event, tick: Callable[[], None] = lambda: None
) -> Predictor:
    """The newest loadable bundle of ``registry``, waiting up to ``wait_s`` for a first one
    (``tick()`` after each look: waiting for a model is progress, not a stuck loop)."""
    if pinned(registry):
        return Predictor.load(registry)
    deadline = time.monotonic() + wait_s
    logged = False
    while True:
        bundle = newest_loadable(registry)
        if bundle is not None:
            return Predictor(bundle)
        if time.monotonic() >= deadline or stop.is_set():
            raise SupconStreamError(f"no loadable model bundle in {registry} (serve.model_dir)")
        if not logged:
            log.info("waiting for a model bundle", registry=str(registry), wait_s=wait_s)
            logged = True
        stop.wait(MODEL_WAIT_POLL_S)
        tick()


def answer_batch(
    predictor: Predictor, batch: EventBatch, answer_labeled: bool
) -> tuple[list[dict[str, Any]], int]:
    """(prediction payloads, labeled events skipped) of one batch, all by one model."""
    rows = [i for i, label in enumerate(batch.labels) if answer_labeled or label is None]
    if not rows:
        return [], len(batch)
    preds = predictor.predict(batch.features[rows])
    out = [
        {
            "id": batch.ids[i],
            "label": label,
            "confidence": round(float(conf), 6),
            "model_version": predictor.version,
            "learner": predictor.manifest.get("learner"),
            "server": "serve",
        }
        for i, label, conf in zip(rows, preds.labels, preds.confidences.tolist(), strict=True)
    ]
    return out, len(batch) - len(rows)


def run_serve(settings: Settings, stop: threading.Event, limits: ServeLimits) -> dict[str, Any]:
    """Serve until stopped, idle for ``exit_when_idle_s`` or past ``max_events``; with
    ``serve.http_port``, ``/metrics`` and ``/healthz`` meanwhile (from the wait for a model)."""
    from consumers.admin import ensure_topics

    k, s = settings.kafka, settings.serve
    topics = [s.input_topic or k.events_topic, k.predictions_topic, k.models_topic, k.dlq_topic]
    ensure_topics(k.client_options(), topics, k.partitions, k.replication_factor)
    expo = ServeExposition(serve_learner(settings), settings.health.stale_after_s)
    server = _serve_endpoints(settings, expo)
    try:
        return _serve(settings, stop, limits, expo)
    finally:
        if server is not None:
            server.close()


def _serve(
    settings: Settings, stop: threading.Event, limits: ServeLimits, expo: ServeExposition
) -> dict[str, Any]:
    """Wait for a model, then answer batches until told to stop; the summary."""
    from consumers.source import KafkaBatchSource, SourceConfig

    k, s = settings.kafka, settings.serve
    learner = serve_learner(settings)
    registry = registry_of(settings)
    input_topic = s.input_topic or k.events_topic
    opts = k.client_options()
    slot = ModelSlot(registry, wait_for_model(registry, s.wait_for_model_s, stop, expo.tick))
    expo.model(slot.version, 0, 0)
    group = s.group_id or f"{k.topic_prefix}.serve.{learner}"
    log.info(
        "serve starting",
        learner=learner,
        group=group,
        version=slot.version,
        topic=input_topic,
        pinned=pinned(registry),
    )
    producer = JsonProducer(opts)
    reader = source = None
    try:
        if not pinned(registry):
            reader = AnnouncementReader(opts, k.models_topic, learner)
        config = SourceConfig.from_tuning(
            settings.consumer,
            topic=input_topic,
            group_id=group,
            input_dim=slot.predictor.input_dim,
            dlq_topic=k.dlq_topic,
        )
        source = KafkaBatchSource(config, opts, producer)
        source.start()
        counters = _loop(settings, stop, limits, slot, reader, source, producer, expo)
    finally:
        structlog.contextvars.clear_contextvars()
        if source is not None:
            source.stop(timeout_s=10.0)
        if reader is not None:
            reader.close()
        producer.close()
    summary = {**counters.__dict__, "model_version": slot.version, "switches": slot.switches}
    log.info("serve stopped", **summary, rejected=slot.rejected)
    return {**summary, "rejected": slot.rejected}


def _serve_endpoints(settings: Settings, expo: ServeExposition) -> EndpointServer | None:
    """``/metrics`` and ``/healthz`` on ``serve.http_host:serve.http_port`` (when set)."""
    s = settings.serve
    if s.http_port is None:
        return None
    return serve_metrics_and_healthz(
        expo.render, expo.healthz(), "serve.http_port", s.http_host, s.http_port
    )


def _loop(
    settings: Settings,
    stop: threading.Event,
    limits: ServeLimits,
    slot: ModelSlot,
    reader: AnnouncementReader | None,
    source: Any,
    producer: JsonProducer,
    expo: ServeExposition,
) -> ServeCounters:
    c = ServeCounters()
    topic = settings.kafka.predictions_topic
    owed: dict[TopicPartitionKey, int] = {}  # offsets whose predictions are not yet flushed
    last_batch = last_progress = time.monotonic()
    while not stop.is_set():
        if limits.max_events is not None and c.consumed >= limits.max_events:
            break
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(batch=c.batches)  # the next batch to answer
        for ann in reader.poll() if reader is not None else ():
            if slot.offer(ann):
                log.info("model announced", version=ann.version, serving=slot.version)
        slot.switch_if_announced()  # between two batches: a batch has one model version
        expo.model(slot.version, slot.switches, len(slot.rejected))
        batch = source.get(timeout_s=0.5)
        now = time.monotonic()
        if batch is None:
            expo.tick()
            if limits.exit_when_idle_s is not None and now - last_batch >= limits.exit_when_idle_s:
                break
            continue
        last_batch = now
        structlog.contextvars.bind_contextvars(
            batch=c.batches,
            model_version=slot.version,
            offsets={f"{t}:{p}": o for (t, p), o in batch.offsets.items()},
        )
        answers, skipped = answer_batch(slot.predictor, batch, settings.serve.answer_labeled)
        for payload in answers:
            producer.send(topic, payload, key=str(payload["id"]).encode())
        c.batches += 1
        c.consumed += batch.consumed
        c.answered += len(answers)
        c.labeled_skipped += skipped
        c.dead_lettered += len(batch.dead_letters)
        for tp, offset in batch.offsets.items():
            owed[tp] = max(offset, owed.get(tp, 0))
        if _flush_then_commit(producer, source, owed):
            expo.committed()
        dead = (d.reason for d in batch.dead_letters)
        expo.batch_done(batch.consumed, len(answers), skipped, dead, time.monotonic() - now)
        if now - last_progress >= PROGRESS_EVERY_S:
            log.info("progress", **c.__dict__, version=slot.version, lag=source.stats().get("lag"))
            last_progress = now
    structlog.contextvars.clear_contextvars()
    if owed and _flush_then_commit(producer, source, owed, final=True) is False:
        log.warning("final commit did not complete; unflushed events will be answered again")
    return c


def _flush_then_commit(
    producer: JsonProducer, source: Any, owed: dict[TopicPartitionKey, int], final: bool = False
) -> bool:
    """INVARIANT: offsets are committed only once the predictions below them are flushed."""
    try:
        producer.flush()
    except ProducerError as exc:
        log.warning("predictions not flushed; commit deferred", error=str(exc))
        return False
    if final:
        ok = source.commit_sync(dict(owed), timeout_s=FINAL_COMMIT_TIMEOUT_S)
    else:
        source.commit(dict(owed))
        ok = True
    owed.clear()
    return bool(ok)
