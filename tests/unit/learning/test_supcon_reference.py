"""supcon_loss against an independent, loop-by-loop transcription of the reference definition."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.learning.losses import masked_cross_entropy, supcon_loss


def reference_supcon(features, labels, temperature, base_temperature, contrast_mode):
    """Literal reading of the definition: one anchor at a time, plain Python sums."""
    batch, views, _ = features.shape
    items = [(i, v) for v in range(views) for i in range(batch)]  # view-major order
    anchors = items if contrast_mode == "all" else [(i, 0) for i in range(batch)]
    total = 0.0
    for ai, av in anchors:
        a = features[ai, av].double()
        others = [(j, w) for (j, w) in items if (j, w) != (ai, av)]
        sims = {o: float(a @ features[o[0], o[1]].double()) / temperature for o in others}
        log_denominator = math.log(sum(math.exp(s) for s in sims.values()))
        if labels is None:
            positives = [o for o in others if o[0] == ai]
        else:
            positives = [o for o in others if int(labels[o[0]]) == int(labels[ai])]
        if positives:
            mean_log_prob = sum(sims[o] - log_denominator for o in positives) / len(positives)
            total += -(temperature / base_temperature) * mean_log_prob
    return total / len(anchors)


def _features(batch, views, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(batch, views, dim, generator=g), dim=-1)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("views", [1, 2, 3])
@pytest.mark.parametrize("mode", ["all", "one"])
def test_supcon_matches_reference(seed, views, mode):
    feats = _features(9, views, 16, seed)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 1])  # classes 3 and 4 have one sample
    got = supcon_loss(feats, labels, temperature=0.1, base_temperature=0.07, contrast_mode=mode)
    want = reference_supcon(feats, labels, 0.1, 0.07, mode)
    assert got.item() == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("views", [1, 2])
def test_unsupervised_case_matches_reference(views):
    feats = _features(7, views, 8, seed=11)
    got = supcon_loss(feats, None)
    want = reference_supcon(feats, None, 0.07, 0.07, "all")
    assert got.item() == pytest.approx(want, abs=1e-5)
    if views == 1:
        # One view and no labels: no anchor has a positive, so the loss is exactly 0.
        assert got.item() == 0.0


def test_anchor_without_positive_contributes_zero_and_counts_in_mean():
    feats = _features(3, 1, 4, seed=3)
    labels = torch.tensor([0, 0, 1])
    per_anchor = supcon_loss(feats, labels, reduction="none")
    assert per_anchor[2].item() == 0.0
    assert torch.isfinite(per_anchor).all()
    assert supcon_loss(feats, labels).item() == pytest.approx(per_anchor.sum().item() / 3)


def test_all_singletons_gives_zero_not_nan():
    feats = _features(5, 1, 4, seed=5)
    loss = supcon_loss(feats, torch.arange(5))
    assert loss.item() == 0.0


def test_stable_at_tiny_temperature():
    feats = _features(6, 2, 8, seed=9)
    loss = supcon_loss(feats, torch.tensor([0, 0, 1, 1, 2, 2]), temperature=1e-4)
    assert torch.isfinite(loss)


def test_gradient_flows_and_is_finite():
    feats = _features(6, 2, 8, seed=1).requires_grad_(True)
    supcon_loss(feats, torch.tensor([0, 1, 0, 1, 2, 2])).backward()
    assert feats.grad is not None
    assert torch.isfinite(feats.grad).all()
    assert feats.grad.abs().sum() > 0


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="batch, views, dim"):
        supcon_loss(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="labels"):
        supcon_loss(torch.zeros(4, 2, 8), torch.arange(3))


def test_masked_cross_entropy_ignores_unseen_classes():
    logits = torch.tensor([[2.0, 1.0, 50.0], [0.5, 3.0, 50.0]])
    seen = torch.tensor([True, True, False])
    targets = torch.tensor([0, 1])
    got = masked_cross_entropy(logits, targets, seen)
    want = F.cross_entropy(logits[:, :2], targets)
    assert got.item() == pytest.approx(want.item(), abs=1e-6)
