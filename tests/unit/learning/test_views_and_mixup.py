"""Several augmented views (``train.views``) and the proxy-mixup term (``proxy_mixup``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ModelSettings, TrainSettings, load_settings
from pipeline.exceptions import ConfigError
from pipeline.learning.losses import asymmetric_supcon_loss, supcon_loss
from pipeline.learning.model import StreamNet, augment
from pipeline.learning.objectives import (
    draw_mix_pairs,
    draw_negative_pairs,
    loss_weights,
    objective_loss,
)
from pipeline.learning.proxy_losses import (
    cross_class_mixtures,
    proxy_contrastive_loss,
    proxy_mixup_loss,
)
from pipeline.learning.step import StepInputs, make_state, train_step

MODEL = ModelSettings(input_dim=8, hidden_dim=32, embed_dim=16, proj_dim=16, max_classes=5)
AUG = {"noise_std": 0.1, "mask_prob": 0.2}


def _net(seed: int = 0) -> StreamNet:
    torch.manual_seed(seed)
    return StreamNet(MODEL)


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, MODEL.input_dim, generator=g)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 3, 3, 0])
    seen = torch.zeros(MODEL.max_classes, dtype=torch.bool)
    seen[:4] = True
    return x, y, seen


def _encoded_views(model: StreamNet, x: torch.Tensor, views: int, seed: int) -> torch.Tensor:
    """The encoder outputs of ``views`` augmented views, ``[m, views, embed]``, drawn as
    ``objective_loss`` draws them from a generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    z = model.standardise(x)
    h = [model.encode(augment(z, AUG["noise_std"], AUG["mask_prob"], g)) for _ in range(views)]
    return torch.stack(h, dim=1)


@pytest.mark.parametrize("views", [2, 3, 4])
def test_supcon_runs_on_every_view(views: int) -> None:
    model, (x, y, seen) = _net(), _data()
    n = 8
    cfg = TrainSettings(objective="supcon", proxy_weight=0.0, views=views, **AUG)
    g = torch.Generator().manual_seed(7)
    out = objective_loss(model, x, y, n, seen, cfg, g)
    feats = model.project(_encoded_views(model, x, views, 7))
    assert feats.shape == (12, views, MODEL.proj_dim)
    expected = supcon_loss(feats, y, cfg.temperature, cfg.base_temperature, reduction="none")
    assert expected.shape == (views * 12,)
    torch.testing.assert_close(out.loss, expected.mean())
    torch.testing.assert_close(out.batch_per_sample, expected.view(views, 12).mean(0)[:n])
    # Without the mixup term the step draws nothing but the views from the generator.
    spent = torch.Generator().manual_seed(7)
    for _ in range(views):
        augment(x, AUG["noise_std"], AUG["mask_prob"], spent)
    assert torch.equal(g.get_state(), spent.get_state())


def test_more_views_change_the_loss() -> None:
    model, (x, y, seen) = _net(), _data()
    losses = [
        objective_loss(
            model, x, y, 12, seen, TrainSettings(views=v, **AUG), torch.Generator().manual_seed(1)
        ).loss
        for v in (2, 3)
    ]
    assert not torch.allclose(losses[0], losses[1])


def test_proxy_and_asymmetric_terms_see_every_view() -> None:
    model, (x, y, seen) = _net(), _data()
    n, views = 8, 3
    h = _encoded_views(model, x, views, 5)  # [m, V, embed]
    rows = h.transpose(0, 1).reshape(views * 12, -1)  # view-major
    proxies = F.normalize(model.head.weight, dim=-1)
    cfg = TrainSettings(loss_terms={"proxy": 1.0}, views=views, **AUG)
    out = objective_loss(model, x, y, n, seen, cfg, torch.Generator().manual_seed(5))
    expected = proxy_contrastive_loss(F.normalize(rows, dim=-1), y.repeat(views), proxies)
    torch.testing.assert_close(out.loss, expected)

    cfg = TrainSettings(objective="asym_supcon", views=views, **AUG)
    out = objective_loss(model, x, y, n, seen, cfg, torch.Generator().manual_seed(5))
    feats = model.project(h)
    replay = feats[n:].transpose(0, 1).reshape(-1, feats.shape[-1])
    expected = asymmetric_supcon_loss(feats[:n], y[:n], replay, y[n:].repeat(views))
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.views=1", "train.views"),
        ("train.views=17", "train.views"),
        ("train.mixup_weight=-0.5", "train.mixup_weight"),
        ("train.loss_terms={proxy_mix: 1}", "train.loss_terms.proxy_mix"),
    ],
)
def test_bad_view_and_mixup_settings_fail_with_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(None, [override], environ={})


