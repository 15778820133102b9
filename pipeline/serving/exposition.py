"""Prometheus exposition of a ``serve`` process (``GET /metrics``) and its liveness.

Series, all named ``supcon_serve_*`` and labelled ``learner`` (whose bundles are served);
Prometheus adds ``instance``, which tells the members of one consumer group apart:

* counters: events consumed (valid and dead-lettered), answered, skipped by ``reason``
  (``labeled``: a labeled event, the learner's, when ``serve.answer_labeled`` is off), and
  dead-lettered by ``reason`` (the reasons of ``consumers.decode``); model version switches
  and rejected bundles;
* gauges: the model version served (0 until a first bundle is loaded), 1 while ``/healthz``
  answers 200 (``supcon_serve_live``), seconds since offsets were last handed for commit (or start),
  computed when scraped;
* histogram: the duration of one batch (answer, send, flush, commit).

INVARIANT: exposition never blocks the serve loop. The loop only updates in-process values
(a lock-protected add per series, one float store per tick); the HTTP server's threads render
them when Prometheus scrapes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from consumers.decode import REASONS
from pipeline.http_endpoints import DURATION_BUCKETS, Route, liveness_route

SKIP_REASONS = ("labeled",)


class ServeExposition:
    """The series of one ``serve`` process, in a registry of their own, and its progress."""

    def __init__(
        self,
        learner: str,
        stale_after_s: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.stale_after_s = stale_after_s
        self._clock, self._wall_clock = clock, wall_clock
        self.last_progress = clock()
        self._last_commit = wall_clock()
        ids = (learner,)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"supcon_serve_{name}", doc, ("learner",), registry=r)

        def by_reason(name: str, doc: str, reasons: Iterable[str]) -> Counter:
            series = Counter(f"supcon_serve_{name}", doc, ("learner", "reason"), registry=r)
            for reason in reasons:  # present from the start, at 0: rate() sees a first burst
                series.labels(*ids, reason)
            return series

        self._consumed = counter("events_consumed", "Events consumed (valid and dead-lettered).")
        self._answered = counter("events_answered", "Events answered on <prefix>.predictions.")
        self._skipped = by_reason("events_skipped", "Events not answered, by reason.", SKIP_REASONS)
        self._dead = by_reason(
            "events_dead_lettered", "Events sent to the DLQ, by reason.", REASONS
        )
        self._switches = counter("model_switches", "Switches to an announced model version.")
        self._rejected = counter("bundles_rejected", "Announced bundles rejected (kept serving).")
        for series in (self._consumed, self._answered, self._switches, self._rejected):
            series.labels(*ids)
        self._version = Gauge(
            "supcon_serve_model_version", "Model version served.", ("learner",), registry=r
        ).labels(*ids)
        self._batch_s = Histogram(
            "supcon_serve_batch_duration_seconds",
            "One batch: answer, send, flush the predictions, commit.",
            ("learner",),
            registry=r,
            buckets=DURATION_BUCKETS,
        ).labels(*ids)
        Gauge(
            "supcon_serve_commit_age_seconds",
            "Seconds since offsets were last handed for commit (or start).",
            ("learner",),
            registry=r,
        ).labels(*ids).set_function(lambda: self._wall_clock() - self._last_commit)
        Gauge(
            "supcon_serve_live", "1 while /healthz answers 200.", ("learner",), registry=r
        ).labels(*ids).set_function(lambda: float(self.live()))
        self._ids = ids
        self.version = 0
        self._counted = (0, 0)  # the slot's (switches, rejected) already counted

    # ---- updates from the serve loop -------------------------------------------------------

    def tick(self) -> None:
        """The loop made progress (a batch answered, an idle poll ended, a wait for a model)."""
        self.last_progress = self._clock()  # one float store: no lock on the hot path

    def batch_done(
        self,
        consumed: int,
        answered: int,
        skipped: int,
        dead_reasons: Iterable[str],
        seconds: float,
    ) -> None:
        """One answered batch: ``skipped`` labeled events, one reason per dead letter."""
        self._consumed.labels(*self._ids).inc(consumed)
        self._answered.labels(*self._ids).inc(answered)
        if skipped:
            self._skipped.labels(*self._ids, "labeled").inc(skipped)
        for reason in dead_reasons:
            self._dead.labels(*self._ids, reason).inc()
        self._batch_s.observe(seconds)
        self.tick()

    def committed(self) -> None:
        self._last_commit = self._wall_clock()

    def model(self, version: int, switches: int, rejected: int) -> None:
        """The slot's served version and its totals of switches and rejected bundles."""
        self.version = version
        self._version.set(version)
        before_switches, before_rejected = self._counted
        if switches > before_switches:
            self._switches.labels(*self._ids).inc(switches - before_switches)
        if rejected > before_rejected:
            self._rejected.labels(*self._ids).inc(rejected - before_rejected)
        self._counted = (switches, rejected)

    # ---- reading (HTTP threads) ------------------------------------------------------------

    def live(self) -> bool:
        return self._clock() - self.last_progress <= self.stale_after_s

    def healthz(self) -> Route:
        """``/healthz``: 503 once the loop made no progress for ``stale_after_s``."""
        return liveness_route(
            lambda: self.last_progress,
            self.stale_after_s,
            lambda: {"learner": self._ids[0], "model_version": self.version},
            clock=self._clock,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
