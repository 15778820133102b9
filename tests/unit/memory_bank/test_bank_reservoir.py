"""Class-balanced reservoir policy and the bank's write-through, with the in-memory store."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memory_bank.bank import AddResult, MemoryBank
from memory_bank.index import TorchIndex
from memory_bank.reservoir import ClassBalancedReservoir, class_balanced_subset, uniform_from_id
from memory_bank.testing import InMemoryBankStore

IN_DIM, EMB_DIM = 4, 8


def make_bank(store: InMemoryBankStore, capacity: int, seed: int = 0) -> MemoryBank:
    return MemoryBank(store, TorchIndex(EMB_DIM), capacity, IN_DIM, EMB_DIM, "cpu", seed=seed)


def offer(bank: MemoryBank, ids: list[str], labels: list[int]) -> AddResult:
    n = len(ids)
    gen = torch.Generator().manual_seed(hash(tuple(ids)) % 2**31)
    return bank.add(
        ids,
        torch.randn(n, IN_DIM, generator=gen),
        torch.tensor(labels, dtype=torch.int64),
        [f"class-{label}" for label in labels],
        torch.randn(n, EMB_DIM, generator=gen),
        [None] * n,
    )


def skewed_stream(n: int, seed: int = 0) -> list[int]:
    """Class 0 is 80% of the stream; classes 1-4 share the rest."""
    rng = random.Random(seed)
    return [0 if rng.random() < 0.8 else rng.randint(1, 4) for _ in range(n)]


def test_skewed_stream_is_balanced_in_the_bank() -> None:
    bank = make_bank(InMemoryBankStore(), capacity=100)
    labels = skewed_stream(4000)
    for start in range(0, len(labels), 50):
        chunk = labels[start : start + 50]
        offer(bank, [f"e{start + i}" for i in range(len(chunk))], chunk)
    counts = bank.class_counts()
    assert len(bank) == 100
    assert sorted(counts) == [0, 1, 2, 3, 4]
    # Each minority class saw ~200 events: enough to fill an equal share of 20.
    assert max(counts.values()) - min(counts.values()) <= 1
    assert bank.seen_counts()[0] == Counter(labels)[0]


def test_a_new_class_takes_slots_from_the_largest_class() -> None:
    bank = make_bank(InMemoryBankStore(), capacity=10)
    offer(bank, [f"a{i}" for i in range(10)], [0] * 10)
    result = offer(bank, [f"b{i}" for i in range(3)], [1] * 3)
    assert result == AddResult(added=3, evicted=3, duplicates=0, declined=0)
    assert bank.class_counts() == {0: 7, 1: 3}


def test_reservoir_within_a_full_class_accepts_about_m_over_n() -> None:
    bank = make_bank(InMemoryBankStore(), capacity=50)
    offer(bank, [f"warm{i}" for i in range(50)], [0] * 50)
    # Offers 51..1050 of class 0: expected accepts = sum 50/n ~= 50 * ln(1050/50) ~= 152.
    result = offer(bank, [f"e{i}" for i in range(1000)], [0] * 1000)
    assert result.added + result.declined == 1000
    assert 110 <= result.added <= 200
    assert result.evicted == result.added
    assert len(bank) == 50


@settings(max_examples=40, deadline=None)
@given(
    capacity=st.integers(min_value=1, max_value=30),
    batches=st.lists(
        st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=40),
        min_size=1,
        max_size=8,
    ),
)
def test_capacity_is_never_exceeded_and_store_matches_mirror(
    capacity: int, batches: list[list[int]]
) -> None:
    store = InMemoryBankStore()
    bank = make_bank(store, capacity)
    counter = 0
    for batch in batches:
        ids = [f"e{counter + i}" for i in range(len(batch))]
        counter += len(batch)
        result = offer(bank, ids, batch)
        assert result.added + result.declined + result.duplicates == len(batch)
        assert len(bank) <= capacity
        assert sum(bank.class_counts().values()) == len(bank)
    assert sorted(bank.ids()) == [item.id for item in store.load().items]
    assert store.load().seen_per_class == {
        f"class-{label}": count for label, count in bank.seen_counts().items()
    }


def test_adding_the_same_ids_twice_changes_nothing() -> None:
    store = InMemoryBankStore()
    bank = make_bank(store, capacity=20)
    ids = [f"e{i}" for i in range(60)]
    labels = skewed_stream(60, seed=3)
    offer(bank, ids, labels)
    before = (bank.ids(), bank.class_counts(), bank.seen_counts(), len(store.apply_calls))
    slots, features, stored_labels = bank.occupied()

    again = offer(bank, ids, labels)  # declined and evicted ids included

    assert again == AddResult(added=0, evicted=0, duplicates=60, declined=0)
    assert (bank.ids(), bank.class_counts(), bank.seen_counts()) == before[:3]
    assert len(store.apply_calls) == before[3]  # nothing to write through
    slots2, features2, labels2 = bank.occupied()
    assert torch.equal(slots, slots2)
    assert torch.equal(features, features2)
    assert torch.equal(stored_labels, labels2)


def test_duplicates_within_one_batch_count_once() -> None:
    bank = make_bank(InMemoryBankStore(), capacity=10)
    result = offer(bank, ["x", "x", "y"], [0, 0, 1])
    assert result == AddResult(added=2, evicted=0, duplicates=1, declined=0)
    assert bank.seen_counts() == {0: 1, 1: 1}


def test_one_store_apply_per_add_call() -> None:
    store = InMemoryBankStore()
    bank = make_bank(store, capacity=16)
    labels = skewed_stream(200, seed=1)
    for call, start in enumerate(range(0, 200, 25), start=1):
        offer(bank, [f"e{i}" for i in range(start, start + 25)], labels[start : start + 25])
        assert len(store.apply_calls) == call
    last = store.apply_calls[-1]
    assert sum(last.seen_increments.values()) == 25


def test_items_added_and_evicted_in_one_call_never_reach_the_store() -> None:
    store = InMemoryBankStore()
    bank = make_bank(store, capacity=2)
    # "a0" fills a slot, then class 1 arrives and must evict from the largest class (0).
    result = offer(bank, ["a0", "a1", "b0", "b1", "c0"], [0, 0, 1, 1, 2])
    assert result.added + result.declined == 5
    stored = {item.id for item in store.load().items}
    assert stored == set(bank.ids())
    call = store.apply_calls[-1]
    assert set(call.added_ids) == stored
    assert call.evicted_ids == ()  # nothing was stored before this call


def test_failed_write_through_leaves_the_bank_unchanged() -> None:
    store = InMemoryBankStore()
    bank = make_bank(store, capacity=8)
    offer(bank, [f"a{i}" for i in range(8)], [0] * 8)
    before = (bank.ids(), bank.class_counts(), bank.seen_counts())
    occupied_before = bank.occupied()

    store.fail_next_apply(ConnectionError("redis went away"))
    with pytest.raises(ConnectionError):
        offer(bank, [f"b{i}" for i in range(4)], [1] * 4)

    assert (bank.ids(), bank.class_counts(), bank.seen_counts()) == before
    for old, new in zip(occupied_before, bank.occupied(), strict=True):
        assert torch.equal(old, new)
    # The ids were not remembered as offered: a retry of the batch goes through.
    result = offer(bank, [f"b{i}" for i in range(4)], [1] * 4)
    assert result.added == 4
    assert bank.class_counts() == {0: 4, 1: 4}


def test_accept_draw_is_a_deterministic_function_of_the_id() -> None:
    draws = [uniform_from_id(f"e{i}") for i in range(2000)]
    assert draws == [uniform_from_id(f"e{i}") for i in range(2000)]
    assert all(0.0 <= u < 1.0 for u in draws)
    assert 0.45 < sum(draws) / len(draws) < 0.55
    assert uniform_from_id("e1", salt=1) != uniform_from_id("e1", salt=2)


def test_reservoir_rollback_restores_state_and_random_stream() -> None:
    reservoir = ClassBalancedReservoir(capacity=5, seed=7)
    reservoir.offer_batch([(f"a{i}", 0) for i in range(5)])
    state = (reservoir.ids(), reservoir.class_counts(), reservoir.seen_counts())
    plan = reservoir.offer_batch([(f"b{i}", 1) for i in range(3)])
    reservoir.rollback(plan)
    assert (reservoir.ids(), reservoir.class_counts(), reservoir.seen_counts()) == state
    again = reservoir.offer_batch([(f"b{i}", 1) for i in range(3)])
    assert again.placements == plan.placements  # same victims: the generator was rewound


def test_class_balanced_subset_evens_out_classes() -> None:
    labels = [0] * 50 + [1] * 30 + [2] * 5
    kept = class_balanced_subset(labels, 35, random.Random(0))
    counts = Counter(labels[i] for i in kept)
    assert len(kept) == 35
    assert counts[2] == 5
    assert abs(counts[0] - counts[1]) <= 1
    assert class_balanced_subset(labels, 100, random.Random(0)) == list(range(85))


def test_same_seed_same_bank() -> None:
    def run() -> list[str]:
        bank = make_bank(InMemoryBankStore(), capacity=30, seed=5)
        labels = skewed_stream(500, seed=9)
        for start in range(0, 500, 50):
            chunk = labels[start : start + 50]
            offer(bank, [f"e{start + i}" for i in range(50)], chunk)
        return sorted(bank.ids())

    assert run() == run()


def test_the_draw_seed_changes_the_replay_drawn_never_the_items_held() -> None:
    """Mirrors of one bank on the ranks of a group: one seed, a draw seed per rank."""

    def run(draw_seed: int | None) -> tuple[list[str], list[list[int]]]:
        bank = MemoryBank(
            InMemoryBankStore(),
            TorchIndex(EMB_DIM),
            30,
            IN_DIM,
            EMB_DIM,
            "cpu",
            seed=5,
            draw_seed=draw_seed,
        )
        labels = skewed_stream(500, seed=9)
        draws = []
        for start in range(0, 500, 50):
            offer(bank, [f"e{start + i}" for i in range(50)], labels[start : start + 50])
            draws.append(bank.sample(8).slots.tolist())
        return sorted(bank.ids()), draws

    same, other = run(None), run(6)
    assert run(5) == same  # the default draw seed is the seed
    assert other[0] == same[0]  # the same items held (evictions included)
    assert other[1] != same[1]  # drawn differently


def test_label_and_name_must_stay_consistent() -> None:
    bank = make_bank(InMemoryBankStore(), capacity=4)
    offer(bank, ["a"], [0])
    with pytest.raises(ValueError, match="class-0"):
        bank.add(
            ["b"],
            torch.zeros(1, IN_DIM),
            torch.tensor([1]),
            ["class-0"],
            torch.ones(1, EMB_DIM),
            [None],
        )


def test_rejects_misshaped_batches() -> None:
    bank = make_bank(InMemoryBankStore(), capacity=4)
    with pytest.raises(ValueError, match="features"):
        bank.add(["a"], torch.zeros(1, 3), torch.tensor([0]), ["c"], torch.ones(1, 8), [None])
    with pytest.raises(ValueError, match="label names"):
        bank.add(["a"], torch.zeros(1, 4), torch.tensor([0]), [], torch.ones(1, 8), [None])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=40), st.integers(40, 60))
def test_bulk_restore_equals_placing_one_by_one(labels: list[int], capacity: int) -> None:
    entries = [(f"id-{i}", label) for i, label in enumerate(labels)]
    bulk = ClassBalancedReservoir(capacity, seed=3)
    slots = bulk.restore(entries, {7: 9})
    # Offering into free slots places the same entries the same way, one at a time.
    one_by_one = ClassBalancedReservoir(capacity, seed=3)
    one_by_one.offer_batch(entries)
    one_by_one._seen = {7: 9}  # what restore() sets; offering counted the entries instead
    assert slots == list(range(len(entries)))
    for name in ("_slot_id", "_slot_label", "_pos", "_id_slot", "_class_slots", "_free"):
        assert getattr(bulk, name) == getattr(one_by_one, name), name
    assert (bulk._size_hist, bulk._max_count) == (one_by_one._size_hist, one_by_one._max_count)
    assert bulk.seen_counts() == {7: 9}
    # And it goes on the same way afterwards.
    more = [(f"more-{i}", i % 7) for i in range(2 * capacity)]
    assert bulk.offer_batch(more).evicted == one_by_one.offer_batch(more).evicted


def test_restore_refuses_repeated_ids_and_overflow() -> None:
    with pytest.raises(ValueError, match="twice"):
        ClassBalancedReservoir(4).restore([("a", 0), ("a", 1)], {})
    with pytest.raises(ValueError, match="capacity"):
        ClassBalancedReservoir(1).restore([("a", 0), ("b", 1)], {})