def test_mixup_weight_joins_the_supcon_preset_only_when_set() -> None:
    assert "proxy_mixup" not in loss_weights(TrainSettings())
    assert loss_weights(TrainSettings(mixup_weight=0.5)) == {
        "supcon": 1.0,
        "proxy": 1.0,
        "proxy_mixup": 0.5,
    }
    assert loss_weights(TrainSettings(objective="ce", mixup_weight=0.5)) == {"ce": 1.0}


def test_proxy_mixup_loss_by_hand() -> None:
    tau = 0.5
    # Class 2's proxy is absent from the step: were it in the softmax, row 1 would change.
    proxies = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-(0.5**0.5), 0.5**0.5]])
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    partner = torch.tensor([1, 0])
    lam = torch.tensor([0.5, 1.0])
    per_row = proxy_mixup_loss(features, labels, partner, lam, proxies, tau, reduction="none")
    # Row 0: the mix (1, 1)/√2 is as close to both proxies: p = 1/2 each, target 1/2 each.
    # Row 1: λ = 1 is row 1 itself against proxies 0 and 1: log(1 + e^(−1/τ)).
    expected = torch.tensor([math.log(2.0), math.log1p(math.exp(-1.0 / tau))])
    torch.testing.assert_close(per_row, expected)
    torch.testing.assert_close(
        proxy_mixup_loss(features, labels, partner, lam, proxies, tau), expected.mean()
    )


def test_proxy_mixup_loss_is_soft_target_cross_entropy_and_symmetric() -> None:
    g = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    proxies = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    labels = torch.tensor([0, 1, 1, 3, 0, 3])
    # λ = 1 (or a row paired with itself) is PCR's proxy term.
    ones = torch.ones(6)
    torch.testing.assert_close(
        proxy_mixup_loss(features, labels, torch.arange(6).flip(0), ones, proxies, 0.1, "none"),
        proxy_contrastive_loss(features, labels, proxies, 0.1, "none"),
    )
    partner = torch.tensor([3, 2, 5, 0, 1, 4])
    lam = torch.rand(6, generator=g)
    got = proxy_mixup_loss(features, labels, partner, lam, proxies, 0.1, "none")
    # The soft-target cross-entropy written out, over the present classes {0, 1, 3}.
    mixed = F.normalize(lam[:, None] * features + (1 - lam[:, None]) * features[partner], dim=-1)
    logits = mixed @ proxies[[0, 1, 3]].T / 0.1
    column = {0: 0, 1: 1, 3: 2}
    target = torch.zeros(6, 3)
    for i in range(6):
        target[i, column[int(labels[i])]] += lam[i]
        target[i, column[int(labels[partner[i]])]] += 1 - lam[i]
    torch.testing.assert_close(got, -(target * F.log_softmax(logits, dim=-1)).sum(dim=1))
    # Row i mixed with j at λ is the same point, and the same loss, as j mixed with i at 1 − λ.
    swapped = proxy_mixup_loss(
        features[partner], labels[partner], torch.argsort(partner), 1 - lam, proxies, 0.1, "none"
    )
    torch.testing.assert_close(got, swapped)


def test_mix_pairs_cover_the_labeled_rows_of_every_view() -> None:
    labels = torch.tensor([0, -1, 2, 2, -1])
    pairs = draw_mix_pairs(labels, 3, torch.Generator().manual_seed(0))
    assert pairs.rows.tolist() == [0, 2, 3, 5, 7, 8, 10, 12, 13]
    assert sorted(pairs.partner.tolist()) == list(range(9))
    assert bool(((pairs.lam >= 0) & (pairs.lam <= 1)).all())
    again = draw_mix_pairs(labels, 3, torch.Generator().manual_seed(0))
    assert torch.equal(pairs.partner, again.partner)
    assert torch.equal(pairs.lam, again.lam)


