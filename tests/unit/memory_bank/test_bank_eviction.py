"""Evictions that weigh embeddings (mean-preserving, stream-mean, adaptive): the rules, the
reservoir's use of a chooser, the bank's wiring."""

from __future__ import annotations

import itertools

import pytest
import torch

from memory_bank.bank import MemoryBank
from memory_bank.eviction import ADAPTIVE_ITEMS, mean_preserving_victim, target_victim
from memory_bank.index import TorchIndex
from memory_bank.reservoir import MAX_VICTIM_CANDIDATES, ClassBalancedReservoir
from memory_bank.testing import InMemoryBankStore
from pipeline.config import BankSettings

DIM = 2


def _least_shift(rows: torch.Tensor, joining: torch.Tensor | None) -> int:
    """Brute force: remove each row in turn, keep the removal that moves the mean least."""
    every = rows if joining is None else torch.cat([rows, joining[None]])
    shifts = [
        float((torch.cat([every[:v], every[v + 1 :]]).mean(dim=0) - every.mean(dim=0)).norm())
        for v in range(len(rows))
    ]
    return shifts.index(min(shifts))


def test_the_victim_is_the_row_whose_removal_moves_the_mean_least() -> None:
    rows = torch.tensor([[0.0, 0.0], [1.0, 0.0], [4.0, 0.0], [-2.0, 3.0]])
    assert mean_preserving_victim(rows, None) == _least_shift(rows, None) == 1
    # A newcomer joins the mean it is weighed against: far to the right, it pulls the mean
    # there, and (4, 0), now the row nearest the mean, is the one that leaves.
    joining = torch.tensor([20.0, 0.0])
    assert mean_preserving_victim(rows, joining) == _least_shift(rows, joining) == 2
    torch.manual_seed(0)
    for _ in range(20):
        rows, joining = torch.randn(7, 3), torch.randn(3)
        assert mean_preserving_victim(rows, joining) == _least_shift(rows, joining)


def test_the_reservoir_asks_the_chooser_for_both_kinds_of_victim_and_rolls_back() -> None:
    asked: list[tuple[list[int], str | None]] = []

    class Last:  # evicts the last candidate, whatever it is
        def weighs(self, class_items: int) -> bool:
            return True

        def __call__(self, slots, joining):
            asked.append((list(slots), joining))
            return len(slots) - 1

    reservoir = ClassBalancedReservoir(capacity=4, seed=3)
    reservoir.victim_chooser = Last()
    reservoir.offer_batch([(f"a{i}", 0) for i in range(4)])
    assert asked == []  # free slots: nobody is evicted
    # A new class takes a slot from the largest class: the chooser weighs class 0, no joiner.
    plan = reservoir.offer_batch([("b0", 1)])
    assert asked == [([0, 1, 2, 3], None)]
    assert reservoir.id_at(3) == "b0"  # the last candidate's slot now holds the newcomer
    reservoir.rollback(plan)
    assert reservoir.class_counts() == {0: 4}
    assert reservoir.id_at(3) == "a3"
    # Within a full class the newcomer joins the class it is weighed against.
    asked.clear()
    accepted = next(f"c{i}" for i in range(1000) if reservoir.offer_batch([(f"c{i}", 0)]).added)
    assert asked == [([0, 1, 2, 3], accepted)]


def test_a_large_class_is_weighed_on_evenly_spread_candidates() -> None:
    seen: list[list[int]] = []
    sizes: list[int] = []

    class First:
        def weighs(self, class_items: int) -> bool:
            sizes.append(class_items)
            return True

        def __call__(self, slots, _joining):
            seen.append(list(slots))
            return 0

    capacity = 3 * MAX_VICTIM_CANDIDATES + 10
    reservoir = ClassBalancedReservoir(capacity=capacity, seed=0)
    reservoir.victim_chooser = First()
    reservoir.offer_batch([(f"a{i}", 0) for i in range(capacity)])
    class_list = list(reservoir._class_slots[0])  # the order the candidates are spread over
    reservoir.offer_batch([("b", 1)])
    (candidates,) = seen
    assert sizes == [capacity]  # asked about the class's size, not only the sample's
    assert len(candidates) == len(set(candidates)) == MAX_VICTIM_CANDIDATES
    positions = [class_list.index(slot) for slot in candidates]
    step = capacity / MAX_VICTIM_CANDIDATES
    assert positions[0] < step  # the whole list is spanned, evenly
    assert positions[-1] >= capacity - step
    assert all(step - 1 <= b - a <= step + 1 for a, b in itertools.pairwise(positions))


