"""Objectives: the loss family of :mod:`pipeline.learning.losses` wired to the network, from config.

An objective is a weighted sum of named loss terms (``train.loss_terms``; empty means the
preset of ``train.objective``, see :func:`loss_weights`). Every term sees the same contrasted
set, the micro-batch (its first ``n`` rows) followed by the replayed bank items, and the same
``train.views`` augmented views (2 by default):

- ``supcon``: SupCon over batch ∪ replay, every item an anchor (SCR, Mai et al. 2021); with
  ``train.mix_negatives``, cross-class mixtures of the step's projections join its contrast
  set as negatives only;
- ``asym_supcon``: only batch items are anchors, replay items are contrast only (Co2L,
  Cha et al. 2021);
- ``ce``: masked cross-entropy of the head on the encoder output, label smoothing optional;
- ``ce_detached``: the same head trained on a *detached* encoder output, so it learns to read
  the representation without pulling it towards the CE solution (e.g. SupCon + 0.1 · CE);
- ``focal``: focal loss of the head (``focal_gamma``, ``focal_alpha``);
- ``ace``: ER-ACE's asymmetric cross-entropy of the head (Caccia et al. 2022): a batch row's
  softmax over the classes present in the batch, a replayed row's over every seen class;
- ``ace_detached``: the same on a detached encoder output: the head learns to read the
  representation without the recency bias of plain CE and without shaping the encoder;
- ``triplet``: batch-hard triplet loss on the normalised projection;
- ``distill``: instance-wise relation distillation (Co2L's IRD) of the projections of the
  contrasted set towards those of an earlier snapshot of the network (``teacher``); 0 while
  there is no snapshot yet;
- ``proxy``: proxy-based contrastive replay (PCR, Lin et al. 2023): each normalised encoder
  output against the normalised rows of the head, softmax over the classes present in the
  step only;
- ``proxy_mixup``: the ``proxy`` term on the mixture of each labeled view with a random other
  labeled view (λ ~ U(0, 1)), with the two labels as soft targets (manifold mixup).

Events without a label (label ``-1``) are handled by the contrastive terms as in SimCLR: each
gets an identity of its own, so its only positives are its other views and every other item is
a negative: NT-Xent (Chen et al. 2020) inside the same softmax, at the same temperature. The
head terms (CE, focal) skip them.

:func:`natural_classifier` says how an objective predicts: nearest class mean over the
encoder output for the representation objectives, the head for CE and focal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812

from pipeline.config import TrainSettings
from pipeline.learning.losses import (
    asymmetric_cross_entropy_loss,
    asymmetric_supcon_loss,
    batch_hard_triplet_loss,
    combine,
    cross_entropy_loss,
    focal_loss,
    relation_distillation_loss,
    supcon_loss,
)
from pipeline.learning.model import StreamNet, augment
from pipeline.learning.proxy_losses import (
    cross_class_mixtures,
    proxy_contrastive_loss,
    proxy_mixup_loss,
)
from pipeline.settings.learning import LOSS_TERMS, REPRESENTATION_TERMS

HEAD_TERMS = frozenset(LOSS_TERMS) - REPRESENTATION_TERMS
UNLABELED = -1


def loss_weights(cfg: TrainSettings) -> dict[str, float]:
    """The weighted terms the objective is made of (zero-weight terms dropped).

    ``train.loss_terms`` when set; else the preset of ``train.objective``: ``supcon`` is SupCon
    with ``proxy_weight`` · PCR's proxy term, ``distill_weight`` · relation distillation and
    ``mixup_weight`` · the proxy-mixup term beside it (the first is the combination measured
    best, docs/forgetting.md; the other two are off by default), any other objective is its
    term alone.
    """
    if cfg.loss_terms:
        terms = dict(cfg.loss_terms)
    elif cfg.objective == "supcon":
        terms = {
            "supcon": 1.0,
            "proxy": cfg.proxy_weight,
            "distill": cfg.distill_weight,
            "proxy_mixup": cfg.mixup_weight,
        }
    else:
        terms = {cfg.objective: 1.0}
    return {name: w for name, w in terms.items() if w > 0}


def natural_classifier(cfg: TrainSettings) -> str:
    """``"head"`` when only head terms (ce, focal, ace) train the encoder, else ``"ncm"``."""
    terms = set(loss_weights(cfg))
    head = terms & {"ce", "focal", "ace"}
    return "head" if head and not terms & REPRESENTATION_TERMS else "ncm"


def chosen_classifier(cfg: TrainSettings, choice: str) -> str:
    """``eval.classifier`` resolved: ``"natural"`` becomes the objective's natural one."""
    return natural_classifier(cfg) if choice == "natural" else choice


