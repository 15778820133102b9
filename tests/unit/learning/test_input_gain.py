"""The input layer's gain (``model.reference_input_dim``): Adam moves wide inputs as narrow."""

from __future__ import annotations

import torch

from pipeline.config import ModelSettings
from pipeline.learning.adam import CpuAdam
from pipeline.learning.model import StreamNet

WIDE = {"input_dim": 256, "hidden_dim": 32, "embed_dim": 16, "proj_dim": 8, "max_classes": 4}


def _pair() -> tuple[StreamNet, StreamNet]:
    """A plain network and one with the gain 64 / 256, from the same draws."""
    torch.manual_seed(0)
    plain = StreamNet(ModelSettings(**WIDE, reference_input_dim=None))
    torch.manual_seed(0)
    scaled = StreamNet(ModelSettings(**WIDE, reference_input_dim=64))
    return plain, scaled


def test_the_gain_is_the_reference_width_over_the_input_width() -> None:
    assert ModelSettings(input_dim=784).input_gain == 64 / 784
    assert ModelSettings(input_dim=16).input_gain == 4.0
    assert ModelSettings().input_gain == 1.0  # the default width is the reference
    assert ModelSettings(input_dim=784, reference_input_dim=None).input_gain == 1.0


def test_a_gain_leaves_the_network_s_function_at_the_start_unchanged() -> None:
    plain, scaled = _pair()
    assert float(scaled.input_gain) == 0.25
    x = torch.randn(9, 256)
    torch.testing.assert_close(scaled.embed(x), plain.embed(x))


def test_adam_moves_the_effective_input_weights_by_the_gain_and_the_rest_alike() -> None:
    plain, scaled = _pair()
    x, target = torch.randn(12, 256), torch.randn(12, 16)
    before = {id(m): [p.detach().clone() for p in m.encoder.parameters()] for m in (plain, scaled)}
    for model in (plain, scaled):
        opt = CpuAdam(model.parameters(), lr=1e-2)
        ((model.embed(x) - target) ** 2).sum().backward()
        opt.step()
    moved = {
        id(m): [p.detach() - b for p, b in zip(m.encoder.parameters(), before[id(m)], strict=True)]
        for m in (plain, scaled)
    }
    plain_w, plain_rest = moved[id(plain)][0], moved[id(plain)][1:]
    scaled_w, scaled_rest = moved[id(scaled)][0], moved[id(scaled)][1:]
    assert plain_w.abs().max() > 1e-3  # the step did move the input layer
    # the effective weight is gain · W': it moved a quarter of the plain layer's step
    effective = scaled.input_gain * scaled_w
    torch.testing.assert_close(effective, 0.25 * plain_w, rtol=1e-3, atol=1e-7)
    for a, b in zip(scaled_rest, plain_rest, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-7)
    # so the two networks, equal before the step, now differ
    assert not torch.allclose(scaled.embed(x), plain.embed(x), atol=1e-4)


def test_a_state_saved_without_a_gain_loads_as_the_plain_layer_it_was() -> None:
    plain, _ = _pair()
    legacy = {k: v for k, v in plain.state_dict().items() if k != "input_gain"}
    loaded = StreamNet(ModelSettings(**WIDE))  # the default reference, gain 0.25 when new
    loaded.load_state_dict(legacy)
    assert float(loaded.input_gain) == 1.0
    x = torch.randn(5, 256)
    torch.testing.assert_close(loaded.embed(x), plain.embed(x))


def test_the_gain_travels_in_the_state_dict() -> None:
    _, scaled = _pair()
    other = StreamNet(ModelSettings(**WIDE, reference_input_dim=None))  # gain 1 when new
    other.load_state_dict(scaled.state_dict())
    x = torch.randn(5, 256)
    torch.testing.assert_close(other.embed(x), scaled.embed(x))
