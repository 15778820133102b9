"""IdleWatch: waiting for the group join, then for batches (times passed in, no sleeps)."""

from __future__ import annotations

import pytest

from pipeline.exceptions import SupconStreamError
from pipeline.learner.idle import IdleWatch


class _Assignment:
    def __init__(self) -> None:
        self.partitions: set[tuple[str, int]] = set()

    def __call__(self) -> set[tuple[str, int]]:
        return self.partitions


def test_idle_time_counts_from_the_join():
    assignment = _Assignment()
    watch = IdleWatch(assignment, "events", exit_when_idle_s=5.0, now=0.0, join_timeout_s=120.0)
    assert not watch.should_finish(30.0)  # still joining: never idle
    assignment.partitions = {("events", 0)}
    assert not watch.should_finish(50.0)  # joined here
    assert not watch.should_finish(54.9)
    assert watch.should_finish(55.0)


def test_idle_time_counts_from_the_last_batch():
    watch = IdleWatch(_Assignment(), "events", exit_when_idle_s=5.0, now=0.0)
    watch.batch_arrived(10.0)  # a batch means partitions are assigned
    watch.batch_arrived(20.0)
    assert not watch.should_finish(24.9)
    assert watch.should_finish(25.0)
    assert watch.first_batch_at == 10.0
    assert watch.active_s == 10.0


def test_processing_time_is_not_idle_time():
    # A batch that arrives at 10 and takes 8 s to train on (a slow machine): the learner has
    # been idle only from 18, not from 10.
    watch = IdleWatch(_Assignment(), "events", exit_when_idle_s=5.0, now=0.0)
    watch.batch_arrived(10.0)
    watch.batch_processed(18.0)
    assert not watch.should_finish(18.1)
    assert not watch.should_finish(22.9)
    assert watch.should_finish(23.0)
    # The active span still runs from the first arrival to the last arrival.
    assert watch.first_batch_at == 10.0
    assert watch.last_batch_at == 10.0
    assert watch.active_s == 0.0


def test_a_new_batch_restarts_the_idle_clock_after_its_processing():
    watch = IdleWatch(_Assignment(), "events", exit_when_idle_s=5.0, now=0.0)
    watch.batch_arrived(10.0)
    watch.batch_processed(11.0)
    watch.batch_arrived(15.0)
    assert not watch.should_finish(15.5)  # processing the second batch is not idle either
    watch.batch_processed(30.0)
    assert not watch.should_finish(34.9)
    assert watch.should_finish(35.0)
    assert watch.active_s == 5.0


def test_without_exit_when_idle_it_waits_for_ever():
    watch = IdleWatch(_Assignment(), "events", exit_when_idle_s=None, now=0.0)
    assert not watch.should_finish(10_000.0)  # no partitions, no error
    watch.batch_arrived(10_001.0)
    assert not watch.should_finish(1e9)


def test_no_assignment_within_the_join_timeout_is_an_error():
    watch = IdleWatch(_Assignment(), "events", exit_when_idle_s=5.0, now=0.0, join_timeout_s=120.0)
    assert not watch.should_finish(120.0)
    with pytest.raises(SupconStreamError, match="no partitions of events assigned within 120 s"):
        watch.should_finish(120.1)


def test_no_batch_means_no_active_time():
    watch = IdleWatch(_Assignment(), "events", exit_when_idle_s=5.0, now=3.0)
    assert watch.first_batch_at is None
    assert watch.active_s == 0.0
