"""What the ranks of a data-parallel group share after each turn: one logical bank and probe set.

Every rank keeps a full mirror of the *one* bank (and the one probe set). After a turn in
which any rank trained, every rank hands the others the rows it would have offered to the
bank (ids, features, class index, name, task, fresh embedding) and its probe rows, in one
``all_gather_object``; then every rank offers every rank's rows to its mirror **in rank
order**. The bank's decisions (idempotence by id, the reservoir's seeded draws) depend only on
that sequence of offers, so every mirror holds the same items, and replay on every rank draws
from the union of the classes any rank has seen; NCM means are over the whole bank.

Only rank 0's bank writes through to Redis (:class:`FollowerStore` on the others): one durable
copy, each id once. A restarted group loads it on every rank.

Cost per turn: one gather of ``rows × (input_dim + embed_dim)`` floats per rank, plus every
rank's ``bank.add`` of the group's rows (docs/architecture.md, "Data-parallel group").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from memory_bank.protocols import BankSnapshot, BankStore, StoredItem
from pipeline.config import TrainSettings
from pipeline.learner.context import LearnerContext
from pipeline.learner.predictions import follow_stream


@dataclass
class BankOffer:
    ids: list[str]
    features: torch.Tensor  # [k, input_dim] on CPU
    labels: torch.Tensor  # [k] class indices
    names: list[str]
    tasks: list[str | None]
    embeddings: torch.Tensor  # [k, embed_dim] on CPU


@dataclass
class GroupTurn:
    """One rank's part of a turn: its loss weight, and what it shares afterwards.

    ``report`` (its batch's telemetry record, empty without a batch) and ``totals`` (its
    counters) let rank 0 report the group's turn as one learner's step (:func:`group_report`).
    """

    weight: float = 1.0
    # This rank's share of the group's replay this turn (``train.replay_size`` and
    # ``train.hard_negatives`` split in proportion to the ranks' rows); None: the settings'.
    replay_size: int | None = None
    hard_negatives: int | None = None
    offer: BankOffer | None = None
    probes: list[tuple[str, torch.Tensor, int]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)

    def train_settings(self, cfg: TrainSettings) -> TrainSettings:
        """``cfg`` with this rank's replay share in place of the group's replay sizes."""
        if self.replay_size is None and self.hard_negatives is None:
            return cfg
        update = {"replay_size": self.replay_size, "hard_negatives": self.hard_negatives}
        return cfg.model_copy(update={k: v for k, v in update.items() if v is not None})


COUNTS = ("batch_events", "trained", "held_out", "predicted", "dead_lettered")


def group_report(turns: Sequence[GroupTurn]) -> tuple[dict[str, Any], dict[str, int]]:
    """One step record for the group's turn (counts summed, losses averaged), and the
    group's totals (every rank's counters summed)."""
    reports = [t.report for t in turns if t.report]
    losses = [r["loss"] for r in reports if r.get("loss") is not None]
    per_class: dict[str, list[float]] = {}
    for r in reports:
        for name, value in r.get("per_class_loss", {}).items():
            per_class.setdefault(name, []).append(value)
    record: dict[str, Any] = {
        "loss": round(sum(losses) / len(losses), 6) if losses else None,
        "per_class_loss": {k: round(sum(v) / len(v), 6) for k, v in per_class.items()},
        "skipped": any(r.get("skipped") for r in reports),
        **{k: sum(int(r.get(k, 0)) for r in reports) for k in COUNTS},
    }
    totals: dict[str, int] = {}
    for t in turns:
        for key, value in t.totals.items():
            totals[key] = totals.get(key, 0) + value
    return record, totals


def rank_totals(ctx: LearnerContext) -> dict[str, int]:
    c = ctx.counters
    return {
        "consumed": c.consumed,
        "trained": c.trained,
        "skipped": ctx.state.skipped,
        "prequential_correct": c.prequential_correct,
        "prequential_total": c.prequential_total,
    }


def apply_shared(ctx: LearnerContext, turns: Sequence[GroupTurn]) -> None:
    """Offer every rank's rows to this rank's bank and probe set, in rank order; then the
    stream class means follow the encoder and take in every rank's rows (the same model, bank
    and rows on every rank: the same means)."""
    device = ctx.device
    offers = [t.offer for t in turns if t.offer is not None and t.offer.ids]
    for turn in turns:
        for event_id, features, label in turn.probes:
            ctx.probes.add(event_id, features.to(device), label)
        o = turn.offer
        if o is None or not o.ids:
            continue
        ctx.bank.add(
            o.ids,
            o.features.to(device),
            o.labels.to(device),
            o.names,
            o.embeddings.to(device),
            o.tasks,
        )
    if offers:
        follow_stream(
            ctx,
            torch.cat([o.features for o in offers]).to(device),
            torch.cat([o.labels for o in offers]).to(device),
            [task for o in offers for task in o.tasks],
        )


class FollowerStore:
    """The bank store of ranks other than 0: reads Redis at start, writes nothing.

    Rank 0 writes the group's bank (every rank's rows, in the same order every mirror
    applies them), so the durable copy holds each id once.
    """

    def __init__(self, store: BankStore) -> None:
        self._store = store

    def load(self) -> BankSnapshot:
        return self._store.load()

    def apply(
        self,
        added: Sequence[StoredItem],
        evicted_ids: Sequence[str],
        seen_increments: Mapping[str, int],
    ) -> None:
        return None

    def write_embeddings(self, ids: Sequence[str], embeddings: np.ndarray) -> None:
        return None

    def clear(self) -> None:
        return None