def test_proxy_mixup_term_wires_the_drawn_pairs() -> None:
    model, (x, y, seen) = _net(), _data()
    y = y.clone()
    y[5] = -1  # an unlabeled row: no mixup loss, and it is nobody's partner
    plain = {"noise_std": 0.0, "mask_prob": 0.0}  # no draws for the views: only the pairs
    cfg = TrainSettings(loss_terms={"proxy_mixup": 1.0}, views=3, **plain)
    out = objective_loss(model, x, y, 8, seen, cfg, torch.Generator().manual_seed(4))
    pairs = draw_mix_pairs(y, 3, torch.Generator().manual_seed(4))
    z = F.normalize(model.embed(x), dim=-1).repeat(3, 1)
    per_row = torch.zeros(36)
    per_row[pairs.rows] = proxy_mixup_loss(
        z[pairs.rows],
        y.repeat(3)[pairs.rows],
        pairs.partner,
        pairs.lam,
        F.normalize(model.head.weight, dim=-1),
        cfg.temperature,
        "none",
    )
    torch.testing.assert_close(out.loss, per_row.mean())
    torch.testing.assert_close(out.batch_per_sample, per_row.view(3, 12).mean(0)[:8])
    assert out.batch_per_sample[5] == 0.0
    out.loss.backward()
    assert next(model.encoder.parameters()).grad is not None
    assert model.head.weight.grad is not None


def test_a_step_with_several_views_and_mixup_trains() -> None:
    x, y, seen = _data()
    cfg = TrainSettings(views=4, mixup_weight=1.0, lr=5e-3, device="cpu", amp=False)
    state = make_state(_net(), cfg)
    inputs = StepInputs(x[:8], y[:8], x[8:], y[8:], seen)
    g = torch.Generator().manual_seed(0)
    results = [train_step(state, inputs, cfg, g) for _ in range(5)]
    losses = [r.loss for r in results]
    assert None not in losses
    assert float(results[-1].loss_value) < float(results[0].loss_value)
    assert results[0].per_sample_loss.shape == (8,)
    assert results[0].batch_embeddings.shape == (8, MODEL.embed_dim)


def test_cross_class_mixtures_by_hand() -> None:
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], requires_grad=True)
    labels = torch.tensor([0, 1, 0])
    first = torch.tensor([0, 0, 2])
    second = torch.tensor([1, 2, 1])
    lam = torch.tensor([0.5, 0.3, 0.25])
    got = cross_class_mixtures(features, labels, first, second, lam)
    # Pair (0, 2) is one class: dropped. (0, 1) at 1/2: (1, 1)/√2. (2, 1) at 1/4: (0.15, 0.95).
    mixed = torch.tensor([0.15, 0.95])
    expected = torch.stack([torch.tensor([1.0, 1.0]) / 2**0.5, mixed / mixed.norm()])
    torch.testing.assert_close(got, expected)
    assert not got.requires_grad


def test_supcon_with_mixed_negatives_adds_them_as_contrast_only_negatives() -> None:
    model, (x, y, seen) = _net(), _data()
    y = y.clone()
    y[4] = -1  # an unlabeled row is never mixed
    plain = {"noise_std": 0.0, "mask_prob": 0.0}
    cfg = TrainSettings(objective="supcon", proxy_weight=0.0, mix_negatives=20, **plain)
    out = objective_loss(model, x, y, 8, seen, cfg, torch.Generator().manual_seed(2))
    pairs = draw_negative_pairs(y, 2, 20, torch.Generator().manual_seed(2))
    assert pairs is not None
    assert not bool(torch.isin(pairs.first, torch.tensor([4, 16])).any())
    z = model.project(model.embed(x))
    rows = torch.cat([z, z])
    synthetic = cross_class_mixtures(rows, y.repeat(2), pairs.first, pairs.second, pairs.lam)
    assert 0 < synthetic.shape[0] < 20  # some pairs crossed classes, some did not
    # Every anchor's denominator gains the synthetic rows; nothing else changes.
    contrast_y = torch.where(y >= 0, y, torch.tensor(-6))
    expected = asymmetric_supcon_loss(
        torch.stack([z, z], dim=1),
        contrast_y,
        synthetic,
        -100 - torch.arange(synthetic.shape[0]),
    )
    torch.testing.assert_close(out.loss, expected)
    without = objective_loss(
        model, x, y, 8, seen, TrainSettings(objective="supcon", proxy_weight=0.0, **plain)
    )
    assert out.loss > without.loss  # more negatives, larger denominators
    assert draw_negative_pairs(torch.full((3,), -1), 2, 5) is None
    with pytest.raises(ConfigError, match="mix_negatives"):
        load_settings(None, ["train.mix_negatives=8", "train.contrast_mode=one"], environ={})
