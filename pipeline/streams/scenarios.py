"""Streams to replay: built-in scenarios by name, and user files of labeled events.

A :class:`Scenario` iterates event dicts in stream order (each iteration starts over) and
carries its metadata. Events have the wire schema the consumers decode::

    {"id": str, "features": [float, ...], "label": int | str, "task": int | str}

Built-in ``split-digits``: the 1797 8×8 digits bundled with scikit-learn (no download),
class-incremental in 5 tasks of 2 classes — (0, 1), (2, 3), …, (8, 9) — the classic
"Split" protocol in which a cross-entropy learner forgets earlier tasks. Features are pixel
intensities ÷ 16, so in [0, 1], rounded to 4 decimals to keep messages small; events are
shuffled within each task with the given seed and tasks follow each other in order.

Built-in ``domain-digits``: the same digits, domain-incremental in the "Permuted" protocol:
5 tasks, each presenting all 1797 images (all 10 classes) under a fixed pixel permutation of
its own, drawn with the seed; task 0 is the identity. Ids carry the task (``digits-t2-17``).

Built-in ``blurry-digits``: ``split-digits`` with blurred boundaries: a fraction (default
0.1) of each task's events is moved, at seeded random positions, into the time span of a
neighbouring task; each event keeps its true ``task``.

Built-in ``gaussian-drift``: a synthetic Gaussian mixture whose class means drift linearly
over the stream, class-incremental; generated lazily, see :func:`gaussian_drift`.

User files with labeled rows (CSV, NPZ, Parquet, JSONL) load as a :class:`Scenario` with
:func:`pipeline.streams.files.load_labeled_file`.
New scenarios are added with :func:`register_scenario`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

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


def _class_incremental_digits(
    name: str, order: list[tuple[int, int]], features: np.ndarray, labels: np.ndarray
) -> Scenario:
    """A digits scenario that yields images in ``order`` ((task, row) pairs), ids by row."""

    def events() -> Iterator[dict[str, Any]]:
        for task, i in order:
            yield {
                "id": f"digits-{i}",
                "features": features[i].tolist(),
                "label": int(labels[i]),
                "task": task,
            }

    return Scenario(
        name=name,
        input_dim=int(features.shape[1]),
        n_events=len(order),
        classes=tuple(range(10)),
        tasks=SPLIT_DIGITS_TASKS,
        events=events,
    )


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

    return _class_incremental_digits("split-digits", order, features, labels)


T = TypeVar("T")


def _digit_rows() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits: features ÷ 16 rounded to 4 decimals (as in split-digits), labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = np.round(np.asarray(digits.data, dtype=np.float64) / 16.0, 4)
    return features, np.asarray(digits.target, dtype=np.int64)


DOMAIN_DIGITS_N_TASKS = 5


def domain_digits_permutations(
    seed: int = 0, n_tasks: int = DOMAIN_DIGITS_N_TASKS, dim: int = 64
) -> np.ndarray:
    """The pixel permutation of each task, shape ``(n_tasks, dim)``; row 0 is the identity.

    Task ``t`` shows pixel ``perms[t][j]`` of the original image at position ``j``.
    """
    # A stream of its own, so the permutations do not depend on how events are shuffled.
    rng = np.random.default_rng([seed, 1])
    return np.stack([np.arange(dim)] + [rng.permutation(dim) for _ in range(n_tasks - 1)])


def domain_digits(seed: int = 0) -> Scenario:
    """Permuted digits: 5 tasks × all 1797 images × all 10 classes, 8985 events."""
    features, labels = _digit_rows()
    perms = domain_digits_permutations(seed, DOMAIN_DIGITS_N_TASKS, int(features.shape[1]))
    rng = np.random.default_rng([seed, 2])
    orders = [rng.permutation(len(labels)) for _ in range(DOMAIN_DIGITS_N_TASKS)]

    def events() -> Iterator[dict[str, Any]]:
        for task, (perm, order) in enumerate(zip(perms, orders, strict=True)):
            for i in order:
                yield {
                    "id": f"digits-t{task}-{i}",
                    "features": features[i, perm].tolist(),
                    "label": int(labels[i]),
                    "task": task,
                }

    classes = tuple(range(10))
    return Scenario(
        name="domain-digits",
        input_dim=int(features.shape[1]),
        n_events=DOMAIN_DIGITS_N_TASKS * len(labels),
        classes=classes,
        tasks=(classes,) * DOMAIN_DIGITS_N_TASKS,
        events=events,
    )


def blur_task_boundaries(
    per_task: Sequence[Sequence[T]], fraction: float, rng: np.random.Generator
) -> list[list[T]]:
    """Move ``round(fraction · len(per_task[t]))`` items of each task into a neighbour's span.

    ``per_task[t]`` holds task ``t``'s items in stream order. Each moved item goes to the span
    of task ``t - 1`` or ``t + 1`` (even odds where both exist) at a random position; the
    items that stay keep their order. Returns the items of each time span in stream order.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"blur fraction must be in [0, 1], got {fraction}")
    n_tasks = len(per_task)
    spans = [list(items) for items in per_task]
    if n_tasks < 2:
        return spans
    incoming: list[list[T]] = [[] for _ in range(n_tasks)]
    for task, items in enumerate(per_task):
        size = round(fraction * len(items))
        moved = set(rng.choice(len(items), size=size, replace=False).tolist())
        spans[task] = [item for j, item in enumerate(items) if j not in moved]
        for j in sorted(moved):
            if task == 0:
                target = 1
            elif task == n_tasks - 1:
                target = task - 1
            else:
                target = task + int(rng.choice((-1, 1)))
            incoming[target].append(items[j])
    for span, arrivals in zip(spans, incoming, strict=True):
        for item in arrivals:
            span.insert(int(rng.integers(len(span) + 1)), item)
    return spans


