"""The group checkpoint ("cut") of a data-parallel learner: one step, every rank, then commits.

Order (INVARIANT: an offset is committed only after the whole cut covering it is durable):

  1. every rank, at the same turn (a cut is voted, so every rank reaches it at the same
     optimizer step): its bank writes flushed (rank 0's reach Redis; the others' bank writes
     nothing, :class:`~pipeline.learner.sharing.FollowerStore`), its DLQ/predictions producer
     flushed, its ledger synced;
  2. one gather: each rank's covered offsets, counters and whether step 1 succeeded; a rank
     whose producer could not flush defers the whole cut (nothing committed anywhere);
  3. rank 0 writes the checkpoint atomically: model and optimizer (equal on every rank), the
     union of the ranks' offsets (the newest per partition) and every rank's counters;
  4. rank 0 tells every rank the file is durable (a broadcast: the barrier of the cut);
  5. every rank commits the offsets of the partitions it holds, never below what it
     committed (the source refuses partitions it no longer owns).

A rank killed anywhere in this leaves either the previous cut or this one complete on disk; the
restarted group resumes from it (rank 0 reads the checkpoint and broadcasts it).
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from consumers.events import TopicPartitionKey
from consumers.exceptions import ProducerError
from pipeline.distributed.group import broadcast_object, gather_objects, model_digest
from pipeline.exceptions import CheckpointError
from pipeline.learner.checkpointer import FINAL_COMMIT_TIMEOUT_S
from pipeline.learner.context import LearnerContext

log = structlog.get_logger(__name__)


def union_offsets(parts: list[dict[str, Any]]) -> dict[TopicPartitionKey, int]:
    """The newest offset per partition over every rank's covered offsets."""
    out: dict[TopicPartitionKey, int] = {}
    for part in parts:
        for (topic, partition), offset in part["offsets"].items():
            key = (str(topic), int(partition))
            out[key] = max(int(offset), out.get(key, 0))
    return out


def group_cut(ctx: LearnerContext, *, wait: bool = False, now: float | None = None) -> bool:
    """Steps 1-5 of the module doc; False when deferred (a producer could not flush)."""
    checkpointer = ctx.checkpointer
    checkpointer.schedule_from(ctx.state.step, time.monotonic() if now is None else now)
    ctx.bank.flush()
    ready = True
    try:
        ctx.producer.flush()
    except ProducerError as exc:
        log.warning("cut deferred: predictions/dead letters not durable", error=str(exc))
        ready = False
    if ctx.ledger is not None:
        ctx.ledger.sync()
    mine = {
        "ready": ready,
        "offsets": dict(checkpointer.offsets),
        "counters": {**ctx.counters.as_dict(), "skipped": float(ctx.state.skipped)},
    }
    parts = gather_objects(mine)
    if not all(p["ready"] for p in parts):
        return False
    saved: str | None = None
    if ctx.rank.leader:
        saved = _save(ctx, parts)
    saved = broadcast_object(saved)
    if saved is None:
        raise CheckpointError("rank 0 could not write the group's checkpoint (see its log)")
    _commit_held(ctx, wait)
    if ctx.health is not None:
        ctx.health.progress(model_digest=model_digest(ctx.state.model), cut_step=ctx.state.step)
    return True


def _save(ctx: LearnerContext, parts: list[dict[str, Any]]) -> str | None:
    offsets = union_offsets(parts)
    ranks = [{"counters": p["counters"]} for p in parts]
    try:
        path = ctx.checkpointer.save(ctx, offsets=offsets, ranks=ranks)
    except CheckpointError as exc:
        log.error("group checkpoint failed", error=str(exc))
        return None
    if ctx.exporter is not None:
        ctx.exporter.after_checkpoint(ctx, offsets)
    log.debug("group checkpoint written", path=str(path), step=ctx.state.step)
    return str(path)


def _commit_held(ctx: LearnerContext, wait: bool) -> None:
    held = ctx.source.assignment()
    offsets = {tp: o for tp, o in ctx.checkpointer.offsets.items() if tp in held}
    if not offsets:
        return
    if wait:
        if not ctx.source.commit_sync(offsets, timeout_s=FINAL_COMMIT_TIMEOUT_S):
            log.warning("final offset commit did not complete; re-delivery covers it")
    else:
        ctx.source.commit(offsets)
    if ctx.exposition is not None:
        ctx.exposition.commit_requested()
