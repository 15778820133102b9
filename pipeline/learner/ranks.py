"""The learner as one rank of a data-parallel group (``torchrun``, ``WORLD_SIZE`` > 1).

Every rank is a member of the learner's consumer group (Kafka splits the partitions) and
trains the one shared model (DDP averages the gradients, :mod:`pipeline.distributed.replicas`).
A group turn, on every rank, with its collectives always in this order::

    get          a batch, or none (none at all until the group has settled, a short wait
                 while the group is busy); rows of partitions no longer assigned dropped
    vote         one all_gather_object: stop? finished? checkpoint due? partitions held,
                 new label names, rows to train
    leave        any rank stopping (SIGTERM), or every rank finished (idle / --max-events)
    settle       until settled: the group trains once the ranks' assignments are
                 disjoint and cover every partition (no batch is read before, so no partition
                 read by one rank is read again by its next owner)
    cut          any rank due: the group checkpoint (:mod:`.rank_cut`)
    labels       every rank registers every rank's new labels, in rank order: one registry,
                 one class index per name on every rank (the CE head is shared)
    train        rows in the group: ``train.iters_per_batch`` DDP steps on every rank, a rank
                 without rows with weight 0 (:func:`~pipeline.learning.batch.idle_steps`),
                 each rank with rows replaying its rows' share of the group's replay
                 (:func:`group_turn`; each rank reads its share of ``consumer.batch_size``,
                 :func:`rank_settings`: a group step is one learner's step)
    share        a batch anywhere: one gather of bank and probe rows, applied in rank order
                 (:mod:`.sharing`: one logical bank, one probe set)
    emit         rank 0: telemetry for the group (the sidecar sees one learner); every rank:
                 its health file
    rebalance    a rank's partitions differ from those the group settled on: a cut, then the
                 group settles again (a rebalance takes effect at a cut)

A rank killed mid-turn makes the others' next collective fail; torchrun (``--max-restarts``)
then restarts the whole group, which resumes from the last complete cut.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import structlog

from consumers.events import EventBatch, TopicPartitionKey, restrict
from consumers.positions import OffsetProbe
from pipeline.config import Settings, TrainSettings
from pipeline.distributed.group import (
    gather_objects,
    join_group,
    leave_group,
    model_digest,
    state_digest,
)
from pipeline.distributed.rank_info import RankInfo
from pipeline.distributed.replicas import release
from pipeline.distributed.shares import rank_share, split
from pipeline.exceptions import SupconStreamError
from pipeline.learner.assembly import build_context, resolve_device
from pipeline.learner.context import LearnerContext, LearnerSummary
from pipeline.learner.emit import (
    Emitter,
    emit_end,
    emit_eval,
    loop_tick,
    note_progress,
)
from pipeline.learner.idle import JOIN_TIMEOUT_S, IdleWatch
from pipeline.learner.loop import RunLimits, batch_log_context, running, summarize
from pipeline.learner.process import process_batch
from pipeline.learner.rank_cut import group_cut
from pipeline.learner.sharing import GroupTurn, apply_shared, group_report, rank_totals
from pipeline.learner.start import NO_REQUEST, StartRequest
from pipeline.learning.batch import idle_steps

log = structlog.get_logger(__name__)

BUSY_GET_S = 0.01  # while any rank has work, a turn waits this long for a batch
IDLE_GET_S = 0.5
SETTLE_WAIT_S = 0.2
NO_LIMITS = RunLimits()


@dataclass(frozen=True)
class Vote:
    """What one rank says at the start of a turn."""

    stop: bool
    finished: bool
    due: bool
    has_batch: bool
    rows: int  # rows it will train this turn
    labels: tuple[tuple[str, str | None], ...]  # label names it has not registered, in order
    assigned: frozenset[TopicPartitionKey]


def moved(held: list[frozenset[TopicPartitionKey]], votes: list[Vote]) -> bool:
    """True when some rank no longer holds what the group settled on (a rebalance)."""
    return held != [v.assigned for v in votes]


def settled(votes: list[Vote], partitions: int) -> bool:
    """True once the ranks hold disjoint assignments covering ``partitions`` partitions."""
    held = [v.assigned for v in votes]
    union = frozenset().union(*held)
    return len(union) == partitions and sum(len(h) for h in held) == len(union)


def new_labels(ctx: LearnerContext, batch: EventBatch | None) -> tuple[tuple[str, str | None], ...]:
    """Labels of ``batch`` this rank's registry lacks, first appearance first."""
    if batch is None:
        return ()
    known = set(ctx.registry.names)
    out: dict[str, str | None] = {}
    for label, task in zip(batch.labels, batch.tasks, strict=True):
        if label is not None and label not in known and label not in out:
            out[label] = task
    return tuple(out.items())


