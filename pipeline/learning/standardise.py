"""Online per-feature standardisation of the learner's inputs.

Events may carry a few pixels in [0, 1] or hundreds of unnormalised measurements. The network
sees ``(x - mean) / std`` per feature, with the mean and variance of every training event so
far, merged batch by batch with the parallel form of Welford's algorithm (Chan, Golub and
LeVeque 1979): exact running moments, no second pass, no cancellation of large sums. The
statistics are buffers of the network, so they travel in its ``state_dict``: the checkpoint,
the exported model and the served model all standardise with the same numbers.

A feature that barely varies would be blown up by its own tiny deviation (a corner pixel that
is almost always 0), and, in a class-incremental stream, such a feature's statistics move
most when new classes arrive. Each feature's scale is therefore
``sqrt(var_i + MIN_STD_RATIO² · mean_j var_j)``: a smooth floor relative to the data's own
scale (no constant tuned to one dataset), which bounds how much any feature is amplified
relative to a typical one. Before the first event the transform is the identity; a feature
that never varied maps to 0 (its mean).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# A feature's scale is at least this fraction of the root-mean-square standard deviation, so
# no input is amplified more than 1/MIN_STD_RATIO times relative to a typical feature. 1.0 was
# measured best on split-digits among 0.1 / 0.5 / 1.0 (docs/forgetting.md, tried changes).
MIN_STD_RATIO = 1.0


class RunningStandardiser(nn.Module):
    """``(x - mean) / std`` per feature over every batch given to :meth:`update`."""

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    def __init__(self, dim: int, min_std_ratio: float = MIN_STD_RATIO) -> None:
        super().__init__()
        self.min_std_ratio = min_std_ratio
        # float64: the sums of squares of a long stream of large values keep their precision.
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))
        self._register_load_state_dict_pre_hook(self._fill_missing)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge the moments of the rows of ``x`` ``[n, dim]`` into the running ones."""
        if x.shape[0] == 0:
            return
        xb = x.detach().to(self.mean.dtype)
        n_b = float(xb.shape[0])
        mean_b = xb.mean(dim=0)
        m2_b = ((xb - mean_b) ** 2).sum(dim=0)
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + delta**2 * (self.count * n_b / n)
        self.count.copy_(n)

    def variance(self) -> torch.Tensor:
        """Population variance per feature (0 before two events)."""
        return self.m2 / self.count.clamp(min=1.0)

    def std(self) -> torch.Tensor:
        """Per-feature scale ``sqrt(var_i + r² · mean(var))``; 1 where everything is 0."""
        var = self.variance()
        floored = torch.sqrt(var + self.min_std_ratio**2 * var.mean())
        # No host read (CUDA stays sync-free): exactly-0 scales (no data yet) become 1.
        return torch.where(floored > 0, floored, torch.ones_like(floored))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std().to(x.dtype)

    def _fill_missing(self, state_dict: dict[str, Any], prefix: str, *_args: Any) -> None:
        """A state saved before the network standardised its inputs: start with no moments."""
        for name, value in (("count", self.count), ("mean", self.mean), ("m2", self.m2)):
            state_dict.setdefault(prefix + name, torch.zeros_like(value))
