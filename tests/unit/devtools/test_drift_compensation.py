"""Semantic drift compensation of running class means (pure arithmetic, small tensors)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.devtools.bench.drift import DriftFollower, RunningClassMeans, drift_shift


def test_class_restricted_shift_is_the_mean_drift_of_the_class_items():
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    mean_labels = torch.tensor([0, 1, 2])
    before = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    after = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 0.0]])
    item_labels = torch.tensor([0, 0, 1])
    shift = drift_shift(means, mean_labels, before, after, item_labels, sigma=None)
    # class 0: mean of (0, 2) and (2, 0); class 1: (0, -1); class 2 has no item: no move
    assert shift.tolist() == [[1.0, 1.0], [0.0, -1.0], [0.0, 0.0]]


def test_gaussian_shift_weighs_items_by_their_distance_to_the_mean():
    means = torch.tensor([[0.0, 0.0]])
    before = torch.tensor([[0.3, 0.0], [0.0, 0.6]])  # squared distances 0.09 and 0.36
    after = before + torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sigma = 0.3
    w1, w2 = math.exp(-0.09 / (2 * sigma**2)), math.exp(-0.36 / (2 * sigma**2))
    shift = drift_shift(means, torch.tensor([0]), before, after, torch.tensor([1, 1]), sigma)
    # labels play no part: both items weigh in, the nearer more
    assert shift[0].tolist() == pytest.approx([w1 / (w1 + w2), w2 / (w1 + w2)], rel=1e-5)


def test_gaussian_shift_of_equally_distant_items_is_their_mean_drift_even_far_away():
    means = torch.tensor([[0.0, 0.0]])
    before = torch.tensor([[10.0, 0.0], [-10.0, 0.0]])  # exp(-100 / 0.18) underflows
    after = before + torch.tensor([[0.0, 2.0], [0.0, 4.0]])
    shift = drift_shift(means, torch.tensor([0]), before, after, torch.tensor([0, 0]), 0.3)
    assert shift[0].tolist() == pytest.approx([0.0, 3.0])


def test_no_items_no_shift():
    means = torch.ones(2, 3)
    empty = torch.zeros(0, 3)
    for sigma in (None, 0.3):
        shift = drift_shift(means, torch.tensor([0, 1]), empty, empty, torch.zeros(0), sigma)
        assert shift.tolist() == torch.zeros(2, 3).tolist()


def test_running_means_average_what_was_added_and_move_by_the_drift():
    means = RunningClassMeans(max_classes=3, dim=2, sigma=None)
    means.add(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    means.add(torch.tensor([[2.0, 2.0]]), torch.tensor([2]))
    labels, rows = means.seen()
    assert labels.tolist() == [0, 2]
    assert rows.tolist() == [[0.5, 0.5], [2.0, 2.0]]

    means.compensate(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, -1.0]]), torch.tensor([0]))
    assert means.seen()[1].tolist() == [[1.5, -0.5], [2.0, 2.0]]  # class 2 has no item
    means.add(torch.tensor([[0.0, 0.5]]), torch.tensor([0]))  # a third event of class 0
    assert means.seen()[1][0].tolist() == pytest.approx([1.0, -1 / 6])
    assert means.counts.tolist() == [3, 0, 1]


def test_stale_means_ignore_the_drift():
    means = RunningClassMeans(max_classes=1, dim=2, sigma=0.3, compensate=False)
    means.add(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    means.compensate(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0]))
    assert means.seen()[1].tolist() == [[1.0, 0.0]]


def test_follower_moves_means_by_the_items_seen_at_the_last_call_then_adds_the_new_events():
    follower = DriftFollower({"class": RunningClassMeans(max_classes=2, dim=2, sigma=None)})
    means = follower.means["class"]
    # first call: nothing to compare with, the event joins class 0
    follower.follow(
        ["a"],
        torch.tensor([[1.0, 0.0]]),
        torch.tensor([0]),
        torch.tensor([[1.0, 0.0]]),
        torch.tensor([0]),
    )
    assert means.seen()[1].tolist() == [[1.0, 0.0]]
    # "a" moved by (-0.25, 0.25); "b" is new to the memory: no drift measured on it yet. The
    # class 1 event joins after the move, as the encoder that embedded it is the new one.
    follower.follow(
        ["a", "b"],
        torch.tensor([[0.75, 0.25], [5.0, 5.0]]),
        torch.tensor([0, 0]),
        torch.tensor([[0.0, 1.0]]),
        torch.tensor([1]),
    )
    assert means.seen()[1].tolist() == [[0.75, 0.25], [0.0, 1.0]]
    # "a" left the memory; "b" moved by (-1, 0) since the last call. Class 1 has no item.
    follower.follow(
        ["b"],
        torch.tensor([[4.0, 5.0]]),
        torch.tensor([0]),
        torch.zeros(0, 2),
        torch.zeros(0, dtype=torch.long),
    )
    assert means.seen()[1].tolist() == [[-0.25, 0.25], [0.0, 1.0]]
    assert means.counts.tolist() == [1, 1]
