"""The loss family against closed forms on tiny inputs, against each other, and at extremes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import TrainSettings, load_settings
from pipeline.exceptions import ConfigError
from pipeline.learning.losses import (
    asymmetric_supcon_loss,
    batch_hard_triplet_loss,
    combine,
    cross_entropy_loss,
    focal_loss,
    masked_cross_entropy,
    nt_xent_loss,
    supcon_loss,
)
from pipeline.learning.objectives import loss_weights

E = math.e


def _features(batch, views, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(batch, views, dim, generator=g), dim=-1)


def _no_bank(dim):
    return torch.zeros(0, dim), torch.zeros(0, dtype=torch.long)


# ---------------------------------------------------------------- asymmetric SupCon (Co2L)


def test_asymmetric_closed_form():
    # τ = τ_base = 1. Anchor a0 = e1 (label 0) sees a1 (sim 0) and the bank item b = e1
    # (sim 1, its only positive): loss log(1 + e) - 1. Anchor a1 (label 1) has no positive: 0.
    anchors = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    bank = torch.tensor([[1.0, 0.0]])
    per_anchor = asymmetric_supcon_loss(
        anchors,
        torch.tensor([0, 1]),
        bank,
        torch.tensor([0]),
        temperature=1.0,
        base_temperature=1.0,
        reduction="none",
    )
    assert per_anchor.tolist() == pytest.approx([math.log(1 + E) - 1, 0.0], abs=1e-6)
    mean = asymmetric_supcon_loss(anchors, torch.tensor([0, 1]), bank, torch.tensor([0]), 1.0, 1.0)
    assert mean.item() == pytest.approx((math.log(1 + E) - 1) / 2, abs=1e-6)


def test_asymmetric_temperature_ratio_scales_the_loss():
    feats = _features(4, 2, 8, seed=2)
    labels = torch.tensor([0, 1, 0, 1])
    bank, bank_y = _features(3, 1, 8, seed=3)[:, 0], torch.tensor([1, 0, 2])
    a = asymmetric_supcon_loss(feats, labels, bank, bank_y, 0.1, base_temperature=0.1)
    b = asymmetric_supcon_loss(feats, labels, bank, bank_y, 0.1, base_temperature=0.05)
    assert b.item() == pytest.approx(2 * a.item(), rel=1e-6)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("views", [1, 2, 3])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_asymmetric_with_empty_bank_is_supcon_all(seed, views, reduction):
    # No bank: the contrast set is exactly the other batch views and every view is an anchor,
    # which is supcon's contrast_mode="all" (same view-major anchor order).
    feats = _features(7, views, 8, seed)
    labels = torch.tensor([0, 0, 1, 2, 2, 3, 1])
    got = asymmetric_supcon_loss(feats, labels, *_no_bank(8), 0.1, 0.07, reduction=reduction)
    want = supcon_loss(feats, labels, 0.1, 0.07, contrast_mode="all", reduction=reduction)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_asymmetric_with_bank_is_supcon_over_the_union_restricted_to_batch_anchors(seed):
    # One view: supcon over batch ∪ bank makes every item an anchor; its first n anchors are
    # the batch items, each contrasted against all other items (batch and bank) - exactly the
    # asymmetric loss. The bank anchors are what the asymmetric form leaves out.
    n, m = 5, 4
    feats = _features(n, 1, 8, seed)
    bank = _features(m, 1, 8, seed + 100)
    labels, bank_y = torch.tensor([0, 1, 1, 2, 3]), torch.tensor([0, 2, 4, 1])
    got = asymmetric_supcon_loss(feats, labels, bank[:, 0], bank_y, reduction="none")
    union = supcon_loss(torch.cat([feats, bank]), torch.cat([labels, bank_y]), reduction="none")
    torch.testing.assert_close(got, union[:n], atol=1e-6, rtol=1e-6)
    mean = asymmetric_supcon_loss(feats, labels, bank[:, 0], bank_y)
    assert mean.item() == pytest.approx(union[:n].mean().item(), abs=1e-6)


def test_asymmetric_bank_items_are_never_anchors():
    feats = _features(3, 2, 8, seed=4)
    bank = _features(10, 1, 8, seed=5)[:, 0]
    per_anchor = asymmetric_supcon_loss(
        feats, torch.tensor([0, 1, 2]), bank, torch.arange(10), reduction="none"
    )
    assert per_anchor.shape == (6,)


def test_asymmetric_lone_anchor_without_contrast_is_zero_not_nan():
    feats = _features(1, 1, 4, seed=6).requires_grad_(True)
    loss = asymmetric_supcon_loss(feats, torch.tensor([0]), *_no_bank(4))
    assert loss.item() == 0.0
    loss.backward()
    assert feats.grad is not None
    assert torch.isfinite(feats.grad).all()


def test_asymmetric_stable_and_differentiable_at_tiny_temperature():
    feats = _features(6, 2, 8, seed=7).requires_grad_(True)
    bank = _features(5, 1, 8, seed=8)[:, 0].requires_grad_(True)
    loss = asymmetric_supcon_loss(
        feats, torch.tensor([0, 0, 1, 1, 2, 5]), bank, torch.tensor([0, 1, 2, 3, 4]), 1e-4
    )
    assert torch.isfinite(loss)
    loss.backward()
    for t in (feats, bank):
        assert t.grad is not None
        assert torch.isfinite(t.grad).all()
    assert feats.grad.abs().sum() > 0


def test_asymmetric_rejects_bad_shapes():
    with pytest.raises(ValueError, match="anchor_features"):
        asymmetric_supcon_loss(torch.zeros(4, 8), torch.arange(4), *_no_bank(8))
    with pytest.raises(ValueError, match="contrast_features"):
        asymmetric_supcon_loss(torch.zeros(4, 1, 8), torch.arange(4), *_no_bank(7))
    with pytest.raises(ValueError, match="contrast labels"):
        asymmetric_supcon_loss(
            torch.zeros(4, 1, 8), torch.arange(4), torch.zeros(2, 8), torch.arange(3)
        )


# ---------------------------------------------------------------- NT-Xent


def test_nt_xent_closed_form():
    # Both views of sample 0 are e1, of sample 1 e2; τ = 1. Each view sees its partner
    # (sim 1) and two views of the other sample (sim 0): loss log(e + 2) - 1 for all four.
    feats = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    per_view = nt_xent_loss(feats, temperature=1.0, reduction="none")
    assert per_view.tolist() == pytest.approx([math.log(E + 2) - 1] * 4, abs=1e-6)


def test_nt_xent_single_pair_is_zero():
    # One pair: the partner is the only other view, so its softmax probability is 1.
    assert nt_xent_loss(_features(1, 2, 4, seed=0)).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("temperature", [0.05, 0.5, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nt_xent_equals_unsupervised_supcon(seed, temperature, reduction):
    feats = _features(8, 2, 16, seed)
    got = nt_xent_loss(feats, temperature, reduction=reduction)
    want = supcon_loss(feats, None, temperature, base_temperature=temperature, reduction=reduction)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_nt_xent_stable_and_differentiable_at_tiny_temperature():
    feats = _features(6, 2, 8, seed=9).requires_grad_(True)
    loss = nt_xent_loss(feats, temperature=1e-4)
    assert torch.isfinite(loss)
    loss.backward()
    assert feats.grad is not None
    assert torch.isfinite(feats.grad).all()


def test_nt_xent_rejects_other_view_counts():
    with pytest.raises(ValueError, match="batch, 2, dim"):
        nt_xent_loss(torch.zeros(4, 3, 8))


# ---------------------------------------------------------------- cross-entropy


def test_cross_entropy_closed_form():
    logits = torch.tensor([[1.0, 0.0, 0.0]])
    got = cross_entropy_loss(logits, torch.tensor([0]))
    assert got.item() == pytest.approx(math.log(E + 2) - 1, abs=1e-6)


def test_cross_entropy_smoothing_spreads_only_over_seen_classes():
    # Seen {0, 1}, ε = 0.2, target 0: q = (0.9, 0.1, 0). log p0 = 1 - log(e + 1),
    # log p1 = -log(e + 1), so the loss is log(e + 1) - 0.9. The unseen class's 9.0 plays no part.
    logits = torch.tensor([[1.0, 0.0, 9.0]])
    seen = torch.tensor([True, True, False])
    got = cross_entropy_loss(logits, torch.tensor([0]), seen, label_smoothing=0.2)
    assert got.item() == pytest.approx(math.log(E + 1) - 0.9, abs=1e-6)


def test_cross_entropy_matches_masked_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g) * 3
    seen = torch.tensor([True, True, False, True, False])
    targets = torch.tensor([0, 1, 3, 3, 0, 1])
    for reduction in ("mean", "none"):
        torch.testing.assert_close(
            cross_entropy_loss(logits, targets, seen, reduction=reduction),
            masked_cross_entropy(logits, targets, seen, reduction=reduction),
        )


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.4])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_without_mask_is_torch_cross_entropy(smoothing, weighted, reduction):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 4, generator=g) * 2
    targets = torch.tensor([0, 1, 2, 3, 3, 1, 0])
    weights = torch.tensor([0.5, 2.0, 1.0, 3.0]) if weighted else None
    got = cross_entropy_loss(
        logits, targets, label_smoothing=smoothing, class_weights=weights, reduction=reduction
    )
    want = F.cross_entropy(
        logits, targets, weight=weights, label_smoothing=smoothing, reduction=reduction
    )
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_cross_entropy_masked_smoothing_is_smoothing_over_the_seen_columns():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 6, generator=g)
    seen = torch.tensor([True, False, True, True, False, False])
    cols = seen.nonzero().squeeze(1)
    targets = torch.tensor([0, 2, 3, 3, 0])
    weights = torch.tensor([1.0, 9.0, 2.0, 0.5, 9.0, 9.0])
    got = cross_entropy_loss(logits, targets, seen, label_smoothing=0.3, class_weights=weights)
    remap = torch.tensor([0, -1, 1, 2, -1, -1])[targets]
    want = F.cross_entropy(logits[:, cols], remap, weight=weights[cols], label_smoothing=0.3)
    assert got.item() == pytest.approx(want.item(), abs=1e-6)


def test_cross_entropy_stable_with_huge_logits():
    logits = torch.tensor([[1e30, -1e30, 0.0], [-1e30, 1e30, 5.0]], requires_grad=True)
    seen = torch.tensor([True, True, False])
    loss = cross_entropy_loss(logits, torch.tensor([1, 0]), seen, label_smoothing=0.1)
    assert torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[:, 2].abs().sum() == 0  # masked classes get no gradient


def test_cross_entropy_rejects_bad_smoothing():
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy_loss(torch.zeros(1, 2), torch.tensor([0]), label_smoothing=1.5)


# ---------------------------------------------------------------- focal


def test_focal_closed_form():
    # Two equal logits: p_t = 1/2, so the loss is (1/2)^γ · log 2, times α.
    logits, targets = torch.zeros(1, 2), torch.tensor([0])
    assert focal_loss(logits, targets, gamma=2.0).item() == pytest.approx(
        0.25 * math.log(2), abs=1e-7
    )
    assert focal_loss(logits, targets, gamma=2.0, alpha=0.25).item() == pytest.approx(
        0.0625 * math.log(2), abs=1e-7
    )


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_focal_with_gamma_zero_is_cross_entropy(masked, reduction):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 5, generator=g) * 4
    targets = torch.tensor([0, 1, 3, 3, 0, 1, 1, 0])
    seen = torch.tensor([True, True, False, True, False]) if masked else None
    got = focal_loss(logits, targets, gamma=0.0, seen_classes=seen, reduction=reduction)
    want = cross_entropy_loss(logits, targets, seen, reduction=reduction)
    torch.testing.assert_close(got, want, atol=0.0, rtol=0.0)


def test_focal_per_class_alpha_with_gamma_zero_is_per_sample_weighted_cross_entropy():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 3, generator=g)
    targets = torch.tensor([0, 1, 2, 2, 1, 0])
    alpha = torch.tensor([0.25, 1.0, 2.0])
    got = focal_loss(logits, targets, gamma=0.0, alpha=alpha, reduction="none")
    want = F.cross_entropy(logits, targets, weight=alpha, reduction="none")
    torch.testing.assert_close(got, want)


def test_focal_down_weights_easy_examples():
    logits = torch.tensor([[4.0, 0.0], [0.2, 0.0]])
    targets = torch.tensor([0, 0])
    ratio = focal_loss(logits, targets, reduction="none") / cross_entropy_loss(
        logits, targets, reduction="none"
    )
    assert ratio[0] < ratio[1]


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_stable_with_huge_logits(gamma):
    # p_t rounds to exactly 1 in the first row (where (1 - p)^γ has an infinite slope for
    # γ < 1) and to exactly 0 in the second.
    logits = torch.tensor([[1e6, -1e6, 0.0], [-1e6, 1e6, 0.0]], requires_grad=True)
    loss = focal_loss(logits, torch.tensor([0, 0]), gamma=gamma, alpha=0.5)
    assert torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()


def test_focal_rejects_negative_gamma():
    with pytest.raises(ValueError, match="gamma"):
        focal_loss(torch.zeros(1, 2), torch.tensor([0]), gamma=-1.0)


# ---------------------------------------------------------------- batch-hard triplet


def test_triplet_closed_form():
    # Points 0, 1 (label 0) and 3 (label 1) on a line, margin 2.5:
    # anchor 0: d_ap = 1, d_an = 3 -> 1 - 3 + 2.5 = 0.5; anchor 1: d_ap = 1, d_an = 2 -> 1.5;
    # anchor 2 has no positive -> 0. Mean 2/3.
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    per_anchor = batch_hard_triplet_loss(emb, labels, margin=2.5, reduction="none")
    assert per_anchor.tolist() == pytest.approx([0.5, 1.5, 0.0], abs=1e-6)
    assert batch_hard_triplet_loss(emb, labels, margin=2.5).item() == pytest.approx(2 / 3)
    # With margin 1.5 anchor 0 is already satisfied (1 - 3 + 1.5 < 0) and the hinge clips it.
    per_anchor = batch_hard_triplet_loss(emb, labels, margin=1.5, reduction="none")
    assert per_anchor.tolist() == pytest.approx([0.0, 0.5, 0.0], abs=1e-6)


def test_triplet_picks_the_hardest_pair():
    # Anchor 0 at the origin: positives at distance 1 and 4 (hardest 4), negatives at 2 and 5
    # (hardest 2): 4 - 2 + 0.2.
    emb = torch.tensor([[0.0], [1.0], [-4.0], [2.0], [5.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    per_anchor = batch_hard_triplet_loss(emb, labels, margin=0.2, reduction="none")
    assert per_anchor[0].item() == pytest.approx(2.2, abs=1e-5)


def test_triplet_single_class_and_singletons_give_zero():
    emb = _features(4, 1, 3, seed=0)[:, 0]
    assert batch_hard_triplet_loss(emb, torch.zeros(4, dtype=torch.long)).item() == 0.0
    assert batch_hard_triplet_loss(emb, torch.arange(4)).item() == 0.0


def test_triplet_gradient_is_finite_with_duplicate_points():
    emb = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    loss = batch_hard_triplet_loss(emb, torch.tensor([0, 0, 1, 1]), margin=0.5)
    assert torch.isfinite(loss)
    loss.backward()
    assert emb.grad is not None
    assert torch.isfinite(emb.grad).all()


def test_triplet_stable_with_huge_embeddings():
    emb = (_features(6, 1, 4, seed=1)[:, 0] * 1e15).requires_grad_(True)
    loss = batch_hard_triplet_loss(emb, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert torch.isfinite(loss)
    loss.backward()
    assert emb.grad is not None
    assert torch.isfinite(emb.grad).all()


def test_triplet_rejects_bad_shapes():
    with pytest.raises(ValueError, match="batch, dim"):
        batch_hard_triplet_loss(torch.zeros(2, 2, 2), torch.arange(2))
    with pytest.raises(ValueError, match="labels"):
        batch_hard_triplet_loss(torch.zeros(3, 2), torch.arange(2))


# ---------------------------------------------------------------- combinator


def test_combine_is_the_weighted_sum():
    # The weights as the product builds them: train.loss_terms through loss_weights. A term
    # weighted but absent from this step (triplet) adds nothing.
    terms = {"supcon": torch.tensor(2.0), "ce": torch.tensor(3.0)}
    weights = loss_weights(TrainSettings(loss_terms={"supcon": 1.0, "ce": 0.5, "triplet": 9.0}))
    assert combine(terms, weights).item() == pytest.approx(3.5)


def test_combine_keeps_gradients():
    x = torch.tensor(1.5, requires_grad=True)
    combine({"a": x * x, "b": 3 * x}, {"a": 2.0, "b": -1.0}).backward()
    assert x.grad is not None
    assert x.grad.item() == pytest.approx(2 * 2 * 1.5 - 3)


def test_combine_rejects_terms_without_a_weight_and_empty_input():
    with pytest.raises(ValueError, match="supcn"):
        combine({"supcn": torch.tensor(1.0)}, {"supcon": 1.0})
    with pytest.raises(ValueError, match="no loss terms"):
        combine({}, {"supcon": 1.0})


def test_configured_loss_terms_are_frozen_and_validated():
    cfg = TrainSettings(loss_terms={"ce": 0.5})
    with pytest.raises(ValueError, match="frozen"):
        cfg.loss_terms = {"ce": 1.0}  # type: ignore[misc]
    loss_weights(cfg)["ce"] = 9.0  # a copy: the configured weights do not change
    assert loss_weights(cfg) == {"ce": 0.5}
    with pytest.raises(ConfigError, match=r"train\.loss_terms.*got ''"):  # a term needs a name
        load_settings(None, ["train.loss_terms={'': 1.0}"], environ={})
    with pytest.raises(ConfigError, match="finite"):
        load_settings(None, ["train.loss_terms={ce: .nan}"], environ={})
    with pytest.raises(ConfigError, match=r"train\.loss_terms: key 'ce' is given twice"):
        load_settings(None, ["train.loss_terms={ce: 1.0, ce: 2.0}"], environ={})
