"""The training step: a plain function of (state, inputs) with no hidden per-step state.

``train_step`` contrasts the micro-batch together with the replayed bank items (class-balanced
sample plus FAISS hard negatives), both re-encoded by the current model so gradient flows
through replay too; the loss is the configured objective (:mod:`pipeline.objectives`). It
returns fresh, L2-normalised encoder embeddings for both, which the learner writes into the
bank (new items) and back over the replayed items' stale ones.

INVARIANT: a non-finite loss or gradient never reaches the weights; the step is skipped and
counted in ``state.skipped``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812

from pipeline.config import TrainSettings
from pipeline.model import StreamNet
from pipeline.objectives import objective_loss


@dataclass
class TrainState:
    model: StreamNet
    optimizer: torch.optim.Optimizer
    step: int = 0
    skipped: int = 0


@dataclass(frozen=True, slots=True)
class StepInputs:
    features: torch.Tensor  # [n, d] on the learner's device
    labels: torch.Tensor  # [n] int64 class indices, -1 for events without a label
    replay_features: torch.Tensor  # [r, d], r may be 0
    replay_labels: torch.Tensor  # [r]
    seen_classes: torch.Tensor  # bool [max_classes]


@dataclass(frozen=True, slots=True)
class StepResult:
    loss: float | None  # None when the step was skipped
    skipped: bool
    per_sample_loss: torch.Tensor  # [n] on CPU, loss of the batch items (replay excluded)
    batch_embeddings: torch.Tensor  # [n, embed_dim], normalised, detached
    replay_embeddings: torch.Tensor  # [r, embed_dim], normalised, detached
    grad_norm: float | None


def make_state(model: StreamNet, cfg: TrainSettings) -> TrainState:
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return TrainState(model=model, optimizer=optimizer)


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[None]:
    # bf16 autocast needs no GradScaler; on CPU we keep fp32 (bf16 matmuls are slower there).
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    state: TrainState,
    inputs: StepInputs,
    cfg: TrainSettings,
    generator: torch.Generator | None = None,
) -> StepResult:
    model, optimizer = state.model, state.optimizer
    device = inputs.features.device
    n = inputs.features.shape[0]
    x = torch.cat([inputs.features, inputs.replay_features], dim=0)
    y = torch.cat([inputs.labels, inputs.replay_labels], dim=0)

    model.train()
    optimizer.zero_grad(set_to_none=True)
    with _autocast(device, cfg.amp):
        objective = objective_loss(model, x, y, n, inputs.seen_classes, cfg, generator)
    loss = objective.loss.float()
    state.step += 1

    loss_value = float(loss.detach())
    grad_norm: float | None = None
    skipped = not math.isfinite(loss_value)
    if not skipped:
        loss.backward()
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        skipped = not math.isfinite(grad_norm)
    if skipped:
        optimizer.zero_grad(set_to_none=True)
        state.skipped += 1
    else:
        optimizer.step()

    model.eval()
    with torch.no_grad(), _autocast(device, cfg.amp):
        fresh = F.normalize(model.embed(x).float(), dim=-1)
    return StepResult(
        loss=None if skipped else loss_value,
        skipped=skipped,
        per_sample_loss=objective.batch_per_sample.float().cpu(),
        batch_embeddings=fresh[:n],
        replay_embeddings=fresh[n:],
        grad_norm=grad_norm,
    )
