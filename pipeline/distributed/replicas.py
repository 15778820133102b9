"""One model on every rank: the objective wrapped in DistributedDataParallel.

``StreamNet`` is used through ``embed`` / ``project`` / ``logits``, never ``forward``, and DDP
prepares its gradient all-reduce in ``forward``. So the module DDP wraps is
:class:`ObjectiveModule`, whose ``forward`` *is* the step's objective
(:func:`~pipeline.learning.objectives.objective_loss` on the shared network). DDP then does
what it does for any model: broadcasts rank 0's parameters at construction, and during
``backward`` averages every gradient over the ranks in buckets (gloo on CPU, NCCL on CUDA),
so every rank's optimizer applies the same update and the replicas stay equal.

Step cadence (why nobody waits forever): every rank takes part in every step of the group,
with its share of the group's rows as the weight of its loss, ``rows_r * world / rows_total``
(DDP divides the sum by ``world``, so the update is the mean over every row of the group).
The group's micro-batch and replay are split among the ranks (:mod:`.shares`), so a group
step has the rows of one learner's step.
A rank without rows that turn still runs the step with weight 0: its forward touches every
parameter times zero, so its gradient is zero and the all-reduce completes.
"""

from __future__ import annotations

import gc

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import TrainSettings
from pipeline.learning.model import StreamNet
from pipeline.learning.objectives import HEAD_TERMS, loss_weights, objective_loss
from pipeline.learning.step import ReplicatedLoss, TrainState
from pipeline.settings.learning import REPRESENTATION_TERMS


class ObjectiveModule(nn.Module):
    """``forward(x, y, n, seen, weight)`` -> (weighted loss for backward, loss, per-sample)."""

    def __init__(
        self, net: StreamNet, cfg: TrainSettings, generator: torch.Generator | None
    ) -> None:
        super().__init__()
        self.net = net
        self.cfg = cfg
        self.generator = generator

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        n: int,
        seen_classes: torch.Tensor,
        weight: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if weight == 0.0 or x.shape[0] == 0:
            # Nothing to learn here this step: a zero gradient for every parameter.
            zero = sum((p.sum() for p in self.net.parameters()), x.new_zeros(())) * 0.0
            return zero, zero.detach(), x.new_zeros(0)
        objective = objective_loss(self.net, x, y, n, seen_classes, self.cfg, self.generator)
        loss = objective.loss.float()
        return loss * weight, loss.detach(), objective.batch_per_sample


def replicate(
    net: StreamNet,
    cfg: TrainSettings,
    generator: torch.Generator | None,
    device: torch.device,
) -> ReplicatedLoss:
    """The DDP-wrapped objective (call it with every rank of the group joined)."""
    module = ObjectiveModule(net, cfg, generator)
    return DistributedDataParallel(
        module,
        device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None,
        # The objective decides which parts train: under SupCon alone the CE head gets no
        # gradient, under CE alone the projection; DDP must then look for unused parameters.
        find_unused_parameters=not _trains_every_part(cfg),
    )


def release(state: TrainState) -> None:
    """Drop ``state``'s DDP wrapper, before its process group is destroyed: a wrapper that
    outlived its group left a gloo thread that aborted the process at exit (SIGABRT,
    "terminate called without an active exception"; one two-rank run in four of
    tests/integration/test_ddp_step.py before this order)."""
    state.replicated = None
    gc.collect()


def _trains_every_part(cfg: TrainSettings) -> bool:
    terms = set(loss_weights(cfg))
    return bool(terms & REPRESENTATION_TERMS) and bool(terms & HEAD_TERMS)
