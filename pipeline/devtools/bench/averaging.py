"""Weights averaged along the stream (an exponential moving average, Polyak averaging).

``bench forgetting --ema-decay D`` keeps such a copy beside each online run and scores the
run's natural classifier with it as the ``ema`` read-out: the same learner, read through
weights that move more slowly than the trained ones. The average never trains and never
feeds back into the run (docs/forgetting.md, "What was tried"); the learner does not use it.
"""

from __future__ import annotations

import copy

import torch

from pipeline.learning.model import StreamNet


class WeightAverage:
    """``avg ← keep · avg + (1 − keep) · weights`` after every micro-batch, with
    ``keep = decay ** steps`` for the optimizer steps the micro-batch took, so ``decay`` is
    per optimizer step whatever ``train.iters_per_batch`` is. Buffers (the standardiser's
    running moments) are statistics of the data, not weights: they are copied, not averaged.
    Starts from the network as it is when the average is made (before its first update).
    """

    def __init__(self, model: StreamNet, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: StreamNet, steps: int) -> None:
        """Fold in ``model``'s weights after ``steps`` optimizer steps."""
        weight = 1.0 - self.decay**steps
        for avg, live in zip(self.model.parameters(), model.parameters(), strict=True):
            avg.lerp_(live.detach(), weight)
        for avg_buf, live_buf in zip(self.model.buffers(), model.buffers(), strict=True):
            avg_buf.copy_(live_buf)
