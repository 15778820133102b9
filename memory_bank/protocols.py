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
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:  # the store side (and a learner opening it early) runs without torch
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
    """Everything a learner needs to rebuild its mirror after a restart, column by column.

    Row ``i`` is one item: ``ids[i]``, ``labels[i]`` (class name), ``tasks[i]``,
    ``features[i]`` and ``embeddings[i]``. Columns, not one object per item: a learner
    restores 100k items in bulk (docs/performance.md, "Restart").
    """

    ids: tuple[str, ...]
    labels: tuple[str, ...]
    tasks: tuple[str | None, ...]
    features: np.ndarray  # float32 [n, input_dim]
    embeddings: np.ndarray  # float32 [n, embed_dim]
    seen_per_class: Mapping[str, int]  # events offered to the reservoir, per class

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not (
            len(self.labels) == len(self.tasks) == len(self.features) == len(self.embeddings) == n
        ):
            raise ValueError("bank snapshot columns differ in length")

    @classmethod
    def from_items(
        cls,
        items: Sequence[StoredItem],
        seen_per_class: Mapping[str, int],
        input_dim: int = 0,
        embed_dim: int = 0,
    ) -> BankSnapshot:
        """The snapshot of ``items`` (dims only matter when there are none)."""
        if not items:
            return cls(
                (),
                (),
                (),
                np.zeros((0, input_dim), np.float32),
                np.zeros((0, embed_dim), np.float32),
                seen_per_class,
            )
        return cls(
            tuple(item.id for item in items),
            tuple(item.label for item in items),
            tuple(item.task for item in items),
            np.stack([np.asarray(item.features, dtype=np.float32) for item in items]),
            np.stack([np.asarray(item.embedding, dtype=np.float32) for item in items]),
            seen_per_class,
        )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def items(self) -> tuple[StoredItem, ...]:
        """One :class:`StoredItem` per row (for inspection; the learner reads the columns)."""
        return tuple(
            StoredItem(event_id, self.features[row], self.embeddings[row], label, task)
            for row, (event_id, label, task) in enumerate(
                zip(self.ids, self.labels, self.tasks, strict=True)
            )
        )


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
