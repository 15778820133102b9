"""What bounds the per-step cost of a large bank: in-place mirror search, the hard-negative
search interval, host-side replay draws, and the automatic defaults behind them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from memory_bank.bank import MemoryBank
from memory_bank.index import MirrorIndex, TorchIndex, make_index
from memory_bank.reservoir import ClassBalancedReservoir
from memory_bank.testing import InMemoryBankStore
from pipeline.config import BankSettings
from pipeline.learning.tuning import default_torch_threads

IN_DIM, EMB_DIM = 4, 8


class CountingIndex(TorchIndex):
    """A TorchIndex that counts its searches and rebuilds."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.searches = 0
        self.rebuilds = 0

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.searches += 1
        return super().search(queries, k)

    def rebuild(self, vectors: torch.Tensor) -> None:
        self.rebuilds += 1
        super().rebuild(vectors)


def add(bank: MemoryBank, labels: list[int], centers: torch.Tensor, prefix: str) -> None:
    n = len(labels)
    y = torch.tensor(labels)
    emb = centers[y] + 0.01 * torch.randn(n, EMB_DIM, generator=torch.Generator().manual_seed(n))
    bank.add(
        [f"{prefix}{i}" for i in range(n)],
        torch.zeros(n, IN_DIM),
        y,
        [f"c{c}" for c in labels],
        emb,
        [None] * n,
    )


def test_mirror_index_searches_the_bank_in_place() -> None:
    centers = torch.eye(EMB_DIM)
    bank = MemoryBank(
        InMemoryBankStore(), make_index("mirror", EMB_DIM, "cpu"), 50, IN_DIM, EMB_DIM, "cpu"
    )
    add(bank, [0] * 5 + [1] * 5, centers, "a")
    # No refresh_index(), no step(): the in-place index already sees the adds.
    labels, _ = bank.knn_predict(centers[:2], k=3)
    assert labels.tolist() == [0, 1]
    negatives = bank.hard_negatives(centers[0].repeat(2, 1), torch.zeros(2, dtype=torch.int64), 20)
    # Only the five class-1 items: empty slots (zero vectors, score 0) are never returned.
    assert negatives.numel() == 5
    assert set(bank.gather(negatives)[1].tolist()) == {1}


class WrappedMirror:
    """A VectorIndex that searches in place through the protocol alone (no MirrorIndex type)."""

    def __init__(self, dim: int) -> None:
        self._inner = MirrorIndex(dim)
        self.rebuilds = 0

    def attach(self, vectors: torch.Tensor, labels: torch.Tensor, count: Callable[[], int]) -> bool:
        return self._inner.attach(vectors, labels, count)

    def rebuild(self, vectors: torch.Tensor) -> None:
        self.rebuilds += 1
        self._inner.rebuild(vectors)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._inner.search(queries, k)

    def __len__(self) -> int:
        return len(self._inner)


def test_bank_searches_in_place_any_index_whose_attach_says_so() -> None:
    centers = torch.eye(EMB_DIM)
    index = WrappedMirror(EMB_DIM)
    bank = MemoryBank(InMemoryBankStore(), index, 50, IN_DIM, EMB_DIM, "cpu")
    add(bank, [0] * 5 + [1] * 5, centers, "a")
    assert len(index) == 10  # sees the adds without a rebuild
    labels, _ = bank.knn_predict(centers[:2], k=3)
    assert labels.tolist() == [0, 1]
    for _ in range(bank.index_refresh_steps):
        bank.step()
    bank.refresh_index()
    assert index.rebuilds == 0
    negatives = bank.hard_negatives(centers[0].repeat(2, 1), torch.zeros(2, dtype=torch.int64), 20)
    assert set(bank.gather(negatives)[1].tolist()) == {1}


def test_bank_rebuilds_an_index_that_keeps_a_copy() -> None:
    centers = torch.eye(EMB_DIM)
    index = CountingIndex(EMB_DIM)
    bank = MemoryBank(InMemoryBankStore(), index, 50, IN_DIM, EMB_DIM, "cpu")
    add(bank, [0] * 5 + [1] * 5, centers, "a")
    assert len(index) == 0  # attach declined: nothing until a rebuild
    bank.refresh_index()
    assert (index.rebuilds, len(index)) == (1, 10)


def test_mirror_index_detached_copies_like_torch_index() -> None:
    index = MirrorIndex(EMB_DIM)
    vectors = F.normalize(torch.randn(10, EMB_DIM), dim=1)
    index.rebuild(vectors)
    vectors.zero_()  # later writes do not reach a detached index
    assert not index.attached
    assert len(index) == 10
    assert torch.all(index.search(F.normalize(torch.ones(1, EMB_DIM), dim=1), 3)[1] >= 0)


