"""The stream class means read through a shared within-class covariance: streaming LDA.

Hayes & Kanan, "Lifelong Machine Learning with Deep Streaming Linear Discriminant Analysis",
CVPR Workshops 2020. Beside the running means (:mod:`pipeline.learning.stream_means`), one
running *shared* within-class scatter of the stream's L2-normalised embeddings, each event's
deviation from its own mean (a mean per class and task), pooled exactly as events arrive.
Prediction is the linear discriminant of Gaussians sharing that covariance::

    argmax_c  mu_c^T P e - 0.5 mu_c^T P mu_c,    P = inverse of the shrunk covariance

which scores a test embedding by how far it lies from a mean *along the directions a class
actually varies in*, where NCM's cosine weighs every direction alike.

The encoder moves under the stream. SDC moves the means by a translation, which leaves a
covariance as it was; but the encoder also turns and stretches the space, and a scatter left
as it was learned reads the newer embeddings worse than no scatter at all
(docs/forgetting.md, "What was tried"). So :meth:`WithinClassScatter.carry` carries it through
the change with the linear map that best takes the re-encoded bank items from their embedding
before the micro-batch to the one after (ridge regression towards the identity): ``S' = A^T S
A``. The cost is a ``d x d`` solve per micro-batch, and ``d^2`` numbers of state, whatever
the stream's length.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pipeline.learning.inference import NCM_TEMPERATURE, ClassMeans

# The ridge of the fitted drift map, in units of one unit-vector item's contribution to the
# normal equations: small enough that the bank's items are followed closely, large enough that
# directions no item spans keep the identity (a bank of 20 items in 128 dimensions).
DRIFT_MAP_RIDGE = 0.01


class WithinClassScatter:
    """The pooled scatter ``[d, d]`` of embeddings about the means of their rows, and the
    number of embeddings in it (float64: sums of many small outer products)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def add(
        self,
        embeddings: torch.Tensor,
        rows: torch.Tensor,
        means: torch.Tensor,
        counts: torch.Tensor,
    ) -> None:
        """Fold ``embeddings [n, d]`` of the rows ``rows [n]`` in, given the rows' running
        ``means`` and ``counts`` *before* the embeddings join them.

        Per row, the exact pooled update (Chan et al.): the batch's own scatter about its mean
        plus ``n m / (n + m)`` times the outer product of that mean's offset from the ``n``
        earlier events' mean."""
        x = embeddings.to(self.scatter)
        if x.shape[0] == 0:
            return
        batch_rows, inverse = torch.unique(rows, return_inverse=True)
        m = torch.bincount(inverse, minlength=batch_rows.numel()).to(x.dtype)
        batch_means = torch.zeros(batch_rows.numel(), x.shape[1], dtype=x.dtype, device=x.device)
        batch_means = batch_means.index_add_(0, inverse, x) / m[:, None]
        centred = x - batch_means[inverse]
        n = counts[batch_rows].to(x.dtype)
        offsets = batch_means - means[batch_rows].to(x.dtype)
        weight = n * m / (n + m)  # 0 for a row's first events: no earlier mean to be off from
        self.scatter += centred.T @ centred + (offsets.T * weight) @ offsets
        self.count += x.shape[0]

    def merge(self, mean_a: torch.Tensor, n_a: float, mean_b: torch.Tensor, n_b: float) -> None:
        """Two rows become one: their means' spread joins the within-row scatter."""
        if n_a and n_b:
            offset = mean_a.to(self.scatter) - mean_b.to(self.scatter)
            self.scatter += (n_a * n_b / (n_a + n_b)) * torch.outer(offset, offset)

    def carry(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """Carry the scatter through the encoder change that took the items ``before [k, d]``
        to ``after [k, d]``: ``A = I + B``, ``B`` the ridge solution of ``before @ B = after -
        before``, and ``S' = A^T S A``."""
        if before.shape[0] == 0:
            return
        # the normal equations' products in float32 (the items' own precision), the d x d
        # solve and the carried scatter in float64
        e = before.float()
        gram = (e.T @ e).to(self.scatter)
        moved = (e.T @ (after.float() - e)).to(self.scatter)
        eye = torch.eye(e.shape[1], dtype=self.scatter.dtype, device=self.scatter.device)
        lift = eye + torch.linalg.solve(gram + DRIFT_MAP_RIDGE * eye, moved)
        self.scatter = lift.T @ self.scatter @ lift

    def covariance(self) -> torch.Tensor:
        return covariance_of(self.scatter, float(self.count))

    def reset(self) -> None:
        self.scatter.zero_()
        self.count.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"scatter": self.scatter.cpu().clone(), "count": float(self.count)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        scatter = state["scatter"]
        if tuple(scatter.shape) != tuple(self.scatter.shape):
            raise ValueError(
                f"saved within-class scatter of shape {tuple(scatter.shape)} does not fit "
                f"{tuple(self.scatter.shape)} (model.embed_dim x model.embed_dim)"
            )
        self.scatter.copy_(scatter)
        self.count.fill_(float(state["count"]))


def covariance_of(scatter: torch.Tensor, count: float) -> torch.Tensor:
    """The covariance of a scatter of ``count`` embeddings (the scatter itself below one)."""
    return scatter / max(count, 1.0)


def saved_covariance(state: Mapping[str, Any]) -> torch.Tensor:
    """The covariance of a saved :meth:`WithinClassScatter.state_dict`."""
    return covariance_of(state["scatter"].double(), float(state["count"]))


def shrunk(cov: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``(1 - s) cov + s (tr cov / d) I``; the identity while nothing has spread yet."""
    d = cov.shape[0]
    target = float(torch.trace(cov)) / d
    if target <= 0:
        target = 1.0
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    return (1 - shrinkage) * cov + shrinkage * target * eye


def discriminant(
    labels: torch.Tensor, means: torch.Tensor, cov: torch.Tensor, shrinkage: float
) -> ClassMeans:
    """The linear discriminant of the rows ``means [k, d]`` (classes ``labels``) sharing the
    covariance ``cov`` shrunk by ``shrinkage``, as NCM's read-out: weights ``P mu`` and biases
    ``-mu^T P mu / 2``, both times :data:`NCM_TEMPERATURE`, so that NCM's softmax at its
    default temperature is the Gaussian posterior with equal priors (the fitted temperature
    then corrects it like NCM's)."""
    if labels.numel() == 0:
        return ClassMeans(labels, means.float())
    mu = means.to(cov.dtype)
    weights = torch.linalg.solve(shrunk(cov, shrinkage), mu.T).T  # [k, d]
    bias = -0.5 * (mu * weights).sum(dim=1)
    return ClassMeans(labels, (weights * NCM_TEMPERATURE).float(), (bias * NCM_TEMPERATURE).float())
