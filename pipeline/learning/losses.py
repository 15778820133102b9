"""Training objectives.

``supcon_loss`` follows the reference formulation of supervised contrastive loss
(Khosla et al., 2020, "Supervised Contrastive Learning"):

* ``features`` is ``[batch, views, dim]`` and already L2-normalised;
* anchors are all views (``contrast_mode="all"``) or the first view (``"one"``);
* the positives of an anchor are the other samples/views with the same label (never itself);
* the loss of an anchor is ``-(τ/τ_base) · mean over positives of log softmax over all
  non-self contrasts``; an anchor with no positive contributes 0 (not NaN) and still counts
  in the mean;
* ``labels=None`` is the self-supervised case (SimCLR): the only positives are the other
  views of the same sample.

The row maximum (over non-self contrasts) is subtracted before ``exp`` so large similarities
and small temperatures can neither overflow nor underflow the softmax denominator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

Reduction = Literal["mean", "none"]


def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    contrast_mode: Literal["all", "one"] = "all",
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Supervised contrastive loss; see the module docstring for the exact definition.

    With ``reduction="none"`` the per-anchor losses are returned, ordered view-major
    (anchor ``v * batch + i`` is view ``v`` of sample ``i``), shape ``[anchors]``.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be [batch, views, dim], got shape {tuple(features.shape)}")
    if contrast_mode not in ("all", "one"):
        raise ValueError(f"contrast_mode must be 'all' or 'one', got {contrast_mode!r}")
    batch, views, _ = features.shape
    device = features.device
    if labels is None:
        same = torch.eye(batch, dtype=torch.bool, device=device)
    else:
        labels = labels.reshape(-1)
        if labels.numel() != batch:
            raise ValueError(f"{labels.numel()} labels for a batch of {batch}")
        same = labels.unsqueeze(0) == labels.unsqueeze(1)

    # View-major stacking: rows [view0 of all samples, view1 of all samples, ...].
    contrast = features.transpose(0, 1).reshape(batch * views, -1).float()
    anchor_views = views if contrast_mode == "all" else 1
    anchors = contrast[: batch * anchor_views]

    logits = anchors @ contrast.T / temperature
    n_anchors = batch * anchor_views
    not_self = torch.ones_like(logits, dtype=torch.bool)
    idx = torch.arange(n_anchors, device=device)
    not_self[idx, idx] = False
    # Shift by the row max over the *non-self* entries (log-softmax is shift-invariant): the
    # largest kept term becomes exp(0) = 1, so the denominator cannot underflow to 0 even at
    # tiny temperatures, where the self-similarity would dominate a plain row max.
    row_max = logits.masked_fill(~not_self, torch.finfo(logits.dtype).min).max(dim=1).values
    logits = logits - row_max.unsqueeze(1).detach()
    positives = same.repeat(anchor_views, views) & not_self

    # masked_fill, not multiply: exp of the (now positive) self logit may be inf, and inf·0 = NaN.
    exp_logits = torch.exp(logits.masked_fill(~not_self, float("-inf")))
    log_prob = logits - torch.log(exp_logits.sum(dim=1, keepdim=True))
    pos_count = positives.sum(dim=1)
    # An anchor without positives has a zero numerator; dividing by 1 keeps it at 0.
    pos_log_prob = log_prob.masked_fill(~positives, 0.0)
    mean_log_prob_pos = pos_log_prob.sum(dim=1) / pos_count.clamp(min=1)
    per_anchor = -(temperature / base_temperature) * mean_log_prob_pos
    return per_anchor.mean() if reduction == "mean" else per_anchor


def masked_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    seen_classes: torch.Tensor,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Cross-entropy over a pre-allocated head where classes not yet seen are masked out.

    ``seen_classes`` is a bool mask ``[max_classes]``. Masked logits get the dtype's lowest
    value rather than -inf, so a row cannot become NaN.
    """
    masked = logits.float().masked_fill(~seen_classes, torch.finfo(torch.float32).min)
    return F.cross_entropy(masked, targets, reduction=reduction)


# --------------------------------------------------------------------------------------------
# The wider loss family. Each is a pure function of tensors; the stability rules are the ones
# ``supcon_loss`` follows: softmax denominators are taken after a (detached) row-max shift or
# through ``log_softmax``, masked entries are removed with ``masked_fill`` rather than
# multiplied by 0 (inf·0 = NaN), and an anchor or sample with nothing to learn from
# contributes exactly 0 and still counts in the mean.
# --------------------------------------------------------------------------------------------


