"""One contract suite for every VectorIndex implementation (FaissIndex, TorchIndex, MirrorIndex)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from memory_bank.exceptions import BankError
from memory_bank.index import (
    FaissIndex,
    MirrorIndex,
    TorchIndex,
    faiss_gpu_available,
    make_index,
)
from memory_bank.protocols import VectorIndex

DIM = 16

IndexFactory = Callable[[int], VectorIndex]


def _faiss(dim: int) -> VectorIndex:
    return FaissIndex(dim, use_gpu="auto")


def _torch(dim: int) -> VectorIndex:
    return TorchIndex(dim)


def _mirror(dim: int) -> VectorIndex:
    return MirrorIndex(dim)  # detached: the contract of a standalone index


@pytest.fixture(params=[_faiss, _torch, _mirror], ids=["faiss", "torch", "mirror"])
def factory(request: pytest.FixtureRequest) -> IndexFactory:
    factory: IndexFactory = request.param
    return factory


def unit_vectors(n: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_top1_of_a_stored_vector_is_itself(factory: IndexFactory) -> None:
    index = factory(DIM)
    vectors = unit_vectors(200, seed=1)
    index.rebuild(vectors)
    assert len(index) == 200
    scores, rows = index.search(vectors[:20], 1)
    assert rows[:, 0].tolist() == list(range(20))
    assert torch.allclose(scores[:, 0], torch.ones(20), atol=1e-5)


def test_results_are_sorted_typed_and_exact(factory: IndexFactory) -> None:
    index = factory(DIM)
    vectors = unit_vectors(300, seed=2)
    queries = unit_vectors(25, seed=3)
    index.rebuild(vectors)
    scores, rows = index.search(queries, 7)
    assert scores.shape == rows.shape == (25, 7)
    assert scores.dtype == torch.float32
    assert rows.dtype == torch.int64
    assert torch.all(scores[:, :-1] >= scores[:, 1:] - 1e-6)
    exact = (queries @ vectors.T).topk(7, dim=1)
    assert torch.equal(rows, exact.indices)
    assert torch.allclose(scores, exact.values, atol=1e-5)


def test_implementations_agree_on_top1() -> None:
    vectors, queries = unit_vectors(500, seed=4), unit_vectors(64, seed=5)
    results = []
    for index in (FaissIndex(DIM, use_gpu=False), TorchIndex(DIM)):
        index.rebuild(vectors)
        results.append(index.search(queries, 1)[1])
    assert torch.equal(results[0], results[1])


def test_k_larger_than_n_pads_with_minus_one(factory: IndexFactory) -> None:
    index = factory(DIM)
    index.rebuild(unit_vectors(3, seed=6))
    scores, rows = index.search(unit_vectors(2, seed=7), 5)
    assert rows.shape == (2, 5)
    assert torch.all(rows[:, :3] >= 0)
    assert rows[:, 3:].tolist() == [[-1, -1], [-1, -1]]
    assert torch.all(torch.isinf(scores[:, 3:]) & (scores[:, 3:] < 0))
    assert sorted(rows[0, :3].tolist()) == [0, 1, 2]


def test_empty_index(factory: IndexFactory) -> None:
    index = factory(DIM)
    assert len(index) == 0
    scores, rows = index.search(unit_vectors(4, seed=8), 3)
    assert rows.shape == scores.shape == (4, 3)
    assert torch.all(rows == -1)
    assert torch.all(scores == float("-inf"))
    index.rebuild(torch.empty(0, DIM))
    assert len(index) == 0
    assert torch.all(index.search(unit_vectors(1, seed=9), 2)[1] == -1)


def test_rebuild_replaces_and_copies(factory: IndexFactory) -> None:
    index = factory(DIM)
    first = unit_vectors(10, seed=10)
    index.rebuild(first)
    second = unit_vectors(4, seed=11)
    index.rebuild(second)
    assert len(index) == 4
    second.zero_()  # later writes to the source must not leak into the index
    _, rows = index.search(unit_vectors(4, seed=11), 1)
    assert rows[:, 0].tolist() == [0, 1, 2, 3]


def test_rejects_wrong_dimensions(factory: IndexFactory) -> None:
    index = factory(DIM)
    with pytest.raises(ValueError, match="vectors"):
        index.rebuild(torch.zeros(3, DIM + 1))
    with pytest.raises(ValueError, match="queries"):
        index.search(torch.zeros(3, DIM - 1), 1)


def test_attach_searches_the_mirror_in_place_or_ignores_it(factory: IndexFactory) -> None:
    index = factory(DIM)
    vectors, labels = torch.zeros(8, DIM), torch.full((8,), -1)
    occupied = [0]
    in_place = index.attach(vectors, labels, lambda: occupied[0])
    assert isinstance(in_place, bool)
    fresh = unit_vectors(3, seed=14)
    vectors[[1, 4, 6]] = fresh  # the bank writes its mirror in place
    labels[[1, 4, 6]] = 0
    occupied[0] = 3
    if in_place:
        assert len(index) == 3
        index.rebuild(unit_vectors(5, seed=15))  # a no-op: the mirror is the index
        scores, rows = index.search(fresh, 5)
        assert rows[:, 0].tolist() == [1, 4, 6]  # row = slot
        assert set(rows[rows >= 0].tolist()) == {1, 4, 6}  # empty slots never come back
        assert torch.all(rows[:, 3:] == -1)
        assert torch.all(torch.isinf(scores[:, 3:]))
    else:
        assert len(index) == 0  # the offered mirror is ignored
        index.rebuild(fresh)
        vectors.zero_()
        _, rows = index.search(fresh, 1)
        assert rows[:, 0].tolist() == [0, 1, 2]


def test_only_the_mirror_index_searches_in_place() -> None:
    vectors, labels = torch.zeros(4, DIM), torch.full((4,), -1)
    kinds = {"faiss": FaissIndex(DIM, use_gpu=False), "torch": TorchIndex(DIM)}
    kinds["mirror"] = MirrorIndex(DIM)
    attached = {name: index.attach(vectors, labels, lambda: 0) for name, index in kinds.items()}
    assert attached == {"faiss": False, "torch": False, "mirror": True}


def test_make_index() -> None:
    assert isinstance(make_index("torch", DIM, "cpu"), TorchIndex)
    faiss_index = make_index("faiss", DIM, "cpu", use_gpu="auto")
    assert isinstance(faiss_index, FaissIndex)
    assert not faiss_index.on_gpu  # a CPU learner keeps a CPU index even with faiss-gpu
    with pytest.raises(ValueError, match="unknown index kind"):
        make_index("annoy", DIM, "cpu")  # type: ignore[arg-type]


@pytest.mark.skipif(faiss_gpu_available(), reason="this FAISS build has a GPU")
def test_forcing_a_gpu_index_without_one_names_the_extra() -> None:
    with pytest.raises(BankError, match=r"supcon-stream\[gpu\]"):
        FaissIndex(DIM, use_gpu=True)


def test_missing_faiss_names_the_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_faiss(name: str, *args: object, **kwargs: object) -> object:
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(BankError, match=r"supcon-stream\[cpu\]"):
        FaissIndex(DIM)
    assert isinstance(make_index("torch", DIM, "cpu"), TorchIndex)  # torch needs no faiss


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_results_come_back_on_the_queries_device(factory: IndexFactory) -> None:
    index = factory(DIM)
    index.rebuild(unit_vectors(10, seed=12).cuda())
    scores, rows = index.search(unit_vectors(2, seed=13).cuda(), 3)
    assert scores.is_cuda
    assert rows.is_cuda
