"""The training step: a plain function of (state, inputs) with no hidden per-step state.

``train_step`` contrasts the micro-batch together with the replayed bank items (class-balanced
sample plus FAISS hard negatives), both re-encoded by the current model so gradient flows
through replay too; the loss is the configured objective (:mod:`pipeline.learning.objectives`). It
returns fresh, L2-normalised encoder embeddings for both, which the learner writes into the
bank (new items) and back over the replayed items' stale ones.

INVARIANT: a non-finite loss or gradient never reaches the weights; the step is skipped and
counted in ``state.skipped``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812

from pipeline.config import TrainSettings
from pipeline.learning.adam import CpuAdam
from pipeline.learning.model import StreamNet
from pipeline.learning.objectives import loss_weights, objective_loss

# The objective of a data-parallel group (pipeline.distributed.replicas): called with
# (x, y, n, seen_classes, weight), returns (weighted loss to backward, loss, per-sample loss).
ReplicatedLoss = Callable[
    [torch.Tensor, torch.Tensor, int, torch.Tensor, float],
    tuple[torch.Tensor, torch.Tensor, torch.Tensor],
]


@dataclass
class TrainState:
    """Model, optimizer and step counters.

    ``skipped`` is a property: steps taken on the sync-free path (CUDA) count their skips in
    a device tensor, read only when someone asks for the total.
    """

    model: StreamNet
    optimizer: torch.optim.Optimizer | CpuAdam
    step: int = 0
    skipped_settled: int = 0
    skips_on_device: torch.Tensor | None = None  # int64 0-d, skips not yet read back
    # Set on the ranks of a data-parallel group: the objective wrapped in DDP, whose backward
    # all-reduces the gradients. None for a single learner (objective_loss on the model).
    replicated: ReplicatedLoss | None = None
    # The earlier snapshot the ``distill`` term keeps the relations of; not checkpointed (a
    # restored learner takes its first snapshot ``distill_every`` steps after the restore).
    teacher: StreamNet | None = None

    @property
    def skipped(self) -> int:
        if self.skips_on_device is not None:
            self.skipped_settled += int(self.skips_on_device)  # the host read
            self.skips_on_device = None
        return self.skipped_settled

    @skipped.setter
    def skipped(self, value: int) -> None:
        self.skipped_settled = value
        self.skips_on_device = None


@dataclass(frozen=True, slots=True)
class StepInputs:
    features: torch.Tensor  # [n, d] on the learner's device
    labels: torch.Tensor  # [n] int64 class indices, -1 for events without a label
    replay_features: torch.Tensor  # [r, d], r may be 0
    replay_labels: torch.Tensor  # [r]
    seen_classes: torch.Tensor  # bool [max_classes]
    # This rank's share of a data-parallel group's step (0: it has no rows this turn).
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class StepResult:
    """What a step produced. Everything stays on the device until read.

    ``loss``, ``skipped``, ``grad_norm`` and ``per_sample_loss`` are read back lazily (a
    host sync on CUDA), so a caller that reads them once per batch, not per step, lets the
    GPU run ahead.
    """

    loss_value: torch.Tensor  # float32 0-d, the step loss (maybe non-finite when skipped)
    applied: torch.Tensor  # bool 0-d: the update reached the weights
    per_sample: torch.Tensor  # [n] on the device, loss of the batch items (replay excluded)
    batch_embeddings: torch.Tensor  # [n, embed_dim], normalised, detached
    replay_embeddings: torch.Tensor  # [r, embed_dim], normalised, detached
    grad_norm_value: torch.Tensor | None  # float32 0-d; None when not computed

    @property
    def skipped(self) -> bool:
        return not bool(self.applied)

    @property
    def loss(self) -> float | None:
        """The step loss; None when the step was skipped."""
        return None if self.skipped else float(self.loss_value)

    @property
    def grad_norm(self) -> float | None:
        return None if self.grad_norm_value is None else float(self.grad_norm_value)

    @property
    def per_sample_loss(self) -> torch.Tensor:
        """[n] on CPU."""
        return self.per_sample.float().cpu()


def make_state(model: StreamNet, cfg: TrainSettings, *, fused: bool | None = None) -> TrainState:
    """Model and Adam. On CUDA Adam is ``torch.optim.Adam``, ``fused`` (default: on CUDA only)
    and ``capturable``: one kernel for the update instead of a few per parameter, its step
    counter on the GPU, and a non-finite step skipped by the kernel itself (``_guarded_step``),
    without a host round trip. The CPU runs :class:`~pipeline.learning.adam.CpuAdam`: the
    arithmetic of torch's plain implementation (whose numerics the documented figures were
    taken with) without ``torch.optim``'s import of ``torch._dynamo``, which delayed a
    restart's first trained batch (docs/performance.md, Restart). Tests pass ``fused=True``
    to run the CUDA path's skip on the CPU.
    """
    on_cuda = next(model.parameters()).device.type == "cuda"
    use_fused = on_cuda if fused is None else fused
    if not on_cuda and not use_fused:
        return TrainState(
            model=model,
            optimizer=CpuAdam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay),
        )
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        capturable=on_cuda,
        fused=use_fused,
    )
    return TrainState(model=model, optimizer=optimizer)


def match_optimizer_device(
    optimizer: torch.optim.Optimizer | CpuAdam, device: torch.device
) -> None:
    """Fit a restored optimizer to this learner's device.

    ``load_state_dict`` brings back the saved ``capturable`` flag: a CUDA checkpoint restored on
    a CPU learner would fail its first step, a CPU one on CUDA would keep Adam's step counter on
    the host (a sync per step). Capturable follows the device, and the step counters move to
    their parameters' device.
    """
    on_cuda = device.type == "cuda"
    for group in optimizer.param_groups:
        if "capturable" in group:
            group["capturable"] = on_cuda
        if "fused" in group:
            group["fused"] = on_cuda
        for param in group["params"]:
            st = optimizer.state.get(param)
            if st and torch.is_tensor(st.get("step")):
                st["step"] = st["step"].to(param.device if on_cuda else "cpu")


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
    *,
    sync_free: bool | None = None,
) -> StepResult:
    """One optimizer step on batch ∪ replay.

    ``sync_free`` (default: on CUDA) keeps every decision on the device: the loss and the
    gradient norm stay tensors, a non-finite one is undone with ``torch.where`` instead of a
    Python branch, so the CPU never waits for the GPU inside the step. On the CPU a host read
    costs nothing, and the plain branch skips the work of an update it would undo.
    """
    model, optimizer = state.model, state.optimizer
    device = inputs.features.device
    if sync_free is None:
        sync_free = device.type == "cuda"
    if state.replicated is not None:
        # Every rank of the group must run backward (its all-reduce) on every step, so the
        # skip is decided after the gradients are averaged, on the device, like on CUDA.
        sync_free = True
    n = inputs.features.shape[0]
    x = torch.cat([inputs.features, inputs.replay_features], dim=0)
    y = torch.cat([inputs.labels, inputs.replay_labels], dim=0)

    _refresh_teacher(state, cfg)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with _autocast(device, cfg.amp):
        if state.replicated is not None:
            to_backward, loss, per_sample = state.replicated(
                x, y, n, inputs.seen_classes, inputs.weight
            )
        else:
            objective = objective_loss(
                model, x, y, n, inputs.seen_classes, cfg, generator, state.teacher
            )
            loss, per_sample = objective.loss, objective.batch_per_sample
            to_backward = loss
    loss, to_backward = loss.float(), to_backward.float()
    state.step += 1
    max_norm = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
    grad_norm: torch.Tensor | None
    if sync_free:
        applied, grad_norm = _guarded_step(state, to_backward, max_norm)
    else:
        applied, grad_norm = _branching_step(state, loss, max_norm)

    model.eval()
    with torch.no_grad(), _autocast(device, cfg.amp):
        fresh = F.normalize(model.embed(x).float(), dim=-1)
    return StepResult(
        loss_value=loss.detach(),
        applied=applied,
        per_sample=per_sample.detach(),
        batch_embeddings=fresh[:n],
        replay_embeddings=fresh[n:],
        grad_norm_value=grad_norm,
    )


def _refresh_teacher(state: TrainState, cfg: TrainSettings) -> None:
    """Every ``distill_every`` steps, snapshot the network for the ``distill`` term."""
    if "distill" not in loss_weights(cfg) or state.step == 0 or state.step % cfg.distill_every:
        return
    teacher = copy.deepcopy(state.model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    state.teacher = teacher


def _branching_step(
    state: TrainState, loss: torch.Tensor, max_norm: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Host-side decision (CPU): skip backward and update when the loss is not finite."""
    params = list(state.model.parameters())
    grad_norm: torch.Tensor | None = None
    skipped = not math.isfinite(float(loss.detach()))
    if not skipped:
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).detach().float()
        skipped = not math.isfinite(float(grad_norm))
    if skipped:
        state.optimizer.zero_grad(set_to_none=True)
        state.skipped += 1
    else:
        state.optimizer.step()
    return torch.tensor(not skipped, device=loss.device), grad_norm


