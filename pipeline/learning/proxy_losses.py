"""Losses against class proxies, and mixtures of features (PCR and its mixup variants).

The proxies are the L2-normalised rows of the classifier's weight; every softmax here runs
over the classes present in the step only (PCR's point: the proxies of absent classes are
neither pushed nor pulled). Conventions as in :mod:`pipeline.learning.losses`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

from pipeline.learning.losses import Reduction, reduce_per_item


def proxy_contrastive_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    temperature: float = 0.07,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Proxy-based contrastive replay (PCR, Lin et al. 2023).

    Each anchor (``features``, ``[n, d]``, L2-normalised) is contrasted against class proxies
    (``proxies``, ``[C, d]``, L2-normalised, e.g. the rows of the classifier's weight) rather
    than against other samples: ``-log softmax(z·w_c / τ)`` at its own class, the softmax
    taken **only over the classes present among ``labels``** (the batch with its replay). That
    restriction is PCR's point: the proxies of classes absent from a step are neither pushed
    nor pulled, so a new task cannot drag the old classes' proxies away. Labels must be
    class indices ``>= 0``.
    """
    _check_proxy_shapes(features, proxies)
    labels = labels.reshape(-1)
    if labels.numel() != features.shape[0]:
        raise ValueError(f"{labels.numel()} labels for {features.shape[0]} anchors")
    logits = _present_classes_only(features.float() @ proxies.float().T / temperature, labels)
    return F.cross_entropy(logits, labels, reduction=reduction)


def _check_proxy_shapes(features: torch.Tensor, proxies: torch.Tensor) -> None:
    if features.dim() != 2 or proxies.dim() != 2 or features.shape[1] != proxies.shape[1]:
        raise ValueError(
            f"features [n, d] and proxies [C, d] expected, got {tuple(features.shape)} and "
            f"{tuple(proxies.shape)}"
        )


def _present_classes_only(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[n, C]`` logits with the classes absent from ``labels`` at -inf (PCR's softmax)."""
    present = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    present[labels] = True
    return logits.masked_fill(~present, float("-inf"))


def proxy_mixup_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    partner: torch.Tensor,
    lam: torch.Tensor,
    proxies: torch.Tensor,
    temperature: float = 0.07,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """PCR's proxy term on mixed features with soft targets (manifold mixup, Verma et al.
    2019, in feature space; i-Mix, Lee et al. 2021, for the soft targets of a contrast).

    ``features`` (``[n, d]``, L2-normalised) are mixed with a partner row each:
    ``m_i = normalise(λ_i f_i + (1 − λ_i) f_{partner_i})``; the loss of row ``i`` is the
    cross-entropy against the soft target ``λ_i · onehot(y_i) + (1 − λ_i) · onehot(y_partner_i)``,
    ``−λ_i log p_i(y_i) − (1 − λ_i) log p_i(y_partner_i)``, with ``p_i = softmax(m_i·w_c / τ)``
    over the classes present among ``labels`` only, as in :func:`proxy_contrastive_loss` (which
    this is when ``λ = 1``). ``partner`` holds row indices, ``lam`` values in [0, 1]; labels
    must be class indices ``>= 0``.
    """
    _check_proxy_shapes(features, proxies)
    labels, partner, lam = labels.reshape(-1), partner.reshape(-1), lam.reshape(-1)
    n = features.shape[0]
    if labels.numel() != n or partner.numel() != n or lam.numel() != n:
        raise ValueError(
            f"{labels.numel()} labels, {partner.numel()} partners and {lam.numel()} "
            f"coefficients for {n} rows"
        )
    f = features.float()
    weight = lam.float().unsqueeze(1)
    mixed = F.normalize(weight * f + (1.0 - weight) * f[partner], dim=-1)
    logits = _present_classes_only(mixed @ proxies.float().T / temperature, labels)
    log_p = F.log_softmax(logits, dim=-1)
    own = log_p.gather(1, labels.unsqueeze(1)).squeeze(1)
    other = log_p.gather(1, labels[partner].unsqueeze(1)).squeeze(1)
    per_row = -(lam.float() * own + (1.0 - lam.float()) * other)
    return reduce_per_item(per_row, reduction)


def cross_class_mixtures(
    features: torch.Tensor,
    labels: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    lam: torch.Tensor,
) -> torch.Tensor:
    """Synthetic negatives: ``normalise(λ_k f_{first_k} + (1 − λ_k) f_{second_k})`` for the
    pairs whose labels differ, detached (MoCHi, Kalantidis et al. 2020, mixes hard negatives
    the same way and stops their gradient). A same-class pair would be a negative sitting
    inside its own class, so it is dropped. ``features`` ``[n, d]`` L2-normalised, the other
    four ``[n]`` / ``[k]``; returns ``[k', d]``, ``k' ≤ k``.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be [n, d], got shape {tuple(features.shape)}")
    first, second, lam = first.reshape(-1), second.reshape(-1), lam.reshape(-1)
    if not first.numel() == second.numel() == lam.numel():
        raise ValueError(f"{first.numel()} / {second.numel()} / {lam.numel()} pair entries")
    keep = labels[first] != labels[second]
    f = features.detach().float()
    weight = lam[keep].float().unsqueeze(1)
    return F.normalize(weight * f[first[keep]] + (1.0 - weight) * f[second[keep]], dim=-1)