def test_hard_negatives_search_only_every_n_calls_and_reuse_candidates() -> None:
    centers = torch.eye(EMB_DIM)
    index = CountingIndex(EMB_DIM)
    bank = MemoryBank(InMemoryBankStore(), index, 60, IN_DIM, EMB_DIM, "cpu", hard_negative_every=3)
    add(bank, [0] * 10 + [1] * 10 + [2] * 10, centers, "a")
    bank.refresh_index()
    q0, y0 = centers[0].repeat(4, 1), torch.zeros(4, dtype=torch.int64)
    first = bank.hard_negatives(q0, y0, 5)
    assert index.searches == 1
    assert first.numel() == 5
    # Cached calls: same candidates for a batch of the same class, none searched.
    assert torch.equal(bank.hard_negatives(q0, y0, 5), first)
    excluded = first[:2]
    again = bank.hard_negatives(q0, y0, 5, exclude_slots=excluded)
    assert not set(again.tolist()) & set(excluded.tolist())
    assert index.searches == 1
    # The next call searches again; a batch of class 2 gets nothing from class-0 candidates.
    bank.hard_negatives(q0, y0, 5)
    assert index.searches == 2
    assert bank.hard_negatives(q0, torch.full((4,), 2), 5).numel() == 0


def test_index_rebuild_is_lazy() -> None:
    index = CountingIndex(EMB_DIM)
    bank = MemoryBank(InMemoryBankStore(), index, 20, IN_DIM, EMB_DIM, "cpu", index_refresh_steps=2)
    add(bank, [0, 1, 1], torch.eye(EMB_DIM), "a")
    for _ in range(6):
        bank.step()
    assert index.rebuilds == 0  # due, but nothing searched yet
    bank.hard_negatives(torch.eye(EMB_DIM)[:1], torch.zeros(1, dtype=torch.int64), 2)
    assert index.rebuilds == 1


def test_host_draw_is_class_balanced_and_distinct() -> None:
    bank = MemoryBank(
        InMemoryBankStore(), make_index("mirror", EMB_DIM, "cpu"), 2000, IN_DIM, EMB_DIM, "cpu"
    )
    add(bank, [0] * 1600 + [1] * 200 + [2] * 200, torch.eye(EMB_DIM), "a")
    drawn: Counter[int] = Counter()
    for _ in range(300):
        replay = bank.sample(12)  # smallest class 200 >= 8 x 12: drawn on the host
        assert len(set(replay.slots.tolist())) == 12
        drawn.update(replay.labels.tolist())
    total = sum(drawn.values())
    for label in (0, 1, 2):
        assert abs(drawn[label] / total - 1 / 3) < 0.05, drawn


def test_reservoir_draw_balanced_gives_up_when_a_class_runs_short() -> None:
    import random

    reservoir = ClassBalancedReservoir(10)
    reservoir.restore([("a", 0), ("b", 1)], {0: 1, 1: 1})
    assert reservoir.draw_balanced(8, random.Random(0)) is None
    slots = reservoir.draw_balanced(1, random.Random(0))
    assert slots is not None
    assert len(slots) == 1


@pytest.mark.parametrize(
    ("capacity", "queries", "expected"), [(200, 32, 1), (2000, 32, 4), (100_000, 32, 196)]
)
def test_automatic_search_interval(capacity: int, queries: int, expected: int) -> None:
    settings = BankSettings(capacity=capacity, hard_negative_queries=queries)
    assert settings.hard_negative_interval == expected
    assert BankSettings(capacity=capacity, hard_negative_every=7).hard_negative_interval == 7


def test_auto_index_and_torch_threads_on_cpu() -> None:
    assert isinstance(make_index("auto", EMB_DIM, "cpu"), MirrorIndex)
    assert default_torch_threads(torch.device("cuda")) is None
    threads = default_torch_threads(torch.device("cpu"))
    assert threads is not None
    assert threads >= 1


def test_cached_candidates_of_a_class_new_to_the_bank() -> None:
    centers = torch.eye(EMB_DIM)
    bank = MemoryBank(
        InMemoryBankStore(),
        make_index("mirror", EMB_DIM, "cpu"),
        40,
        IN_DIM,
        EMB_DIM,
        "cpu",
        hard_negative_every=5,
    )
    add(bank, [0] * 5 + [1] * 5, centers, "a")
    # Queries of class 7, which the bank has never stored: their candidates are cached too.
    q7, y7 = centers[1].repeat(3, 1), torch.full((3,), 7)
    first = bank.hard_negatives(q7, y7, 4)
    assert first.numel() == 4
    assert torch.equal(bank.hard_negatives(q7, y7, 4), first)
    assert bank.hard_negatives(q7, torch.full((3,), 9), 4).numel() == 0


def test_unlabeled_queries_get_no_hard_negatives_and_mark_no_class() -> None:
    bank = MemoryBank(
        InMemoryBankStore(),
        make_index("mirror", 4, torch.device("cpu"), "never"),
        capacity=40,
        input_dim=4,
        embed_dim=4,
        device=torch.device("cpu"),
        hard_negative_queries=8,
        hard_negative_every=3,
    )
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    emb = torch.nn.functional.normalize(torch.randn(40, 4, generator=gen), dim=1)
    bank.add(
        [f"e{i}" for i in range(40)],
        torch.randn(40, 4, generator=gen),
        labels,
        [str(int(c)) for c in labels],
        emb,
        [None] * 40,
    )
    queries = emb[:4]
    unlabeled = torch.full((4,), -1, dtype=torch.long)
    for _ in range(3):  # one search, then two calls served from its cached candidates
        assert bank.hard_negatives(queries, unlabeled, 8).numel() == 0
    labeled = torch.zeros(4, dtype=torch.long)
    found = bank.hard_negatives(queries, labeled, 8)
    assert found.numel() > 0
    assert bool((bank.gather(found)[1] != 0).all())
