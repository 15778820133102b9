"""The training step: a plain function of (state, inputs) with no hidden per-step state.

``train_step`` contrasts the micro-batch together with the replayed bank items (class-balanced
sample plus FAISS hard negatives), both re-encoded by the current model so gradient flows
through replay too. It returns fresh, L2-normalised encoder embeddings for both, which the
learner writes into the bank (new items) and back over the replayed items' stale ones.

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
from pipeline.losses import masked_cross_entropy, supcon_loss
from pipeline.model import StreamNet, augment


@dataclass
class TrainState:
    model: StreamNet
    optimizer: torch.optim.Optimizer
    step: int = 0
    skipped: int = 0


@dataclass(frozen=True, slots=True)
class StepInputs:
    features: torch.Tensor  # [n, d] on the learner's device
    labels: torch.Tensor  # [n] int64 class indices
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


def _objective_loss(
    model: StreamNet,
    x: torch.Tensor,
    y: torch.Tensor,
    inputs: StepInputs,
    cfg: TrainSettings,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Per-sample loss [m] over the contrasted set x (batch ∪ replay), averaged over views."""
    m = x.shape[0]
    views = torch.cat(
        [augment(x, cfg.noise_std, cfg.mask_prob, generator) for _ in range(2)], dim=0
    )
    h = model.embed(views)
    if cfg.objective == "supcon":
        z = model.project(h)
        feats = torch.stack([z[:m], z[m:]], dim=1)
        per_anchor = supcon_loss(
            feats, y, cfg.temperature, cfg.base_temperature, cfg.contrast_mode, reduction="none"
        )
        if cfg.contrast_mode == "one":
            return per_anchor
        return per_anchor.view(2, m).mean(dim=0)
    logits = model.logits(h)
    per_view = masked_cross_entropy(logits, y.repeat(2), inputs.seen_classes, reduction="none")
    return per_view.view(2, m).mean(dim=0)


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
        per_sample = _objective_loss(model, x, y, inputs, cfg, generator)
    loss = per_sample.float().mean()
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
        per_sample_loss=per_sample[:n].detach().float().cpu(),
        batch_embeddings=fresh[:n],
        replay_embeddings=fresh[n:],
        grad_norm=grad_norm,
    )
