"""Streaming linear discriminant analysis over the encoder (deep SLDA), following the encoder.

Hayes & Kanan, "Lifelong Machine Learning with Deep Streaming Linear Discriminant Analysis",
CVPR Workshops 2020. Beside one running mean per class (NCM's state), one running *shared*
within-class covariance of the L2-normalised embeddings, updated per event as the stream is
learned; prediction is the linear discriminant of Gaussians sharing that covariance::

    argmax_c  mu_c^T P e - 0.5 mu_c^T P mu_c,    P = inverse of the shrunk covariance

Equal memory in the sense of O(classes * d + d^2) numbers and no stored item. Where a class
is several clusters (one per domain of a domain-incremental stream), the spread between the
clusters lands in the shared covariance and the discriminant discounts it, which NCM's
Euclidean/cosine distance cannot.

The encoder drifts under the stream: the means are moved by semantic drift compensation
(:class:`pipeline.learning.drift.RunningClassMeans`); the scatter is accumulated as each
event's deviation from its class mean was when it was learned (SDC moves a class by a
translation, which leaves a covariance unchanged), optionally with an exponential forgetting
of old contributions (``half_life`` in events). Shrinkage towards ``(tr S / d) I``: a fixed
weight, or the parameter-free Oracle Approximating Shrinkage (Chen et al. 2010, as
``sklearn.covariance.oas``). Screened by ``bench/domain_readout.py`` (docs/forgetting.md,
"A streaming LDA read-out"); not used by ``bench forgetting`` nor by the learner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812

from pipeline.learning.discriminant import shrunk as shrunk_by
from pipeline.learning.drift import RunningClassMeans
from pipeline.learning.model import StreamNet

# A shrinkage is a weight in [0, 1] or "oas" (Oracle Approximating Shrinkage, from the data).
Shrinkage = float | str


def oas_weight(cov: torch.Tensor, n: float) -> float:
    """The OAS shrinkage weight of a covariance ``[d, d]`` estimated from ``n`` samples,
    towards ``(tr cov / d) I`` (Chen et al. 2010; the formula of ``sklearn.covariance.oas``)."""
    d = cov.shape[0]
    mu = float(torch.trace(cov)) / d
    alpha = float((cov**2).mean())
    den = (n + 1) * (alpha - mu**2 / d)
    return 1.0 if den <= 0 else min((alpha + mu**2) / den, 1.0)


def shrunk(cov: torch.Tensor, shrinkage: Shrinkage, n: float) -> torch.Tensor:
    """``(1 - s) cov + s (tr cov / d) I``, ``s`` fixed or ``"oas"`` (the learner's
    :func:`pipeline.learning.discriminant.shrunk` once ``s`` is known)."""
    s = oas_weight(cov, n) if shrinkage == "oas" else float(shrinkage)
    return shrunk_by(cov, s)


@dataclass(frozen=True, slots=True)
class LinearDiscriminant:
    """Scores ``e @ weights + bias`` ``[n, k]`` of the classes ``labels`` ``[k]``."""

    labels: torch.Tensor  # [k] class indices
    weights: torch.Tensor  # [d, k]: P mu_c
    bias: torch.Tensor  # [k]: -0.5 mu_c^T P mu_c

    def __len__(self) -> int:
        return int(self.labels.numel())

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings.to(self.weights.dtype) @ self.weights + self.bias


def discriminant(
    labels: torch.Tensor, means: torch.Tensor, cov: torch.Tensor, shrinkage: Shrinkage, n: float
) -> LinearDiscriminant:
    """LDA of the classes ``labels`` with means ``[k, d]`` sharing the covariance ``[d, d]``
    estimated from ``n`` events, shrunk by ``shrinkage``."""
    mu = means.double()
    w = torch.linalg.solve(shrunk(cov.double(), shrinkage, n), mu.T)
    return LinearDiscriminant(labels, w, -0.5 * (mu * w.T).sum(dim=1))


class RunningLDA:
    """Running class means (moved by SDC of width ``sigma``, unless ``compensate=False``) and
    a running shared within-class scatter: each event's deviation from its class's running
    mean as it was when the event was learned.

    ``half_life`` (events, ``None`` = never): every event added multiplies the weight of the
    earlier contributions to the scatter by ``2 ** (-1 / half_life)``.
    """

    def __init__(
        self,
        max_classes: int,
        dim: int,
        sigma: float | None,
        half_life: float | None = None,
        compensate: bool = True,
    ) -> None:
        self.class_means = RunningClassMeans(max_classes, dim, sigma, compensate)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64)
        self.weight = 0.0  # sum of the (decayed) weights of the events in the scatter
        self.decay = 1.0 if half_life is None else 2 ** (-1 / half_life)

    def add(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        tasks: Sequence[str | None] | None = None,
    ) -> None:
        """Fold embeddings ``[n, d]`` of classes ``labels [n]`` into the scatter and the means.

        Per class, the exact pooled update (Chan et al.): the batch's own scatter plus
        ``n m / (n + m)`` times the outer product of its mean's offset from the running mean
        of the ``n`` earlier events, which is Hayes & Kanan's per-event update batched."""
        x = embeddings.double()
        m_total = x.shape[0]
        if m_total == 0:
            return
        factor = self.decay**m_total
        self.scatter *= factor
        self.weight *= factor
        means, counts = self.class_means.means.double(), self.class_means.counts
        for c in torch.unique(labels).tolist():
            xc = x[labels == c]
            m, n = xc.shape[0], int(counts[c])
            batch_mean = xc.mean(dim=0)
            centred = xc - batch_mean
            self.scatter += centred.T @ centred
            if n:
                offset = batch_mean - means[c]
                self.scatter += (n * m / (n + m)) * torch.outer(offset, offset)
        self.weight += m_total
        self.class_means.add(embeddings, labels)

    def compensate(self, before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor) -> None:
        """Move the class means by the drift the items ``before -> after`` measure (SDC); the
        scatter stays: a translation of every class leaves it unchanged."""
        self.class_means.compensate(before, after, labels)

    def covariance(self) -> torch.Tensor:
        """The shared within-class covariance ``[d, d]`` (zeros before any event)."""
        return self.scatter / max(self.weight, 1.0)

    def discriminant(self, shrinkage: Shrinkage) -> LinearDiscriminant:
        """The LDA read-out of the classes seen so far."""
        labels, means = self.class_means.seen()
        return discriminant(labels, means, self.covariance(), shrinkage, self.weight)


@torch.no_grad()
def predict_lda(
    model: StreamNet, features: torch.Tensor, lda: LinearDiscriminant
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class index [n], confidence [n]) by the linear discriminant of the
    L2-normalised embeddings; the confidence is the posterior of the Gaussian model with equal
    priors, ``max softmax(scores)``."""
    n = features.shape[0]
    if len(lda) == 0 or n == 0:
        return torch.full((n,), -1, dtype=torch.long), torch.zeros(n)
    model.eval()
    e = F.normalize(model.embed(features).float(), dim=-1)
    conf, idx = torch.softmax(lda.scores(e), dim=1).max(dim=1)
    return lda.labels[idx], conf.float()
