"""Online per-feature standardisation: exact running moments, floors, checkpoint round trip."""

from __future__ import annotations

import torch

from pipeline.config import ModelSettings
from pipeline.learning.model import StreamNet
from pipeline.learning.standardise import MIN_STD_RATIO, RunningStandardiser


def test_batched_updates_give_the_moments_of_the_whole_stream() -> None:
    g = torch.Generator().manual_seed(0)
    x = 1000.0 + 50.0 * torch.randn(257, 6, generator=g, dtype=torch.float64)
    s = RunningStandardiser(6)
    for chunk in torch.split(x, [1, 10, 100, 46, 100]):
        s.update(chunk)
    assert int(s.count) == 257
    torch.testing.assert_close(s.mean, x.mean(dim=0))
    torch.testing.assert_close(s.variance(), x.var(dim=0, unbiased=False))


def test_standardised_features_have_zero_mean_and_unit_variance_whatever_their_scale() -> None:
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([1e-3, 1.0, 1e4], dtype=torch.float64)
    x = 7.0 + scales * torch.randn(500, 3, generator=g, dtype=torch.float64)
    s = RunningStandardiser(3, min_std_ratio=0.0)
    s.update(x)
    z = s(x)
    torch.testing.assert_close(
        z.mean(dim=0), torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0
    )
    torch.testing.assert_close(
        z.std(dim=0, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-9, rtol=0
    )


def test_identity_before_any_event_and_constant_features_map_to_zero() -> None:
    s = RunningStandardiser(3)
    x = torch.tensor([[1.0, -2.0, 3.0]])
    torch.testing.assert_close(s(x), x)
    s.update(torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0]]))
    out = s(torch.tensor([[5.0, 0.0, 0.0]]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.zeros(1, 3))


def test_a_nearly_constant_feature_is_not_amplified_beyond_the_floor() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1000, 4, generator=g)
    x[:, 3] = 1e-6 * x[:, 3]  # varies, but a million times less than the others
    s = RunningStandardiser(4)
    s.update(x)
    var = s.variance()
    expected = torch.sqrt(var + MIN_STD_RATIO**2 * var.mean())
    torch.testing.assert_close(s.std(), expected)
    rms = float(torch.sqrt(var.mean()))
    assert float(s.std()[3]) >= MIN_STD_RATIO * rms
    # A unit deviation of the quiet feature comes out no larger than 1 / (ratio · rms).
    assert float(s(s.mean.float().unsqueeze(0) + 1.0)[0, 3]) <= 1.0 / (MIN_STD_RATIO * rms) + 1e-4


def test_statistics_travel_in_the_state_dict_and_old_states_load_as_identity() -> None:
    cfg = ModelSettings(input_dim=5, hidden_dim=8, embed_dim=4, proj_dim=4, max_classes=3)
    a = StreamNet(cfg)
    a.observe(3.0 + 2.0 * torch.randn(40, 5))
    b = StreamNet(cfg)
    b.load_state_dict(a.state_dict())
    x = torch.randn(7, 5)
    torch.testing.assert_close(b.embed(x), a.embed(x))
    legacy = {k: v for k, v in a.state_dict().items() if not k.startswith("standardiser.")}
    c = StreamNet(cfg)
    c.load_state_dict(legacy)  # a checkpoint written before standardisation existed
    torch.testing.assert_close(c.standardise(x), x)


def test_observe_does_nothing_when_standardisation_is_off() -> None:
    cfg = ModelSettings(input_dim=3, hidden_dim=8, embed_dim=4, proj_dim=4, standardize=False)
    model = StreamNet(cfg)
    model.observe(10.0 + torch.randn(20, 3))
    x = torch.randn(4, 3)
    torch.testing.assert_close(model.standardise(x), x)
