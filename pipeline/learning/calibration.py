"""Temperature scaling of the nearest-class-mean classifier (Guo et al. 2017, section 4.2).

NCM turns the cosines between an embedding and the class means into a confidence with
``softmax(cosine / T)``. A fixed ``T`` (``inference.NCM_TEMPERATURE``, 0.1) is poorly
calibrated: the cosines of a well-trained encoder are spread differently at every stage of a
stream. Temperature scaling fits the one parameter ``T`` that minimises the negative
log-likelihood of the true classes on held-out examples (the learner's probe set); the
predicted class (the argmax) does not change, only the confidence.

Method: the NLL is evaluated on a log-spaced grid of :data:`GRID_SIZE` temperatures between
:data:`MIN_TEMPERATURE` and :data:`MAX_TEMPERATURE` (one matrix product per temperature,
deterministic, no optimizer state), then refined by a golden-section search inside the best
grid cell. The NLL of temperature scaling is unimodal in ``log T`` in practice, so the grid
only guards against a flat start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MIN_TEMPERATURE = 0.005
MAX_TEMPERATURE = 2.0
GRID_SIZE = 120
REFINE_STEPS = 30
MIN_EXAMPLES = 20  # fewer held-out examples than this: keep the previous temperature


@dataclass(frozen=True, slots=True)
class TemperatureFit:
    temperature: float
    nll_before: float  # mean NLL at the starting temperature
    nll_after: float  # mean NLL at the fitted temperature
    examples: int


def _nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    return float(torch.nn.functional.cross_entropy(logits / temperature, targets))


def fit_temperature(
    logits: torch.Tensor, targets: torch.Tensor, start: float
) -> TemperatureFit | None:
    """The temperature minimising the mean NLL of ``softmax(logits / T)`` for ``targets``.

    ``logits`` is ``[n, k]`` (for NCM: cosines to the ``k`` class means), ``targets`` the
    column of the true class per row. Returns None with fewer than :data:`MIN_EXAMPLES` rows
    or fewer than two classes: too little to fit anything.
    """
    n = int(targets.numel())
    if n < MIN_EXAMPLES or logits.ndim != 2 or logits.shape[1] < 2:
        return None
    logits = logits.detach().double()
    targets = targets.detach().long()
    lo, hi = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    grid = [lo + (hi - lo) * i / (GRID_SIZE - 1) for i in range(GRID_SIZE)]
    losses = [_nll(logits, targets, math.exp(g)) for g in grid]
    best = min(range(GRID_SIZE), key=losses.__getitem__)
    a = grid[max(0, best - 1)]
    b = grid[min(GRID_SIZE - 1, best + 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(REFINE_STEPS):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if _nll(logits, targets, math.exp(c)) <= _nll(logits, targets, math.exp(d)):
            b = d
        else:
            a = c
    fitted = math.exp((a + b) / 2)
    after = _nll(logits, targets, fitted)
    if after > losses[best]:  # the refinement never does worse than the grid point
        fitted, after = math.exp(grid[best]), losses[best]
    return TemperatureFit(fitted, _nll(logits, targets, start), after, n)


def targets_in(
    class_labels: torch.Tensor, truth: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row mask, column index): rows whose true class is among ``class_labels``, and where.

    NCM scores only classes that have a mean; a probe of a class without bank items (none so
    far) has no column and is left out of the fit.
    """
    match = truth.unsqueeze(1) == class_labels.unsqueeze(0)
    keep = match.any(dim=1)
    return keep, match[keep].float().argmax(dim=1)
