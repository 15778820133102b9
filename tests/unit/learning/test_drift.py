"""Semantic drift compensation of running class means: the arithmetic, and the learner's
stream class means over a real (in-memory) bank."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memory_bank.bank import MemoryBank
from memory_bank.index import TorchIndex
from memory_bank.testing import InMemoryBankStore
from pipeline.config import ModelSettings
from pipeline.learning.drift import DriftFollower, RunningClassMeans, drift_shift
from pipeline.learning.inference import class_means
from pipeline.learning.model import StreamNet
from pipeline.learning.stream_means import TASK_KEYS_PER_MEAN, StreamClassMeans, TaskClassMeans


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


def test_running_means_round_trip_their_state_and_refuse_another_shape():
    means = RunningClassMeans(max_classes=3, dim=2, sigma=0.3)
    means.add(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 2]))
    copy = RunningClassMeans(max_classes=3, dim=2, sigma=0.3)
    copy.load_state_dict(means.state_dict())
    assert copy.means.tolist() == means.means.tolist()
    assert copy.counts.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="do not fit"):
        RunningClassMeans(max_classes=4, dim=2, sigma=0.3).load_state_dict(means.state_dict())


INPUT = 4


def _bank(capacity: int) -> MemoryBank:
    return MemoryBank(InMemoryBankStore(), TorchIndex(8), capacity, INPUT, 8, "cpu", seed=0)


def _offer(
    bank: MemoryBank,
    model: StreamNet,
    start: int,
    labels: list[int],
    tasks: list[str | None] | None = None,
) -> torch.Tensor:
    x = torch.randn(len(labels), INPUT, generator=torch.Generator().manual_seed(start))
    ids = [f"e{start + i}" for i in range(len(labels))]
    with torch.no_grad():
        bank.add(
            ids,
            x,
            torch.tensor(labels),
            [f"c{c}" for c in labels],
            model.embed(x),
            tasks if tasks is not None else [None] * len(labels),
        )
    return x


def _model(seed: int) -> StreamNet:
    torch.manual_seed(seed)
    return StreamNet(
        ModelSettings(input_dim=INPUT, hidden_dim=16, embed_dim=8, proj_dim=8, max_classes=3)
    )


def _embed(model: StreamNet, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model.embed(x), dim=-1)


def test_stream_means_measure_the_drift_on_the_first_slots_only_and_take_in_the_batch():
    model = _model(0)
    bank = _bank(capacity=6)
    means = StreamClassMeans(max_classes=3, dim=8, sigma=None, probe_items=2)
    x0 = _offer(bank, model, 0, [0, 0, 1, 1])
    means.follow(model, bank, x0, torch.tensor([0, 0, 1, 1]))
    first = _embed(model, x0)
    assert means.means().labels.tolist() == [0, 1]
    assert torch.allclose(
        means.running.means[:2], torch.stack([first[:2].mean(0), first[2:].mean(0)])
    )
    # Only the items of slots 0 and 1 (both class 0) are re-encoded as the drift's probe.
    assert list(means.follower.previous_state()["ids"]) == ["e0", "e1"]

    moved = _model(1)  # "the encoder after the next micro-batch"
    x1 = _offer(bank, moved, 10, [1])
    means.follow(moved, bank, x1, torch.tensor([1]))
    drift = (_embed(moved, x0[:2]) - first[:2]).mean(0)  # class-restricted: class 0's items
    assert torch.allclose(means.running.means[0], first[:2].mean(0) + drift, atol=1e-6)
    # class 1 has no probe item: it does not move, and takes in the new event
    expected_1 = (first[2:].sum(0) + _embed(moved, x1)[0]) / 3
    assert torch.allclose(means.running.means[1], expected_1, atol=1e-6)
    assert means.running.counts.tolist() == [2, 3, 0]


def test_stream_means_resume_from_their_state_as_if_never_stopped():
    model, moved = _model(0), _model(1)
    bank = _bank(capacity=8)
    x0 = _offer(bank, model, 0, [0, 1, 2, 0])
    y0 = torch.tensor([0, 1, 2, 0])
    kept = StreamClassMeans(max_classes=3, dim=8, sigma=0.3)
    kept.follow(model, bank, x0, y0)
    resumed = StreamClassMeans(max_classes=3, dim=8, sigma=0.3)
    resumed.load_state_dict(kept.state_dict())
    x1 = _offer(bank, moved, 10, [2, 1])
    for means in (kept, resumed):
        means.follow(moved, bank, x1, torch.tensor([2, 1]))
    assert torch.equal(kept.means().means, resumed.means().means)
    assert torch.equal(kept.means().labels, resumed.means().labels)


def test_stream_means_seeded_from_the_bank_are_its_class_means():
    model = _model(0)
    bank = _bank(capacity=8)
    x = _offer(bank, model, 0, [0, 1, 1, 2])
    means = StreamClassMeans(max_classes=3, dim=8, sigma=0.3)
    means.seed(model, bank)
    seeded = means.means()
    bank_means = class_means(model, x, torch.tensor([0, 1, 1, 2]))
    assert seeded.labels.tolist() == bank_means.labels.tolist() == [0, 1, 2]
    assert torch.allclose(seeded.means, bank_means.means, atol=1e-6)


def test_stream_means_seeded_from_the_bank_keep_its_items_tasks_apart():
    model = _model(0)
    bank = _bank(capacity=8)
    x = _offer(bank, model, 0, [0, 0, 0, 1], ["a", "b", "a", "b"])
    means = StreamClassMeans(max_classes=3, dim=8, sigma=0.3, per_class=2)
    means.seed(model, bank)
    seeded = means.means()
    assert seeded.labels.tolist() == [0, 0, 1]
    e = _embed(model, x)
    assert torch.allclose(seeded.means[0], F.normalize(e[[0, 2]].mean(0), dim=0), atol=1e-6)
    assert torch.allclose(seeded.means[1], e[1], atol=1e-6)


def test_task_means_of_one_task_a_class_are_the_running_means_exactly():
    torch.manual_seed(0)
    single = RunningClassMeans(max_classes=3, dim=4, sigma=0.3)
    per_task = TaskClassMeans(max_classes=3, dim=4, sigma=0.3, per_class=4)
    for _step in range(3):
        x = F.normalize(torch.randn(6, 4), dim=-1)
        y = torch.tensor([0, 1, 2, 0, 1, 2])
        before = F.normalize(torch.randn(5, 4), dim=-1)
        after = F.normalize(before + 0.1 * torch.randn(5, 4), dim=-1)
        for means in (single, per_task):
            means.compensate(before, after, torch.tensor([0, 0, 1, 2, 2]))
            # each class under its own task, as in a class-incremental stream
            means.add(x, y, [f"t{c}" for c in y.tolist()])
    labels, rows = per_task.seen()
    assert labels.tolist() == [0, 1, 2]
    assert torch.equal(rows, single.means)
    for c in range(3):
        assert torch.equal(per_task.mean_of(c), single.mean_of(c))


def test_a_class_back_under_a_new_task_gets_a_mean_of_its_own():
    means = TaskClassMeans(max_classes=2, dim=2, sigma=0.3, per_class=3)
    means.add(
        torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0, 1]), ["a"] * 3
    )
    means.add(torch.tensor([[0.0, 1.0]]), torch.tensor([0]), ["b"])
    read = means.class_means()
    assert read.labels.tolist() == [0, 0, 1]  # class 0 twice: its task a and task b means
    assert read.means.tolist() == [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    assert means.classes() == 2
    # the eviction's target is the class's mean over every event, whatever the task
    assert means.mean_of(0).tolist() == pytest.approx([2 / 3, 1 / 3])
    assert means.mean_of(1).tolist() == [0.0, 1.0]
    # events without a task keep one mean of their own
    means.add(torch.tensor([[1.0, 1.0]]), torch.tensor([1]))
    assert means.class_means().labels.tolist() == [0, 0, 1, 1]


def test_a_class_over_its_limit_merges_its_two_nearest_means_to_make_room():
    means = TaskClassMeans(max_classes=1, dim=3, sigma=0.3, per_class=3)
    events = {"a": [[1.0, 0.0, 0.0]] * 2, "b": [[0.0, 1.0, 0.0]], "c": [[0.8, 0.6, 0.0]]}
    for task, rows in events.items():
        means.add(torch.tensor(rows), torch.zeros(len(rows), dtype=torch.long), [task] * len(rows))
    means.add(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([0]), ["d"])
    # a (2 events) and c were nearest (cosine 0.8 against b's 0.6 to c and 0 to a): merged
    assert means.counts.tolist() == [3, 1, 1]
    assert means.means[0].tolist() == pytest.approx([(2 * 1.0 + 0.8) / 3, 0.6 / 3, 0.0])
    assert means.means[2].tolist() == [0.0, 0.0, 1.0]  # task d in the freed row
    # task c's events now join the merged mean
    means.add(torch.tensor([[0.8, 0.6, 0.0]]), torch.tensor([0]), ["c"])
    assert means.counts.tolist() == [4, 1, 1]
    assert len(means.class_means()) == 3


def test_class_restricted_drift_moves_every_mean_of_the_class_by_its_items():
    means = TaskClassMeans(max_classes=2, dim=2, sigma=None, per_class=2)
    means.add(
        torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([0, 0, 1]), ["a", "b", "a"]
    )
    before = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    after = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    means.compensate(before, after, torch.tensor([0, 1]))
    _, rows = means.seen()
    # both of class 0's means move by its item's drift (0, 2); class 1's item did not move
    assert rows.tolist() == [[1.0, 2.0], [0.0, 3.0], [1.0, 1.0]]


def test_task_means_round_trip_and_read_a_state_of_one_mean_per_class():
    means = TaskClassMeans(max_classes=3, dim=2, sigma=0.3, per_class=2)
    means.add(
        torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]]),
        torch.tensor([0, 0, 2]),
        ["a", "b", None],
    )
    copy = TaskClassMeans(max_classes=3, dim=2, sigma=0.3, per_class=2)
    copy.load_state_dict(means.state_dict())
    assert torch.equal(copy.means, means.means)
    assert copy.keys == means.keys
    copy.add(torch.tensor([[0.0, 1.0]]), torch.tensor([0]), ["b"])
    assert copy.counts.tolist() == [1, 2, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="do not fit"):
        TaskClassMeans(max_classes=3, dim=2, sigma=0.3, per_class=3).load_state_dict(
            means.state_dict()
        )
    # a checkpoint of one mean per class (before means were kept per task)
    old = RunningClassMeans(max_classes=3, dim=2, sigma=0.3)
    old.add(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 2]))
    upgraded = TaskClassMeans(max_classes=3, dim=2, sigma=0.3, per_class=2)
    upgraded.load_state_dict(old.state_dict())
    assert upgraded.class_means().labels.tolist() == [0, 2]
    assert upgraded.mean_of(2).tolist() == [0.0, 2.0]
    upgraded.add(torch.tensor([[0.0, 4.0]]), torch.tensor([2]))  # unnamed: joins it
    assert upgraded.mean_of(2).tolist() == [0.0, 3.0]


def test_stream_means_keep_a_mean_per_class_and_task():
    model = _model(0)
    bank = _bank(capacity=8)
    means = StreamClassMeans(max_classes=3, dim=8, sigma=0.3, per_class=4)
    x = _offer(bank, model, 0, [0, 0, 1, 0])
    means.follow(model, bank, x, torch.tensor([0, 0, 1, 0]), ["d0", "d0", "d0", "d1"])
    read = means.means()
    assert read.labels.tolist() == [0, 0, 1]
    assert len(means) == 2
    e = _embed(model, x)
    assert torch.allclose(read.means[0], F.normalize(e[:2].mean(0), dim=0), atol=1e-6)
    assert torch.allclose(read.means[1], e[3], atol=1e-6)


def test_one_mean_a_class_takes_every_task_into_it():
    single = RunningClassMeans(max_classes=2, dim=2, sigma=0.3)
    per_class_1 = TaskClassMeans(max_classes=2, dim=2, sigma=0.3, per_class=1)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    for means in (single, per_class_1):
        means.add(x, y, ["a", "b", "c"])
        means.add(x, y, ["d", "a", None])
    assert torch.equal(per_class_1.means, single.means)
    assert per_class_1.counts.tolist() == [4, 2]


def test_new_tasks_in_one_batch_each_get_a_row_and_a_merge_keeps_earlier_events_in_place():
    means = TaskClassMeans(max_classes=1, dim=2, sigma=0.3, per_class=2)
    batch = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    means.add(batch, torch.tensor([0, 0]), ["a", "b"])
    assert means.counts.tolist() == [1, 1]  # two rows, not both tasks in one
    # a batch with old task a, then new task c: the block is full, a and b merge, c gets the
    # freed row, and a's event of this batch joins the merged row, not c's
    means.add(torch.tensor([[1.0, 0.0], [0.0, -1.0]]), torch.tensor([0, 0]), ["a", "c"])
    assert means.counts.tolist() == [3, 1]
    assert means.means[1].tolist() == [0.0, -1.0]
    assert means.means[0].tolist() == pytest.approx([2 / 3, 1 / 3])


def test_a_class_remembers_a_bounded_number_of_task_names():
    means = TaskClassMeans(max_classes=1, dim=2, sigma=0.3, per_class=2)
    for day in range(50):  # a task per day
        means.add(torch.tensor([[1.0, float(day % 3)]]), torch.tensor([0]), [f"day{day}"])
    assert len(means.keys) == TASK_KEYS_PER_MEAN * 2
    assert int(means.counts.sum()) == 50
    assert (0, "day49") in means.keys
    assert (0, "day0") not in means.keys


def test_a_batch_naming_more_new_tasks_than_a_class_remembers_loses_no_event():
    means = TaskClassMeans(max_classes=1, dim=2, sigma=0.3, per_class=1)
    n = TASK_KEYS_PER_MEAN + 2  # task names the class cannot all remember
    x = torch.tensor([[1.0, float(i)] for i in range(n)])
    means.add(x, torch.zeros(n, dtype=torch.long), [f"t{i}" for i in range(n)])
    assert means.counts.tolist() == [n]
    assert means.means[0].tolist() == pytest.approx(x.mean(dim=0).tolist())
    assert len(means.keys) == TASK_KEYS_PER_MEAN
