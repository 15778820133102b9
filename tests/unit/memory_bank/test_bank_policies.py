"""Bank policies (class-balanced vs plain reservoir) and replay sampling (class-balanced vs
random)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from memory_bank.bank import MemoryBank
from memory_bank.index import TorchIndex
from memory_bank.testing import InMemoryBankStore

IN_DIM, EMB_DIM = 4, 8


def _bank(policy: str, capacity: int = 100, seed: int = 0) -> MemoryBank:
    return MemoryBank(
        InMemoryBankStore(),
        TorchIndex(EMB_DIM),
        capacity,
        IN_DIM,
        EMB_DIM,
        "cpu",
        seed=seed,
        policy=policy,
    )


def _fill(bank: MemoryBank, labels: list[int]) -> None:
    for start in range(0, len(labels), 50):
        chunk = labels[start : start + 50]
        ids = [f"e{start + i}" for i in range(len(chunk))]
        bank.add(
            ids,
            torch.zeros(len(chunk), IN_DIM),
            torch.tensor(chunk),
            [f"c{c}" for c in chunk],
            torch.randn(len(chunk), EMB_DIM),
            [None] * len(chunk),
        )


def _skewed(n: int = 4000) -> list[int]:
    rng = random.Random(1)
    return [0 if rng.random() < 0.8 else 1 for _ in range(n)]


def test_reservoir_keeps_the_stream_proportions_and_class_balanced_evens_them() -> None:
    stream = _skewed()
    plain, balanced = _bank("reservoir"), _bank("class_balanced")
    _fill(plain, stream)
    _fill(balanced, stream)
    assert len(plain) == len(balanced) == 100
    assert 65 <= plain.class_counts()[0] <= 93  # ~80 expected; binomial sd ~4
    assert balanced.class_counts() == {0: 50, 1: 50}


def test_reservoir_accepts_about_capacity_over_n() -> None:
    bank = _bank("reservoir", capacity=50)
    _fill(bank, [0] * 50)
    before = set(bank.ids())
    _fill(bank, [0] * 450)  # items 51..500: expected kept ~ 50 · (1 − 50/500)
    survivors = len(before & set(bank.ids()))
    assert 0 < survivors < 15  # E = 50·(50/500) = 5


def test_reservoir_policy_writes_through_to_the_store() -> None:
    store = InMemoryBankStore()
    bank = MemoryBank(store, TorchIndex(EMB_DIM), 10, IN_DIM, EMB_DIM, "cpu", policy="reservoir")
    _fill(bank, list(range(5)) * 10)
    assert {item.id for item in store.load().items} == set(bank.ids())
    assert bank.policy == "reservoir"
    assert len(bank) == 10


def test_unknown_policy_and_sampling_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown bank policy"):
        _bank("fifo")
    with pytest.raises(ValueError, match="unknown replay sampling"):
        _bank("reservoir").sample(4, "hardest")


def test_random_sampling_follows_the_bank_and_class_balanced_evens_classes() -> None:
    bank = _bank("reservoir", capacity=100)
    _fill(bank, [0] * 90 + [1] * 10)
    assert bank.class_counts() == {0: 90, 1: 10}
    uniform, balanced = Counter(), Counter()
    for _ in range(200):
        uniform.update(bank.sample(10, "random").labels.tolist())
        balanced.update(bank.sample(10, "class_balanced").labels.tolist())
    assert uniform[1] / 2000 == pytest.approx(0.10, abs=0.03)
    assert balanced[1] / 2000 > 0.35  # class 1 (10 items) is drawn ~ half the time


def test_knn_answers_before_the_first_scheduled_index_refresh() -> None:
    bank = _bank("class_balanced", capacity=20)
    assert bank.knn_predict(torch.randn(2, EMB_DIM), k=3)[0].tolist() == [-1, -1]  # empty bank
    _fill(bank, [0] * 5 + [1] * 5)
    labels, confidence = bank.knn_predict(torch.randn(4, EMB_DIM), k=3)
    assert set(labels.tolist()) <= {0, 1}
    assert bool((confidence > 0).all())
