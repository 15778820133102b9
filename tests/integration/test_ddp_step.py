"""The group's step math with real DDP: 2 processes, gloo on CPU, loopback only.

A group step in which rank 0 has every row (weight ``world * rows / rows_total`` = 2) and
rank 1 has none (weight 0, the idle step) must update the model exactly as one learner's
step on rank 0's rows would, and leave both replicas equal. Real processes and a real
process group (no broker needed), so it sits with the integration tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import ModelSettings, TrainSettings
from pipeline.distributed.replicas import release, replicate
from pipeline.learning.model import StreamNet
from pipeline.learning.step import StepInputs, TrainState, make_state, train_step

pytestmark = pytest.mark.integration

STEPS = 3
MODEL = ModelSettings(input_dim=6, hidden_dim=16, embed_dim=8, proj_dim=8, max_classes=4)


def _fresh() -> tuple[TrainState, TrainSettings, torch.Generator]:
    torch.manual_seed(0)
    cfg = TrainSettings()
    return make_state(StreamNet(MODEL), cfg), cfg, torch.Generator().manual_seed(1)


def _rows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, MODEL.input_dim, generator=g)
    y = torch.tensor([0, 1, 2, 3] * 3)
    return x, y, torch.ones(MODEL.max_classes, dtype=torch.bool)


def _rank(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        state, cfg, generator = _fresh()
        state.replicated = replicate(state.model, cfg, generator, torch.device("cpu"))
        x, y, seen = _rows()
        none, no_labels = x[:0], y[:0]
        for _ in range(STEPS):
            if rank == 0:
                inputs = StepInputs(x, y, none, no_labels, seen, weight=2.0)
            else:
                inputs = StepInputs(none, no_labels, none, no_labels, seen, weight=0.0)
            train_step(state, inputs, cfg)
        torch.save(state.model.state_dict(), Path(out) / f"rank{rank}.pt")
        release(state)  # as the learner does: the DDP wrapper goes before its process group
    finally:
        dist.destroy_process_group()


def test_group_step_with_an_idle_rank_equals_one_learner_on_the_busy_ranks_rows(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    state, cfg, generator = _fresh()
    x, y, seen = _rows()
    for _ in range(STEPS):
        train_step(state, StepInputs(x, y, x[:0], y[:0], seen), cfg, generator)
    expected = state.model.state_dict()
    replicas = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name, value in expected.items():
        assert torch.equal(replicas[0][name], replicas[1][name]), name
        assert torch.allclose(replicas[0][name], value, atol=1e-6), name
    assert not torch.equal(expected["encoder.0.weight"], _fresh()[0].model.encoder[0].weight)