@dataclass(frozen=True, slots=True)
class MixPairs:
    """Who mixes with whom, drawn once per step for the ``proxy_mixup`` term."""

    rows: torch.Tensor  # [k] the labeled rows of ``Views.h`` (every view)
    partner: torch.Tensor  # [k] for each, the position in ``rows`` of its partner
    lam: torch.Tensor  # [k] its mixing coefficient in [0, 1]


@dataclass(frozen=True, slots=True)
class NegativePairs:
    """Pairs of rows of ``Views.h`` whose cross-class mixtures are SupCon's synthetic negatives."""

    first: torch.Tensor  # [k] row indices
    second: torch.Tensor  # [k] row indices
    lam: torch.Tensor  # [k] mixing coefficients in [0, 1]


@dataclass(frozen=True, slots=True)
class Views:
    """``count`` augmented views of the contrasted set, encoded once and shared by every term."""

    n: int  # batch items first, then replay items
    labels: torch.Tensor  # [m], UNLABELED for events without a label
    h: torch.Tensor  # [count·m, embed_dim] encoder output, view-major
    seen_classes: torch.Tensor
    teacher_z: torch.Tensor | None = None  # [count·m, proj_dim] an earlier snapshot's projections
    count: int = 2  # views per item
    mix: MixPairs | None = None  # drawn only when the proxy_mixup term is weighted
    negatives: NegativePairs | None = None  # drawn only when train.mix_negatives > 0

    @property
    def m(self) -> int:
        return int(self.labels.shape[0])

    def per_row(self, per_item: torch.Tensor) -> torch.Tensor:
        """A per-item tensor ``[m]`` repeated for every view, in the rows' view-major order."""
        return per_item.repeat(self.count)

    def per_item(self, per_view: torch.Tensor, items: int | None = None) -> torch.Tensor:
        """Per-row values ``[count·items]`` averaged over each item's views: ``[items]``."""
        return per_view.view(self.count, self.m if items is None else items).mean(dim=0)


@dataclass(frozen=True, slots=True)
class ObjectiveLoss:
    loss: torch.Tensor  # scalar, what backward() is called on
    batch_per_sample: torch.Tensor  # [n] weighted per-item loss of the batch items


