"""The bank's mirror: one row per reservoir slot, in tensors on the learner's device.

:class:`Mirror` holds, per slot: features, the L2-normalised embedding, the int label (``-1``
= empty slot), a version bumped whenever the slot gets a new item (it guards late embedding
write-backs), a dirty flag (embedding refreshed here, not yet in the store) and the task name.
The tensors are preallocated once: writes go to rows in place, nothing reallocates per step.

It knows nothing of event ids, the reservoir or the store: :class:`~memory_bank.bank.MemoryBank`
decides which slots change and writes the store before it writes here; the replay sampler
(:mod:`memory_bank.replay`) and the search (:mod:`memory_bank.search`) read these tensors in
place. The reads here (class means, gather, occupied slots) never touch Redis.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)


class Mirror:
    """Slot-addressed features, embeddings, labels, versions, dirty flags and tasks."""

    def __init__(self, capacity: int, input_dim: int, embed_dim: int, device: torch.device) -> None:
        self.input_dim = input_dim
        self.embed_dim = embed_dim
        self.device = device
        self.features = torch.zeros((capacity, input_dim), dtype=torch.float32, device=device)
        self.embeddings = torch.zeros((capacity, embed_dim), dtype=torch.float32, device=device)
        self.labels = torch.full((capacity,), -1, dtype=torch.int64, device=device)
        self.versions = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.dirty = torch.zeros(capacity, dtype=torch.bool, device=device)
        self.tasks: list[str | None] = [None] * capacity

    # -- writes ----------------------------------------------------------------------------

    def check_rows(
        self, n: int, features: torch.Tensor, labels: torch.Tensor, embeddings: torch.Tensor
    ) -> None:
        """Raise ValueError unless these are ``n`` rows of this mirror's shapes."""
        if features.shape != (n, self.input_dim):
            raise ValueError(f"features must be [{n}, {self.input_dim}], got {features.shape}")
        if embeddings.shape != (n, self.embed_dim):
            raise ValueError(f"embeddings must be [{n}, {self.embed_dim}], got {embeddings.shape}")
        if labels.shape != (n,):
            raise ValueError(f"labels must be [{n}], got {tuple(labels.shape)}")

    def load(
        self,
        slots: list[int],
        features: np.ndarray,
        embeddings: np.ndarray,
        labels: list[int],
        tasks: Iterable[str | None],
    ) -> None:
        """Rows read back from the store into ``slots`` (the embeddings normalised here)."""
        if features.shape[1] != self.input_dim or embeddings.shape[1] != self.embed_dim:
            raise ValueError(
                f"stored items have dims {features.shape[1]}/{embeddings.shape[1]}, "
                f"the bank expects {self.input_dim}/{self.embed_dim}"
            )
        dst = torch.tensor(slots, dtype=torch.int64, device=self.device)
        self.features[dst] = torch.from_numpy(features).to(self.device)
        self.embeddings[dst] = F.normalize(torch.from_numpy(embeddings).to(self.device), dim=1)
        self.labels[dst] = torch.tensor(labels, dtype=torch.int64, device=self.device)
        for slot, task in zip(slots, tasks, strict=True):
            self.tasks[slot] = task

    def place(
        self,
        dst: torch.Tensor,
        features: torch.Tensor,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        tasks: Iterable[tuple[int, str | None]],
    ) -> None:
        """New items (already in the store) into slots ``dst``: versions bumped, not dirty.

        ``tasks``: (slot, task) pairs of the same items.
        """
        self.features[dst] = features
        self.embeddings[dst] = embeddings
        self.labels[dst] = labels
        self.versions[dst] += 1
        self.dirty[dst] = False
        for slot, task in tasks:
            self.tasks[slot] = task

    def write_back(
        self, slots: torch.Tensor, embeddings: torch.Tensor, versions: torch.Tensor | None
    ) -> None:
        """Re-encoded embeddings of ``slots``, marked dirty; see
        :meth:`~memory_bank.bank.MemoryBank.update_embeddings`."""
        if embeddings.shape != (slots.shape[0], self.embed_dim):
            raise ValueError(
                f"embeddings must be [{slots.shape[0]}, {self.embed_dim}], "
                f"got {tuple(embeddings.shape)}"
            )
        slots = slots.to(self.device, torch.int64)
        fresh = F.normalize(embeddings.detach().to(self.device, torch.float32), dim=1)
        valid = self.labels[slots] >= 0
        if versions is not None:
            valid &= self.versions[slots] == versions.to(self.device)
        # Masked on the device rather than by filtering the slots: filtering needs a sync.
        self.embeddings[slots] = torch.where(valid[:, None], fresh, self.embeddings[slots])
        self.dirty[slots] = self.dirty[slots] | valid

    def dirty_slots(self) -> torch.Tensor:
        """Occupied slots whose embedding the store does not have yet."""
        return torch.nonzero(self.dirty & (self.labels >= 0)).squeeze(1)

    # -- reads -----------------------------------------------------------------------------

    def occupied_slots(self) -> torch.Tensor:
        return torch.nonzero(self.labels >= 0).squeeze(1)

    def occupied(self, below: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slots ascending, features, labels) of every stored item; with ``below``, of the
        items in the slots ``0 .. below - 1`` only."""
        labels = self.labels if below is None else self.labels[:below]
        slots = torch.nonzero(labels >= 0).squeeze(1)
        return slots, self.features[slots], self.labels[slots]

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features, labels, versions) of ``slots``."""
        slots = slots.to(self.device, torch.int64)
        return self.features[slots], self.labels[slots], self.versions[slots]

    def class_means(
        self, embeddings: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised mean embedding per stored class: (labels [k], means [k, e]); see
        :meth:`~memory_bank.bank.MemoryBank.class_means`."""
        slots = self.occupied_slots()
        source = self.embeddings[slots] if embeddings is None else embeddings
        if source.shape[0] != slots.shape[0]:
            raise ValueError(f"{source.shape[0]} embeddings for {slots.shape[0]} stored items")
        if slots.numel() == 0:
            return (
                torch.empty(0, dtype=torch.int64, device=self.device),
                torch.empty((0, source.shape[1]), device=self.device),
            )
        source = source.to(self.device, torch.float32)
        classes, inverse = torch.unique(self.labels[slots], return_inverse=True)
        sums = torch.zeros((classes.shape[0], source.shape[1]), device=self.device)
        sums.index_add_(0, inverse, F.normalize(source, dim=1))
        return classes, F.normalize(sums, dim=1)
