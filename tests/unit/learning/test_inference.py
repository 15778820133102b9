"""NCM over class means where a class may own several rows (its means per task)."""

from __future__ import annotations

import pytest
import torch

from pipeline.learning.inference import ClassMeans, class_cosines, ncm_from_logits


def test_a_class_scores_its_nearest_row():
    means = ClassMeans(torch.tensor([2, 0, 2]), torch.eye(3))
    assert means.classes.tolist() == [0, 2]
    cosines = torch.tensor([[0.1, 0.5, 0.9], [0.7, 0.2, -0.4]])
    per_class = class_cosines(cosines, means)
    assert torch.allclose(per_class, torch.tensor([[0.5, 0.9], [0.2, 0.7]]))
    classes, conf = ncm_from_logits(per_class, means, 0.1)
    assert classes.tolist() == [2, 2]
    # the confidence is the softmax over the two classes, not over the three rows
    assert torch.allclose(conf, torch.softmax(per_class / 0.1, dim=1).max(dim=1).values)
    assert conf[0].item() == pytest.approx(1 / (1 + torch.exp(torch.tensor(-4.0)).item()))


def test_one_row_a_class_is_read_as_it_is_in_its_own_order():
    means = ClassMeans(torch.tensor([3, 1]), torch.eye(2))
    cosines = torch.tensor([[0.3, 0.8]])
    assert means.classes.tolist() == [3, 1]
    assert class_cosines(cosines, means) is cosines
    classes, _ = ncm_from_logits(cosines, means)
    assert classes.tolist() == [1]
