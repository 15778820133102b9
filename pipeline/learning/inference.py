"""Classifiers over the encoder (nearest class mean, CE head) and per-class accuracy.

The held-out probe set they are evaluated on lives in :mod:`pipeline.learner.probes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812

from pipeline.learning.labels import LabelRegistry
from pipeline.learning.model import StreamNet

NCM_TEMPERATURE = 0.1  # softmax temperature turning cosine similarities into a confidence


@dataclass(frozen=True, slots=True)
class ClassMeans:
    """NCM's prototypes: unit rows ``means [p, embed_dim]``, row ``i`` of class ``labels[i]``.
    A class may own several rows (its means per task, :class:`pipeline.learning.
    stream_means.TaskClassMeans`); NCM scores a class by its nearest row.

    ``classes``: the classes the rows hold, once each: ``labels`` itself when no class owns
    two rows (its order kept), else sorted; the columns of :func:`ncm_logits`. Found once, when
    the means are made, not at every prediction.

    ``bias``: under a shared covariance (``eval.covariance_shrinkage``,
    :mod:`pipeline.learning.discriminant`) the rows are a linear discriminant's weights, not
    unit means, and each has a bias; a row's score is then ``e . row + bias``, for the unit
    embedding ``e``. None: plain NCM, the score a cosine."""

    labels: torch.Tensor  # [p] class indices
    means: torch.Tensor  # [p, embed_dim], L2-normalised (discriminant weights with a bias)
    bias: torch.Tensor | None = None  # [p]
    classes: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        classes = torch.unique(self.labels)
        unique = classes.numel() == self.labels.numel()
        object.__setattr__(self, "classes", self.labels if unique else classes)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def scores(self, unit: torch.Tensor) -> torch.Tensor:
        """Per-row scores ``[n, p]`` of unit embeddings ``[n, embed_dim]``: cosines, or the
        discriminant's scores when the rows have a bias."""
        scores = unit @ self.means.T
        return scores if self.bias is None else scores + self.bias


def class_cosines(cosines: torch.Tensor, means: ClassMeans) -> torch.Tensor:
    """Per-row scores ``[n, p]`` (cosines under plain NCM) to per-class ones ``[n, k]``
    (columns ``means.classes``): a class's score is its best row's."""
    classes = means.classes
    if classes.numel() == cosines.shape[1]:
        return cosines
    column = torch.searchsorted(classes, means.labels)
    lowest = torch.finfo(cosines.dtype).min
    out = torch.full(
        (cosines.shape[0], classes.numel()), lowest, dtype=cosines.dtype, device=cosines.device
    )
    return out.scatter_reduce(1, column.expand_as(cosines), cosines, "amax")


def unit_embeddings(model: StreamNet, features: torch.Tensor) -> torch.Tensor:
    """The encoder output of ``features`` as float32 unit vectors: what NCM compares."""
    return F.normalize(model.embed(features).float(), dim=-1)


@torch.no_grad()
def class_means(model: StreamNet, features: torch.Tensor, labels: torch.Tensor) -> ClassMeans:
    """Class means of the *current* encoder over the bank (SCR re-encodes the memory)."""
    if features.numel() == 0:
        return ClassMeans(labels.new_empty(0), features.new_empty(0, 0))
    model.eval()
    h = unit_embeddings(model, features)
    classes, inverse = torch.unique(labels, return_inverse=True)
    sums = torch.zeros(classes.numel(), h.shape[1], device=h.device).index_add_(0, inverse, h)
    return ClassMeans(classes, F.normalize(sums, dim=-1))


@torch.no_grad()
def ncm_logits(model: StreamNet, features: torch.Tensor, means: ClassMeans) -> torch.Tensor:
    """Cosines ``[n, k]`` between the embeddings and the ``k`` classes of ``means`` (columns
    ``means.classes``; a class's nearest row): NCM's logits."""
    model.eval()
    return class_cosines(means.scores(unit_embeddings(model, features)), means)


def ncm_from_logits(
    cosines: torch.Tensor, means: ClassMeans, temperature: float = NCM_TEMPERATURE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(class index [n], confidence [n]) from :func:`ncm_logits`: the nearest class,
    ``max softmax(cosine / T)``."""
    conf, idx = torch.softmax(cosines / temperature, dim=1).max(dim=1)
    return means.classes[idx], conf


@torch.no_grad()
def predict_ncm(
    model: StreamNet,
    features: torch.Tensor,
    means: ClassMeans,
    temperature: float = NCM_TEMPERATURE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class index [n], confidence [n]) by cosine to the nearest class mean.

    ``temperature`` turns cosines into a confidence; the learner passes the one fitted on
    its probes (:mod:`pipeline.learning.calibration`) once there is one.
    """
    if len(means) == 0 or features.shape[0] == 0:
        n = features.shape[0]
        return (
            torch.full((n,), -1, dtype=torch.long, device=features.device),
            torch.zeros(n, device=features.device),
        )
    return ncm_from_logits(ncm_logits(model, features, means), means, temperature)


@torch.no_grad()
def predict_head(
    model: StreamNet, features: torch.Tensor, seen_classes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class index [n], softmax confidence [n]) from the CE head, unseen masked."""
    model.eval()
    logits = model.logits(model.embed(features)).float()
    logits = logits.masked_fill(~seen_classes, torch.finfo(torch.float32).min)
    conf, idx = torch.softmax(logits, dim=1).max(dim=1)
    return idx, conf


@torch.no_grad()
def predict_ensemble(
    model: StreamNet,
    features: torch.Tensor,
    means: ClassMeans,
    seen_classes: torch.Tensor,
    temperature: float = NCM_TEMPERATURE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class index [n], confidence [n]) from the mean of the head's softmax (unseen
    masked) and NCM's softmax (``cosine / temperature`` over the bank's classes).

    The head is a parametric memory of the whole stream, NCM reads the bank without the head's
    recency bias; averaging probabilities lets the more confident of the two decide. Without
    class means it is the head.
    """
    model.eval()
    h = model.embed(features).float()
    logits = model.logits(h).float().masked_fill(~seen_classes, torch.finfo(torch.float32).min)
    p = torch.softmax(logits, dim=1)
    if len(means) > 0:
        cosines = class_cosines(means.scores(F.normalize(h, dim=-1)), means)
        p_ncm = torch.zeros_like(p).index_add_(
            1, means.classes, torch.softmax(cosines / temperature, dim=1)
        )
        p = 0.5 * (p + p_ncm)
    conf, idx = p.max(dim=1)
    return idx, conf


def per_class_accuracy(
    predicted: torch.Tensor, truth: torch.Tensor, registry: LabelRegistry
) -> dict[str, float]:
    if truth.numel() == 0:
        return {}
    classes, inverse = torch.unique(truth, return_inverse=True)
    correct = torch.zeros(classes.numel(), device=truth.device).index_add_(
        0, inverse, (predicted == truth).float()
    )
    counts = torch.bincount(inverse, minlength=classes.numel()).float()
    acc = (correct / counts).cpu().tolist()
    return {registry.name(int(c)): round(a, 6) for c, a in zip(classes.tolist(), acc, strict=True)}