def _bank(eviction: str, capacity: int, seed: int = 0, adaptive_items: int = 6) -> MemoryBank:
    return MemoryBank(
        InMemoryBankStore(),
        TorchIndex(DIM),
        capacity,
        1,
        DIM,
        "cpu",
        seed=seed,
        eviction=eviction,
        adaptive_items=adaptive_items,
    )


def _add(bank: MemoryBank, ids: list[str], labels: list[int], points: list[list[float]]) -> None:
    n = len(ids)
    bank.add(
        ids,
        torch.zeros(n, 1),
        torch.tensor(labels),
        [f"c{c}" for c in labels],
        torch.tensor(points),
        [None] * n,
    )


def test_the_bank_evicts_the_item_whose_removal_moves_its_class_mean_least() -> None:
    """Four unit vectors of class 0; a class-1 newcomer takes one of their slots. The random
    rule evicts one that depends on the seed; the mean-preserving one always the same."""
    angles = torch.tensor([0.0, 0.9, -0.6, 1.6])
    points = torch.stack([angles.cos(), angles.sin()], dim=1)
    expected = f"a{_least_shift(points, None)}"
    left_by_seed = set()
    for seed in range(6):
        bank = _bank("mean_preserving", capacity=4, seed=seed)
        _add(bank, ["a0", "a1", "a2", "a3"], [0] * 4, points.tolist())
        _add(bank, ["b0"], [1], [[0.0, -1.0]])
        assert set(bank.ids()) == {"a0", "a1", "a2", "a3", "b0"} - {expected}
        plain = _bank("random", capacity=4, seed=seed)
        _add(plain, ["a0", "a1", "a2", "a3"], [0] * 4, points.tolist())
        _add(plain, ["b0"], [1], [[0.0, -1.0]])
        left_by_seed |= {"a0", "a1", "a2", "a3", "b0"} - set(plain.ids())
    assert len(left_by_seed) > 1
    # Items placed earlier in the same batch are weighed with their own embeddings.
    bank = _bank("mean_preserving", capacity=3)
    batch = [[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]]
    _add(bank, ["a0", "a1", "a2", "b0"], [0, 0, 0, 1], batch)
    assert set(bank.ids()) == {"a0", "a1", "b0"}  # (0.7, 0.7) sits on the class's mean


def _nearest_target(rows: torch.Tensor, joining: torch.Tensor | None, target: torch.Tensor) -> int:
    """Brute force: remove each row in turn, keep the removal whose mean is nearest target."""
    every = rows if joining is None else torch.cat([rows, joining[None]])
    gaps = [
        float((torch.cat([every[:v], every[v + 1 :]]).mean(dim=0) - target).norm())
        for v in range(len(rows))
    ]
    return gaps.index(min(gaps))


def test_the_stream_mean_victim_leaves_the_kept_mean_nearest_the_target() -> None:
    # Two typical items near the class's stream mean and one outlier: the mean-preserving
    # rule evicts the most central item of the three (keeping the outlier); aiming at the
    # stream's mean, the outlier leaves.
    rows = torch.tensor([[1.0, 0.1], [1.0, -0.1], [-0.2, 1.0]])
    stream = torch.tensor([0.95, 0.0])
    assert mean_preserving_victim(rows, None) != 2
    assert target_victim(rows, None, stream) == _nearest_target(rows, None, stream) == 2
    torch.manual_seed(0)
    for _ in range(20):
        rows, joining, target = torch.randn(6, 3), torch.randn(3), torch.randn(3)
        assert target_victim(rows, joining, target) == _nearest_target(rows, joining, target)
        assert target_victim(rows, None, target) == _nearest_target(rows, None, target)


def test_the_bank_aims_stream_mean_eviction_at_the_target_it_is_given() -> None:
    """Class 0 holds two typical items and an outlier; a class-1 newcomer takes one slot.
    Without a target the rule is mean-preserving; with the class's stream mean, the outlier
    leaves; a class without a target (None) falls back to mean-preserving."""
    points = [[1.0, 0.1], [1.0, -0.1], [-0.2, 1.0]]
    expected_mp = f"a{mean_preserving_victim(torch.tensor(points), None)}"
    targets = {
        None: expected_mp,
        (lambda label: torch.tensor([0.95, 0.0]) if label == 0 else None): "a2",
        (lambda _label: None): expected_mp,
    }
    for target, leaves in targets.items():
        bank = _bank("stream_mean", capacity=3)
        bank.set_eviction_target(target)
        _add(bank, ["a0", "a1", "a2"], [0, 0, 0], points)
        _add(bank, ["b0"], [1], [[0.0, -1.0]])
        assert set(bank.ids()) == {"a0", "a1", "a2", "b0"} - {leaves}


