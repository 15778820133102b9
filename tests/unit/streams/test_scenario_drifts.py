"""The drifting scenarios: domain-digits, blurry-digits and gaussian-drift."""

from __future__ import annotations

import itertools
import tracemalloc
from collections import Counter
from typing import Any

import numpy as np
import orjson
import pytest

from pipeline.exceptions import ConfigError
from pipeline.streams.scenarios import (
    SCENARIOS,
    SPLIT_DIGITS_TASKS,
    Scenario,
    blur_task_boundaries,
    blurry_digits,
    domain_digits_permutations,
    gaussian_drift,
    get_scenario,
)


def test_new_scenarios_are_registered() -> None:
    assert {"split-digits", "domain-digits", "blurry-digits", "gaussian-drift"} <= set(SCENARIOS)


# domain-digits


@pytest.fixture(scope="module")
def domain() -> Scenario:
    return get_scenario("domain-digits", seed=0)


@pytest.fixture(scope="module")
def domain_events(domain: Scenario) -> list[dict[str, Any]]:
    return list(domain)


def test_domain_digits_shape_and_tasks(
    domain: Scenario, domain_events: list[dict[str, Any]]
) -> None:
    assert domain.name == "domain-digits"
    assert domain.input_dim == 64
    assert domain.n_events == len(domain_events) == 5 * 1797
    assert domain.tasks == (tuple(range(10)),) * 5
    assert len({e["id"] for e in domain_events}) == len(domain_events)
    tasks = [e["task"] for e in domain_events]
    assert tasks == sorted(tasks)
    for task in range(5):
        in_task = [e for e in domain_events if e["task"] == task]
        assert len(in_task) == 1797
        assert {e["label"] for e in in_task} == set(range(10))
        assert all(len(e["features"]) == 64 for e in in_task)


def test_domain_digits_permutation_fixed_per_task_identity_for_task_0(
    domain_events: list[dict[str, Any]],
) -> None:
    from sklearn.datasets import load_digits

    raw = np.round(load_digits().data / 16.0, 4)
    perms = domain_digits_permutations(seed=0)
    assert perms.shape == (5, 64)
    assert (perms[0] == np.arange(64)).all()
    assert all(sorted(p) == list(range(64)) for p in perms)
    assert len({tuple(p) for p in perms}) == 5
    for e in domain_events:
        task, index = (int(part) for part in e["id"].removeprefix("digits-t").split("-"))
        assert task == e["task"]
        assert e["features"] == raw[index, perms[task]].tolist()
    assert (domain_digits_permutations(seed=0) == perms).all()
    assert not (domain_digits_permutations(seed=1)[1:] == perms[1:]).all()


# blurry-digits


def test_blur_task_boundaries_moves_the_fraction_to_neighbours() -> None:
    per_task = [[(t, i) for i in range(100)] for t in range(5)]
    spans = blur_task_boundaries(per_task, 0.1, np.random.default_rng(0))
    assert sorted(x for span in spans for x in span) == sorted(x for t in per_task for x in t)
    for span_index, span in enumerate(spans):
        foreign = [t for t, _ in span if t != span_index]
        assert all(abs(t - span_index) == 1 for t in foreign)
    for task in range(5):
        moved = sum(1 for s, span in enumerate(spans) for t, _ in span if t == task and s != task)
        assert moved == 10  # round(0.1 * 100)
    # The items that stay keep their order.
    assert [i for t, i in spans[2] if t == 2] == sorted(i for t, i in spans[2] if t == 2)


def test_blur_task_boundaries_edges() -> None:
    rng = np.random.default_rng(0)
    per_task = [[0] * 10, [1] * 10]
    assert blur_task_boundaries(per_task, 0.0, rng) == per_task
    assert blur_task_boundaries([[0, 0, 0]], 0.5, rng) == [[0, 0, 0]]
    swapped = blur_task_boundaries(per_task, 1.0, rng)
    assert swapped == [[1] * 10, [0] * 10]
    with pytest.raises(ConfigError, match=r"blur fraction must be in \[0, 1\]"):
        blur_task_boundaries(per_task, 1.5, rng)


