"""Prometheus exposition of a learner's operational state (``GET /metrics``).

"Metrics" in this project are the quality measures of :mod:`pipeline.quality`; what this
module serves are Prometheus *series*, named ``supcon_*``, all labelled ``learner`` and
``objective``. Quality series (loss, accuracy, forgetting, ECE) come from the sidecar
(:mod:`pipeline.sidecar.exposition`); these are the learner's own:

* counters: events by fate (consumed, trained, held out, predicted; dead-lettered by
  ``reason``), optimizer steps and skipped (non-finite) steps;
* gauges: consumer lag per partition, bank items and items per ``class`` (at most
  ``model.max_classes`` values), liveness and readiness, and seconds since the last durable
  checkpoint and since the last commit request (computed when scraped);
* histograms: batch duration, train duration (every ``train_step`` of one batch) and
  event-to-trained latency (Kafka record timestamp → trained).

INVARIANT: exposition never blocks the training loop. The training thread only updates
in-process values (a lock-protected add per series); the HTTP server thread of
:class:`~pipeline.learner.health.HealthBoard` renders them when Prometheus scrapes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from consumers.decode import REASONS
from consumers.events import EventBatch
from pipeline.http_endpoints import DURATION_BUCKETS

_LABELS = ("learner", "objective")
# Event-to-trained spans the micro-batch latency up to a backlog of minutes.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_LAG_EVERY_S = 1.0  # source.stats() copies under the consumer thread's lock: once a second


class LearnerExposition:
    """The learner's Prometheus series in a registry of their own (one learner per process)."""

    def __init__(self, learner: str, objective: str, max_classes: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._ids = (learner, objective)
        self.max_classes = max_classes
        r, ids = self.registry, self._ids

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, _LABELS, registry=r)

        self._events = {
            fate: counter(f"supcon_events_{fate}", f"Events {doc}.").labels(*ids)
            for fate, doc in (
                ("consumed", "consumed (valid and dead-lettered)"),
                ("trained", "trained on"),
                ("held_out", "held out for the probe set (never trained)"),
                ("predicted", "unlabeled and given a prediction"),
            )
        }
        self._dead = Counter(
            "supcon_events_dead_lettered",
            "Events sent to the DLQ, by reason.",
            (*_LABELS, "reason"),
            registry=r,
        )
        for reason in (*REASONS, "class_limit"):
            # Every reason exported from the start, at 0: a series born at its first dead
            # letter would hide that first burst from rate().
            self._dead.labels(*ids, reason)
        self._steps = counter("supcon_train_steps", "Optimizer steps taken.").labels(*ids)
        self._skipped = counter(
            "supcon_train_steps_skipped", "Steps skipped for a non-finite loss or gradient."
        ).labels(*ids)
        self._lag = Gauge(
            "supcon_consumer_lag",
            "Records behind the partition's high watermark.",
            (*_LABELS, "topic", "partition"),
            registry=r,
        )
        self._bank = Gauge("supcon_bank_items", "Items in the memory bank.", _LABELS, registry=r)
        self._bank_class = Gauge(
            "supcon_bank_class_items",
            "Memory bank items per class.",
            (*_LABELS, "class"),
            registry=r,
        )
        self._batch_s = Histogram(
            "supcon_batch_duration_seconds",
            "One micro-batch through the learner.",
            _LABELS,
            registry=r,
            buckets=DURATION_BUCKETS,
        ).labels(*ids)
        self._train_s = Histogram(
            "supcon_train_duration_seconds",
            "The train steps of one micro-batch (train.iters_per_batch of them).",
            _LABELS,
            registry=r,
            buckets=DURATION_BUCKETS,
        ).labels(*ids)
        self._latency_s = Histogram(
            "supcon_event_to_trained_seconds",
            "Kafka record timestamp to trained.",
            _LABELS,
            registry=r,
            buckets=_LATENCY_BUCKETS,
        ).labels(*ids)
        self._last_checkpoint = time.time()
        self._last_commit = time.time()
        self._age(
            "supcon_checkpoint_age_seconds",
            "Seconds since the last durable checkpoint (or start).",
            lambda: time.time() - self._last_checkpoint,
        )
        self._age(
            "supcon_commit_age_seconds",
            "Seconds since offsets were last handed for commit.",
            lambda: time.time() - self._last_commit,
        )
        self._live: Callable[[], bool] = lambda: False
        self._ready: Callable[[], bool] = lambda: False
        self._age(
            "supcon_learner_live",
            "1 while /healthz answers 200 (running, loop not stuck).",
            lambda: float(self._live()),
        )
        self._age(
            "supcon_learner_ready", "1 while /readyz answers 200.", lambda: float(self._ready())
        )
        self._next_lag = 0.0

    def _age(self, name: str, doc: str, fn: Callable[[], float]) -> None:
        Gauge(name, doc, _LABELS, registry=self.registry).labels(*self._ids).set_function(fn)

    def watch_health(self, live: Callable[[], bool], ready: Callable[[], bool]) -> None:
        """Where ``supcon_learner_live`` and ``_ready`` read from when scraped (cheap calls,
        safe from the HTTP thread)."""
        self._live, self._ready = live, ready

    # ---- updates from the training thread --------------------------------------------------

    def batch_done(
        self,
        batch: EventBatch,
        fates: Mapping[str, int],
        dead_reasons: Mapping[str, int],
        train_rows: list[int],
        steps: tuple[int, int],
        seconds: tuple[float, float | None],
    ) -> None:
        """One processed batch: its events by fate, ``steps`` (taken, skipped) and
        ``seconds`` (batch, train or None when nothing was trained)."""
        for fate, n in fates.items():
            if n:
                self._events[fate].inc(n)
        for reason, n in dead_reasons.items():
            self._dead.labels(*self._ids, reason).inc(n)
        if steps[0]:
            self._steps.inc(steps[0])
        if steps[1]:
            self._skipped.inc(steps[1])
        self._batch_s.observe(seconds[0])
        if seconds[1] is not None:
            self._train_s.observe(seconds[1])
        now_ms = time.time() * 1000.0
        for i in train_rows:
            ts = batch.sources[i].timestamp_ms
            if ts >= 0:
                self._latency_s.observe(max(0.0, (now_ms - ts) / 1000.0))

    def bank(self, size: int, per_class: Mapping[str, int]) -> None:
        """Bank size and items per class (class names come from a registry bounded by
        ``model.max_classes``, so the ``class`` label stays bounded)."""
        self._bank.labels(*self._ids).set(size)
        for name, n in per_class.items():
            self._bank_class.labels(*self._ids, name).set(n)

    def lag_due(self, now: float) -> bool:
        if now < self._next_lag:
            return False
        self._next_lag = now + _LAG_EVERY_S
        return True

    def lag(self, per_partition: Mapping[str, int]) -> None:
        """``{"topic:partition": records behind}`` from the source's stats."""
        for label, behind in per_partition.items():
            topic, _, partition = label.rpartition(":")
            self._lag.labels(*self._ids, topic, partition).set(behind)

    def checkpointed(self) -> None:
        self._last_checkpoint = time.time()

    def commit_requested(self) -> None:
        self._last_commit = time.time()

    # ---- rendering (HTTP thread) -----------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)