def reduce_per_item(per_item: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return per_item.mean()
    if reduction == "none":
        return per_item
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _mean_log_prob_pos(
    logits: torch.Tensor, contrast_mask: torch.Tensor, positives: torch.Tensor
) -> torch.Tensor:
    """Per-row mean over ``positives`` of the log softmax taken over ``contrast_mask``.

    Rows with no contrast entry, or no positive, give exactly 0 with a finite gradient.
    """
    has_contrast = contrast_mask.any(dim=1)
    row_max = logits.masked_fill(~contrast_mask, torch.finfo(logits.dtype).min).max(dim=1).values
    # A row with nothing to contrast against would be shifted by the dtype's lowest value.
    row_max = torch.where(has_contrast, row_max, torch.zeros_like(row_max))
    shifted = logits - row_max.unsqueeze(1).detach()
    denominator = torch.exp(shifted.masked_fill(~contrast_mask, float("-inf"))).sum(dim=1)
    # After the shift the largest kept term is exp(0) = 1, so a row with any contrast has a
    # denominator >= 1; only an empty row is 0, and it is replaced by 1 (never log(0)).
    denominator = torch.where(has_contrast, denominator, torch.ones_like(denominator))
    log_prob = shifted - torch.log(denominator).unsqueeze(1)
    pos_count = positives.sum(dim=1)
    return log_prob.masked_fill(~positives, 0.0).sum(dim=1) / pos_count.clamp(min=1)


def asymmetric_supcon_loss(
    anchor_features: torch.Tensor,
    anchor_labels: torch.Tensor,
    contrast_features: torch.Tensor,
    contrast_labels: torch.Tensor,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Asymmetric supervised contrastive loss (Cha et al., 2021, "Co2L").

    Only the current batch's views (``anchor_features``, ``[n, views, d]``) are anchors. Each
    anchor contrasts against every other batch view and every memory-bank item
    (``contrast_features``, ``[m, d]``, contrast only, never anchors); its positives are the
    non-self entries with its label. Per-anchor loss and the no-positive rule are those of
    ``supcon_loss``. With an empty bank (``m = 0``) this *is* ``supcon_loss(...,
    contrast_mode="all")``, anchors in the same view-major order.
    """
    if anchor_features.dim() != 3:
        raise ValueError(
            f"anchor_features must be [batch, views, dim], got {tuple(anchor_features.shape)}"
        )
    batch, views, dim = anchor_features.shape
    if contrast_features.dim() != 2 or contrast_features.shape[1] != dim:
        raise ValueError(
            f"contrast_features must be [items, {dim}], got {tuple(contrast_features.shape)}"
        )
    anchor_labels = anchor_labels.reshape(-1)
    contrast_labels = contrast_labels.reshape(-1)
    if anchor_labels.numel() != batch:
        raise ValueError(f"{anchor_labels.numel()} anchor labels for a batch of {batch}")
    if contrast_labels.numel() != contrast_features.shape[0]:
        raise ValueError(
            f"{contrast_labels.numel()} contrast labels for {contrast_features.shape[0]} items"
        )
    device = anchor_features.device

    anchors = anchor_features.transpose(0, 1).reshape(batch * views, dim).float()
    anchor_y = anchor_labels.repeat(views)  # view-major, like the rows of ``anchors``
    contrast = torch.cat([anchors, contrast_features.to(device).float()])
    contrast_y = torch.cat([anchor_y, contrast_labels.to(device=device, dtype=anchor_y.dtype)])

    logits = anchors @ contrast.T / temperature
    n_anchors = batch * views
    not_self = torch.ones_like(logits, dtype=torch.bool)
    idx = torch.arange(n_anchors, device=device)
    not_self[idx, idx] = False  # anchor i is contrast column i: the batch views come first
    positives = (anchor_y.unsqueeze(1) == contrast_y.unsqueeze(0)) & not_self
    per_anchor = -(temperature / base_temperature) * _mean_log_prob_pos(logits, not_self, positives)
    return reduce_per_item(per_anchor, reduction)


def nt_xent_loss(
    features: torch.Tensor, temperature: float = 0.5, reduction: Reduction = "mean"
) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al., 2020) over ``[n, 2, d]`` L2-normalised view pairs.

    Each of the 2n views is classified against the other 2n - 1 with its partner view as the
    target. Equal to ``supcon_loss(features, None, temperature, base_temperature=temperature)``;
    written independently (cross-entropy over a self-masked similarity matrix) so the two can
    check each other. ``reduction="none"`` gives per-view losses in view-major order.
    """
    if features.dim() != 3 or features.shape[1] != 2:
        raise ValueError(f"features must be [batch, 2, dim], got shape {tuple(features.shape)}")
    batch = features.shape[0]
    z = features.transpose(0, 1).reshape(2 * batch, -1).float()
    logits = z @ z.T / temperature
    eye = torch.eye(2 * batch, dtype=torch.bool, device=z.device)
    # log_softmax shifts by the row max internally; -inf on the diagonal drops self-similarity
    # from the denominator and, as exp(-inf) = 0, from the gradient.
    logits = logits.masked_fill(eye, float("-inf"))
    partner = torch.arange(2 * batch, device=z.device).roll(batch)
    per_view = F.cross_entropy(logits, partner, reduction="none")
    return reduce_per_item(per_view, reduction)


def _masked_log_softmax(logits: torch.Tensor, seen_classes: torch.Tensor | None) -> torch.Tensor:
    """log_softmax over the seen classes; unseen classes get -inf (probability exactly 0)."""
    logits = logits.float()
    if seen_classes is not None:
        logits = logits.masked_fill(~seen_classes.to(logits.device), float("-inf"))
    return F.log_softmax(logits, dim=-1)


def cross_entropy_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    seen_classes: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    class_weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Cross-entropy over the seen classes, with optional label smoothing and class weights.

    Follows ``F.cross_entropy`` exactly (weighted mean divides by the summed target weights;
    the smoothing term is weighted per class) with one change: the smoothing mass ``ε`` is
    spread over the K *seen* classes rather than all C, so masked classes never receive
    target mass. With ``seen_classes=None`` it equals ``F.cross_entropy``; with
    ``label_smoothing=0`` and no weights it equals ``masked_cross_entropy``. A target in an
    unseen class gives an infinite loss (loudly wrong, not silently 0).
    """
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    log_p = _masked_log_softmax(logits, seen_classes)
    n_classes = log_p.shape[-1]
    weights = (
        torch.ones(n_classes, device=log_p.device)
        if class_weights is None
        else class_weights.to(log_p.device).float()
    )
    nll = -log_p.gather(1, targets.unsqueeze(1)).squeeze(1)
    target_weight = weights[targets]
    per_sample = (1.0 - label_smoothing) * target_weight * nll
    if label_smoothing > 0.0:
        seen = (
            torch.ones(n_classes, dtype=torch.bool, device=log_p.device)
            if seen_classes is None
            else seen_classes.to(log_p.device)
        )
        # masked_fill before the product: 0 · (-inf) on an unseen class would be NaN.
        smooth = -(log_p.masked_fill(~seen, 0.0) * weights).sum(dim=1)
        per_sample = per_sample + label_smoothing / seen.sum() * smooth
    if reduction == "mean":
        return per_sample.sum() / target_weight.sum()
    return reduce_per_item(per_sample, reduction)


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma: float = 2.0,
    alpha: float | torch.Tensor | None = None,
    seen_classes: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Softmax focal loss (Lin et al., 2017): ``-α_t (1 - p_t)^γ log p_t`` per sample.

    ``alpha`` is a float (the same α for every sample) or a per-class tensor ``[C]``
    (``α_t = alpha[target]``); ``"mean"`` is a plain mean over samples. Unseen classes are
    masked as in ``cross_entropy_loss``. With ``gamma=0`` and ``alpha=None`` it equals
    cross-entropy exactly.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    log_p = _masked_log_softmax(logits, seen_classes)
    log_pt = log_p.gather(1, targets.unsqueeze(1)).squeeze(1)
    # 1 - p_t via expm1 keeps precision when p_t is close to 1. The clamp to the smallest
    # normal float keeps (1 - p_t)^γ differentiable for γ < 1 when p_t rounds to exactly 1
    # (the derivative of x^γ is infinite at 0); x^0 is still exactly 1.
    one_minus_pt = (-torch.expm1(log_pt)).clamp(min=torch.finfo(log_pt.dtype).tiny)
    per_sample = -(one_minus_pt**gamma) * log_pt
    if isinstance(alpha, torch.Tensor):
        per_sample = alpha.to(per_sample.device).float()[targets] * per_sample
    elif alpha is not None:
        per_sample = alpha * per_sample
    return reduce_per_item(per_sample, reduction)


def asymmetric_cross_entropy_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    incoming: torch.Tensor,
    seen_classes: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """ER-ACE's asymmetric cross-entropy (Caccia et al. 2022, "New Insights on Reducing Abrupt
    Representation Change in Online Continual Learning").

    ``incoming`` (bool ``[n]``) marks the rows of the incoming batch; the others are replayed.
    An incoming row's softmax runs **only over the classes present among the incoming rows'
    targets**, a replayed row's over every seen class (all classes with
    ``seen_classes=None``). So the new classes' logits are never pushed up against the old
    classes on new data, which is where a CE head's class-incremental recency bias comes
    from, while replay still teaches the head to tell old from new. When every row is
    incoming and every class present, it is plain cross-entropy.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, classes], got shape {tuple(logits.shape)}")
    targets, incoming = targets.reshape(-1), incoming.reshape(-1)
    if targets.numel() != logits.shape[0] or incoming.numel() != logits.shape[0]:
        raise ValueError(
            f"{targets.numel()} targets and {incoming.numel()} incoming flags "
            f"for {logits.shape[0]} rows"
        )
    n_classes = logits.shape[1]
    present = torch.zeros(n_classes, dtype=torch.bool, device=logits.device)
    present[targets[incoming]] = True
    seen = (
        torch.ones(n_classes, dtype=torch.bool, device=logits.device)
        if seen_classes is None
        else seen_classes.to(logits.device)
    )
    allowed = torch.where(incoming.unsqueeze(1), present.unsqueeze(0), seen.unsqueeze(0))
    log_p = F.log_softmax(logits.float().masked_fill(~allowed, float("-inf")), dim=-1)
    per_row = -log_p.gather(1, targets.unsqueeze(1)).squeeze(1)
    return reduce_per_item(per_row, reduction)


