"""One micro-batch through the learner: split, predict-then-train, publish, dead-letter, count.

Every event of a batch has exactly one fate::

    probe (held out, never trained)  | labeled → predict, then train  | unlabeled → predicted
    | label past model.max_classes → dead letter

INVARIANT: trained + held_out + dead_lettered + predicted == consumed, for every batch.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np
import orjson
import torch

from consumers.decode import dead_letter_payload
from consumers.events import DeadLetter, EventBatch, SourceRecord
from pipeline.learner.context import LearnerContext
from pipeline.learner.predictions import follow_stream, predict, publish_predictions
from pipeline.learner.probes import is_probe
from pipeline.learner.sharing import BankOffer, GroupTurn
from pipeline.learning.batch import learn_batch, with_unlabeled
from pipeline.learning.objectives import chosen_classifier


def _register_labels(ctx: LearnerContext, batch: EventBatch) -> list[int | None]:
    """Class index per event (None for unlabeled, -1 when the class registry is full)."""
    out: list[int | None] = []
    for label, task in zip(batch.labels, batch.tasks, strict=True):
        if label is None:
            out.append(None)
        elif ctx.registry.has_room_for(label):
            idx = ctx.registry.index(label, task)
            ctx.registry.note_task(label, task)
            out.append(idx)
        else:
            out.append(-1)
    fresh = {idx for idx in out if idx is not None and idx >= 0}
    if fresh:
        # One indexed write per batch, not a tensor write per event (docs/performance.md).
        ctx.seen_classes[sorted(fresh)] = True
    return out


def _route(
    batch: EventBatch, class_idx: list[int | None], probe_fraction: float
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Rows by fate: (train, probe, predict, over the class limit); each row in exactly one."""
    train_rows: list[int] = []
    probe_rows: list[int] = []
    predict_rows: list[int] = []
    overflow: list[int] = []
    for i, idx in enumerate(class_idx):
        if idx is None:
            predict_rows.append(i)
        elif idx < 0:
            overflow.append(i)
        elif is_probe(batch.ids[i], probe_fraction):
            probe_rows.append(i)
        else:
            train_rows.append(i)
    return train_rows, probe_rows, predict_rows, overflow


def _dead_letter_class_limit(ctx: LearnerContext, batch: EventBatch, rows: list[int]) -> None:
    """Events whose label would exceed model.max_classes go to the DLQ, not into training."""
    for i in rows:
        src = batch.sources[i]
        # The consumer dropped the raw bytes to save memory; re-serialise the validated event.
        raw = _event_json(batch, i)
        letter = DeadLetter(
            reason="class_limit",
            detail=f"label {batch.labels[i]!r} would exceed model.max_classes="
            f"{ctx.settings.model.max_classes}",
            source=SourceRecord(src.topic, src.partition, src.offset, raw, src.timestamp_ms),
        )
        rejected_by = {"learner": ctx.name, "group": ctx.settings.group_id}
        ctx.producer.send(
            ctx.settings.kafka.dlq_topic, dead_letter_payload(letter, rejected_by=rejected_by)
        )


def _event_json(batch: EventBatch, i: int) -> bytes:
    return orjson.dumps(
        {
            "id": batch.ids[i],
            "features": batch.features[i].tolist(),
            "label": batch.labels[i],
            "task": batch.tasks[i],
        }
    )


