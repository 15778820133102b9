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

User files with labeled rows (CSV, NPZ, Parquet, JSONL) load with :func:`load_labeled_file`.
New scenarios are added with :func:`register_scenario`.
"""

from __future__ import annotations

import csv
import math
import re
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
import orjson

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


@dataclass(frozen=True)
class _Table:
    """Rows of a labeled file, validated: ``features`` is ``(n, dim)`` and finite."""

    features: np.ndarray
    labels: list[Label]
    tasks: list[Label] | None
    ids: list[str] | None


@dataclass(frozen=True)
class _Columns:
    label: str
    task: str
    id: str


_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_SEQUENCE = (list, tuple, np.ndarray)


def load_labeled_file(
    path: str | Path,
    label_column: str = "label",
    task_column: str = "task",
    id_column: str = "id",
) -> Scenario:
    """A :class:`Scenario` of the labeled rows of a JSONL, CSV, NPZ or Parquet file.

    - JSONL (``.jsonl``, ``.ndjson``) and CSV, Parquet: one row per event. Features are the
      ``features`` column when there is one holding lists, otherwise every numeric column
      except the label, task and id columns, in file order.
    - NPZ: arrays ``X`` or ``features`` (2-D), ``y`` or ``labels`` (or ``label_column``),
      optional ``task_column`` and ``id_column`` arrays.
    - Parquet needs pyarrow or pandas.

    Labels and tasks are integers or strings (integer text such as ``"3"`` becomes ``3``).
    Without a task column every event is in one task and events carry no ``task``; without
    an id column ids are ``<file stem>-<row>``. The file is read and checked here: an
    unreadable file, a missing column or a bad value raises :class:`ConfigError`.
    """
    path = Path(path)
    readers: dict[str, Callable[[Path, _Columns], _Table]] = {
        ".csv": _read_csv,
        ".jsonl": _read_jsonl,
        ".ndjson": _read_jsonl,
        ".npz": _read_npz,
        ".parquet": _read_parquet,
    }
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise ConfigError(
            f"cannot load {path}: unsupported file type {path.suffix or '(no suffix)'!r}; "
            f"expected one of {', '.join(readers)}"
        )
    table = reader(path, _Columns(label_column, task_column, id_column))
    return _labeled_scenario(path, table)


def _labeled_scenario(path: Path, table: _Table) -> Scenario:
    n = len(table.labels)
    classes = tuple(dict.fromkeys(table.labels))
    if table.tasks is None:
        tasks: tuple[tuple[Label, ...], ...] = (classes,)
    else:
        by_task: dict[Label, dict[Label, None]] = {}
        for task, label in zip(table.tasks, table.labels, strict=True):
            by_task.setdefault(task, {})[label] = None
        tasks = tuple(tuple(labels) for labels in by_task.values())
    ids = table.ids if table.ids is not None else [f"{path.stem}-{i}" for i in range(n)]
    features, labels, task_of = table.features, table.labels, table.tasks

    def events() -> Iterator[dict[str, Any]]:
        for i in range(n):
            event: dict[str, Any] = {
                "id": ids[i],
                "features": features[i].tolist(),
                "label": labels[i],
            }
            if task_of is not None:
                event["task"] = task_of[i]
            yield event

    return Scenario(
        name=path.name,
        input_dim=int(features.shape[1]),
        n_events=n,
        classes=classes,
        tasks=tasks,
        events=events,
    )


def _unreadable(path: Path, exc: BaseException) -> ConfigError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
    return ConfigError(f"cannot read labeled file {path}: {reason}")


def _read_csv(path: Path, names: _Columns) -> _Table:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            records = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise _unreadable(path, exc) from exc
    columns = {name: [record.get(name) for record in records] for name in header}
    return _table(path, columns, names)


def _read_jsonl(path: Path, names: _Columns) -> _Table:
    records: list[dict[str, Any]] = []
    for number, line in enumerate(_jsonl_lines(path), start=1):
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"{path}: line {number} is not valid JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise ConfigError(f"{path}: line {number} is not a JSON object")
        records.append(record)
    header = list(dict.fromkeys(key for record in records for key in record))
    columns = {name: [record.get(name) for record in records] for name in header}
    return _table(path, columns, names)


def _jsonl_lines(path: Path) -> Iterator[bytes]:
    """The non-blank lines of a JSONL file, read eagerly (a strict loader, unlike replay's)."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    return (line for line in lines if line.strip())


def _read_npz(path: Path, names: _Columns) -> _Table:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise _unreadable(path, exc) from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ConfigError(f"cannot read labeled file {path}: not an .npz archive of arrays")
    try:
        with archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise _unreadable(path, exc) from exc

    def pick(*keys: str) -> str | None:
        return next((key for key in keys if key in arrays), None)

    feature_key, label_key = pick("X", "features"), pick("y", "labels", names.label)
    if feature_key is None or label_key is None:
        raise ConfigError(
            f"{path}: an .npz needs a feature array (X or features) and a label array "
            f"(y, labels or {names.label}); it holds {', '.join(sorted(arrays)) or 'nothing'}"
        )
    features = arrays[feature_key]
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.number):
        raise ConfigError(
            f"{path}: {feature_key} must be a 2-D numeric array, got shape {features.shape} "
            f"of {features.dtype}"
        )
    columns: dict[str, list[Any]] = {names.label: arrays[label_key].tolist()}
    for name in (names.task, names.id):
        if name in arrays:
            columns[name] = arrays[name].tolist()
    for name, values in columns.items():
        if len(values) != len(features):
            raise ConfigError(
                f"{path}: {name} holds {len(values)} values for {len(features)} feature rows"
            )
    return _table(path, columns, names, features=features)


