"""Which item of a class leaves the bank when the class gives up a slot (``bank.eviction``).

When a class must give up a slot (a new class grows into the bank, or the class's own reservoir
draw admits a newcomer), the default (``random``) evicts a random item of it. The other rules
weigh the candidates' embeddings (:class:`EmbeddingVictims`, the reservoir's victim chooser):

- ``mean_preserving`` evicts the item whose removal moves the mean embedding of the class's
  items (the newcomer included when it joins that class) least: the item closest to that
  mean, since removing row ``j`` of ``k`` moves the mean by ``(mean - e_j) / (k - 1)``.
  Repeated, this is herding by elimination (the kept items' mean follows the mean of every
  item the class held).
- ``stream_mean`` evicts the item whose removal brings the mean of the class's remaining items
  closest to a *target*: the class's running mean over the whole stream, which the learner
  keeps under ``eval.class_means: stream`` (pipeline/learning/stream_means.py) and hands the bank
  with :meth:`EmbeddingVictims.set_target`; a class without a target falls back to
  ``mean_preserving``. With two items per class the mean-preserving rule always evicts the
  most central of three and keeps the two least typical; the stream's mean keeps the pair
  that summarises the class best.
- ``adaptive`` (the product's default) is ``stream_mean`` while the class has few candidates
  (its items and the newcomer: at most ``adaptive_items``, 6 by default), where the kept
  items' own mean is a poor summary of the class, ``mean_preserving`` above, where keeping
  the class's spread matters more than its centre, and a random item once the class holds
  more than :data:`~memory_bank.reservoir.MAX_VICTIM_CANDIDATES` items: the chooser would see
  only a sample of it, a random victim moves the mean of so many items little, and a large
  bank admitting events fast would otherwise weigh candidates at every admission.

Measured in docs/forgetting.md ("Which items a class keeps").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)

from memory_bank.mirror import Mirror
from memory_bank.reservoir import MAX_VICTIM_CANDIDATES

EVICTIONS = ("random", "mean_preserving", "stream_mean", "adaptive")
# Evictions that aim at a target class mean (the learner's stream class means)
TARGETED_EVICTIONS = frozenset({"stream_mean", "adaptive"})
# ``adaptive``: the most candidates (a class's items and the newcomer) it aims at the target
ADAPTIVE_ITEMS = 6

# A class index -> its target mean embedding [d], or None when there is none (yet).
TargetMeans = Callable[[int], "torch.Tensor | None"]


def _sum_and_count(
    embeddings: torch.Tensor, joining: torch.Tensor | None
) -> tuple[torch.Tensor, int]:
    """The sum and number of the rows of ``embeddings``, and of ``joining`` when given."""
    if joining is None:
        return embeddings.sum(dim=0), embeddings.shape[0]
    return embeddings.sum(dim=0) + joining, embeddings.shape[0] + 1


def mean_preserving_victim(embeddings: torch.Tensor, joining: torch.Tensor | None) -> int:
    """Row of ``embeddings`` ``[k, d]`` (k >= 1) whose removal moves the mean of the rows, and
    of ``joining`` ``[d]`` when given, least."""
    total, count = _sum_and_count(embeddings, joining)
    mean = total / count
    return int(((embeddings - mean) ** 2).sum(dim=1).argmin())


def target_victim(
    embeddings: torch.Tensor, joining: torch.Tensor | None, target: torch.Tensor
) -> int:
    """Row of ``embeddings`` ``[k, d]`` whose removal leaves the rows (and ``joining`` ``[d]``
    when given) with the mean nearest ``target`` ``[d]``."""
    total, count = _sum_and_count(embeddings, joining)
    if count < 2:
        return 0
    kept = (total[None, :] - embeddings) / (count - 1)
    return int(((kept - target[None, :]) ** 2).sum(dim=1).argmin())


class EmbeddingVictims:
    """The reservoir's victim chooser under every rule but ``random``.

    Candidate slots in, the position of the victim out (the reservoir stays tensor-free). The
    candidates' embeddings are the mirror's; items placed earlier in the batch being offered
    are not in the mirror yet, so :meth:`offering` names the batch's normalised embeddings
    while the reservoir decides.
    """

    def __init__(
        self,
        rule: str,
        mirror: Mirror,
        slot_of: Callable[[str], int | None],
        id_at: Callable[[int], str | None],
        adaptive_items: int = ADAPTIVE_ITEMS,
    ) -> None:
        if rule not in EVICTIONS[1:]:
            raise ValueError(f"no embedding victims for eviction {rule!r}")
        if adaptive_items < 2:
            raise ValueError(f"need adaptive_items >= 2: {adaptive_items=}")
        self.rule = rule
        self.adaptive_items = adaptive_items
        self._mirror = mirror
        self._slot_of = slot_of
        self._id_at = id_at
        self._joining: dict[str, torch.Tensor] = {}
        self._target: TargetMeans | None = None

    def set_target(self, target: TargetMeans | None) -> None:
        """The target mean per class of ``stream_mean`` and ``adaptive`` (None:
        mean-preserving for every class)."""
        self._target = target

    def offering(self, ids: Sequence[str], embeddings: torch.Tensor) -> None:
        """The batch being offered: its ids and raw embeddings (normalised here)."""
        rows = F.normalize(embeddings.detach().to(self._mirror.device, torch.float32), dim=1)
        self._joining = dict(zip(ids, rows.unbind(0), strict=True))

    def offered(self) -> None:
        self._joining = {}

    def weighs(self, class_items: int) -> bool:
        """Every rule weighs a class's candidates, but ``adaptive`` not those of a class of more
        than :data:`MAX_VICTIM_CANDIDATES` items (the reservoir then draws a random one)."""
        return self.rule != "adaptive" or class_items <= MAX_VICTIM_CANDIDATES

    def __call__(self, slots: Sequence[int], joining_id: str | None) -> int:
        where = torch.tensor(list(slots), device=self._mirror.device)
        rows = self._mirror.embeddings[where]
        placed = self._placed(slots)
        if placed:
            placed_slots = torch.tensor(list(placed), device=self._mirror.device)
            row, which = torch.nonzero(where[:, None] == placed_slots[None, :], as_tuple=True)
            rows[row] = torch.stack(list(placed.values()))[which]
        joining = None if joining_id is None else self._joining[joining_id]
        candidates = rows.shape[0] + (joining is not None)
        target = self._target_of(int(self._mirror.labels[where[0]]), candidates)
        if target is None:
            return mean_preserving_victim(rows, joining)
        return target_victim(rows, joining, target.to(rows.device, torch.float32))

    def _target_of(self, label: int, candidates: int) -> torch.Tensor | None:
        """The mean the victim's removal aims at for class ``label`` with ``candidates``
        candidates, or None for the mean-preserving victim."""
        if self.rule not in TARGETED_EVICTIONS or self._target is None:
            return None
        if self.rule == "adaptive" and candidates > self.adaptive_items:
            return None
        return self._target(label)

    def _placed(self, slots: Sequence[int]) -> dict[int, torch.Tensor]:
        """Slot -> offered embedding of the batch's items already placed, among ``slots`` or
        beyond them: looked up from the smaller side, the batch's items or the candidates (at
        most 256), so one eviction never walks a large batch."""
        if len(self._joining) <= len(slots):
            return {
                slot: embedding
                for event_id, embedding in self._joining.items()
                if (slot := self._slot_of(event_id)) is not None
            }
        placed: dict[int, torch.Tensor] = {}
        for slot in slots:
            event_id = self._id_at(slot)
            if event_id is not None and (embedding := self._joining.get(event_id)) is not None:
                placed[slot] = embedding
        return placed
