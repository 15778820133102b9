"""Streams from user files: raw JSONL lines, and labeled rows as a :class:`Scenario`.

:func:`load_jsonl` hands the lines of a JSONL file over unparsed (the consumers validate
them, so a bad line reaches the DLQ with its reason). :func:`load_labeled_file` reads a CSV,
NPZ, Parquet or JSONL file of labeled rows up front and checks it, so a bad file fails before
anything is produced.
"""

from __future__ import annotations

import csv
import re
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson

from pipeline.exceptions import ConfigError
from pipeline.streams.scenarios import Label, Scenario


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
class FeatureTable:
    """Rows of a file to score (``supcon-stream predict``): labels only when it has them."""

    features: np.ndarray  # float64 [n, dim], finite
    labels: list[Label] | None
    ids: list[str]


@dataclass(frozen=True)
class _Columns:
    label: str
    task: str
    id: str
    label_required: bool = True


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
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise ConfigError(
            f"cannot load {path}: unsupported file type {path.suffix or '(no suffix)'!r}; "
            f"expected one of {', '.join(_READERS)}"
        )
    table = reader(path, _Columns(label_column, task_column, id_column))
    return _labeled_scenario(path, table)


def load_feature_file(
    path: str | Path, label_column: str = "label", id_column: str = "id"
) -> FeatureTable:
    """The rows of a JSONL, CSV, NPZ or Parquet file to score, labeled or not.

    The same readers and checks as :func:`load_labeled_file`, except that the label column
    (``y``/``labels`` in an NPZ) may be absent; ids default to ``<file stem>-<row>``.
    """
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise ConfigError(
            f"cannot load {path}: unsupported file type {path.suffix or '(no suffix)'!r}; "
            f"expected one of {', '.join(_READERS)}"
        )
    table = reader(path, _Columns(label_column, "task", id_column, label_required=False))
    n = len(table.features)
    ids = table.ids if table.ids is not None else [f"{path.stem}-{i}" for i in range(n)]
    return FeatureTable(table.features, table.labels or None, ids)


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
    if feature_key is None or (label_key is None and names.label_required):
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
    columns: dict[str, list[Any]] = {}
    if label_key is not None:
        columns[names.label] = arrays[label_key].tolist()
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
    if names.label not in columns and names.label_required:
        raise ConfigError(
            f"{path}: no label column {names.label!r}; columns: {', '.join(columns) or 'none'}"
        )
    n = len(features) if features is not None else len(next(iter(columns.values()), []))
    if n == 0:
        raise ConfigError(f"{path} holds no {'labeled ' if names.label_required else ''}rows")
    raw_labels = columns.get(names.label, [])
    labels = [_class_value(v, path, i, names.label) for i, v in enumerate(raw_labels)]
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


_READERS: dict[str, Callable[[Path, _Columns], _Table]] = {
    ".csv": _read_csv,
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".npz": _read_npz,
    ".parquet": _read_parquet,
}