def process_batch(
    ctx: LearnerContext, batch: EventBatch, turn: GroupTurn | None = None
) -> dict[str, Any]:
    """Handle one micro-batch; returns the step telemetry record (see ``emit.step_record``).

    Labels are registered, each event is routed by its fate, the labeled part is predicted
    and then trained on, the counters and the offsets covered (``ctx.checkpointer``) advance.
    On a rank of a data-parallel group (``turn``), the loss carries the rank's weight and the
    bank and probe rows go into ``turn`` for every rank to apply (:mod:`.sharing`).
    """
    s = ctx.settings
    started = time.perf_counter()
    steps_before, skipped_before = ctx.state.step, ctx.state.skipped
    train_s: float | None = None
    class_idx = _register_labels(ctx, batch)
    train_rows, probe_rows, predict_rows, overflow = _route(batch, class_idx, s.eval.probe_fraction)
    if overflow:
        _dead_letter_class_limit(ctx, batch, overflow)

    feats_all = torch.from_numpy(batch.features)
    if ctx.device.type == "cuda":
        feats_all = feats_all.pin_memory().to(ctx.device, non_blocking=True)

    _hold_out(ctx, batch, probe_rows, class_idx, feats_all, turn)
    if predict_rows:
        publish_predictions(ctx, batch, predict_rows, feats_all[predict_rows])

    record: dict[str, Any] = {"loss": None, "per_class_loss": {}, "skipped": False}
    if train_rows:
        x = feats_all[train_rows]
        y = torch.tensor([class_idx[i] for i in train_rows], dtype=torch.long, device=ctx.device)
        # Predict, then train: the prequential accuracy costs one forward pass.
        if len(ctx.bank) > 0 or chosen_classifier(s.train, s.eval.classifier) == "head":
            predicted, _ = predict(ctx, x)
            ctx.counters.prequential_correct += int((predicted == y).sum())
            ctx.counters.prequential_total += len(train_rows)
        unlabeled = feats_all[predict_rows] if s.train.train_unlabeled and predict_rows else None
        x, y = with_unlabeled(x, y, unlabeled)  # trained with NT-Xent, never banked
        train_started = time.perf_counter()
        record = _train_on(ctx, batch, train_rows, x, y, turn)
        train_s = time.perf_counter() - train_started
        tasks = [batch.tasks[i] for i in train_rows]
        ctx.current_task = tasks[-1] if tasks[-1] is not None else ctx.current_task

    c = ctx.counters
    c.batches += 1
    c.consumed += batch.consumed
    c.trained += len(train_rows)
    c.held_out += len(probe_rows)
    c.predicted += len(predict_rows)
    c.dead_lettered += len(batch.dead_letters) + len(overflow)
    if train_rows:
        times = batch.timestamps_ms[train_rows]  # the event time a model export covers
        earliest = int(times.min())
        c.first_event_ms = min(c.first_event_ms, earliest) if c.first_event_ms else earliest
        c.last_event_ms = max(c.last_event_ms, int(times.max()))
    ctx.checkpointer.cover(batch.offsets)
    if ctx.exposition is not None:
        reasons = Counter(dl.reason for dl in batch.dead_letters)
        if overflow:
            reasons["class_limit"] += len(overflow)
        ctx.exposition.batch_done(
            batch,
            {
                "consumed": batch.consumed,
                "trained": len(train_rows),
                "held_out": len(probe_rows),
                "predicted": len(predict_rows),
            },
            reasons,
            train_rows,
            (ctx.state.step - steps_before, ctx.state.skipped - skipped_before),
            (time.perf_counter() - started, train_s),
        )
    return {
        **record,
        "batch_events": batch.consumed,
        "trained": len(train_rows),
        "held_out": len(probe_rows),
        "predicted": len(predict_rows),
        "dead_lettered": len(batch.dead_letters) + len(overflow),
    }


def _hold_out(
    ctx: LearnerContext,
    batch: EventBatch,
    rows: list[int],
    class_idx: list[int | None],
    feats: torch.Tensor,
    turn: GroupTurn | None,
) -> None:
    """Probe rows into the probe set (a group's: into ``turn``, applied by every rank)."""
    for i in rows:
        label = int(class_idx[i])  # type: ignore[arg-type]
        if turn is None:
            ctx.probes.add(batch.ids[i], feats[i], label)
        else:
            turn.probes.append((batch.ids[i], feats[i].cpu(), label))


def _train_on(
    ctx: LearnerContext,
    batch: EventBatch,
    rows: list[int],
    x: torch.Tensor,
    y: torch.Tensor,
    turn: GroupTurn | None,
) -> dict[str, Any]:
    ids = [batch.ids[i] for i in rows]
    names = [batch.labels[i] or "" for i in rows]
    tasks = [batch.tasks[i] for i in rows]
    cfg = ctx.settings.train if turn is None else turn.train_settings(ctx.settings.train)
    ledger = ctx.ledger

    def record_trained() -> None:  # after the steps, before the bank holds the batch
        if ledger is not None:
            ledger.record(ctx.state.step, ids)

    outcome = learn_batch(
        ctx.state,
        ctx.bank,
        cfg,
        x,
        y,
        ctx.seen_classes,
        ctx.generator,
        (ids, names, tasks),
        weight=1.0 if turn is None else turn.weight,
        offer=turn is None,
        trained=record_trained,
    )
    if turn is None:  # a group's ranks follow every rank's rows (sharing.apply_shared)
        follow_stream(ctx, x[: len(rows)], y[: len(rows)], tasks[: len(rows)])
    if turn is not None and outcome.embeddings is not None:
        k = len(ids)
        turn.offer = BankOffer(
            ids, x[:k].cpu(), y[:k].cpu(), names, tasks, outcome.embeddings.cpu()
        )
    losses, per_sample = outcome.losses, outcome.per_sample_loss
    per_class: dict[str, float] = {}
    if per_sample is not None:
        ys = y.cpu()
        for cls in torch.unique(ys[ys >= 0]).tolist():
            per_class[ctx.registry.name(cls)] = round(float(per_sample[ys == cls].mean()), 6)
    return {
        "loss": round(float(np.mean(losses)), 6) if losses else None,
        "per_class_loss": per_class,
        "skipped": outcome.skipped_any,
    }
