"""The learner process: its one loop.

Path of a message::

    source.get()            poll → decode+validate → micro-batch (consumer thread, consumers/)
      → split               probe (held out) | labeled (train) | unlabeled (predict)
      → predict-then-train  prequential accuracy on the labeled part, before it is learned
      → train_step × iters  batch ∪ replay (class-balanced + FAISS hard negatives), SupCon/CE
      → bank.add            write-through to Redis, idempotent by event id
      → telemetry           step stats, every N steps an evaluation on the probe set
      → checkpoint          atomic, then source.commit(offsets it covers)

The stages live beside this module: ``assembly`` builds the :class:`LearnerContext`,
``process`` handles one batch (split, predict, train, publish), ``emit`` reports it,
``checkpointer`` checkpoints and commits, ``idle`` waits for the group join and decides
when an idle learner finishes.

INVARIANTS (each kept by the module named)
  * An offset is committed only after a checkpoint covering every event before it is durable
    (and after the DLQ/predictions producer has flushed): at-least-once, duplicates bounded
    by the checkpoint interval. (``checkpointer``)
  * Probe events are never trained on (``is_probe`` is a pure function of the event id).
    (``probes``, ``process``)
  * trained + held_out + dead_lettered + predicted == consumed, for every batch. (``process``)
  * The learner never blocks on metrics: telemetry is an XADD to Redis; the sidecar
    publishes. (``emit``)
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import structlog

from consumers.events import EventBatch
from pipeline.config import Settings
from pipeline.learner.assembly import build_context, close_context
from pipeline.learner.context import LearnerContext, LearnerSummary
from pipeline.learner.emit import Emitter, emit_end, emit_eval, loop_tick, start_health
from pipeline.learner.idle import IdleWatch
from pipeline.learner.opening import Opened
from pipeline.learner.process import process_batch
from pipeline.learner.start import NO_REQUEST, StartRequest

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RunLimits:
    """When a run finishes on its own: after ``max_events`` events, or idle this long."""

    max_events: int | None = None
    exit_when_idle_s: float | None = None


def run_learner(
    settings: Settings,
    stop: threading.Event,
    limits: RunLimits = RunLimits(),
    start: StartRequest = NO_REQUEST,
    opened: Opened | None = None,
) -> LearnerSummary:
    """Get → process → emit → checkpoint/commit when due; until stopped, idle or at max_events.

    ``start`` carries ``--from`` / ``--reset`` (:mod:`pipeline.learner.start`); ``opened``,
    the connections ``learn`` opened before importing torch (:mod:`pipeline.learner.opening`).
    """
    ctx = build_context(settings, stop, start_source=True, request=start, opened=opened)
    _log_start(ctx)
    ctx.started = now = time.monotonic()
    start_consumed = ctx.counters.consumed
    ctx.checkpointer.schedule_from(ctx.state.step, now)
    idle = IdleWatch(
        ctx.source.assignment, settings.kafka.events_topic, limits.exit_when_idle_s, now
    )
    emitter = Emitter(ctx, start_consumed, now)
    committed_at = now
    with running(ctx):
        while not stop.is_set() and not _reached_max_events(ctx, limits, start_consumed):
            batch = ctx.source.get(timeout_s=0.5)
            now = time.monotonic()
            loop_tick(ctx, now)
            if batch is None:
                if idle.should_finish(now):
                    break
                continue
            idle.batch_arrived(now)
            with batch_log_context(ctx, batch):
                record = process_batch(ctx, batch)
                emitter.batch(record, now)
                if ctx.checkpointer.due(ctx.state.step, now):
                    ctx.checkpointer.commit(ctx, now=now)
            idle.batch_processed(time.monotonic())
        emit_eval(ctx)
        ctx.checkpointer.commit(ctx, wait=True)
        committed_at = time.monotonic()
        emit_end(ctx)
    return summarize(ctx, idle, start_consumed, committed_at)


@contextlib.contextmanager
def running(ctx: LearnerContext) -> Iterator[None]:
    """A learner's run, one process or one rank: the health board started; on the way out the
    log context cleared and the context closed, ``stopped``, or ``failed`` with the exception
    that ended the run (kept in the health file)."""
    failure = None
    try:
        start_health(ctx)
        yield
    except BaseException as exc:
        failure = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        structlog.contextvars.clear_contextvars()
        close_context(ctx, "failed" if failure else "stopped", failure)


def _log_start(ctx: LearnerContext) -> None:
    s = ctx.settings
    log.info(
        "learner starting",
        learner=ctx.name,
        objective=s.train.objective,
        group=s.group_id,
        device=str(ctx.device),
        resumed_step=ctx.state.step,
        replay=s.train.replay_enabled,
    )


def _reached_max_events(ctx: LearnerContext, limits: RunLimits, start_consumed: int) -> bool:
    events = ctx.counters.consumed - start_consumed
    if limits.max_events is not None and events >= limits.max_events:
        log.info("max events reached", events=events)
        return True
    return False


@contextlib.contextmanager
def batch_log_context(ctx: LearnerContext, batch: EventBatch) -> Iterator[None]:
    """Every log line of this batch carries its step, batch number, topic and offsets."""
    first = batch.sources[0] if batch.sources else None
    structlog.contextvars.bind_contextvars(
        step=ctx.state.step,
        batch=ctx.counters.batches,
        topic=first.topic if first else None,
        offsets={f"{t}:{p}": o for (t, p), o in batch.offsets.items()},
    )
    try:
        yield
    finally:
        structlog.contextvars.clear_contextvars()


def summarize(
    ctx: LearnerContext,
    idle: IdleWatch,
    start_consumed: int,
    committed_at: float,
    group: dict[str, Any] | None = None,
) -> LearnerSummary:
    """The run's summary; ``group`` is a data-parallel rank's (rank, world size, digest)."""
    group = group or {}
    first_batch_at = idle.first_batch_at
    summary = LearnerSummary(
        name=ctx.name,
        objective=ctx.settings.train.objective,
        steps=ctx.state.step,
        skipped_steps=ctx.state.skipped,
        counters=ctx.counters.as_dict(),
        elapsed_s=time.monotonic() - ctx.started,
        bank_size=len(ctx.bank),
        active_s=idle.active_s,
        run_events=ctx.counters.consumed - start_consumed,
        first_batch_to_commit_s=(committed_at - first_batch_at) if first_batch_at else 0.0,
        group=group,
    )
    log.info(
        "learner stopped",
        **summary.counters,
        **summary.group,
        steps=summary.steps,
        skipped=summary.skipped_steps,
        events_per_s=round(summary.events_per_s, 1),
    )
    return summary
