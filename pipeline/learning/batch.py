"""One micro-batch of online learning against the memory bank, shared by every caller.

The streaming learner (:mod:`pipeline.learner.loop`) and the in-process forgetting benchmark
(:mod:`pipeline.devtools.bench.forgetting`) both learn a batch with :func:`learn_batch`, so the
numbers the benchmark reports are those of the code the learner runs:

    iters_per_batch × (select replay → train_step → write fresh replay embeddings back)
    → bank.add(batch)

Replay retrieval (:func:`select_replay`): ``replay_size`` items drawn ``replay_sampling``
(class-balanced or uniformly at random) plus up to ``hard_negatives`` FAISS hard negatives,
the bank items of other classes nearest to the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812

from memory_bank.bank import MemoryBank
from pipeline.config import TrainSettings
from pipeline.learning.step import StepInputs, StepResult, TrainState, train_step


@dataclass(frozen=True, slots=True)
class ReplaySelection:
    slots: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor
    versions: torch.Tensor


def select_replay(
    bank: MemoryBank,
    cfg: TrainSettings,
    state: TrainState,
    x: torch.Tensor,
    y: torch.Tensor,
    queries: torch.Tensor | None,
) -> ReplaySelection:
    """Bank items to contrast with the batch ``x``.

    ``queries`` are the batch's normalised embeddings under the current weights when the
    caller already has them (the previous step returns exactly these); else one forward.
    """
    empty = torch.empty(0, dtype=torch.long, device=x.device)
    if not cfg.replay_enabled or len(bank) == 0 or cfg.replay_size + cfg.hard_negatives == 0:
        return ReplaySelection(empty, x.new_empty(0, x.shape[1]), empty, empty)
    replay = bank.sample(cfg.replay_size, cfg.replay_sampling)
    if cfg.hard_negatives == 0:
        return ReplaySelection(replay.slots, replay.features, replay.labels, replay.versions)
    if queries is None:
        with torch.no_grad():
            state.model.eval()
            queries = F.normalize(state.model.embed(x).float(), dim=-1)
    hard = bank.hard_negatives(queries, y, cfg.hard_negatives, exclude_slots=replay.slots)
    h_feats, h_labels, h_versions = bank.gather(hard)
    return ReplaySelection(
        torch.cat([replay.slots, hard]),
        torch.cat([replay.features, h_feats]),
        torch.cat([replay.labels, h_labels]),
        torch.cat([replay.versions, h_versions]),
    )


def with_unlabeled(
    x: torch.Tensor, y: torch.Tensor, unlabeled: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append events without a label (label -1) after the labeled rows of a batch."""
    if unlabeled is None or unlabeled.shape[0] == 0:
        return x, y
    return torch.cat([x, unlabeled]), torch.cat([y, y.new_full((unlabeled.shape[0],), -1)])


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    losses: list[float]  # one per step that was not skipped
    per_sample_loss: torch.Tensor | None  # [n] of the last step that was not skipped
    skipped_any: bool
    # The labeled rows' fresh embeddings, when the caller offers them to the bank itself
    # (``offer=False``: a rank of a data-parallel group offers every rank's rows in turn).
    embeddings: torch.Tensor | None = None


def learn_batch(
    state: TrainState,
    bank: MemoryBank,
    cfg: TrainSettings,
    x: torch.Tensor,
    y: torch.Tensor,
    seen_classes: torch.Tensor,
    generator: torch.Generator | None,
    bank_items: tuple[Sequence[str], Sequence[str], Sequence[str | None]],
    *,
    weight: float = 1.0,
    offer: bool = True,
    trained: Callable[[], None] | None = None,
) -> BatchOutcome:
    """Train ``iters_per_batch`` steps on batch ∪ replay, then offer the batch to the bank.

    ``bank_items`` is (event ids, label names, tasks) of the labeled batch rows, which come
    first in ``x``; rows after them are events without a label (``y = -1``): they are trained
    on (NT-Xent in the contrastive terms) but never offered to the bank. ``weight`` is this
    rank's share of a data-parallel step (:mod:`pipeline.distributed.replicas`); with
    ``offer=False`` the batch is not offered here, its embeddings come back instead.

    ``trained`` is called once the steps are taken and before the batch reaches the bank: the
    learner appends the batch's ids to its ledger there. INVARIANT: an item in the bank has
    its ledger line, even when the process is killed between the two writes (the other order
    left bank items no ledger line proved trained).
    """
    losses: list[float] = []
    per_sample: torch.Tensor | None = None
    skipped_any = False
    result: StepResult | None = None
    results: list[StepResult] = []
    # The batch's inputs join the standardisation statistics before it is trained on.
    state.model.observe(x)
    for _ in range(cfg.iters_per_batch):
        queries = result.batch_embeddings if result is not None else None
        replay = select_replay(bank, cfg, state, x, y, queries)
        inputs = StepInputs(x, y, replay.features, replay.labels, seen_classes, weight)
        result = train_step(state, inputs, cfg, generator)
        if replay.slots.numel():
            # Re-encoded replay items write back their fresh embeddings (index refreshes).
            bank.update_embeddings(replay.slots, result.replay_embeddings, replay.versions)
        bank.step()
        results.append(result)
    assert result is not None  # iters_per_batch >= 1
    # Read back once per batch, after every step is queued (a host sync on CUDA).
    last_applied: StepResult | None = None
    for done in results:
        skipped_any |= done.skipped
        if done.loss is not None:
            losses.append(done.loss)
            last_applied = done
    if last_applied is not None:
        per_sample = last_applied.per_sample_loss  # one copy to the host, of the last step
    if trained is not None:
        trained()
    ids, names, tasks = bank_items
    k = len(ids)
    if not offer:
        return BatchOutcome(losses, per_sample, skipped_any, result.batch_embeddings[:k])
    bank.add(list(ids), x[:k], y[:k], list(names), result.batch_embeddings[:k], list(tasks))
    return BatchOutcome(losses, per_sample, skipped_any)


def idle_steps(
    state: TrainState,
    bank: MemoryBank,
    cfg: TrainSettings,
    input_dim: int,
    seen_classes: torch.Tensor,
) -> None:
    """A rank with no rows this turn still takes the group's ``iters_per_batch`` steps.

    Weight 0: its gradient is zero, but its backward joins the all-reduce, so no rank waits
    for it (:mod:`pipeline.distributed.replicas`), and its optimizer applies the same update.
    """
    device = seen_classes.device
    none = torch.empty(0, input_dim, device=device)
    no_labels = torch.empty(0, dtype=torch.long, device=device)
    for _ in range(cfg.iters_per_batch):
        inputs = StepInputs(none, no_labels, none, no_labels, seen_classes, 0.0)
        train_step(state, inputs, cfg)
        bank.step()
