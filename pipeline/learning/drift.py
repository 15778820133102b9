"""Running class means that follow the encoder: semantic drift compensation (SDC).

Yu et al., "Semantic Drift Compensation for Class-Incremental Learning", CVPR 2020. One
vector per class (equal memory: no more than NCM's class means) holds the mean of the
L2-normalised embeddings every stream event of that class had when it was learned. When the
encoder moves, the bank's items, embedded before (``e_i``) and after (``e'_i``), measure the
drift ``delta_i = e'_i - e_i``; each class mean moves by a weighted mean of those deltas:

- SDC's weights, ``w_ic = exp(-||e_i - mu_c||^2 / (2 sigma^2))`` over every bank item,
  normalised over the items (``sigma=...``);
- class-restricted: the mean delta of the bank items of class ``c`` (``sigma=None``).

:class:`DriftFollower` keeps sets of such means in step with an online learner: after every
micro-batch, the bank re-encoded by the updated encoder gives the drift of the items it held
at the previous micro-batch, then the micro-batch's events join their means under the updated
encoder (:func:`follow_encoder`). The learner's own class means, a mean per class and task,
are :mod:`pipeline.learning.stream_means` (docs/forgetting.md, "Class means that follow the
encoder", "A mean per class and task").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

import torch
import torch.nn.functional as F  # noqa: N812

from memory_bank.bank import MemoryBank
from pipeline.learning.inference import ClassMeans, unit_embeddings
from pipeline.learning.model import StreamNet

# Bank items re-encoded per micro-batch to measure the drift: the items of the first this many
# slots (all of a bank of up to this many items), so a large bank's cost stays bounded.
DRIFT_PROBE_ITEMS = 1024


def drift_shift(
    means: torch.Tensor,
    mean_labels: torch.Tensor,
    before: torch.Tensor,
    after: torch.Tensor,
    item_labels: torch.Tensor,
    sigma: float | None,
) -> torch.Tensor:
    """The shift ``[k, d]`` of ``k`` class means ``[k, d]`` from ``n`` items embedded
    ``before`` and ``after`` ``[n, d]`` an encoder change.

    ``sigma`` set: SDC's Gaussian weights of every item around each mean; ``None``: the plain
    mean over the items whose label is the mean's. A mean with no item to weigh (no items,
    or none of its class) does not move.
    """
    shift = torch.zeros_like(means)
    if before.shape[0] == 0 or means.shape[0] == 0:
        return shift
    delta = after - before
    if sigma is None:
        same = (mean_labels[:, None] == item_labels[None, :]).to(delta.dtype)
        counts = same.sum(dim=1, keepdim=True)
        has = counts.squeeze(1) > 0
        shift[has] = (same[has] @ delta) / counts[has]
        return shift
    # softmax over the items == exp(-d^2 / 2 sigma^2) normalised, without underflow
    weights = torch.softmax(-torch.cdist(means, before).pow(2) / (2 * sigma**2), dim=1)
    return weights @ delta


def fold_into(
    means: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor, embeddings: torch.Tensor
) -> None:
    """Fold ``embeddings [n, d]`` into the running means of ``rows [n]`` (each row the mean of
    ``counts`` embeddings so far), in place."""
    sums = means * counts[:, None]
    sums.index_add_(0, rows, embeddings.float().to(means.device))
    counts.index_add_(0, rows, torch.ones_like(rows))
    seen = counts > 0
    means[seen] = sums[seen] / counts[seen, None]


class RunningClassMeans:
    """Per class, the running mean of the embeddings added to it, optionally moved by SDC.

    ``compensate=False`` keeps the stale means (each embedding as it was when added). One row
    per class; a subclass holding several rows per class names each row's class
    (:meth:`_row_classes`).
    """

    SHAPE = "model.max_classes x model.embed_dim"  # what a saved state's shape must match

    def __init__(
        self,
        max_classes: int,
        dim: int,
        sigma: float | None,
        compensate: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        self.means = torch.zeros(max_classes, dim, device=device)
        self.counts = torch.zeros(max_classes, dtype=torch.long, device=device)
        self.sigma = sigma
        self.compensate_drift = compensate

    def add(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        tasks: Sequence[str | None] | None = None,
    ) -> None:
        """Fold embeddings ``[n, d]`` of classes ``labels [n]`` into their classes' means (one
        per class whatever the events' ``tasks``)."""
        if labels.numel() == 0:
            return
        fold_into(self.means, self.counts, labels.to(self.counts.device), embeddings)

    def compensate(self, before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor) -> None:
        """Move every seen class's mean by the drift the items ``before -> after`` measure."""
        if not self.compensate_drift:
            return
        seen = torch.nonzero(self.counts > 0).squeeze(1)
        device = self.means.device
        self.means[seen] += drift_shift(
            self.means[seen],
            self._row_classes(seen),
            before.float().to(device),
            after.float().to(device),
            labels.to(device),
            self.sigma,
        )

    def _row_classes(self, rows: torch.Tensor) -> torch.Tensor:
        """The class of each row: the row itself, one row a class."""
        return rows

    def seen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(class ``[k]``, mean ``[k, d]``) of every row with at least one embedding, in row
        order."""
        seen = torch.nonzero(self.counts > 0).squeeze(1)
        return self._row_classes(seen), self.means[seen]

    def class_means(self) -> ClassMeans:
        """The seen rows' means as unit vectors, labeled with their classes: what
        :func:`predict_ncm` reads."""
        labels, rows = self.seen()
        return ClassMeans(labels, F.normalize(rows, dim=-1))

    def mean_of(self, label: int) -> torch.Tensor | None:
        """Class ``label``'s running mean (not normalised), or None before its first event:
        the target of the bank's ``stream_mean`` eviction."""
        return self.means[label] if int(self.counts[label]) else None

    def reset(self) -> None:
        self.means.zero_()
        self.counts.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"means": self.means.cpu().clone(), "counts": self.counts.cpu().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        means, counts = state["means"], state["counts"]
        if tuple(means.shape) != tuple(self.means.shape) or counts.shape != self.counts.shape:
            raise ValueError(
                f"saved class means of shape {tuple(means.shape)} do not fit "
                f"{tuple(self.means.shape)} ({self.SHAPE})"
            )
        self.means.copy_(means)
        self.counts.copy_(counts)


