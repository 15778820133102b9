"""Boundaries of the memory bank: durable storage and vector index.

The bank itself (``memory_bank.bank.MemoryBank``) keeps an in-process mirror of features,
labels and embeddings as tensors on the learner's device, samples replay from it, and writes
through to a :class:`BankStore`. A :class:`VectorIndex` answers nearest-neighbour queries over
the mirror's embeddings. Each protocol has one contract test suite run against every
implementation (tests/unit/test_index_contract.py, tests/integration/test_bank_store.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class StoredItem:
    """One bank item as stored durably. ``label`` is the class name (never the index)."""

    id: str
    features: np.ndarray  # float32 [input_dim]
    embedding: np.ndarray  # float32 [embed_dim]; may be stale, refreshed on replay
    label: str
    task: str | None = None


@dataclass(frozen=True, slots=True)
class BankSnapshot:
    """Everything a learner needs to rebuild its mirror after a restart."""

    items: tuple[StoredItem, ...]
    seen_per_class: Mapping[str, int]  # events offered to the reservoir, per class


class BankStore(Protocol):
    """Durable copy of the bank (Redis in production). All writes are batched."""

    def load(self) -> BankSnapshot: ...

    def apply(
        self,
        added: Sequence[StoredItem],
        evicted_ids: Sequence[str],
        seen_increments: Mapping[str, int],
    ) -> None:
        """Atomically add items, remove evicted ids and bump per-class seen counters."""
        ...

    def write_embeddings(self, ids: Sequence[str], embeddings: np.ndarray) -> None:
        """Overwrite stored embeddings of existing items (ids no longer stored are skipped)."""
        ...

    def clear(self) -> None: ...


class VectorIndex(Protocol):
    """Inner-product nearest-neighbour index over L2-normalised embeddings.

    Rows are numbered 0..n-1 in the order given to :meth:`rebuild`.
    """

    def attach(self, vectors: torch.Tensor, labels: torch.Tensor, count: Callable[[], int]) -> bool:
        """Offered the bank's mirror once, before any use: ``vectors`` [capacity, dim],
        ``labels`` [capacity] (-1 = empty slot), ``count()`` = occupied slots (host-side).

        True: from now on the index searches the mirror in place (row = slot, empty slots
        never returned), :meth:`rebuild` is a no-op and results are never stale. False: the
        index keeps its own copy, filled by :meth:`rebuild`, and ignores the mirror.
        """
        ...

    def rebuild(self, vectors: torch.Tensor) -> None:
        """Replace the index contents with ``vectors`` [n, dim] (float32)."""
        ...

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` rows per query: (scores [q, k] float32, rows [q, k] int64, -1 = none).

        Results are on the queries' device.
        """
        ...

    def __len__(self) -> int: ...