def rows_to_train(ctx: LearnerContext, batch: EventBatch | None) -> int:
    """Rows of ``batch`` the step will train: labeled non-probes (and unlabeled, when trained)."""
    if batch is None:
        return 0
    from pipeline.learner.probes import is_probe

    fraction = ctx.settings.eval.probe_fraction
    labeled = sum(
        1
        for event_id, label in zip(batch.ids, batch.labels, strict=True)
        if label is not None and not is_probe(event_id, fraction)
    )
    unlabeled = sum(1 for label in batch.labels if label is None)
    # Unlabeled rows are trained only beside labeled ones (process_batch).
    return labeled + (unlabeled if labeled and ctx.settings.train.train_unlabeled else 0)


def register_group_labels(ctx: LearnerContext, votes: list[Vote]) -> None:
    """Every rank's new labels into this rank's registry, in rank order (room permitting)."""
    for vote in votes:
        for label, task in vote.labels:
            if ctx.registry.has_room_for(label):
                idx = ctx.registry.index(label, task)
                ctx.seen_classes[idx] = True


def group_turn(train: TrainSettings, rank: RankInfo, rows: list[int]) -> GroupTurn:
    """This rank's part of the group's step, from every rank's rows to train this turn.

    The weight of its loss is ``rows_r * N / sum(rows)`` (:mod:`pipeline.distributed.replicas`),
    and it replays its rows' share of the group's ``train.replay_size`` and
    ``train.hard_negatives``: the group's step has one learner's replay beside the group's
    rows, and every rank's loss averages rows and replay in the same proportion.
    """
    me = rank.rank
    return GroupTurn(
        weight=rank.world_size * rows[me] / max(sum(rows), 1),
        replay_size=split(train.replay_size, rows)[me],
        hard_negatives=split(train.hard_negatives, rows)[me],
    )


def rank_settings(settings: Settings, rank: RankInfo) -> Settings:
    """This rank's settings: its share of the group's ``consumer.batch_size`` (at least 1)."""
    share = max(1, rank_share(settings.consumer.batch_size, rank.world_size, rank.rank))
    consumer = settings.consumer.model_copy(update={"batch_size": share})
    return settings.model_copy(update={"consumer": consumer})


def run_group_learner(
    settings: Settings,
    stop: threading.Event,
    rank: RankInfo,
    limits: RunLimits = NO_LIMITS,
    start: StartRequest = NO_REQUEST,
) -> LearnerSummary:
    """:func:`~pipeline.learner.loop.run_learner` for one rank of a group (module doc)."""
    join_group(rank, resolve_device(settings.train.device))
    ctx: LearnerContext | None = None
    try:
        settings = rank_settings(settings, rank)
        ctx = build_context(settings, stop, start_source=True, request=start, rank=rank)
        return _run(ctx, stop, limits)
    finally:
        if ctx is not None:
            release(ctx.state)  # the DDP wrapper goes before its process group
        leave_group()


def _run(ctx: LearnerContext, stop: threading.Event, limits: RunLimits) -> LearnerSummary:
    settings = ctx.settings
    log.info(
        "learner rank starting", group=settings.group_id, step=ctx.state.step, **ctx.rank.as_dict()
    )
    ctx.started = now = time.monotonic()
    start_consumed = ctx.counters.consumed
    ctx.checkpointer.schedule_from(ctx.state.step, now)
    topic = settings.kafka.events_topic
    with OffsetProbe(settings.kafka.client_options(), topic) as probe:
        partitions = len(probe.partitions())
    idle = IdleWatch(ctx.source.assignment, topic, limits.exit_when_idle_s, now)
    emitter = Emitter(ctx, start_consumed, now) if ctx.rank.leader else None
    turns = _Turns(ctx, stop, idle, limits, start_consumed, partitions)
    committed_at = now
    with running(ctx):
        while turns.next(emitter):
            pass
        if emitter is not None:
            emit_eval(ctx)
        group_cut(ctx, wait=True)
        committed_at = time.monotonic()
        if emitter is not None:
            consumed = turns.totals.get("consumed", ctx.counters.consumed)
            digest = model_digest(ctx.state.model)
            end = {"events_total": consumed, "world_size": ctx.rank.world_size}
            emit_end(ctx, {**end, "model_digest": digest})
    group = {**ctx.rank.as_dict(), "model_digest": model_digest(ctx.state.model)}
    if ctx.stream_means is not None:  # equal on every rank, as the model
        group["means_digest"] = state_digest(ctx.stream_means.running.tensors())
    return summarize(ctx, idle, start_consumed, committed_at, group)