def _read_parquet(path: Path, names: _Columns) -> _Table:
    columns: dict[str, list[Any]]
    try:
        import pyarrow.parquet as pq
    except ImportError:
        try:
            import pandas as pd
        except ImportError:
            raise ConfigError(
                f"cannot read {path}: Parquet needs the pyarrow package (or pandas with a "
                "Parquet engine); install it with `pip install pyarrow`"
            ) from None
        try:
            frame = pd.read_parquet(path)
        except ImportError as exc:  # pandas without a Parquet engine
            raise ConfigError(f"cannot read {path}: {exc}; install pyarrow") from exc
        except (OSError, ValueError) as exc:
            raise _unreadable(path, exc) from exc
        columns = {str(key): list(values) for key, values in frame.to_dict("list").items()}
    else:
        try:
            columns = pq.read_table(path).to_pydict()
        except (OSError, ValueError) as exc:
            raise _unreadable(path, exc) from exc
    return _table(path, columns, names)


def _table(
    path: Path,
    columns: dict[str, list[Any]],
    names: _Columns,
    features: np.ndarray | None = None,
) -> _Table:
    """Validate the label, task and id columns and find the features (unless given)."""
    if names.label not in columns:
        raise ConfigError(
            f"{path}: no label column {names.label!r}; columns: {', '.join(columns) or 'none'}"
        )
    n = len(columns[names.label])
    if n == 0:
        raise ConfigError(f"{path} holds no labeled rows")
    labels = [_class_value(v, path, i, names.label) for i, v in enumerate(columns[names.label])]
    tasks = None
    if names.task in columns:
        tasks = [_class_value(v, path, i, names.task) for i, v in enumerate(columns[names.task])]
    ids = None
    if names.id in columns:
        ids = [str(_class_value(v, path, i, names.id)) for i, v in enumerate(columns[names.id])]
    if features is None:
        features = _features(path, columns, names)
    features = np.asarray(features, dtype=np.float64)
    if not np.isfinite(features).all():
        row = int(np.flatnonzero(~np.isfinite(features).all(axis=1))[0])
        raise ConfigError(f"{path}: row {row + 1} has a feature that is not a finite number")
    return _Table(features, labels, tasks, ids)


def _features(path: Path, columns: dict[str, list[Any]], names: _Columns) -> np.ndarray:
    """The ``features`` list column if there is one, else every numeric column but the
    label, task and id ones, in order."""
    reserved = {names.label, names.task, names.id}
    listed = columns.get("features")
    if "features" not in reserved and listed and any(isinstance(v, _SEQUENCE) for v in listed):
        rows: list[list[float]] = []
        for i, value in enumerate(listed):
            row = _floats(value) if isinstance(value, _SEQUENCE) else None
            if row is None or (rows and len(row) != len(rows[0])):
                raise ConfigError(
                    f"{path}: row {i + 1}: 'features' is not a list of numbers of the same "
                    "length as the first row's"
                )
            rows.append(row)
        return np.asarray(rows, dtype=np.float64)
    numeric: list[list[float]] = []
    for name, values in columns.items():
        if name in reserved:
            continue
        present = [v for v in values if not _missing(v)]
        parsed = _floats(present)
        if not present or parsed is None:
            continue  # not a feature column: text, or empty throughout
        if len(present) != len(values):
            gap = next(i for i, v in enumerate(values) if _missing(v))
            raise ConfigError(f"{path}: row {gap + 1} has no value in feature column {name!r}")
        numeric.append(parsed)
    if not numeric:
        raise ConfigError(
            f"{path}: no numeric feature columns besides {names.label!r}, {names.task!r} and "
            f"{names.id!r}; columns: {', '.join(columns)}"
        )
    return np.asarray(numeric, dtype=np.float64).T


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _floats(values: Sequence[Any] | np.ndarray) -> list[float] | None:
    """``values`` as floats, or None when one of them is not a number (or numeric text)."""
    out: list[float] = []
    for value in values:
        if isinstance(value, bool | np.bool_):
            return None
        try:
            out.append(float(value))
        except (TypeError, ValueError):
            return None
    return out


def _class_value(value: Any, path: Path, row: int, column: str) -> Label:
    """A label, task or id value as an int or a non-empty string."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip():
        text = value.strip()
        return int(text) if _INT_TEXT.fullmatch(text) else text
    raise ConfigError(
        f"{path}: row {row + 1}: {column!r} is {value!r}, not an integer or a non-empty string"
    )
