"""Streams to replay: built-in scenarios by name, and user JSONL files.

A :class:`Scenario` iterates event dicts in stream order (each iteration starts over) and
carries its metadata. Events have the wire schema the consumers decode::

    {"id": str, "features": [float, ...], "label": int | str, "task": int | str}

Built-in ``split-digits``: the 1797 8×8 digits bundled with scikit-learn (no download),
class-incremental in 5 tasks of 2 classes — (0, 1), (2, 3), …, (8, 9) — the classic
"Split" protocol in which a cross-entropy learner forgets earlier tasks. Features are pixel
intensities ÷ 16, so in [0, 1], rounded to 4 decimals to keep messages small; events are
shuffled within each task with the given seed and tasks follow each other in order.

New scenarios are added with :func:`register_scenario`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from pipeline.exceptions import ConfigError

Label = int | str
ScenarioFactory = Callable[[int], "Scenario"]  # seed -> scenario


@dataclass(frozen=True)
class Scenario:
    """An event stream with its metadata. ``tasks[i]`` lists the classes of task ``i``."""

    name: str
    input_dim: int
    n_events: int
    classes: tuple[Label, ...]
    tasks: tuple[tuple[Label, ...], ...]
    events: Callable[[], Iterator[dict[str, Any]]] = field(repr=False, compare=False)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.events()

    def __len__(self) -> int:
        return self.n_events


SPLIT_DIGITS_TASKS: tuple[tuple[int, ...], ...] = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))


def split_digits(seed: int = 0) -> Scenario:
    """Class-incremental split of sklearn's digits: 5 tasks × 2 classes, 1797 events."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = np.round(np.asarray(digits.data, dtype=np.float64) / 16.0, 4)
    labels = np.asarray(digits.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    order: list[tuple[int, int]] = []  # (task, row index)
    for task, classes in enumerate(SPLIT_DIGITS_TASKS):
        rows = np.flatnonzero(np.isin(labels, classes))
        order.extend((task, int(i)) for i in rng.permutation(rows))

    def events() -> Iterator[dict[str, Any]]:
        for task, i in order:
            yield {
                "id": f"digits-{i}",
                "features": features[i].tolist(),
                "label": int(labels[i]),
                "task": task,
            }

    return Scenario(
        name="split-digits",
        input_dim=int(features.shape[1]),
        n_events=len(order),
        classes=tuple(range(10)),
        tasks=SPLIT_DIGITS_TASKS,
        events=events,
    )


SCENARIOS: dict[str, ScenarioFactory] = {"split-digits": split_digits}


def register_scenario(name: str, factory: ScenarioFactory) -> None:
    """Make ``factory`` available to ``replay`` under ``name``."""
    if name in SCENARIOS:
        raise ValueError(f"scenario {name!r} is already registered")
    SCENARIOS[name] = factory


def get_scenario(name: str, seed: int = 0) -> Scenario:
    factory = SCENARIOS.get(name)
    if factory is None:
        known = ", ".join(sorted(SCENARIOS))
        raise ConfigError(f"unknown scenario {name!r}; built-in scenarios: {known}")
    return factory(seed)


def load_jsonl(path: str | Path) -> Iterator[bytes]:
    """The lines of a JSONL file as raw bytes, line endings stripped, blank lines skipped.

    Lines are not parsed: validation is the consumer's job, so a malformed line reaches the
    DLQ with its reason instead of stopping the replay. The file is opened before this
    returns, so an unreadable path fails here with :class:`ConfigError`.
    """
    try:
        handle = Path(path).open("rb")  # noqa: SIM115 - closed by the generator below
    except OSError as exc:
        raise ConfigError(f"cannot read replay file {path}: {exc.strerror or exc}") from exc
    return _lines(handle)


def _lines(handle: IO[bytes]) -> Iterator[bytes]:
    with handle:
        for raw in handle:
            line = raw.rstrip(b"\r\n")
            if line.strip():
                yield line