def _contrast_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels with each unlabeled item given a fresh identity (below every real label).

    Always computed (no ``.any()`` test), so a step with labels only costs no host sync.
    """
    ids = -2 - torch.arange(labels.shape[0], device=labels.device)
    return torch.where(labels == UNLABELED, ids, labels)


def _projected(model: StreamNet, v: Views) -> torch.Tensor:
    z = model.project(v.h)
    return z.view(v.count, v.m, -1).transpose(0, 1)  # [m, views, proj]


def _supcon_term(model: StreamNet, v: Views, cfg: TrainSettings) -> torch.Tensor:
    feats = _projected(model, v)
    if v.negatives is not None:
        return _supcon_with_mixed_negatives(feats, v, cfg)
    per_anchor = supcon_loss(
        feats,
        _contrast_labels(v.labels),
        cfg.temperature,
        cfg.base_temperature,
        cfg.contrast_mode,
        reduction="none",
    )
    return per_anchor if cfg.contrast_mode == "one" else v.per_item(per_anchor)


def _supcon_with_mixed_negatives(feats: torch.Tensor, v: Views, cfg: TrainSettings) -> torch.Tensor:
    """SupCon, every view an anchor, with the cross-class mixtures as extra contrast-only
    negatives: each gets an identity of its own, below every item's, so it is nobody's positive.
    """
    assert v.negatives is not None
    labels = _contrast_labels(v.labels)
    rows = feats.transpose(0, 1).reshape(v.count * v.m, -1)
    pairs = v.negatives
    synthetic = cross_class_mixtures(rows, v.per_row(labels), pairs.first, pairs.second, pairs.lam)
    ids = -2 - v.m - torch.arange(synthetic.shape[0], device=labels.device)
    per_anchor = asymmetric_supcon_loss(
        feats, labels, synthetic, ids, cfg.temperature, cfg.base_temperature, reduction="none"
    )
    return v.per_item(per_anchor)


def _asym_supcon_term(model: StreamNet, v: Views, cfg: TrainSettings) -> torch.Tensor:
    feats = _projected(model, v)
    labels = _contrast_labels(v.labels)
    replay = feats[v.n :]
    per_anchor = asymmetric_supcon_loss(
        feats[: v.n],
        labels[: v.n],
        replay.transpose(0, 1).reshape(-1, replay.shape[-1]),
        labels[v.n :].repeat(v.count),
        cfg.temperature,
        cfg.base_temperature,
        reduction="none",
    )
    return v.per_item(per_anchor, v.n)


def _labeled_only(per_view: torch.Tensor, v: Views) -> torch.Tensor:
    """Average a head loss over views; unlabeled items contribute 0 (and count in the mean)."""
    labeled = v.per_row(v.labels != UNLABELED)
    per_view = per_view.masked_fill(~labeled, 0.0)
    return v.per_item(per_view)


def _head_targets(v: Views) -> torch.Tensor:
    return v.per_row(v.labels.clamp(min=0))


def _ce_term(model: StreamNet, v: Views, cfg: TrainSettings, detach: bool) -> torch.Tensor:
    logits = model.logits(v.h.detach() if detach else v.h)
    per_view = cross_entropy_loss(
        logits,
        _head_targets(v),
        v.seen_classes,
        label_smoothing=cfg.label_smoothing,
        reduction="none",
    )
    return _labeled_only(per_view, v)


def _focal_term(model: StreamNet, v: Views, cfg: TrainSettings) -> torch.Tensor:
    per_view = focal_loss(
        model.logits(v.h),
        _head_targets(v),
        gamma=cfg.focal_gamma,
        alpha=cfg.focal_alpha,
        seen_classes=v.seen_classes,
        reduction="none",
    )
    return _labeled_only(per_view, v)


def _ace_term(model: StreamNet, v: Views, detach: bool) -> torch.Tensor:
    labeled = v.per_row(v.labels != UNLABELED)
    incoming = v.per_row(torch.arange(v.m, device=v.labels.device) < v.n)
    h = v.h.detach() if detach else v.h
    per_view = v.h.new_zeros(v.h.shape[0], dtype=torch.float32)
    per_view[labeled] = asymmetric_cross_entropy_loss(
        model.logits(h[labeled]),
        v.per_row(v.labels)[labeled],
        incoming[labeled],
        v.seen_classes,
        reduction="none",
    )
    return v.per_item(per_view)


def _triplet_term(model: StreamNet, v: Views, cfg: TrainSettings) -> torch.Tensor:
    z = model.project(v.h)
    labels = v.per_row(_contrast_labels(v.labels))
    per_anchor = batch_hard_triplet_loss(z, labels, cfg.triplet_margin, reduction="none")
    return v.per_item(per_anchor)


def _proxy_term(model: StreamNet, v: Views, cfg: TrainSettings) -> torch.Tensor:
    z = F.normalize(v.h, dim=-1)
    proxies = F.normalize(model.head.weight, dim=-1)
    labeled = v.per_row(v.labels != UNLABELED)
    per_view = z.new_zeros(z.shape[0])
    per_view[labeled] = proxy_contrastive_loss(
        z[labeled], v.per_row(v.labels)[labeled], proxies, cfg.temperature, reduction="none"
    )
    return v.per_item(per_view)


def _proxy_mixup_term(model: StreamNet, v: Views, cfg: TrainSettings) -> torch.Tensor:
    if v.mix is None:
        raise ValueError("the proxy_mixup term needs the step's mix pairs (objective_loss)")
    z = F.normalize(v.h, dim=-1)
    proxies = F.normalize(model.head.weight, dim=-1)
    rows = v.mix.rows
    per_view = z.new_zeros(z.shape[0])
    per_view[rows] = proxy_mixup_loss(
        z[rows],
        v.per_row(v.labels)[rows],
        v.mix.partner,
        v.mix.lam,
        proxies,
        cfg.temperature,
        reduction="none",
    )
    return v.per_item(per_view)


def _distill_term(model: StreamNet, v: Views, _cfg: TrainSettings) -> torch.Tensor:
    if v.teacher_z is None:
        return v.h.new_zeros(v.m)
    per_view = relation_distillation_loss(model.project(v.h), v.teacher_z, reduction="none")
    return v.per_item(per_view)


# One function per name of config.LOSS_TERMS (a unit test holds the two to each other).
# A term returns its per-item losses (each averaged over the item's views): rows 0..m-1, or
# only the batch's rows 0..n-1 for a term whose anchors are the batch (asym_supcon).
TermFn = Callable[[StreamNet, Views, TrainSettings], torch.Tensor]
TERMS: dict[str, TermFn] = {
    "supcon": _supcon_term,
    "asym_supcon": _asym_supcon_term,
    "ce": lambda model, v, cfg: _ce_term(model, v, cfg, detach=False),
    "ce_detached": lambda model, v, cfg: _ce_term(model, v, cfg, detach=True),
    "focal": _focal_term,
    "ace": lambda model, v, _cfg: _ace_term(model, v, detach=False),
    "ace_detached": lambda model, v, _cfg: _ace_term(model, v, detach=True),
    "triplet": _triplet_term,
    "proxy": _proxy_term,
    "proxy_mixup": _proxy_mixup_term,
    "distill": _distill_term,
}


def draw_mix_pairs(
    labels: torch.Tensor, views: int, generator: torch.Generator | None = None
) -> MixPairs:
    """Random mixing pairs over the labeled rows of ``views`` view-major copies of ``labels``.

    Each labeled row is paired with the row at a random permutation of the labeled rows (the
    mixup of a batch with a shuffled copy of itself, so most pairs cross classes), and gets a
    coefficient λ ~ U(0, 1), i.e. Beta(1, 1). Unlabeled rows take no part.
    """
    labeled = (labels != UNLABELED).repeat(views)
    rows = labeled.nonzero().squeeze(1)
    k = rows.shape[0]
    partner = torch.randperm(k, generator=generator, device=labels.device)
    lam = torch.rand(k, generator=generator, device=labels.device)
    return MixPairs(rows=rows, partner=partner, lam=lam)


def draw_negative_pairs(
    labels: torch.Tensor, views: int, pairs: int, generator: torch.Generator | None = None
) -> NegativePairs | None:
    """``pairs`` random pairs (with replacement) of labeled rows of ``views`` view-major copies
    of ``labels``, each with λ ~ U(0, 1); None when no row is labeled."""
    rows = (labels != UNLABELED).repeat(views).nonzero().squeeze(1)
    if rows.numel() == 0:
        return None
    device = labels.device
    first = rows[torch.randint(rows.numel(), (pairs,), generator=generator, device=device)]
    second = rows[torch.randint(rows.numel(), (pairs,), generator=generator, device=device)]
    lam = torch.rand(pairs, generator=generator, device=device)
    return NegativePairs(first=first, second=second, lam=lam)


def objective_loss(
    model: StreamNet,
    x: torch.Tensor,
    labels: torch.Tensor,
    n: int,
    seen_classes: torch.Tensor,
    cfg: TrainSettings,
    generator: torch.Generator | None = None,
    teacher: StreamNet | None = None,
) -> ObjectiveLoss:
    """Loss of the configured objective over ``x`` (the batch's ``n`` rows, then replay).

    ``teacher`` is the earlier snapshot the ``distill`` term keeps the relations of; it sees
    the same (standardised, augmented) views, without gradient.
    """
    z = model.standardise(x)
    views = torch.cat(
        [augment(z, cfg.noise_std, cfg.mask_prob, generator) for _ in range(cfg.views)], dim=0
    )
    weights = loss_weights(cfg)
    teacher_z = None
    if teacher is not None and "distill" in weights:
        with torch.no_grad():
            teacher_z = teacher.project(teacher.encode(views))
    # Drawn after the views and only when weighted: without the term the generator's stream,
    # and so every earlier figure, is unchanged.
    mix = draw_mix_pairs(labels, cfg.views, generator) if "proxy_mixup" in weights else None
    negatives = (
        draw_negative_pairs(labels, cfg.views, cfg.mix_negatives, generator)
        if cfg.mix_negatives and "supcon" in weights
        else None
    )
    v = Views(n, labels, model.encode(views), seen_classes, teacher_z, cfg.views, mix, negatives)
    per_term = {name: TERMS[name](model, v, cfg) for name in weights}
    total = combine({name: t.float().mean() for name, t in per_term.items()}, weights)
    batch = combine({name: t[:n].float() for name, t in per_term.items()}, weights)
    return ObjectiveLoss(
        loss=total,
        batch_per_sample=batch.detach(),
    )
