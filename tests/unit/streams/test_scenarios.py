"""Built-in scenarios and JSONL loading."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.exceptions import ConfigError
from pipeline.streams.files import load_jsonl
from pipeline.streams.scenarios import (
    SCENARIOS,
    SPLIT_DIGITS_TASKS,
    Scenario,
    get_scenario,
    register_scenario,
)


@pytest.fixture(scope="module")
def digits() -> Scenario:
    return get_scenario("split-digits", seed=0)


@pytest.fixture(scope="module")
def events(digits: Scenario) -> list[dict[str, Any]]:
    return list(digits)


def test_split_digits_metadata(digits: Scenario) -> None:
    assert digits.name == "split-digits"
    assert digits.n_events == len(digits) == 1797
    assert digits.input_dim == 64
    assert digits.classes == tuple(range(10))
    assert digits.tasks == ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))


def test_split_digits_events(events: list[dict[str, Any]]) -> None:
    assert len(events) == 1797
    assert len({e["id"] for e in events}) == 1797
    assert all(e["id"].startswith("digits-") for e in events)
    for e in events:
        assert set(e) == {"id", "features", "label", "task"}
        assert isinstance(e["label"], int)
        assert len(e["features"]) == 64
        assert all(0.0 <= x <= 1.0 for x in e["features"])
        assert all(round(x, 4) == x for x in e["features"])


def test_split_digits_tasks_in_order_with_two_classes_each(events: list[dict[str, Any]]) -> None:
    tasks = [e["task"] for e in events]
    assert tasks == sorted(tasks)  # task 0 entirely, then task 1, ...
    assert sorted(set(tasks)) == [0, 1, 2, 3, 4]
    for task, classes in enumerate(SPLIT_DIGITS_TASKS):
        labels = {e["label"] for e in events if e["task"] == task}
        assert labels == set(classes)
        assert len(labels) == 2
    # sklearn's digits hold 174-183 images per class; none is lost.
    assert sum(Counter(e["label"] for e in events).values()) == 1797


def test_split_digits_features_match_sklearn(events: list[dict[str, Any]]) -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    first = events[0]
    index = int(first["id"].removeprefix("digits-"))
    assert first["label"] == int(raw.target[index])
    assert first["features"] == [round(float(x) / 16.0, 4) for x in raw.data[index]]


def test_shuffle_is_seeded_and_within_tasks(events: list[dict[str, Any]]) -> None:
    again = [e["id"] for e in get_scenario("split-digits", seed=0)]
    other = [e["id"] for e in get_scenario("split-digits", seed=1)]
    ids = [e["id"] for e in events]
    assert again == ids
    assert other != ids
    assert sorted(other) == sorted(ids)


def test_scenario_iterates_afresh_each_time(digits: Scenario) -> None:
    assert next(iter(digits)) == next(iter(digits))


def test_unknown_scenario_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown scenario 'nope'.*split-digits"):
        get_scenario("nope")


def test_register_scenario() -> None:
    def tiny(seed: int) -> Scenario:
        def gen() -> Iterator[dict[str, Any]]:
            yield {"id": f"tiny-{seed}", "features": [0.0], "label": 0, "task": 0}

        return Scenario("tiny-test", 1, 1, (0,), ((0,),), gen)

    register_scenario("tiny-test", tiny)
    try:
        assert next(iter(get_scenario("tiny-test", seed=3)))["id"] == "tiny-3"
        with pytest.raises(ValueError, match="already registered"):
            register_scenario("tiny-test", tiny)
    finally:
        del SCENARIOS["tiny-test"]


def test_load_jsonl_passes_lines_through_raw(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"id": "a", "label": 1}\r\nnot json at all\n\n{"id": "b"}')
    assert list(load_jsonl(path)) == [
        b'{"id": "a", "label": 1}',
        b"not json at all",
        b'{"id": "b"}',
    ]


def test_load_jsonl_unreadable_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read replay file"):
        load_jsonl(tmp_path / "missing.jsonl")
