"""Mean-preserving eviction: which item of a class leaves the bank (``eviction="mean_preserving"``).

When a class must give up a slot (a new class grows into the bank, or the class's own reservoir
draw admits a newcomer), the default evicts a random item of it. Mean-preserving eviction
evicts the item whose removal moves the mean embedding of the class's items (the newcomer
included when it joins that class) least: the item closest to that mean, since removing row
``j`` of ``k`` moves the mean by ``(mean - e_j) / (k - 1)``. Repeated, this is herding by
elimination (the kept items' mean follows the mean of every item the class held), so a small
bank's class means, which NCM reads, stay close to what a larger sample would give.
Measured in docs/forgetting.md ("What was tried"): not the default.
"""

from __future__ import annotations

import torch


def mean_preserving_victim(embeddings: torch.Tensor, joining: torch.Tensor | None) -> int:
    """Row of ``embeddings`` ``[k, d]`` (k >= 1) whose removal moves the mean of the rows, and
    of ``joining`` ``[d]`` when given, least."""
    total = embeddings.sum(dim=0)
    count = embeddings.shape[0]
    if joining is not None:
        total = total + joining
        count += 1
    mean = total / count
    return int(((embeddings - mean) ** 2).sum(dim=1).argmin())