def batch_hard_triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 0.2,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al., 2017) on Euclidean distances.

    For each anchor: the hardest positive is the farthest other sample with its label, the
    hardest negative the nearest sample with another label; the loss is
    ``max(0, d_ap - d_an + margin)``. An anchor lacking a positive or a negative contributes
    0 and still counts in the mean.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be [batch, dim], got shape {tuple(embeddings.shape)}")
    labels = labels.reshape(-1)
    if labels.numel() != embeddings.shape[0]:
        raise ValueError(f"{labels.numel()} labels for a batch of {embeddings.shape[0]}")
    x = embeddings.float()
    sq = (x * x).sum(dim=1)
    d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (x @ x.T)
    # sqrt has an infinite derivative at 0 (the diagonal, duplicate points): clamping to a
    # small eps both bounds it and, as clamp passes no gradient below its bound, zeroes it.
    dist = torch.sqrt(d2.clamp(min=1e-12))
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=x.device)
    pos_mask = same & ~eye
    neg_mask = ~same
    hardest_pos = dist.masked_fill(~pos_mask, 0.0).max(dim=1).values
    hardest_neg = dist.masked_fill(~neg_mask, torch.finfo(dist.dtype).max).min(dim=1).values
    valid = pos_mask.any(dim=1) & neg_mask.any(dim=1)
    hinge = F.relu(hardest_pos - hardest_neg + margin)
    per_anchor = torch.where(valid, hinge, torch.zeros_like(hinge))
    return reduce_per_item(per_anchor, reduction)


