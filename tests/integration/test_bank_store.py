"""One contract suite for every BankStore: the in-memory test store and RedisBankStore.

The Redis cases talk to the real redis-server the session fixture starts; the in-memory
cases need nothing and run in the unit tier too.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from memory_bank.bank import MemoryBank
from memory_bank.index import TorchIndex
from memory_bank.protocols import BankStore, StoredItem
from memory_bank.redis_store import RedisBankStore
from memory_bank.testing import InMemoryBankStore

IN_DIM, EMB_DIM = 4, 8


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest) -> Iterator[BankStore]:
    if request.param == "memory":
        yield InMemoryBankStore()
        return
    client = request.getfixturevalue("redis_client")
    unique = request.getfixturevalue("unique")
    redis_store = RedisBankStore(client, f"test-{unique}", "contract", IN_DIM, EMB_DIM)
    yield redis_store
    redis_store.clear()


def item(event_id: str, label: str = "cat", task: str | None = None, seed: int = 0) -> StoredItem:
    rng = np.random.default_rng(seed)
    embedding = rng.standard_normal(EMB_DIM).astype(np.float32)
    return StoredItem(
        id=event_id,
        features=rng.standard_normal(IN_DIM).astype(np.float32),
        embedding=embedding / np.linalg.norm(embedding),
        label=label,
        task=task,
    )


def by_id(store: BankStore) -> dict[str, StoredItem]:
    return {stored.id: stored for stored in store.load().items}


def assert_same(a: StoredItem, b: StoredItem) -> None:
    assert (a.id, a.label, a.task) == (b.id, b.label, b.task)
    assert np.array_equal(a.features, b.features)
    assert np.array_equal(a.embedding, b.embedding)
    assert np.asarray(b.features).dtype == np.float32


def test_empty_store_loads_empty(store: BankStore) -> None:
    snapshot = store.load()
    assert snapshot.items == ()
    assert dict(snapshot.seen_per_class) == {}


def test_round_trip(store: BankStore) -> None:
    items = [item("a", "cat", None, 1), item("b", "dog", "task-1", 2), item("ü/ß 3", "cat", "t", 3)]
    store.apply(items, [], {"cat": 5, "dog": 2})
    loaded = by_id(store)
    assert sorted(loaded) == sorted(i.id for i in items)
    for original in items:
        assert_same(original, loaded[original.id])
    assert dict(store.load().seen_per_class) == {"cat": 5, "dog": 2}


def test_apply_removes_then_adds_and_counts(store: BankStore) -> None:
    store.apply([item("a"), item("b"), item("c")], [], {"cat": 3})
    store.apply([item("d", seed=4), item("b", seed=9)], ["a", "b", "missing"], {"cat": 2, "dog": 0})
    loaded = by_id(store)
    assert sorted(loaded) == ["b", "c", "d"]
    assert_same(item("b", seed=9), loaded["b"])  # in both lists: removed, then added
    assert dict(store.load().seen_per_class) == {"cat": 5}


def test_apply_keeps_its_own_copy(store: BankStore) -> None:
    original = item("a")
    store.apply([original], [], {})
    original.features[:] = 0.0
    assert not np.array_equal(by_id(store)["a"].features, original.features)


def test_write_embeddings_skips_ids_no_longer_stored(store: BankStore) -> None:
    store.apply([item("a"), item("b")], [], {"cat": 2})
    store.apply([], ["b"], {})
    fresh = np.stack([np.full(EMB_DIM, 0.5, np.float32), np.full(EMB_DIM, -0.5, np.float32)])
    store.write_embeddings(["a", "b"], fresh)
    loaded = by_id(store)
    assert sorted(loaded) == ["a"]  # "b" was not resurrected
    assert np.array_equal(loaded["a"].embedding, fresh[0])
    with pytest.raises(ValueError, match="ids"):
        store.write_embeddings(["a"], fresh)


def test_clear(store: BankStore) -> None:
    store.apply([item("a")], [], {"cat": 1})
    store.clear()
    assert store.load().items == ()
    assert dict(store.load().seen_per_class) == {}
    store.apply([item("b")], [], {"dog": 1})  # usable after a clear
    assert sorted(by_id(store)) == ["b"]


def test_large_batches_cross_every_chunk_boundary(store: BankStore) -> None:
    # More ids than one Lua unpack chunk, one HSCAN step and one write_embeddings call.
    n = 6_200
    rng = np.random.default_rng(0)
    features = rng.standard_normal((n, IN_DIM)).astype(np.float32)
    embeddings = rng.standard_normal((n, EMB_DIM)).astype(np.float32)
    items = [StoredItem(f"e{i}", features[i], embeddings[i], f"c{i % 7}", None) for i in range(n)]
    store.apply(items, [], {"c0": n})
    store.apply([], [f"e{i}" for i in range(0, n, 2)], {})
    kept = list(range(1, n, 2))
    store.write_embeddings([f"e{i}" for i in range(n)], -embeddings)
    loaded = by_id(store)
    assert sorted(loaded) == sorted(f"e{i}" for i in kept)
    for i in kept[::97]:
        assert np.array_equal(loaded[f"e{i}"].features, features[i])
        assert np.array_equal(loaded[f"e{i}"].embedding, -embeddings[i])


@pytest.mark.parametrize("eviction", ["random", "mean_preserving", "adaptive"])
def test_bank_over_store_survives_a_restart(store: BankStore, eviction: str) -> None:
    """What one bank wrote, a bank opened later on the same store sees, byte for byte, and
    goes on writing through (any victim rule)."""
    first = MemoryBank(
        store, TorchIndex(EMB_DIM), 30, IN_DIM, EMB_DIM, "cpu", seed=1, eviction=eviction
    )
    gen = torch.Generator().manual_seed(0)
    names = ["cat", "dog", "eel"]
    for step in range(6):
        labels = torch.randint(0, 3, (20,), generator=gen)
        first.add(
            [f"s{step}-{i}" for i in range(20)],
            torch.randn(20, IN_DIM, generator=gen),
            labels,
            [names[label] for label in labels.tolist()],
            torch.randn(20, EMB_DIM, generator=gen),
            [f"task-{step // 3}"] * 20,
        )
    replay = first.sample(10)
    first.update_embeddings(replay.slots, torch.randn(10, EMB_DIM, generator=gen), replay.versions)
    first.flush()

    second = MemoryBank.open(
        store,
        TorchIndex(EMB_DIM),
        30,
        IN_DIM,
        EMB_DIM,
        "cpu",
        names.index,
        seed=1,
        eviction=eviction,
    )
    assert sorted(second.ids()) == sorted(first.ids())
    assert second.seen_counts() == first.seen_counts()

    def rows(bank: MemoryBank) -> dict[str | None, tuple[list[float], int, list[float]]]:
        slots, features, labels = bank.occupied()
        embeddings = bank._mirror.embeddings[slots]
        return {
            event_id: (f.tolist(), label, e.tolist())
            for event_id, f, label, e in zip(
                bank.slot_ids(slots), features, labels.tolist(), embeddings, strict=True
            )
        }

    first_rows, second_rows = rows(first), rows(second)
    for event_id, (features, label, embedding) in first_rows.items():
        assert second_rows[event_id][0] == features
        assert second_rows[event_id][1] == label
        assert np.allclose(second_rows[event_id][2], embedding, atol=1e-6)

    # The reopened bank keeps writing through: after more batches (a fourth class growing in,
    # and the three full classes admitting their own), the store holds exactly its items.
    for step in range(6, 9):
        labels = torch.randint(0, 4, (20,), generator=gen)
        result = second.add(
            [f"s{step}-{i}" for i in range(20)],
            torch.randn(20, IN_DIM, generator=gen),
            labels,
            [[*names, "fox"][label] for label in labels.tolist()],
            torch.randn(20, EMB_DIM, generator=gen),
            [None] * 20,
        )
        assert result.evicted > 0
    assert sorted(by_id(store)) == sorted(second.ids())
    assert len(second) == 30