class _Turns:
    """The group turn of the module doc; ``next`` plays one and says whether to go on."""

    def __init__(
        self,
        ctx: LearnerContext,
        stop: threading.Event,
        idle: IdleWatch,
        limits: RunLimits,
        start_consumed: int,
        partitions: int,
    ) -> None:
        self.ctx, self.stop, self.idle, self.limits = ctx, stop, idle, limits
        self.start_consumed = start_consumed
        self.partitions = partitions
        self.settled = False
        self.held: list[frozenset[TopicPartitionKey]] = []  # what the group settled on
        self.busy = False
        self.totals: dict[str, int] = {}  # the group's counters at the last busy turn
        self.started = time.monotonic()

    def next(self, emitter: Emitter | None) -> bool:
        ctx = self.ctx
        batch = self._get()
        now = time.monotonic()
        loop_tick(ctx, now)
        if batch is not None:
            self.idle.batch_arrived(now)
        votes = gather_objects(self._vote(batch, now))
        if any(v.stop for v in votes) or all(v.finished for v in votes):
            return False
        if not self.settled:
            self._settle(votes)
            return True
        if any(v.due for v in votes):
            group_cut(ctx, now=now)
        register_group_labels(ctx, votes)
        total = sum(v.rows for v in votes)
        self.busy = any(v.has_batch for v in votes)
        turn = group_turn(ctx.settings.train, ctx.rank, [v.rows for v in votes])
        if batch is not None:
            with batch_log_context(ctx, batch):
                turn.report = process_batch(ctx, batch, turn)
        if total > 0 and not turn.report.get("trained"):
            s = ctx.settings
            idle_steps(ctx.state, ctx.bank, s.train, s.model.input_dim, ctx.seen_classes)
        if self.busy:
            turn.totals = rank_totals(ctx)
            turns = gather_objects(turn)
            apply_shared(ctx, turns)
            record, self.totals = group_report(turns)
            if emitter is not None:
                emitter.batch(record, now, self.totals)
            else:
                note_progress(ctx)
        if batch is not None:
            self.idle.batch_processed(time.monotonic())
        if moved(self.held, votes):
            self._unsettle(votes, now)
        return True

    def _get(self) -> EventBatch | None:
        ctx = self.ctx
        if not self.settled or self._reached_max_events():
            self.stop.wait(SETTLE_WAIT_S)
            return None
        batch = ctx.source.get(timeout_s=BUSY_GET_S if self.busy else IDLE_GET_S)
        if batch is None:
            return None
        kept = restrict(batch, ctx.source.assignment())
        if kept.consumed < batch.consumed:
            log.warning(
                "dropped records of partitions no longer assigned; their new owner reads them",
                dropped=batch.consumed - kept.consumed,
            )
        return kept if kept.consumed else None

    def _vote(self, batch: EventBatch | None, now: float) -> Vote:
        ctx = self.ctx
        finished = self._reached_max_events() or (
            self.settled and batch is None and self.idle.should_finish(now)
        )
        return Vote(
            stop=self.stop.is_set(),
            finished=finished,
            due=self.settled and ctx.checkpointer.due(ctx.state.step, now),
            has_batch=batch is not None,
            rows=rows_to_train(ctx, batch),
            labels=new_labels(ctx, batch),
            assigned=frozenset(ctx.source.assignment()),
        )

    def _settle(self, votes: list[Vote]) -> None:
        if settled(votes, self.partitions):
            self.settled = True
            self.held = [v.assigned for v in votes]
            self.idle.joined = True  # a rank without partitions is joined too
            self.idle.batch_processed(time.monotonic())  # idle time counts from here
            log.info(
                "group settled; training starts",
                partitions={i: sorted(p for _, p in v.assigned) for i, v in enumerate(votes)},
            )
            if self.ctx.health is not None:
                self.ctx.health.mark_ready("partitions_assigned")
            return
        waited = time.monotonic() - self.started
        if self.limits.exit_when_idle_s is not None and waited > JOIN_TIMEOUT_S:
            raise SupconStreamError(
                f"the group did not settle on the {self.partitions} partitions of "
                f"{self.ctx.settings.kafka.events_topic} within {JOIN_TIMEOUT_S:.0f} s"
            )

    def _unsettle(self, votes: list[Vote], now: float) -> None:
        """A rebalance moved partitions between ranks: cut, then settle again before reading.

        The cut makes the move take effect at a complete checkpoint; the group then reads
        nothing until every partition has one owner again (batches already handed over keep
        only the rows of partitions their rank still holds).
        """
        log.warning(
            "partitions moved between ranks; the group cuts and settles again",
            partitions={i: sorted(p for _, p in v.assigned) for i, v in enumerate(votes)},
        )
        group_cut(self.ctx, now=now)
        self.settled, self.busy = False, False
        self.started = time.monotonic()

    def _reached_max_events(self) -> bool:
        limit = self.limits.max_events
        return limit is not None and self.ctx.counters.consumed - self.start_consumed >= limit
