"""Streaming LDA over embeddings (pure arithmetic, small tensors)."""

from __future__ import annotations

import pytest
import torch
from sklearn.covariance import oas
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from pipeline.devtools.bench.slda import RunningLDA, discriminant, oas_weight, shrunk
from pipeline.learning.drift import DriftFollower


def _within_class_scatter(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    scatter = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for c in torch.unique(y):
        centred = x[y == c].double() - x[y == c].double().mean(dim=0)
        scatter += centred.T @ centred
    return scatter


ROOT = torch.tensor([[2.0, 0.0, 0.0], [1.5, 0.3, 0.0], [0.0, 0.0, 0.4]])  # cov = ROOT ROOT^T


def _gaussians(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three classes sharing one elongated covariance whose long axis crosses the means."""
    g = torch.Generator().manual_seed(seed)
    means = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [2.0, -1.0, 0.5]])
    y = torch.arange(n) % 3
    x = means[y] + torch.randn(n, 3, generator=g) @ ROOT.T
    return x, y, means


def test_batched_updates_give_the_pooled_within_class_scatter_and_the_class_means():
    x, y, _ = _gaussians(300)
    lda = RunningLDA(max_classes=4, dim=3, sigma=None)
    for start in range(0, 300, 7):  # batches of 7 events, classes mixed, uneven per class
        lda.add(x[start : start + 7], y[start : start + 7])
    assert lda.weight == 300
    assert torch.allclose(lda.scatter, _within_class_scatter(x, y), atol=1e-8)
    labels, means = lda.class_means.seen()
    assert labels.tolist() == [0, 1, 2]
    for c in range(3):
        assert torch.allclose(means[c], x[y == c].mean(dim=0), atol=1e-6)


def test_forgetting_halves_old_contributions_every_half_life():
    lda = RunningLDA(max_classes=2, dim=2, sigma=None, half_life=2)
    lda.add(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([0, 0]))
    assert lda.scatter.tolist() == [[2.0, 0.0], [0.0, 0.0]]
    # two more events (one half-life): the first two now weigh 1/2 each; class 1's first
    # events add no cross term, only their own scatter
    lda.add(torch.tensor([[0.0, 1.0], [0.0, 3.0]]), torch.tensor([1, 1]))
    assert lda.weight == pytest.approx(3.0)
    assert lda.scatter.flatten().tolist() == pytest.approx([1.0, 0.0, 0.0, 2.0])
    assert lda.covariance().flatten().tolist() == pytest.approx([1 / 3, 0.0, 0.0, 2 / 3])


def test_compensation_moves_the_means_not_the_covariance():
    lda = RunningLDA(max_classes=1, dim=2, sigma=None)
    lda.add(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([0, 0]))
    cov = lda.covariance().clone()
    lda.compensate(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0]))
    assert lda.class_means.seen()[1].tolist() == [[2.0, 1.0]]
    assert torch.equal(lda.covariance(), cov)


def test_oas_weight_is_sklearns():
    x, _, _ = _gaussians(40, seed=1)
    centred = (x - x.mean(dim=0)).double()
    cov = centred.T @ centred / 40
    expected_cov, expected_weight = oas(centred.numpy(), assume_centered=True)
    assert oas_weight(cov, 40) == pytest.approx(expected_weight, rel=1e-9)
    assert shrunk(cov, "oas", 40).numpy() == pytest.approx(expected_cov, rel=1e-9)
    # more samples, less shrinkage
    assert oas_weight(cov, 4000) < oas_weight(cov, 40) / 10


@pytest.mark.parametrize("shrinkage", [0.0, 0.3])
def test_the_discriminant_is_sklearns_lda_with_equal_priors(shrinkage):
    x, y, _ = _gaussians(300)  # 100 events per class
    lda = RunningLDA(max_classes=3, dim=3, sigma=None)
    lda.add(x, y)
    ours = lda.discriminant(shrinkage).scores(x)
    reference = LinearDiscriminantAnalysis(
        solver="lsqr", shrinkage=shrinkage or None, priors=[1 / 3] * 3
    ).fit(x.numpy(), y.numpy())
    theirs = torch.from_numpy(reference.decision_function(x.numpy()))
    # the same scores up to one constant (sklearn adds log prior to every class)
    gap = ours - theirs
    assert torch.allclose(gap, gap[0, 0].expand_as(gap), atol=1e-8)


def test_with_a_shared_elongated_covariance_lda_beats_nearest_mean():
    x, y, true_means = _gaussians(3000)
    true_cov = ROOT @ ROOT.T
    lda = RunningLDA(max_classes=3, dim=3, sigma=None)
    for start in range(0, 1500, 10):  # learn on the first half as a stream
        lda.add(x[start : start + 10], y[start : start + 10])
    test_x, test_y = x[1500:], y[1500:]
    labels, means = lda.class_means.seen()
    nearest = labels[torch.cdist(test_x, means).argmin(dim=1)]
    by_lda = labels[lda.discriminant("oas").scores(test_x).argmax(dim=1)]
    ncm_acc = (nearest == test_y).float().mean().item()
    lda_acc = (by_lda == test_y).float().mean().item()
    # the Bayes classifier: the true means and covariance
    bayes = discriminant(torch.arange(3), true_means, true_cov, 0.0, n=1).scores(test_x)
    bayes_acc = (bayes.argmax(dim=1) == test_y).float().mean().item()
    assert lda_acc > ncm_acc + 0.08
    assert lda_acc > bayes_acc - 0.01
    # full shrinkage to (tr S / d) I is nearest mean again (same ranking of the classes)
    spherical = labels[lda.discriminant(1.0).scores(test_x).argmax(dim=1)]
    assert torch.equal(spherical, nearest)


def test_no_spread_yet_falls_back_to_nearest_mean():
    means = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    out = discriminant(torch.tensor([3, 5]), means, torch.zeros(2, 2), "oas", n=2)
    scores = out.scores(torch.tensor([[0.2, 0.0], [0.9, 0.0]]))
    assert out.labels[scores.argmax(dim=1)].tolist() == [3, 5]


def test_a_drift_follower_keeps_the_lda_in_step_with_the_encoder():
    lda = RunningLDA(max_classes=2, dim=2, sigma=None)
    follower = DriftFollower({"slda": lda})
    follower.follow(["a"], torch.tensor([[1.0, 0.0]]), torch.tensor([0]), *_two_events())
    follower.follow(["a"], torch.tensor([[1.0, 1.0]]), torch.tensor([0]), *_two_events())
    # class 0: (0.5, 0) moved by a's drift to (0.5, 1), then (0, 0) and (1, 0) joined it
    assert lda.class_means.seen()[1].tolist() == [[0.5, 0.5]]
    assert lda.weight == 4


def _two_events() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 0])
