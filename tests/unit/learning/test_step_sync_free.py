"""The sync-free step (the CUDA path), exercised on the CPU: same update as the branching
step when finite, an exact undo when not, and skips counted on the device until read; with
fused Adam (CUDA's optimizer, whose kernel skips the step) and unfused Adam (where() undo, the
data-parallel group on the CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.config import ModelSettings, TrainSettings
from pipeline.learning.model import StreamNet
from pipeline.learning.step import StepInputs, make_state, train_step

MODEL = ModelSettings(input_dim=8, hidden_dim=32, embed_dim=16, proj_dim=16, max_classes=5)
FUSED = pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])


def _inputs(seed: int, poison: bool = False) -> StepInputs:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, MODEL.input_dim, generator=g)
    y = torch.arange(3).repeat(4)
    if poison:
        x[0, 0] = float("nan")
    rx = torch.randn(6, MODEL.input_dim, generator=g)
    ry = torch.arange(3).repeat(2)
    seen = torch.zeros(MODEL.max_classes, dtype=torch.bool)
    seen[:3] = True
    return StepInputs(x, y, rx, ry, seen)


def _optimizer_tensors(state) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    out = []
    for p in state.model.parameters():
        for value in state.optimizer.state.get(p, {}).values():
            if torch.is_tensor(value):
                out.append(value.detach().clone())
    return out


@FUSED
def test_sync_free_matches_the_branching_step_when_finite(fused: bool) -> None:
    cfg = TrainSettings()
    torch.manual_seed(0)
    model = StreamNet(MODEL)
    a, b = make_state(model, cfg), make_state(copy.deepcopy(model), cfg, fused=fused)
    for seed in range(3):
        ra = train_step(a, _inputs(seed), cfg, torch.Generator().manual_seed(seed), sync_free=False)
        rb = train_step(b, _inputs(seed), cfg, torch.Generator().manual_seed(seed), sync_free=True)
        assert ra.loss is not None
        assert rb.loss is not None
        assert abs(ra.loss - rb.loss) < 1e-5
        assert ra.grad_norm is not None
        assert rb.grad_norm is not None
        assert abs(ra.grad_norm - rb.grad_norm) < 1e-4
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6)
    assert a.skipped == b.skipped == 0


@FUSED
def test_sync_free_undoes_a_non_finite_step_exactly(fused: bool) -> None:
    cfg = TrainSettings()
    torch.manual_seed(1)
    state = make_state(StreamNet(MODEL), cfg, fused=fused)
    train_step(state, _inputs(0), cfg, sync_free=True)  # Adam state now exists
    params = [p.detach().clone() for p in state.model.parameters()]
    moments = _optimizer_tensors(state)

    result = train_step(state, _inputs(1, poison=True), cfg, sync_free=True)

    assert state.skips_on_device is not None  # counted on the device, not read yet
    assert result.skipped
    assert result.loss is None
    assert state.skipped == 1
    assert state.skips_on_device is None  # read once, settled
    for p, before in zip(state.model.parameters(), params, strict=True):
        assert torch.equal(p, before)
    for now, before in zip(_optimizer_tensors(state), moments, strict=True):
        assert torch.equal(now, before)
    assert state.step == 2

    follow = train_step(state, _inputs(2), cfg, sync_free=True)
    assert not follow.skipped
    assert all(torch.isfinite(p).all() for p in state.model.parameters())


@FUSED
def test_lazy_result_fields_and_skip_counter_setter(fused: bool) -> None:
    cfg = TrainSettings(grad_clip=None)
    state = make_state(StreamNet(MODEL), cfg, fused=fused)
    result = train_step(state, _inputs(0), cfg, sync_free=True)
    assert result.per_sample_loss.shape == (12,)
    assert result.per_sample_loss.device.type == "cpu"
    assert result.applied.dtype == torch.bool
    state.skipped = 5  # restored from a checkpoint
    train_step(state, _inputs(1, poison=True), cfg, sync_free=True)
    assert state.skipped == 6


@FUSED
def test_sync_free_first_step_skipped_leaves_adam_as_fresh(fused: bool) -> None:
    """A non-finite very first step: Adam's newly created state is zeros with step 0."""
    cfg = TrainSettings(weight_decay=0.1)
    torch.manual_seed(2)
    state = make_state(StreamNet(MODEL), cfg, fused=fused)
    params = [p.detach().clone() for p in state.model.parameters()]

    result = train_step(state, _inputs(0, poison=True), cfg, sync_free=True)

    assert result.skipped
    for p, before in zip(state.model.parameters(), params, strict=True):
        assert torch.equal(p, before)
    tensors = _optimizer_tensors(state)
    assert tensors  # the state exists (created by the undone step) ...
    for tensor in tensors:
        assert not tensor.any()  # ... and is all zeros, step counters included
