"""The weight average of ``bench forgetting --ema-decay``: its arithmetic, per optimizer step."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelSettings
from pipeline.devtools.bench.averaging import WeightAverage
from pipeline.learning.model import StreamNet


def _net(seed: int) -> StreamNet:
    torch.manual_seed(seed)
    return StreamNet(ModelSettings(input_dim=4, hidden_dim=8, embed_dim=4, proj_dim=4))


def test_each_update_moves_the_average_by_one_minus_decay_to_the_steps() -> None:
    start, live = _net(0), _net(1)
    average = WeightAverage(start, decay=0.9)
    first = [p.detach().clone() for p in start.parameters()]
    average.update(live, steps=3)
    keep = 0.9**3
    for avg, old, new in zip(average.model.parameters(), first, live.parameters(), strict=True):
        torch.testing.assert_close(avg, keep * old + (1 - keep) * new.detach())
    # Three updates of one step each land where one update of three steps does.
    stepwise = WeightAverage(start, decay=0.9)
    for _ in range(3):
        stepwise.update(live, steps=1)
    for a, b in zip(stepwise.model.parameters(), average.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_buffers_follow_the_live_network_and_the_copy_is_its_own() -> None:
    start, live = _net(0), _net(1)
    live.observe(torch.randn(16, 4) * 5 + 2)
    average = WeightAverage(start, decay=0.5)
    average.update(live, steps=1)
    for avg_buf, live_buf in zip(average.model.buffers(), live.buffers(), strict=True):
        assert torch.equal(avg_buf, live_buf)
    with torch.no_grad():
        next(start.parameters()).add_(1.0)  # the average does not share storage with its start
    assert not torch.equal(next(average.model.parameters()), next(start.parameters()))
    assert not any(p.requires_grad for p in average.model.parameters())


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_a_decay_outside_the_open_unit_interval_is_refused(decay: float) -> None:
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(_net(0), decay=decay)
