"""MicroBatcher: size or latency, with a fake clock; revoked partitions are forgotten."""

from __future__ import annotations

import pytest

from consumers.batcher import MicroBatcher
from consumers.events import SourceRecord


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def recs(n: int, partition: int = 0, start: int = 0) -> list[SourceRecord]:
    return [SourceRecord("t", partition, start + i, b"{}") for i in range(n)]


def test_ready_when_size_reached() -> None:
    b = MicroBatcher(4, 10.0, FakeClock())
    b.add(recs(3))
    assert not b.ready()
    b.add(recs(1, start=3))
    assert b.ready()
    assert [r.offset for r in b.take()] == [0, 1, 2, 3]
    assert len(b) == 0
    assert not b.ready()


def test_take_returns_at_most_batch_size_oldest_first() -> None:
    b = MicroBatcher(4, 10.0, FakeClock())
    b.add(recs(10))
    assert [r.offset for r in b.take()] == [0, 1, 2, 3]
    assert [r.offset for r in b.take()] == [4, 5, 6, 7]
    assert b.ready() is False  # 2 left, latency not reached
    assert [r.offset for r in b.take()] == [8, 9]
    assert b.take() == []


def test_ready_when_oldest_waited_max_latency() -> None:
    clock = FakeClock()
    b = MicroBatcher(100, 0.25, clock)
    assert b.time_until_ready() is None
    b.add(recs(1))
    clock.now += 0.1
    b.add(recs(1, start=1))  # a newer record does not restart the timer
    assert b.time_until_ready() == pytest.approx(0.15)
    assert not b.ready()
    clock.now += 0.15
    assert b.ready()
    assert len(b.take()) == 2


def test_latency_follows_the_oldest_remaining_record() -> None:
    clock = FakeClock()
    b = MicroBatcher(2, 1.0, clock)
    b.add(recs(3))  # t=100
    clock.now += 0.5
    b.add(recs(1, start=3))  # t=100.5
    b.take()
    b.take()
    assert len(b) == 0
    b.add(recs(1, start=4))
    clock.now += 0.9
    assert not b.ready()  # the record added at t=100.5 left with the full batches


def test_zero_latency_is_ready_at_once() -> None:
    b = MicroBatcher(10, 0.0, FakeClock())
    b.add(recs(1))
    assert b.ready()


def test_drop_partitions() -> None:
    clock = FakeClock()
    b = MicroBatcher(10, 1.0, clock)
    b.add(recs(3, partition=0))
    clock.now += 0.5
    b.add(recs(2, partition=1))
    assert b.drop_partitions([("t", 0)]) == 3
    assert b.drop_partitions([("t", 5), ("other", 1)]) == 0
    assert b.drop_partitions([]) == 0
    assert len(b) == 2
    # The latency clock now starts at the oldest remaining record.
    assert b.time_until_ready() == pytest.approx(1.0)
    assert {r.partition for r in b.take()} == {1}


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        MicroBatcher(0, 1.0)
    with pytest.raises(ValueError, match="max_latency_s"):
        MicroBatcher(1, -1.0)


def test_drop_from_forgets_one_partitions_tail() -> None:
    b = MicroBatcher(100, 1.0, FakeClock())
    b.add(recs(5, partition=0))
    b.add(recs(5, partition=1))
    assert b.drop_from(("t", 0), 3) == 2
    assert sorted((r.partition, r.offset) for r in b.take()) == [
        *((0, i) for i in range(3)),
        *((1, i) for i in range(5)),
    ]
