"""The class means an exported checkpoint carries: its stream means (per class and task),
the bank's for the classes they never saw."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.learner.exporting import with_stream_means
from pipeline.learning.discriminant import discriminant
from pipeline.learning.drift import RunningClassMeans
from pipeline.learning.inference import ClassMeans
from pipeline.learning.stream_means import TaskClassMeans


def test_every_mean_of_a_stream_class_and_the_banks_for_the_rest():
    saved = TaskClassMeans(max_classes=3, dim=2, sigma=0.3, per_class=2)
    saved.add(
        torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]), torch.tensor([2, 2, 0]), ["a", "b", "a"]
    )
    bank = ClassMeans(torch.tensor([0, 1, 2]), F.normalize(torch.randn(3, 2), dim=-1))
    out = with_stream_means(bank, saved.state_dict())
    assert out.labels.tolist() == [0, 1, 2, 2]
    expected = torch.stack(
        [F.normalize(torch.tensor([1.0, 1.0]), dim=0), bank.means[1], torch.tensor([1.0, 0.0])]
    )
    assert torch.allclose(out.means[:3], expected)
    assert torch.allclose(out.means[3], torch.tensor([0.0, 1.0]))


def test_a_checkpoint_of_one_mean_per_class_still_exports():
    saved = RunningClassMeans(max_classes=3, dim=2, sigma=0.3)
    saved.add(torch.tensor([[0.0, 2.0]]), torch.tensor([1]))
    bank = ClassMeans(torch.tensor([0, 1]), F.normalize(torch.randn(2, 2), dim=-1))
    out = with_stream_means(bank, saved.state_dict())
    assert out.labels.tolist() == [0, 1]
    assert torch.allclose(out.means, torch.stack([bank.means[0], torch.tensor([0.0, 1.0])]))


def test_saved_means_with_a_scatter_export_as_the_discriminant_the_learner_reads():
    saved = TaskClassMeans(max_classes=3, dim=2, sigma=0.3, per_class=2, shrinkage=0.4)
    x = F.normalize(torch.tensor([[2.0, 0.1], [1.0, 0.4], [0.2, 3.0], [0.5, 1.0]]), dim=-1)
    saved.add(x, torch.tensor([2, 2, 0, 0]), ["a", "a", "a", "a"])
    bank = ClassMeans(torch.tensor([0, 1, 2]), F.normalize(torch.randn(3, 2), dim=-1))
    out = with_stream_means(bank, saved.state_dict(), 0.4)
    learner = saved.class_means()
    assert out.labels.tolist() == [0, 1, 2]
    assert out.bias is not None
    assert learner.bias is not None
    assert torch.allclose(out.means[[0, 2]], learner.means)  # the learner's rows, as it reads them
    assert torch.allclose(out.bias[[0, 2]], learner.bias)
    assert saved.scatter is not None
    cov = saved.scatter.covariance()
    alone = discriminant(torch.tensor([1]), bank.means[1:2], cov, 0.4)  # the bank's class 1
    assert torch.allclose(out.means[1], alone.means[0])
    assert alone.bias is not None
    assert torch.allclose(out.bias[1], alone.bias)
    plain = with_stream_means(bank, saved.state_dict(), None)  # eval.covariance_shrinkage null
    assert plain.bias is None
    assert torch.allclose(plain.means[0], F.normalize(x[2:].mean(dim=0), dim=0))
