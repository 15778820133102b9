"""Test helpers that ship with the package: an in-memory :class:`BankStore`.

Use it to unit-test code built on :class:`~memory_bank.bank.MemoryBank` without Redis::

    store = InMemoryBankStore()
    bank = MemoryBank(store, TorchIndex(dim=8), capacity=100, input_dim=4, embed_dim=8,
                      device="cpu")

It keeps the same semantics as :class:`~memory_bank.redis_store.RedisBankStore` (removals
before additions, ids no longer stored skipped by ``write_embeddings``, copies of the arrays
it is given) and records what it was asked to do, so tests can check that the bank writes
through once per call. The shared contract suite (tests/integration/test_bank_store.py)
runs against both stores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from memory_bank.protocols import BankSnapshot, StoredItem


@dataclass(frozen=True, slots=True)
class ApplyCall:
    """One :meth:`InMemoryBankStore.apply` call, as received."""

    added_ids: tuple[str, ...]
    evicted_ids: tuple[str, ...]
    seen_increments: Mapping[str, int]


class InMemoryBankStore:
    """A :class:`~memory_bank.protocols.BankStore` held in dicts (not durable, not shared)."""

    def __init__(self) -> None:
        self._items: dict[str, StoredItem] = {}
        self._seen: dict[str, int] = {}
        self.apply_calls: list[ApplyCall] = []
        self.write_embedding_calls = 0
        self.load_calls = 0
        self._fail_next: BaseException | None = None

    def fail_next_apply(self, error: BaseException) -> None:
        """Make the next :meth:`apply` raise ``error`` without changing anything."""
        self._fail_next = error

    def load(self) -> BankSnapshot:
        self.load_calls += 1
        items = tuple(self._items[event_id] for event_id in sorted(self._items))
        return BankSnapshot.from_items(items, dict(self._seen))

    def apply(
        self,
        added: Sequence[StoredItem],
        evicted_ids: Sequence[str],
        seen_increments: Mapping[str, int],
    ) -> None:
        if self._fail_next is not None:
            error, self._fail_next = self._fail_next, None
            raise error
        self.apply_calls.append(
            ApplyCall(
                added_ids=tuple(item.id for item in added),
                evicted_ids=tuple(evicted_ids),
                seen_increments=dict(seen_increments),
            )
        )
        for event_id in evicted_ids:
            self._items.pop(event_id, None)
        for item in added:
            # Copies: the caller may reuse its buffers, a durable store would not notice.
            self._items[item.id] = StoredItem(
                id=item.id,
                features=np.array(item.features, dtype=np.float32),
                embedding=np.array(item.embedding, dtype=np.float32),
                label=item.label,
                task=item.task,
            )
        for name, increment in seen_increments.items():
            if int(increment):  # as in Redis, a zero increment creates no counter
                self._seen[name] = self._seen.get(name, 0) + int(increment)

    def write_embeddings(self, ids: Sequence[str], embeddings: np.ndarray) -> None:
        if len(ids) != len(embeddings):
            raise ValueError(f"{len(ids)} ids but {len(embeddings)} embeddings")
        self.write_embedding_calls += 1
        for event_id, embedding in zip(ids, embeddings, strict=True):
            item = self._items.get(event_id)
            if item is None:
                continue  # evicted since: skipped, as RedisBankStore does
            self._items[event_id] = StoredItem(
                id=item.id,
                features=item.features,
                embedding=np.array(embedding, dtype=np.float32),
                label=item.label,
                task=item.task,
            )

    def clear(self) -> None:
        self._items.clear()
        self._seen.clear()

    def stored_ids(self) -> list[str]:
        """Ids stored now, sorted. (No ``__len__``: an empty store must not be falsy.)"""
        return sorted(self._items)
