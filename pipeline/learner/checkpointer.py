"""Checkpoint-and-commit: the offsets training has covered, when to checkpoint, and in what order.

INVARIANT: an offset is committed only after a checkpoint covering every event before it is
durable, and after the DLQ/predictions producer has flushed: at-least-once, duplicates
bounded by the checkpoint interval (``checkpoint.every_steps`` / ``checkpoint.every_seconds``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from consumers.events import TopicPartitionKey
from consumers.exceptions import ProducerError
from pipeline.config import Settings
from pipeline.learner.checkpoint import Checkpoint, save_checkpoint

if TYPE_CHECKING:
    from pipeline.learner.context import LearnerContext

log = structlog.get_logger(__name__)

FINAL_COMMIT_TIMEOUT_S = 30.0


class Checkpointer:
    """Owns the offsets covered by training and the step/time schedule of checkpoints.

    ``cover`` advances the offsets as batches are processed, ``due`` says whether a checkpoint
    is owed (``every_steps`` steps or ``every_seconds`` seconds since the last attempt), and
    ``commit`` writes one and commits the offsets it covers. Times are whatever clock the
    caller passes (the loop passes ``time.monotonic()``), so the schedule is pure logic.
    """

    def __init__(
        self,
        directory: Path,
        keep: int,
        every_steps: int,
        every_seconds: float,
        *,
        step: int = 0,
        now: float = 0.0,
    ) -> None:
        self.directory = directory
        self.keep = keep
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.offsets: dict[TopicPartitionKey, int] = {}
        self.start: dict[str, Any] = {}  # the lineage's start point, kept in every checkpoint
        self._last_step = step
        self._last_time = now

    @classmethod
    def from_settings(cls, settings: Settings, now: float | None = None) -> Checkpointer:
        c = settings.checkpoint
        return cls(
            settings.checkpoint_dir,
            c.keep,
            c.every_steps,
            c.every_seconds,
            now=time.monotonic() if now is None else now,
        )

    def cover(self, offsets: Mapping[TopicPartitionKey, int]) -> None:
        """Offsets (next to read, per partition) of a processed batch; they never move back."""
        for tp, offset in offsets.items():
            self.offsets[tp] = max(offset, self.offsets.get(tp, 0))

    def restore(self, offsets: Mapping[TopicPartitionKey, int]) -> None:
        """The offsets a loaded checkpoint covers: what training resumes after."""
        self.offsets = dict(offsets)

    def schedule_from(self, step: int, now: float) -> None:
        """Count the next interval from ``step`` and ``now`` (a run's start, a commit)."""
        self._last_step, self._last_time = step, now

    def due(self, step: int, now: float) -> bool:
        """True once ``every_steps`` steps or ``every_seconds`` have passed since the last one."""
        return (
            step - self._last_step >= self.every_steps
            or now - self._last_time >= self.every_seconds
        )

    def commit(
        self, ctx: LearnerContext, *, wait: bool = False, now: float | None = None
    ) -> Path | None:
        """Checkpoint, then commit the offsets it covers. Steps, in this order:

        1. **bank flush**: buffered memory-bank writes reach Redis;
        2. **producer flush**: predictions and dead letters reach Kafka. When the broker is
           unreachable (``ProducerError``) the checkpoint and the commit are deferred to the
           next attempt rather than crashing: nothing is committed that is not durable, and
           re-delivery covers the rest (at-least-once);
        3. **ledger sync**: the ids of trained events are on disk (``checkpoint.ledger``);
        4. **save checkpoint**: model, optimizer, labels, offsets, probes and counters, written
           atomically (:func:`~pipeline.learner.checkpoint.save_checkpoint`), then the health
           board and the Prometheus series note its step, and every
           ``export.every_checkpoints``-th checkpoint is exported as a model bundle (it
           never covers more than the checkpoint);
        5. **commit offsets**: asynchronously, or with ``wait`` synchronously (the final
           commit), warning when it did not complete.

        The schedule restarts at ``(ctx.state.step, now)`` on every attempt, deferred or not
        (``now`` defaults to ``time.monotonic()``). Returns the checkpoint written, or None
        when deferred.
        """
        self.schedule_from(ctx.state.step, time.monotonic() if now is None else now)
        ctx.bank.flush()
        try:
            ctx.producer.flush()
        except ProducerError as exc:
            log.warning("checkpoint deferred: predictions/dead letters not durable", error=str(exc))
            return None
        path = self.save(ctx)
        if ctx.exporter is not None:
            # After the checkpoint is durable: a bundle never covers more than a checkpoint.
            ctx.exporter.after_checkpoint(ctx, dict(self.offsets))
        if not self.offsets:
            return path
        if wait:
            committed = ctx.source.commit_sync(dict(self.offsets), timeout_s=FINAL_COMMIT_TIMEOUT_S)
            if not committed:
                log.warning(
                    "final offset commit did not complete; events after the previous "
                    "commit will be re-delivered",
                    checkpoint=str(path),
                )
        else:
            ctx.source.commit(dict(self.offsets))
        if ctx.exposition is not None:
            ctx.exposition.commit_requested()
        log.debug("checkpoint written", path=str(path), offsets=len(self.offsets))
        return path

    def save(
        self,
        ctx: LearnerContext,
        *,
        offsets: Mapping[TopicPartitionKey, int] | None = None,
        ranks: list[dict[str, Any]] | None = None,
    ) -> Path:
        """Steps 3 and 4 of :meth:`commit`: sync the ledger, write the checkpoint atomically.

        A data-parallel group's rank 0 passes the union of the ranks' ``offsets`` and every
        rank's counters (``ranks``, :mod:`pipeline.learner.rank_cut`).
        """
        if ctx.ledger is not None:
            ctx.ledger.sync()
        ckpt = Checkpoint(
            step=ctx.state.step,
            model=ctx.state.model.state_dict(),
            optimizer=ctx.state.optimizer.state_dict(),
            labels=ctx.registry.names,
            class_task=dict(ctx.registry.class_task),
            offsets=dict(self.offsets if offsets is None else offsets),
            probe=ctx.probes.state(),
            counters={**ctx.counters.as_dict(), "skipped": float(ctx.state.skipped)},
            temperature=ctx.temperature,
            metrics=dict(ctx.last_metrics),
            start=dict(self.start),
            ranks=list(ranks or []),
            class_means=ctx.stream_means.state_dict() if ctx.stream_means is not None else None,
        )
        path = save_checkpoint(self.directory, ckpt, self.keep)
        if ctx.health is not None:
            ctx.health.progress(checkpoint_step=ctx.state.step, checkpoint_ts=round(time.time(), 3))
        if ctx.exposition is not None:
            ctx.exposition.checkpointed()
        return path