class FollowsEncoder(Protocol):
    """Running statistics of embeddings that a :class:`DriftFollower` keeps in step: class
    means (:class:`RunningClassMeans`), or means and a covariance
    (:class:`pipeline.devtools.bench.slda.RunningLDA`)."""

    def add(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        tasks: Sequence[str | None] | None = None,
    ) -> None: ...

    def compensate(
        self, before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor
    ) -> None: ...


Follows = TypeVar("Follows", bound=FollowsEncoder)


class DriftFollower(Generic[Follows]):
    """Sets of running class means that follow an encoder through a memory it re-encodes.

    :meth:`follow` is called after every encoder change with the memory's items embedded by
    the new encoder; the items it also saw at the previous call measure the drift.
    """

    def __init__(self, means: Mapping[str, Follows]) -> None:
        self.means = dict(means)
        self._previous: dict[str, torch.Tensor] = {}  # item id -> embedding at the last call

    def follow(
        self,
        ids: Sequence[str],
        items: torch.Tensor,
        item_labels: torch.Tensor,
        new: torch.Tensor,
        new_labels: torch.Tensor,
        new_tasks: Sequence[str | None] | None = None,
    ) -> None:
        """Move every set of means by the drift of the items ``ids`` (embedded now as ``items``
        ``[n, d]``) that were there at the last call, then add ``new`` ``[m, d]`` (embedded
        by the same encoder, of the tasks ``new_tasks`` where known) to their classes'
        means."""
        kept = [i for i, item in enumerate(ids) if item in self._previous]
        if kept:
            before = torch.stack([self._previous[ids[i]] for i in kept])
            for means in self.means.values():
                means.compensate(before, items[kept], item_labels[kept])
        self._previous = dict(zip(ids, items, strict=True))
        for means in self.means.values():
            means.add(new, new_labels, new_tasks)

    def previous_state(self) -> dict[str, Any]:
        """The items embedded at the last call (ids and ``[n, d]`` embeddings, on the CPU)."""
        ids = list(self._previous)
        rows = torch.stack([self._previous[i] for i in ids]).cpu() if ids else torch.zeros(0)
        return {"ids": ids, "embeddings": rows}

    def load_previous_state(self, state: Mapping[str, Any], device: torch.device | str) -> None:
        rows = state["embeddings"].to(device)
        self._previous = {str(i): rows[n] for n, i in enumerate(state["ids"])}


@torch.no_grad()
def follow_encoder(
    follower: DriftFollower,
    model: StreamNet,
    bank: MemoryBank,
    x: torch.Tensor,
    y: torch.Tensor,
    probe_items: int = DRIFT_PROBE_ITEMS,
    tasks: Sequence[str | None] | None = None,
) -> None:
    """After the micro-batch ``x, y`` (of the tasks ``tasks``, where known) was learned:
    re-encode the bank's items of its first ``probe_items`` slots with ``model``, move the
    means by the drift of the items it held before, then add the micro-batch, all as
    L2-normalised embeddings of the updated encoder. Reads the model, never trains it."""
    model.eval()
    slots, bank_x, bank_y = bank.occupied(below=probe_items)
    ids = [str(item) for item in bank.slot_ids(slots)]
    follower.follow(
        ids, unit_embeddings(model, bank_x), bank_y, unit_embeddings(model, x), y, tasks
    )
