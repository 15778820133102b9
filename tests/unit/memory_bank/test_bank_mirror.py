"""Reads of the in-process mirror: replay, hard negatives, embeddings, class means, kNN, open."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from memory_bank.bank import MemoryBank
from memory_bank.index import TorchIndex, make_index
from memory_bank.testing import InMemoryBankStore

IN_DIM, EMB_DIM = 4, 8


def make_bank(
    store: InMemoryBankStore | None = None,
    capacity: int = 100,
    device: str = "cpu",
    **kwargs: int,
) -> MemoryBank:
    return MemoryBank(
        store if store is not None else InMemoryBankStore(),
        make_index("torch", EMB_DIM, device),
        capacity,
        IN_DIM,
        EMB_DIM,
        device,
        **kwargs,
    )


def fill(
    bank: MemoryBank,
    per_class: dict[int, int],
    centers: torch.Tensor | None = None,
    prefix: str = "e",
    noise: float = 0.05,
) -> None:
    """Add items per class; embeddings cluster around ``centers[label]`` when given."""
    labels = [label for label, count in per_class.items() for _ in range(count)]
    n = len(labels)
    gen = torch.Generator().manual_seed(n)
    label_tensor = torch.tensor(labels, dtype=torch.int64)
    if centers is None:
        embeddings = torch.randn(n, EMB_DIM, generator=gen)
    else:
        embeddings = centers[label_tensor] + noise * torch.randn(n, EMB_DIM, generator=gen)
    features = torch.arange(n * IN_DIM, dtype=torch.float32).reshape(n, IN_DIM)
    bank.add(
        [f"{prefix}{i}" for i in range(n)],
        features,
        label_tensor,
        [f"class-{label}" for label in labels],
        embeddings,
        ["task-a"] * n,
    )


def test_empty_bank_reads() -> None:
    bank = make_bank()
    replay = bank.sample(8)
    assert len(replay) == 0
    assert replay.features.shape == (0, IN_DIM)
    assert (
        bank.hard_negatives(torch.randn(3, EMB_DIM), torch.zeros(3, dtype=torch.int64), 4).numel()
        == 0
    )
    labels, confidence = bank.knn_predict(torch.randn(2, EMB_DIM), 3)
    assert labels.tolist() == [-1, -1]
    assert confidence.tolist() == [0.0, 0.0]
    classes, means = bank.class_means()
    assert classes.numel() == 0
    assert means.shape == (0, EMB_DIM)
    assert bank.flush() == 0


def test_sample_is_class_balanced_and_without_replacement() -> None:
    bank = make_bank(capacity=100)
    fill(bank, {0: 80, 1: 10, 2: 10})
    drawn: Counter[int] = Counter()
    for _ in range(200):
        replay = bank.sample(12)
        assert len(replay) == 12
        assert len(set(replay.slots.tolist())) == 12  # no slot twice in one draw
        drawn.update(replay.labels.tolist())
    total = sum(drawn.values())
    for label in (0, 1, 2):
        assert abs(drawn[label] / total - 1 / 3) < 0.05, drawn


def test_sample_returns_the_stored_rows() -> None:
    bank = make_bank(capacity=10)
    fill(bank, {0: 3, 1: 2})
    replay = bank.sample(100)  # more than stored: everything once
    assert len(replay) == 5
    slots, features, labels = bank.occupied()
    order = torch.argsort(replay.slots)
    assert torch.equal(replay.slots[order], slots)
    assert torch.equal(replay.features[order], features)
    assert torch.equal(replay.labels[order], labels)


def test_hard_negatives_are_nearest_items_of_other_classes() -> None:
    centers = torch.eye(EMB_DIM)[:3].clone()
    centers[1] = F.normalize(centers[0] + 0.8 * centers[1], dim=0)  # class 1 sits near class 0
    bank = make_bank(capacity=60)
    fill(bank, {0: 20, 1: 20, 2: 20}, centers=centers)
    bank.refresh_index()
    queries = centers[0].repeat(5, 1)
    negatives = bank.hard_negatives(queries, torch.zeros(5, dtype=torch.int64), k=10)
    assert negatives.numel() == 10
    assert len(set(negatives.tolist())) == 10
    _, _, labels = bank.occupied()
    label_of = dict(zip(bank.occupied()[0].tolist(), labels.tolist(), strict=True))
    assert {label_of[slot] for slot in negatives.tolist()} == {1}  # near class, never own
    features, gathered_labels, versions = bank.gather(negatives)
    assert features.shape == (10, IN_DIM)
    assert gathered_labels.tolist() == [1] * 10
    assert versions.shape == (10,)

    excluded = negatives[:4]
    again = bank.hard_negatives(queries, torch.zeros(5, dtype=torch.int64), 10, excluded)
    assert not set(again.tolist()) & set(excluded.tolist())


def test_hard_negatives_check_current_labels_and_bound_queries() -> None:
    bank = make_bank(capacity=6, hard_negative_queries=4)
    fill(bank, {0: 3, 1: 3})
    bank.refresh_index()
    fill(bank, {2: 2}, prefix="new")  # evicts from classes 0/1; the index is now stale
    queries = torch.randn(50, EMB_DIM)  # more than hard_negative_queries: subsampled
    negatives = bank.hard_negatives(queries, torch.full((50,), 2), k=6)
    slots, _, labels = bank.occupied()
    current = dict(zip(slots.tolist(), labels.tolist(), strict=True))
    assert negatives.numel() > 0
    assert all(current[slot] != 2 for slot in negatives.tolist())


def test_update_embeddings_skips_refilled_slots_and_flush_writes_once() -> None:
    store = InMemoryBankStore()
    bank = make_bank(store, capacity=4)
    fill(bank, {0: 4})
    replay = bank.sample(4)
    assert replay.versions is not None
    fill(bank, {1: 1}, prefix="late")  # refills one of the sampled slots
    late_embedding = store.load().items[-1].embedding.copy()

    fresh = torch.full((4, EMB_DIM), 2.0)
    bank.update_embeddings(replay.slots, fresh, replay.versions)
    assert bank.flush() == 3
    assert store.write_embedding_calls == 1
    assert bank.flush() == 0

    expected = F.normalize(fresh[:1], dim=1)[0].numpy()
    for item in store.load().items:
        if item.id.startswith("late"):
            assert (item.embedding == late_embedding).all()
        else:
            assert abs(item.embedding - expected).max() < 1e-6


def test_index_refreshes_every_n_steps() -> None:
    centers = torch.eye(EMB_DIM)[:2]
    query = centers[1:2]  # nearest to class 1 once class 1 is indexed
    bank = make_bank(capacity=10, index_refresh_steps=3)
    fill(bank, {0: 5}, centers=centers)
    # An empty index over a non-empty bank is built on first use...
    assert bank.knn_predict(query, 1)[0].item() == 0
    fill(bank, {1: 5}, centers=centers, prefix="f")
    # ...later changes wait for the scheduled refresh, every index_refresh_steps steps.
    assert bank.knn_predict(query, 1)[0].item() == 0
    bank.step()
    bank.step()
    assert bank.knn_predict(query, 1)[0].item() == 0
    bank.step()
    assert bank.knn_predict(query, 1)[0].item() == 1


def test_class_means_from_mirror_and_from_given_embeddings() -> None:
    centers = torch.eye(EMB_DIM)[:3]
    bank = make_bank(capacity=30)
    fill(bank, {0: 10, 2: 10}, centers=centers, noise=0.0)
    classes, means = bank.class_means()
    assert classes.tolist() == [0, 2]
    assert torch.allclose(means, centers[[0, 2]], atol=1e-6)

    slots, _, labels = bank.occupied()
    given = torch.where((labels == 0)[:, None], centers[1], centers[0])  # swapped encodings
    classes, means = bank.class_means(given)
    assert torch.allclose(means, centers[[1, 0]], atol=1e-6)
    with pytest.raises(ValueError, match="embeddings"):
        bank.class_means(given[:3])
    assert slots.numel() == 20


def test_knn_predict_votes_by_similarity() -> None:
    centers = torch.eye(EMB_DIM)[:3]
    bank = make_bank(capacity=60)
    fill(bank, {0: 20, 1: 20, 2: 20}, centers=centers)
    bank.refresh_index()
    labels, confidence = bank.knn_predict(centers, k=5)
    assert labels.tolist() == [0, 1, 2]
    assert torch.all(confidence > 0.99)


def test_open_rebuilds_the_mirror_with_the_learners_label_indices() -> None:
    store = InMemoryBankStore()
    first = make_bank(store, capacity=20)
    fill(first, {0: 6, 1: 4})
    first_rows = {
        event_id: (features, label)
        for event_id, features, label in zip(
            first.slot_ids(first.occupied()[0]),
            first.occupied()[1],
            first.occupied()[2].tolist(),
            strict=True,
        )
    }

    # The restarted learner numbers its classes the other way round.
    second = MemoryBank.open(
        store,
        TorchIndex(EMB_DIM),
        20,
        IN_DIM,
        EMB_DIM,
        "cpu",
        label_index={"class-0": 1, "class-1": 0}.__getitem__,
    )
    assert sorted(second.ids()) == sorted(first.ids())
    assert second.class_counts() == {1: 6, 0: 4}
    assert second.seen_counts() == {1: 6, 0: 4}
    assert second.label_names() == {1: "class-0", 0: "class-1"}
    for event_id, features, label in zip(
        second.slot_ids(second.occupied()[0]),
        second.occupied()[1],
        second.occupied()[2].tolist(),
        strict=True,
    ):
        assert event_id is not None
        assert torch.equal(features, first_rows[event_id][0])
        assert label == 1 - first_rows[event_id][1]
    # Already-stored ids stay duplicates after the restart.
    fill(second, {1: 6}, prefix="e")
    assert len(second) == 10


def test_open_with_a_lower_capacity_evicts_class_balanced_and_writes_through() -> None:
    store = InMemoryBankStore()
    fill(make_bank(store, capacity=40), {0: 30, 1: 6, 2: 4})
    bank = MemoryBank.open(
        store, TorchIndex(EMB_DIM), 16, IN_DIM, EMB_DIM, "cpu", lambda name: int(name[-1])
    )
    assert len(bank) == 16
    assert bank.class_counts() == {0: 6, 1: 6, 2: 4}
    assert store.stored_ids() == sorted(bank.ids())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mirror_on_cuda() -> None:
    bank = make_bank(capacity=50, device="cuda")
    fill(bank, {0: 20, 1: 20})
    bank.refresh_index()
    replay = bank.sample(10)
    assert replay.features.is_cuda
    assert replay.slots.is_cuda
    negatives = bank.hard_negatives(torch.randn(4, EMB_DIM, device="cuda"), replay.labels[:4], 5)
    assert negatives.is_cuda
    bank.update_embeddings(replay.slots, torch.randn(10, EMB_DIM, device="cuda"), replay.versions)
    assert bank.flush() == 10
