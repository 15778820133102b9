"""The memory bank: an in-process mirror of past examples, written through to a durable store.

The learner samples replay, looks up hard negatives and computes class means every step, so
those read the mirror (:mod:`memory_bank.mirror`, tensors on the learner's device), never
Redis: a Redis round trip per step would cap a GPU learner far below what it can train. Redis
(a :class:`~memory_bank.protocols.BankStore`) is written once per :meth:`MemoryBank.add`, at
checkpoints (:meth:`MemoryBank.flush`) and read once, at start (:meth:`MemoryBank.open`).

INVARIANTS

- The bank is idempotent by event id: offering an id that is stored, or that this process
  offered recently (declined or since evicted; the last ``recent_ids`` of them), changes
  nothing, not even the per-class ``seen`` counter. After a crash the recent-id memory is
  gone; a replayed event that was declined before can then bump ``seen`` once more (and gets
  the same hash-derived accept draw), but a stored id never counts twice.
- Write-through: the store is written before the mirror. If ``store.apply`` fails, the
  reservoir's bookkeeping is rolled back and the mirror is untouched, so the mirror never
  holds what the durable copy lacks.
- Capacity is never exceeded; eviction follows the bank's policy, class-balanced by default
  or plain reservoir (:mod:`memory_bank.reservoir`).

Not thread-safe: one training thread owns the bank.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import structlog
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)

from memory_bank.eviction import ADAPTIVE_ITEMS, EVICTIONS, EmbeddingVictims, TargetMeans
from memory_bank.ids import ClassNames, RecentIds
from memory_bank.mirror import Mirror
from memory_bank.protocols import BankSnapshot, BankStore, StoredItem, VectorIndex
from memory_bank.replay import Replay, ReplaySampler
from memory_bank.reservoir import POLICIES, Plan, class_balanced_subset
from memory_bank.search import MirrorSearch

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class AddResult:
    """Outcome of one :meth:`MemoryBank.add`: ``added + duplicates + declined == offered``.

    ``evicted`` counts every eviction the call made, including items it added and evicted
    again, so ``len(bank)`` changed by ``added - evicted``.
    """

    added: int
    evicted: int
    duplicates: int
    declined: int


class MemoryBank:
    """Replay memory (class-balanced or plain reservoir) with a FAISS/torch index over it.

    Use :meth:`open` to start from what the store holds. The constructor starts an empty
    mirror and is meant for an empty (or just cleared) store.
    """

    def __init__(
        self,
        store: BankStore,
        index: VectorIndex,
        capacity: int,
        input_dim: int,
        embed_dim: int,
        device: torch.device | str,
        *,
        seed: int = 0,
        index_refresh_steps: int = 10,
        hard_negative_queries: int = 32,
        recent_ids: int = 65_536,
        policy: str = "class_balanced",
        hard_negative_every: int = 1,
        draw_seed: int | None = None,
        eviction: str = "random",
        adaptive_items: int = ADAPTIVE_ITEMS,
    ) -> None:
        if capacity < 1 or input_dim < 1 or embed_dim < 1:
            raise ValueError(f"need capacity, input_dim, embed_dim >= 1: {capacity=}")
        if index_refresh_steps < 1 or hard_negative_queries < 1 or recent_ids < 0:
            raise ValueError(
                f"need index_refresh_steps >= 1, hard_negative_queries >= 1, recent_ids >= 0: "
                f"{index_refresh_steps=} {hard_negative_queries=} {recent_ids=}"
            )
        self.capacity = capacity
        self.input_dim = input_dim
        self.embed_dim = embed_dim
        self.device = torch.device(device)
        self.seed = seed
        self.index_refresh_steps = index_refresh_steps
        self.hard_negative_queries = hard_negative_queries
        if hard_negative_every < 1:
            raise ValueError(f"need hard_negative_every >= 1: {hard_negative_every=}")
        self.hard_negative_every = hard_negative_every
        self._store = store
        if policy not in POLICIES:
            raise ValueError(f"unknown bank policy {policy!r}; known: {sorted(POLICIES)}")
        self.policy = policy
        self._reservoir = POLICIES[policy](capacity, seed)
        if eviction not in EVICTIONS:
            raise ValueError(f"unknown eviction {eviction!r}; known: {list(EVICTIONS)}")
        if eviction != "random" and policy != "class_balanced":
            raise ValueError(f"eviction {eviction!r} needs the class_balanced policy")
        self.eviction = eviction
        self._mirror = mirror = Mirror(capacity, input_dim, embed_dim, self.device)
        # Which item of a class leaves when the class gives up a slot (memory_bank/eviction.py)
        self._victims = (
            EmbeddingVictims(
                eviction, mirror, self._reservoir.slot_of, self._reservoir.id_at, adaptive_items
            )
            if eviction != "random"
            else None
        )
        if self._victims is not None:
            self._reservoir.victim_chooser = self._victims

        self._names = ClassNames()
        self._recent = RecentIds(recent_ids)

        # Replay and hard-negative draws: ``draw_seed`` (default ``seed``). What the bank
        # holds depends on ``seed`` alone, so mirrors that draw differently hold the same items.
        draws = seed if draw_seed is None else draw_seed
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(draws)
        self._replay = ReplaySampler(
            mirror.features,
            mirror.labels,
            mirror.versions,
            self._reservoir,
            lambda: max(1, self._names.bound()),
            self._generator,
            draws,
        )
        self._search = MirrorSearch(
            index,
            mirror.embeddings,
            mirror.labels,
            self.__len__,
            self._generator,
            refresh_steps=index_refresh_steps,
            hard_negative_queries=hard_negative_queries,
            hard_negative_every=hard_negative_every,
        )

    # -- construction from the store -------------------------------------------------------

    @classmethod
    def open(
        cls,
        store: BankStore,
        index: VectorIndex,
        capacity: int,
        input_dim: int,
        embed_dim: int,
        device: torch.device | str,
        label_index: Callable[[str], int],
        *,
        seed: int = 0,
        index_refresh_steps: int = 10,
        hard_negative_queries: int = 32,
        recent_ids: int = 65_536,
        policy: str = "class_balanced",
        hard_negative_every: int = 1,
        snapshot: BankSnapshot | None = None,
        draw_seed: int | None = None,
        eviction: str = "random",
        adaptive_items: int = ADAPTIVE_ITEMS,
    ) -> MemoryBank:
        """Load the store's snapshot and rebuild the mirror and the index from it.

        ``snapshot``: the store's snapshot when the caller already read it (a learner reads
        it on a thread while it starts); otherwise it is loaded here.

        ``label_index`` maps a stored class name to the learner's int label. When the store
        holds more items than ``capacity`` (the capacity was lowered), the bank evicts
        class-balanced down to it and writes the evictions through.
        """
        started = time.perf_counter()
        bank = cls(
            store,
            index,
            capacity,
            input_dim,
            embed_dim,
            device,
            seed=seed,
            index_refresh_steps=index_refresh_steps,
            hard_negative_queries=hard_negative_queries,
            recent_ids=recent_ids,
            policy=policy,
            hard_negative_every=hard_negative_every,
            draw_seed=draw_seed,
            eviction=eviction,
            adaptive_items=adaptive_items,
        )
        bank._restore(snapshot if snapshot is not None else store.load(), label_index)
        log.info(
            "memory_bank_opened",
            items=len(bank),
            classes=len(bank.class_counts()),
            capacity=capacity,
            seconds=round(time.perf_counter() - started, 3),
        )
        return bank

    def _restore(self, snapshot: BankSnapshot, label_index: Callable[[str], int]) -> None:
        # Sorted by id so that slots, and so sampling with a fixed seed, do not depend on the
        # order the store happened to return. Column-wise: one call per class name, one
        # fancy-indexed copy per column (a 100k-item bank restores in bulk).
        order = sorted(range(len(snapshot)), key=snapshot.ids.__getitem__)
        ids = [snapshot.ids[row] for row in order]
        label_of = {
            name: self._names.register(label_index(name), name)
            for name in dict.fromkeys(snapshot.labels)
        }
        labels = [label_of[snapshot.labels[row]] for row in order]
        seen = {
            self._names.register(label_index(name), name): int(count)
            for name, count in snapshot.seen_per_class.items()
        }
        if len(ids) > self.capacity:
            keep = class_balanced_subset(labels, self.capacity, random.Random(self.seed))
            kept = set(keep)
            evicted = [event_id for i, event_id in enumerate(ids) if i not in kept]
            self._store.apply([], evicted, {})
            log.warning(
                "memory_bank_shrunk_to_capacity",
                stored=len(ids),
                capacity=self.capacity,
                evicted=len(evicted),
            )
            order = [order[i] for i in keep]
            ids = [ids[i] for i in keep]
            labels = [labels[i] for i in keep]
        slots = self._reservoir.restore(list(zip(ids, labels, strict=True)), seen)
        if ids:
            rows = np.asarray(order, dtype=np.int64)
            features = np.asarray(snapshot.features, dtype=np.float32)[rows]
            embeddings = np.asarray(snapshot.embeddings, dtype=np.float32)[rows]
            tasks = [snapshot.tasks[row] for row in order]
            self._mirror.load(slots, features, embeddings, labels, tasks)
        self._replay.invalidate()
        self.refresh_index()

    def _offer(
        self,
        ids: Sequence[str],
        fresh: list[int],
        labels: list[int],
        embeddings: torch.Tensor,
    ) -> Plan:
        """The reservoir's plan for the batch positions ``fresh``; an embedding-aware victim
        chooser sees their embeddings while it decides."""
        if self._victims is not None:
            self._victims.offering([ids[p] for p in fresh], embeddings[fresh])
        try:
            return self._reservoir.offer_batch([(ids[p], labels[p]) for p in fresh])
        finally:
            if self._victims is not None:
                self._victims.offered()

    def set_eviction_target(self, target: TargetMeans | None) -> None:
        """``eviction="stream_mean"`` / ``"adaptive"``: the target mean embedding per class (the
        learner's stream class means); without one, a class's victim is chosen
        mean-preserving."""
        if self._victims is not None:
            self._victims.set_target(target)

    # -- writes ----------------------------------------------------------------------------

    def add(
        self,
        ids: Sequence[str],
        features: torch.Tensor,
        labels: torch.Tensor,
        label_names: Sequence[str],
        embeddings: torch.Tensor,
        tasks: Sequence[str | None],
    ) -> AddResult:
        """Offer a batch to the reservoir; one ``store.apply`` writes its effect through.

        ``labels`` are the learner's int labels, ``label_names`` the class names stored in
        Redis, ``embeddings`` the encoder outputs (normalised here).
        """
        n = len(ids)
        self._mirror.check_rows(n, features, labels, embeddings)
        if len(label_names) != n or len(tasks) != n:
            raise ValueError(f"{n} ids, {len(label_names)} label names, {len(tasks)} tasks")
        if n == 0:
            return AddResult(0, 0, 0, 0)
        labels_host: list[int] = labels.detach().to("cpu", torch.int64).tolist()  # one sync

        fresh: list[int] = []  # batch positions of ids never seen before
        in_batch: set[str] = set()
        for position, event_id in enumerate(ids):
            if event_id in self._reservoir or event_id in self._recent or event_id in in_batch:
                continue
            in_batch.add(event_id)
            fresh.append(position)
            self._names.register(labels_host[position], label_names[position])
        duplicates = n - len(fresh)
        if not fresh:
            return AddResult(0, 0, duplicates, 0)

        plan = self._offer(ids, fresh, labels_host, embeddings)
        placed = sorted((slot, fresh[j]) for slot, j in plan.placements.items())
        dst = torch.tensor([slot for slot, _ in placed], dtype=torch.int64, device=self.device)
        src = torch.tensor([p for _, p in placed], dtype=torch.int64, device=features.device)
        new_features = features.detach()[src].to(self.device, torch.float32)
        new_embeddings = F.normalize(
            embeddings.detach()[src.to(embeddings.device)].to(self.device, torch.float32), dim=1
        )
        added_items: list[StoredItem] = []
        if placed:
            # One device->host copy per tensor per call, not per item.
            features_np = new_features.cpu().numpy()
            embeddings_np = new_embeddings.cpu().numpy()
            added_items = [
                StoredItem(
                    id=ids[p],
                    features=features_np[row],
                    embedding=embeddings_np[row],
                    label=label_names[p],
                    task=tasks[p],
                )
                for row, (_, p) in enumerate(placed)
            ]
        seen_increments = {
            self._names.by_label[lab]: inc for lab, inc in plan.seen_increments.items()
        }
        try:
            self._store.apply(added_items, plan.evicted, seen_increments)
        except BaseException:
            self._reservoir.rollback(plan)
            raise

        if placed:
            new_labels = labels.detach()[src.to(labels.device)].to(self.device, torch.int64)
            slot_tasks = [(slot, tasks[p]) for slot, p in placed]
            self._mirror.place(dst, new_features, new_embeddings, new_labels, slot_tasks)
        for p in fresh:
            if ids[p] not in self._reservoir:
                self._recent.add(ids[p])  # declined, or accepted and evicted in this call
        for event_id in plan.evicted:
            self._recent.add(event_id)
        if plan.added or plan.evictions:
            self._replay.invalidate()
            self._search.mark_stale()
        return AddResult(plan.added, plan.evictions, duplicates, plan.declined)

    def update_embeddings(
        self, slots: torch.Tensor, embeddings: torch.Tensor, versions: torch.Tensor | None = None
    ) -> None:
        """Write re-encoded embeddings of replayed items into the mirror (no store access).

        With ``versions`` (from :class:`Replay`), slots refilled since the draw are skipped, so
        an ``add`` between sample and write-back cannot give a new item an old embedding.
        The index sees the new embeddings at its next refresh; the store at :meth:`flush`.
        """
        if slots.numel() == 0:
            return
        self._mirror.write_back(slots, embeddings, versions)
        self._search.mark_stale()

    def flush(self) -> int:
        """Write dirty embeddings to the store in one batched call; returns how many."""
        dirty = self._mirror.dirty_slots()
        if dirty.numel() == 0:
            return 0
        ids: list[str] = []
        for slot in dirty.tolist():
            event_id = self._reservoir.id_at(slot)
            if event_id is None:  # labels >= 0 exactly where the reservoir holds an item
                raise RuntimeError(f"bank mirror out of sync with its bookkeeping at slot {slot}")
            ids.append(event_id)
        self._store.write_embeddings(ids, self._mirror.embeddings[dirty].cpu().numpy())
        self._mirror.dirty[dirty] = False
        log.debug("memory_bank_flushed", embeddings=len(ids))
        return len(ids)

    # -- index (memory_bank.search) -------------------------------------------------------

    def step(self) -> None:
        """Called once per train step: the index is due for a rebuild every
        ``index_refresh_steps`` steps when stale.

        The rebuild itself is lazy, done just before the next search (:meth:`hard_negatives`,
        :meth:`knn_predict`): with a search interval, a large bank is not copied into the
        index on steps that never search it (the rebuild's cost: docs/performance.md).
        """
        self._search.step()

    def refresh_index(self) -> None:
        """Rebuild the index from the mirror's current embeddings (one host sync)."""
        self._search.refresh()

    # -- reads -----------------------------------------------------------------------------

    def sample(self, n: int, how: str = "class_balanced") -> Replay:
        """Up to ``n`` distinct items (no Redis access).

        ``how="class_balanced"``: each class equally likely per draw; ``"random"``: each
        stored item equally likely (classes in the bank's proportions).
        """
        return self._replay.sample(n, how)

    def hard_negatives(
        self,
        queries: torch.Tensor,
        query_labels: torch.Tensor,
        k: int,
        exclude_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Up to ``k`` distinct slots of other classes nearest to the queries, best first.

        At most ``hard_negative_queries`` queries are searched (a random subset), on every
        ``hard_negative_every``-th call only; see :meth:`MirrorSearch.hard_negatives`.
        """
        return self._search.hard_negatives(queries, query_labels, k, exclude_slots)

    def knn_predict(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarity-weighted majority vote of the ``k`` nearest items.

        Returns (labels int64 [q], confidence float32 [q] = winning share of the vote);
        label -1 and confidence 0 when the bank is empty (an empty index over a non-empty
        bank is built first).
        """
        return self._search.knn_predict(queries, k, n_labels=self._names.bound())

    def class_means(
        self, embeddings: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised mean embedding per stored class: (labels [k], means [k, e]).

        ``embeddings``, when given, are fresh encodings aligned with :meth:`occupied`'s slots
        (re-encoded at evaluation); otherwise the mirror's embeddings are used.
        """
        return self._mirror.class_means(embeddings)

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features, labels, versions) of ``slots``, e.g. of :meth:`hard_negatives`' result.

        Pass the versions to :meth:`update_embeddings` as with a :class:`Replay`.
        """
        return self._mirror.gather(slots)

    def occupied(self, below: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slots ascending, features, labels) of every stored item, for re-encoding; with
        ``below``, of the items in the first ``below`` slots only (a bounded, stable subset:
        an item keeps its slot until it is evicted)."""
        return self._mirror.occupied(below)

    def __len__(self) -> int:
        return len(self._reservoir)

    def class_counts(self) -> dict[int, int]:
        return self._reservoir.class_counts()

    def seen_counts(self) -> dict[int, int]:
        """Events offered to the reservoir per class (what ``m_c / n_c`` divides by)."""
        return self._reservoir.seen_counts()

    def label_names(self) -> dict[int, str]:
        return dict(self._names.by_label)

    def ids(self) -> list[str]:
        return self._reservoir.ids()

    def slot_ids(self, slots: torch.Tensor) -> list[str | None]:
        """Event ids held by ``slots`` (None for empty slots)."""
        return [self._reservoir.id_at(slot) for slot in slots.tolist()]

    def slot_tasks(self, slots: torch.Tensor) -> list[str | None]:
        """The tasks of the items held by ``slots`` (None for an item without one)."""
        return [self._mirror.tasks[slot] for slot in slots.tolist()]