def blurry_digits(seed: int = 0, *, blur: float = 0.1) -> Scenario:
    """split-digits with blurred task boundaries: ``blur`` of each task in its neighbours."""
    features, labels = _digit_rows()
    rng = np.random.default_rng(seed)
    per_task: list[list[tuple[int, int]]] = []  # (task, row index), as split-digits orders them
    for task, classes in enumerate(SPLIT_DIGITS_TASKS):
        rows = np.flatnonzero(np.isin(labels, classes))
        per_task.append([(task, int(i)) for i in rng.permutation(rows)])
    order = [item for span in blur_task_boundaries(per_task, blur, rng) for item in span]

    return _class_incremental_digits("blurry-digits", order, features, labels)


GAUSSIAN_CHUNK = 1024  # events drawn per numpy call: bounds memory, amortises call overhead


def gaussian_drift(
    seed: int = 0,
    *,
    classes: int = 20,
    dim: int = 64,
    events: int = 20_000,
    tasks: int = 5,
    drift: float = 0.5,
    noise: float = 1.0,
) -> Scenario:
    """A class-incremental Gaussian mixture whose class means drift over the stream.

    Class ``c`` has a mean ``μ_c ~ N(0, I)`` and a direction ``d_c ~ N(0, I)``; event ``k`` of
    ``n`` is drawn from ``N(μ_c + drift · k/(n-1) · d_c, noise² I)``, so by the end each mean
    has moved ``drift`` times the typical size of a mean. Classes are split into ``tasks``
    consecutive groups and events into ``tasks`` consecutive spans (both as even as
    possible); within a span labels are uniform over that task's classes. Features are
    rounded to 4 decimals.

    Only the means and directions are held, O(dim·classes); events are drawn lazily in chunks
    from a generator seeded afresh on each iteration, so every pass yields the same stream
    and millions of events cost no memory.
    """
    if classes < 1 or dim < 1 or tasks < 1 or events < 0:
        raise ConfigError(
            "gaussian-drift needs classes, dim, tasks >= 1 and events >= 0; got "
            f"classes={classes}, dim={dim}, tasks={tasks}, events={events}"
        )
    if tasks > classes:
        raise ConfigError(f"gaussian-drift: tasks ({tasks}) must not exceed classes ({classes})")
    if not (math.isfinite(drift) and drift >= 0 and math.isfinite(noise) and noise >= 0):
        raise ConfigError(
            f"gaussian-drift: drift and noise must be finite and >= 0, got {drift}, {noise}"
        )
    rng = np.random.default_rng([seed, 0])
    means = rng.standard_normal((classes, dim))
    directions = rng.standard_normal((classes, dim))
    groups = [np.asarray(g, dtype=np.int64) for g in np.array_split(np.arange(classes), tasks)]
    bounds = [events * t // tasks for t in range(tasks + 1)]
    step = drift / max(events - 1, 1)

    def generate() -> Iterator[dict[str, Any]]:
        stream = np.random.default_rng([seed, 1])
        for task, group in enumerate(groups):
            for start in range(bounds[task], bounds[task + 1], GAUSSIAN_CHUNK):
                stop = min(start + GAUSSIAN_CHUNK, bounds[task + 1])
                labels = group[stream.integers(len(group), size=stop - start)]
                progress = (np.arange(start, stop, dtype=np.float64) * step)[:, None]
                x = means[labels] + progress * directions[labels]
                x += noise * stream.standard_normal((stop - start, dim))
                rows = np.round(x, 4).tolist()
                for k, (label, row) in enumerate(zip(labels.tolist(), rows, strict=True)):
                    yield {
                        "id": f"gauss-{start + k}",
                        "features": row,
                        "label": label,
                        "task": task,
                    }

    return Scenario(
        name="gaussian-drift",
        input_dim=dim,
        n_events=events,
        classes=tuple(range(classes)),
        tasks=tuple(tuple(int(c) for c in g) for g in groups),
        events=generate,
    )


SCENARIOS: dict[str, ScenarioFactory] = {
    "split-digits": split_digits,
    "domain-digits": domain_digits,
    "blurry-digits": blurry_digits,
    "gaussian-drift": gaussian_drift,
}


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
