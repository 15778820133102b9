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
encoder. Read out by ``bench forgetting`` (``sdc``, ``sdc_class``: :data:`DRIFT_READOUTS`) and
screened by ``bench/domain_readout.py`` (docs/forgetting.md); not used by the learner.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Generic, Protocol, TypeVar

import torch
import torch.nn.functional as F  # noqa: N812

from memory_bank.bank import MemoryBank
from pipeline.learning.inference import ClassMeans
from pipeline.learning.model import StreamNet

# The read-outs ``bench forgetting`` scores beside NCM over the bank: name -> SDC's width
# (on unit vectors; 0.3 led the screen of docs/forgetting.md), None for class-restricted.
DRIFT_READOUTS: dict[str, float | None] = {"sdc": 0.3, "sdc_class": None}


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


class RunningClassMeans:
    """Per class, the running mean of the embeddings added to it, optionally moved by SDC.

    ``compensate=False`` keeps the stale means (each embedding as it was when added).
    """

    def __init__(
        self, max_classes: int, dim: int, sigma: float | None, compensate: bool = True
    ) -> None:
        self.means = torch.zeros(max_classes, dim)
        self.counts = torch.zeros(max_classes, dtype=torch.long)
        self.sigma = sigma
        self.compensate_drift = compensate

    def add(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Fold embeddings ``[n, d]`` of classes ``labels [n]`` into their classes' means."""
        sums = self.means * self.counts[:, None]
        sums.index_add_(0, labels, embeddings.float())
        self.counts.index_add_(0, labels, torch.ones_like(labels))
        seen = self.counts > 0
        self.means[seen] = sums[seen] / self.counts[seen, None]

    def compensate(self, before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor) -> None:
        """Move every seen class's mean by the drift the items ``before -> after`` measure."""
        if not self.compensate_drift:
            return
        seen = torch.nonzero(self.counts > 0).squeeze(1)
        self.means[seen] += drift_shift(
            self.means[seen], seen, before.float(), after.float(), labels, self.sigma
        )

    def seen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels ``[k]``, means ``[k, d]``) of the classes with at least one embedding."""
        seen = torch.nonzero(self.counts > 0).squeeze(1)
        return seen, self.means[seen]

    def class_means(self) -> ClassMeans:
        """The seen classes' means as unit vectors: what :func:`predict_ncm` reads."""
        labels, rows = self.seen()
        return ClassMeans(labels, F.normalize(rows, dim=-1))


class FollowsEncoder(Protocol):
    """Running statistics of embeddings that a :class:`DriftFollower` keeps in step: class
    means (:class:`RunningClassMeans`), or means and a covariance
    (:class:`pipeline.devtools.bench.slda.RunningLDA`)."""

    def add(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None: ...

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
    ) -> None:
        """Move every set of means by the drift of the items ``ids`` (embedded now as ``items``
        ``[n, d]``) that were there at the last call, then add ``new`` ``[m, d]`` (embedded
        by the same encoder) to their classes' means."""
        kept = [i for i, item in enumerate(ids) if item in self._previous]
        if kept:
            before = torch.stack([self._previous[ids[i]] for i in kept])
            for means in self.means.values():
                means.compensate(before, items[kept], item_labels[kept])
        self._previous = dict(zip(ids, items, strict=True))
        for means in self.means.values():
            means.add(new, new_labels)


@torch.no_grad()
def follow_encoder(
    follower: DriftFollower,
    model: StreamNet,
    bank: MemoryBank,
    x: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """After the micro-batch ``x, y`` was learned: re-encode the bank with ``model``, move the
    means by the drift of the items it held before, then add the micro-batch, all as
    L2-normalised embeddings of the updated encoder. Reads the model, never trains it."""
    model.eval()
    slots, bank_x, bank_y = bank.occupied()
    ids = [str(item) for item in bank.slot_ids(slots)]

    def embed(features: torch.Tensor) -> torch.Tensor:
        return F.normalize(model.embed(features).float(), dim=-1)

    follower.follow(ids, embed(bank_x), bank_y, embed(x), y)


def drift_readouts(max_classes: int, dim: int) -> DriftFollower[RunningClassMeans]:
    """The :data:`DRIFT_READOUTS` means of ``bench forgetting``, following no encoder yet."""
    return DriftFollower(
        {name: RunningClassMeans(max_classes, dim, sigma) for name, sigma in DRIFT_READOUTS.items()}
    )
