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
