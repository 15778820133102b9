"""Running class means that follow the encoder: semantic drift compensation (SDC).

Yu et al., "Semantic Drift Compensation for Class-Incremental Learning", CVPR 2020. One
vector per class (equal memory: no more than NCM's class means) holds the mean of the
L2-normalised embeddings every stream event of that class had when it was learned. When the
encoder moves, the bank's items, embedded before (``e_i``) and after (``e'_i``), measure the
drift ``delta_i = e'_i - e_i``; each class mean moves by a weighted mean of those deltas:

- SDC's weights, ``w_ic = exp(-||e_i - mu_c||^2 / (2 sigma^2))`` over every bank item,
  normalised over the items (``sigma=...``);
- class-restricted: the mean delta of the bank items of class ``c`` (``sigma=None``).

Screened by ``bench/domain_readout.py`` (docs/forgetting.md), not used by the learner.
"""

from __future__ import annotations

import torch


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