def _guarded_step(
    state: TrainState, loss: torch.Tensor, max_norm: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Device-side decision (CUDA, and a data-parallel group): no host read of the loss.

    INVARIANT kept without a host read: when the loss or the gradient norm is not finite,
    the weights and the optimizer state come out exactly as they went in. Fused Adam (CUDA)
    skips such a step in its kernel; unfused Adam steps and the step is undone with where()
    (non-finite gradients zeroed first, so that nothing NaN enters the optimizer state).
    (Adam creates its state on its first step; a first step that is skipped leaves zero
    moments behind, which is what Adam starts from anyway.)
    """
    model, optimizer = state.model, state.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False)
    ok = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
    if isinstance(optimizer, torch.optim.Optimizer) and all(
        group.get("fused") for group in optimizer.param_groups
    ):
        _fused_skip_step(optimizer, ok)
    else:
        _undo_if_not_finite(state, params, ok)
    skips = (~ok).to(torch.int64)
    state.skips_on_device = (
        skips if state.skips_on_device is None else state.skips_on_device + skips
    )
    return ok, grad_norm.detach().float()


def _fused_skip_step(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """Fused Adam reads ``found_inf`` (the attribute ``torch.amp.GradScaler`` sets): when it is
    non-zero the kernel leaves weights, moments and step counter as they were."""
    optimizer.found_inf = (~ok).to(torch.float32)  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        optimizer.found_inf = None  # type: ignore[attr-defined]


def _undo_if_not_finite(
    state: TrainState, params: list[torch.nn.Parameter], ok: torch.Tensor
) -> None:
    """Unfused Adam (the data-parallel group on the CPU): step, then put back with where()."""
    optimizer = state.optimizer
    with torch.no_grad():
        grads = [p.grad for p in params if p.grad is not None]
        for g in grads:
            g.copy_(torch.where(ok, g, torch.zeros_like(g)))
        before = [p.detach().clone() for p in params]
        saved = [
            (st, {k: v.clone() for k, v in st.items() if torch.is_tensor(v)})
            for st in (optimizer.state.get(p) for p in params)
            if st
        ]
        stateless = [p for p in params if not optimizer.state.get(p)]
    optimizer.step()
    with torch.no_grad():
        for p, old in zip(params, before, strict=True):
            p.copy_(torch.where(ok, p, old))
        for st, old_state in saved:
            for key, old_value in old_state.items():
                st[key].copy_(torch.where(ok, st[key], old_value))
        # State Adam created in this step (its first): zeros and step 0 when the step is undone,
        # which is exactly what a fresh Adam starts from (weight decay cannot leak into it).
        for st in (optimizer.state.get(p, {}) for p in stateless):
            for value in st.values():
                if torch.is_tensor(value):
                    value.copy_(torch.where(ok, value, torch.zeros_like(value)))
