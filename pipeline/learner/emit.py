"""What the learner reports: telemetry records for the sidecar, health progress, progress logs.

INVARIANT: the learner never blocks on metrics. Telemetry is an XADD to Redis through a
fast-failing client of its own (:class:`~pipeline.telemetry.channel.TelemetryWriter`); the
sidecar publishes.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from pipeline.learner.context import LearnerContext
from pipeline.learner.probes import evaluate
from pipeline.telemetry.records import EndRecord, StepRecord

log = structlog.get_logger(__name__)

PROGRESS_EVERY_S = 5.0


class Emitter:
    """Reports each processed batch: health progress and the step record, an evaluation on
    the probes every ``eval.every_steps`` steps, a progress log line every ``PROGRESS_EVERY_S``.
    """

    def __init__(self, ctx: LearnerContext, start_consumed: int, now: float) -> None:
        self.ctx = ctx
        self.start_consumed = start_consumed  # counters continue across restarts
        self._last_eval_step = ctx.state.step
        self._last_progress = now

    def batch(
        self, record: dict[str, Any], now: float, totals: dict[str, int] | None = None
    ) -> None:
        """``totals``: a data-parallel group's counters over every rank (rank 0 reports)."""
        ctx = self.ctx
        note_progress(ctx)
        ctx.telemetry.emit(step_record(ctx, record, totals))
        if ctx.state.step - self._last_eval_step >= ctx.settings.eval.every_steps:
            emit_eval(ctx)
            self._last_eval_step = ctx.state.step
        if now - self._last_progress >= PROGRESS_EVERY_S:
            log_progress(ctx, self.start_consumed)
            self._last_progress = now


def step_record(
    ctx: LearnerContext, record: dict[str, Any], totals: dict[str, int] | None = None
) -> StepRecord:
    """``record`` is :func:`~pipeline.learner.process.process_batch`'s: counts, loss, per class.

    ``totals`` (consumed, trained, skipped, prequential_correct, prequential_total) replace
    this process's counters: a data-parallel group reports the sum over its ranks.
    """
    c = ctx.counters
    t = totals or {
        "consumed": c.consumed,
        "trained": c.trained,
        "skipped": ctx.state.skipped,
        "prequential_correct": c.prequential_correct,
        "prequential_total": c.prequential_total,
    }
    return StepRecord(
        learner=ctx.name,
        objective=ctx.settings.train.objective,
        group=ctx.settings.group_id,
        step=ctx.state.step,
        ts=int(time.time() * 1000),
        events_total=t["consumed"],
        trained_total=t["trained"],
        skipped_total=t["skipped"],
        elapsed_s=round(time.monotonic() - ctx.started, 3),
        prequential_correct=t["prequential_correct"],
        prequential_total=t["prequential_total"],
        **record,
    )


def emit_eval(ctx: LearnerContext) -> None:
    ctx.telemetry.emit(evaluate(ctx))


def emit_end(ctx: LearnerContext, group: dict[str, Any] | None = None) -> None:
    """The ``end`` record, then one last try to write whatever telemetry is still buffered.

    ``group``: a data-parallel group's ``events_total`` (every rank's), ``world_size`` and
    ``model_digest``.
    """
    elapsed = time.monotonic() - ctx.started
    fields: dict[str, Any] = {"events_total": ctx.counters.consumed, **(group or {})}
    ctx.telemetry.emit(
        EndRecord(learner=ctx.name, step=ctx.state.step, elapsed_s=round(elapsed, 3), **fields)
    )
    ctx.telemetry.flush()


def start_health(ctx: LearnerContext) -> None:
    """health.json, and on ``health.http_port`` /healthz, /readyz and /metrics."""
    h, board, expo = ctx.settings.health, ctx.health, ctx.exposition
    if board is None:
        return
    if expo is not None:
        expo.watch_health(lambda: board.snapshot()["status"] == "running", board.ready)
        board.serve_metrics(expo.render)
    board.start(h.every_s, h.http_host, h.http_port)
    board.set_state("running")


def loop_tick(ctx: LearnerContext, now: float) -> None:
    """After every ``source.get``: the loop is alive; once a second, the slower readings
    (partition assignment for /readyz, consumer lag, bank occupancy)."""
    board, expo = ctx.health, ctx.exposition
    if board is not None:
        board.tick()
    if expo is None or not expo.lag_due(now):
        return
    if board is not None:
        board.mark_ready("partitions_assigned", bool(ctx.source.assignment()))
    expo.lag(ctx.source.stats().get("lag") or {})
    names = ctx.registry.names
    per_class = ctx.bank.class_counts()
    expo.bank(
        len(ctx.bank), {names[c] if c < len(names) else str(c): n for c, n in per_class.items()}
    )


def note_progress(ctx: LearnerContext) -> None:
    if ctx.health is not None:
        c = ctx.counters
        ctx.health.progress(
            step=ctx.state.step,
            consumed=c.consumed,
            trained=c.trained,
            dead_lettered=c.dead_lettered,
            last_batch_ts=round(time.time(), 3),
        )


def log_progress(ctx: LearnerContext, start_consumed: int) -> None:
    elapsed = time.monotonic() - ctx.started
    events = ctx.counters.consumed - start_consumed
    stats = ctx.source.stats()
    log.info(
        "progress",
        events=ctx.counters.consumed,
        trained=ctx.counters.trained,
        dead_lettered=ctx.counters.dead_lettered,
        steps=ctx.state.step,
        skipped=ctx.state.skipped,
        bank=len(ctx.bank),
        events_per_s=round(events / elapsed, 1) if elapsed > 0 else 0.0,
        lag=stats.get("lag"),
    )
