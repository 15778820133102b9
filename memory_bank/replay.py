"""Replay draws from the bank's mirror: which stored items a train step replays.

:class:`ReplaySampler` reads the mirror's feature, label and version tensors (the bank's own,
shared) and the reservoir's bookkeeping; it never writes them. No Redis access.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from memory_bank.reservoir import ClassBalancedReservoir

# Replay is drawn on the host when the bank holds this many times more items than one draw
# takes; see ReplaySampler._draw.
_FAST_DRAW_FACTOR = 8

SAMPLINGS = ("class_balanced", "random")


@dataclass(frozen=True, slots=True)
class Replay:
    """Items drawn from the bank for one step, on the bank's device.

    Pass ``slots`` and ``versions`` back to :meth:`MemoryBank.update_embeddings` with the
    fresh embeddings: ``versions`` lets the bank skip slots refilled since the draw.
    """

    slots: torch.Tensor  # int64 [r]
    features: torch.Tensor  # float32 [r, input_dim]
    labels: torch.Tensor  # int64 [r]
    versions: torch.Tensor  # int64 [r]

    def __len__(self) -> int:
        return int(self.slots.shape[0])


class ReplaySampler:
    """Draws replay from the mirror (``labels`` -1 = empty slot).

    ``label_bound`` returns one past the largest label the bank knows (at least 1);
    ``generator`` is the bank's, so one seed fixes every random draw of the bank.
    """

    def __init__(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        versions: torch.Tensor,
        reservoir: ClassBalancedReservoir,
        label_bound: Callable[[], int],
        generator: torch.Generator,
        seed: int,
    ) -> None:
        self._features = features
        self._labels = labels
        self._versions = versions
        self._reservoir = reservoir
        self._label_bound = label_bound
        self._generator = generator
        self._device = labels.device
        self._draw_rng = random.Random(seed)  # host-side replay draws (see _draw)
        self._weights: torch.Tensor | None = None  # cache, reset when membership changes

    def invalidate(self) -> None:
        """The bank's membership changed: per-slot weights must be recomputed."""
        self._weights = None

    def sample(self, n: int, how: str = "class_balanced") -> Replay:
        """Up to ``n`` distinct items (see :meth:`MemoryBank.sample`)."""
        if how not in SAMPLINGS:
            raise ValueError(f"unknown replay sampling {how!r}")
        take = min(n, len(self._reservoir))
        if take <= 0:
            dev = self._device
            return Replay(
                slots=torch.empty(0, dtype=torch.int64, device=dev),
                features=torch.empty((0, self._features.shape[1]), device=dev),
                labels=torch.empty(0, dtype=torch.int64, device=dev),
                versions=torch.empty(0, dtype=torch.int64, device=dev),
            )
        if how == "class_balanced":
            slots = self._draw(take)
        else:
            weights = (self._labels >= 0).to(torch.float32)
            slots = torch.multinomial(weights, take, replacement=False, generator=self._generator)
        return Replay(
            slots=slots,
            features=self._features[slots],
            labels=self._labels[slots],
            versions=self._versions[slots],
        )

    def _draw(self, take: int) -> torch.Tensor:
        """``take`` distinct slots, class-balanced.

        ``torch.multinomial`` without replacement over the per-slot weights costs more than
        the rest of the replay path on a large bank (docs/performance.md). When the bank is
        much larger than one draw, the reservoir draws on the host instead (a class
        uniformly, then an item of it: the same class balance), in O(take + classes).
        """
        if len(self._reservoir) >= _FAST_DRAW_FACTOR * take:
            slots = self._reservoir.draw_balanced(take, self._draw_rng)
            if slots is not None:
                return torch.tensor(slots, dtype=torch.int64).to(self._device, non_blocking=True)
        weights = self._class_balanced_weights()
        return torch.multinomial(weights, take, replacement=False, generator=self._generator)

    def _class_balanced_weights(self) -> torch.Tensor:
        # weight(slot) = 1 / count(class of slot): every class carries the same total mass.
        # Computed on the device with a host-known number of classes, so no sync.
        if self._weights is None:
            occupied = (self._labels >= 0).to(torch.float32)
            labels = self._labels.clamp(min=0)
            counts = torch.zeros(self._label_bound(), device=self._device)
            counts.scatter_add_(0, labels, occupied)
            self._weights = occupied / counts[labels].clamp(min=1)
        return self._weights