def test_blurry_digits_keeps_true_tasks_and_blurs_order() -> None:
    blurry = get_scenario("blurry-digits", seed=0)
    events = list(blurry)
    split = list(get_scenario("split-digits", seed=0))
    assert blurry.name == "blurry-digits"
    assert blurry.tasks == SPLIT_DIGITS_TASKS
    assert blurry.n_events == len(events) == 1797
    assert sorted(e["id"] for e in events) == sorted(e["id"] for e in split)
    task_of = {label: t for t, classes in enumerate(SPLIT_DIGITS_TASKS) for label in classes}
    assert all(e["task"] == task_of[e["label"]] for e in events)
    tasks = [e["task"] for e in events]
    assert tasks != sorted(tasks)
    # Events stay within their neighbours' spans: task t ends before task t + 3 begins.
    first = {t: tasks.index(t) for t in range(5)}
    last = {t: len(tasks) - 1 - tasks[::-1].index(t) for t in range(5)}
    assert all(last[t] < first[t + 3] for t in range(2))
    # About `blur` (0.1) of the events fall outside their task's span in split-digits (the
    # spans shift a little as tasks trade events, so the share is not exact).
    bounds = np.cumsum([0] + [sum(1 for e in split if e["task"] == t) for t in range(5)])
    outside = sum(not bounds[e["task"]] <= i < bounds[e["task"] + 1] for i, e in enumerate(events))
    assert 0.07 < outside / len(events) < 0.15
    assert [e["id"] for e in get_scenario("blurry-digits", seed=0)] == [e["id"] for e in events]
    assert [e["id"] for e in blurry_digits(0, blur=0.0)] == [e["id"] for e in split]


# gaussian-drift


def test_gaussian_drift_default_metadata() -> None:
    scenario = get_scenario("gaussian-drift", seed=0)
    assert (scenario.name, scenario.input_dim, scenario.n_events) == ("gaussian-drift", 64, 20_000)
    assert scenario.classes == tuple(range(20))
    assert len(scenario.tasks) == 5
    assert all(len(classes) == 4 for classes in scenario.tasks)


def test_gaussian_drift_class_incremental_tasks() -> None:
    scenario = gaussian_drift(3, classes=7, dim=5, events=1000, tasks=3, drift=0.2)
    events = list(scenario)
    assert len(events) == 1000
    assert scenario.tasks == ((0, 1, 2), (3, 4), (5, 6))
    tasks = [e["task"] for e in events]
    assert tasks == sorted(tasks)
    assert Counter(tasks) == {0: 333, 1: 333, 2: 334}
    for e in events:
        assert e["label"] in scenario.tasks[e["task"]]
        assert len(e["features"]) == 5
    assert len({e["id"] for e in events}) == 1000
    orjson.dumps(events[0])  # plain JSON types


def test_gaussian_drift_is_deterministic_by_seed() -> None:
    a = list(gaussian_drift(1, events=2500, dim=8))
    assert a == list(gaussian_drift(1, events=2500, dim=8))
    assert a != list(gaussian_drift(2, events=2500, dim=8))


def test_gaussian_drift_means_drift() -> None:
    scenario = gaussian_drift(0, classes=1, dim=16, events=4000, tasks=1, drift=2.0, noise=0.1)
    x = np.array([e["features"] for e in scenario])
    shift = np.linalg.norm(x[-200:].mean(axis=0) - x[:200].mean(axis=0))
    still = gaussian_drift(0, classes=1, dim=16, events=4000, tasks=1, drift=0.0, noise=0.1)
    y = np.array([e["features"] for e in still])
    assert shift > 2.0
    assert np.linalg.norm(y[-200:].mean(axis=0) - y[:200].mean(axis=0)) < 0.1


def test_gaussian_drift_generates_lazily() -> None:
    # Laziness measured by memory, not time: the whole stream as float64 would take
    # 50M x 64 x 8 B = 25.6 GB; building it and drawing the head must allocate only
    # about one chunk (numpy reports its buffers to tracemalloc).
    tracemalloc.start()
    try:
        scenario = gaussian_drift(0, events=50_000_000, dim=64, classes=20)
        head = list(itertools.islice(scenario, 10))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20
    assert len(scenario) == 50_000_000
    assert [e["id"] for e in head] == [f"gauss-{i}" for i in range(10)]
    assert head == list(itertools.islice(scenario, 10))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": 0}, "classes, dim, tasks >= 1"),
        ({"tasks": 30}, r"tasks \(30\) must not exceed classes \(20\)"),
        ({"drift": -1.0}, "drift and noise must be finite"),
    ],
)
def test_gaussian_drift_rejects_bad_parameters(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        gaussian_drift(0, **kwargs)