def relation_distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_temperature: float = 0.2,
    teacher_temperature: float = 0.01,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Instance-wise relation distillation (IRD, Co2L, Cha et al. 2021).

    ``student`` and ``teacher`` are ``[n, d]`` L2-normalised features of the same ``n`` items
    under the current and an earlier model. Row ``i`` of each gives a distribution over the
    other items, ``softmax_j≠i(z_i·z_j / κ)``; the loss of item ``i`` is the cross-entropy
    ``-Σ_j p_teacher(j) log p_student(j)``, so the current model keeps the earlier one's
    *relations* between items rather than their coordinates. Co2L's temperatures: κ = 0.2
    (student), κ* = 0.01 (teacher, sharper). The teacher gets no gradient.
    """
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher must be the same [n, d], got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    n = student.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=student.device)
    s_logits = (student.float() @ student.float().T / student_temperature).masked_fill(
        eye, float("-inf")
    )
    t = teacher.detach().float()
    t_logits = (t @ t.T / teacher_temperature).masked_fill(eye, float("-inf"))
    p_teacher = torch.softmax(t_logits, dim=1)
    # The diagonal: p_teacher is 0 there and log p_student is -inf; masked_fill, not 0·(-inf).
    log_p_student = torch.log_softmax(s_logits, dim=1).masked_fill(eye, 0.0)
    per_item = -(p_teacher * log_p_student).sum(dim=1)
    return reduce_per_item(per_item, reduction)


def combine(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """``Σ weights[name] · terms[name]``.

    A term without a weight is an error (it catches a misspelt weight key, which would
    otherwise silently drop a term). A weight without a term is allowed: a term may be absent
    on some steps, e.g. a replay loss while the memory bank is still empty.
    """
    if not terms:
        raise ValueError("no loss terms to combine")
    unknown = sorted(set(terms) - set(weights))
    if unknown:
        raise ValueError(f"no weight for loss terms {unknown}; known: {sorted(weights)}")
    total: torch.Tensor | None = None
    for name, value in terms.items():
        weighted = weights[name] * value
        total = weighted if total is None else total + weighted
    assert total is not None  # terms is non-empty
    return total