def test_mean_preserving_eviction_needs_the_class_balanced_policy() -> None:
    with pytest.raises(ValueError, match="class_balanced"):
        MemoryBank(
            InMemoryBankStore(),
            TorchIndex(DIM),
            4,
            1,
            DIM,
            "cpu",
            policy="reservoir",
            eviction="mean_preserving",
        )
    with pytest.raises(ValueError, match="unknown eviction"):
        _bank("herding", capacity=4)
    with pytest.raises(ValueError, match="class_balanced"):
        BankSettings(policy="reservoir", eviction="mean_preserving")
    with pytest.raises(ValueError, match="class_balanced"):
        BankSettings(policy="reservoir", eviction="stream_mean")
    # The default (adaptive) is the class-balanced policy's; under the plain reservoir the
    # victim is any item, so the bank runs the random rule.
    assert BankSettings().eviction == "adaptive"
    assert BankSettings().victim_rule == "adaptive"
    assert BankSettings(policy="reservoir").victim_rule == "random"
    with pytest.raises(ValueError, match="class_balanced"):
        BankSettings(policy="reservoir", eviction="adaptive")
    with pytest.raises(ValueError, match="adaptive_items"):
        _bank("adaptive", capacity=4, adaptive_items=1)


def test_adaptive_eviction_aims_at_the_target_only_for_a_class_of_few_candidates() -> None:
    """Class 0 holds two typical items and an outlier, with its stream mean among the typical
    ones; a class-1 newcomer takes one of its slots, so the class has 3 candidates. Up to
    ``adaptive_items`` candidates the victim is stream_mean's (the outlier), above it
    mean_preserving's (the most central item); a class without a target is mean-preserving."""
    points = [[1.0, 0.1], [1.0, -0.1], [-0.2, 1.0]]
    expected_mp = f"a{mean_preserving_victim(torch.tensor(points), None)}"
    assert expected_mp != "a2"
    target = lambda label: torch.tensor([0.95, 0.0]) if label == 0 else None  # noqa: E731
    cases = [(3, target, "a2"), (2, target, expected_mp), (3, None, expected_mp)]
    for adaptive_items, aim, leaves in cases:
        bank = _bank("adaptive", capacity=3, adaptive_items=adaptive_items)
        bank.set_eviction_target(aim)
        _add(bank, ["a0", "a1", "a2"], [0, 0, 0], points)
        _add(bank, ["b0"], [1], [[0.0, -1.0]])
        assert set(bank.ids()) == {"a0", "a1", "a2", "b0"} - {leaves}, (adaptive_items, aim)
    assert BankSettings().adaptive_items == ADAPTIVE_ITEMS  # the bank's default is the product's


def test_adaptive_eviction_takes_a_random_victim_from_a_class_larger_than_it_weighs() -> None:
    """Above MAX_VICTIM_CANDIDATES items a class loses a random item under ``adaptive`` (the
    chooser names none, no embedding is read), which one depending on the seed; up to it the
    chooser decides, the same item for every seed; ``mean_preserving`` weighs any size."""

    def evicted(eviction: str, capacity: int, seed: int) -> set[str]:
        bank = _bank(eviction, capacity=capacity, seed=seed)
        ids = [f"a{i}" for i in range(capacity)]
        angles = torch.linspace(-1.0, 1.0, capacity)
        _add(bank, ids, [0] * capacity, torch.stack([angles.cos(), angles.sin()], 1).tolist())
        _add(bank, ["b0"], [1], [[0.0, -1.0]])
        return set(ids) - set(bank.ids())

    large = MAX_VICTIM_CANDIDATES + 1
    assert len({frozenset(evicted("adaptive", large, seed)) for seed in range(4)}) > 1
    assert len({frozenset(evicted("mean_preserving", large, seed)) for seed in range(4)}) == 1
    small = MAX_VICTIM_CANDIDATES
    assert len({frozenset(evicted("adaptive", small, seed)) for seed in range(4)}) == 1
