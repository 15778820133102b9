"""Decode and validate a micro-batch of raw Kafka records into an :class:`EventBatch`.

Bad payloads are data, not errors: every record of the input comes out either as a row of the
batch or as a :class:`DeadLetter` with a machine-readable reason (INVARIANT 5 of the design:
``len(batch) + len(batch.dead_letters) == batch.consumed == len(records)``). Nothing in here
raises on any byte string.

Two paths, one answer. The native scanner (``consumers/_eventscan.c``, one call per
micro-batch, a large one scanned without the GIL) reads every plain event straight into the
float32 matrix: no Python object per feature, no dict per event. It only ever *accepts*; a
record it is not sure of (a parse error, an escape in a string, non-ASCII text, a repeated
name, a nested value, a field of the wrong type) goes to the reference path, :func:`_parse`
(``orjson`` and a type check per field), which alone decides rejections and their reasons.
Then ONE vectorised ``np.isfinite`` finds non-finite rows and one set finds repeated ids.
Figures in docs/performance.md; tests/unit/consumers/test_native_decode.py checks that both
paths give the same batch.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, NamedTuple

import numpy as np
import orjson

from consumers import _eventscan
from consumers.events import DeadLetter, EventBatch, SourceRecord, TopicPartitionKey

MAX_ID_CHARS: Final = 256
MAX_TS_MS: Final = 2**63 - 1  # the batch's int64 timestamps column
# A DLQ message must fit a default broker/producer request (1 MiB); base64 grows by 4/3.
DEFAULT_MAX_RAW_BYTES: Final = 256 * 1024

REASONS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "empty": "the record value is null or zero bytes",
        "oversized": "the record value is larger than max_event_bytes (checked before parsing)",
        "not_json": "the value is not valid JSON (invalid UTF-8 and nesting deeper than 1024 too)",
        "not_object": "the JSON document is not an object",
        "missing_id": "the 'id' field is absent or null",
        "bad_id": f"'id' is not a non-empty string of at most {MAX_ID_CHARS} characters",
        "bad_features": "'features' is absent or not a list of numbers (booleans are not numbers)",
        "wrong_dimension": "'features' has a length other than input_dim",
        "non_finite": "a feature is NaN or infinite once converted to float32",
        "bad_label": "'label' is not a non-empty string, an integer or null",
        "bad_task": "'task' is not a non-empty string, an integer or null",
        "bad_timestamp": "'ts' is not an integer (milliseconds) in 0..2**63-1, or null",
        "duplicate_id": "the same 'id' already appeared earlier in this micro-batch",
    }
)

_NUMBER_TYPES: Final = frozenset((int, float))
# Builds a named tuple without its Python-level ``__new__`` (per-record hot path).
_new_tuple: Final = tuple.__new__


class _RejectedError(Exception):
    """Internal control flow: one record failed one check."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _class_name(value: object, field: str, reason: str) -> str | None:
    """Normalise a label or task to ``str`` (``3`` and ``"3"`` are the same class)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value:
            return value
        raise _RejectedError(reason, f"'{field}' is an empty string")
    if type(value) is int:  # exact type: bool is a subclass of int and is rejected
        return str(value)
    raise _RejectedError(reason, f"'{field}' is {type(value).__name__}, expected str, int or null")


class _Candidate(NamedTuple):
    """A record that passed the per-record checks (the batch-level ones come after)."""

    record: SourceRecord
    event_id: str
    features: list[Any]  # numbers
    label: str | None
    task: str | None
    ts_ms: int


def _parse(record: SourceRecord, input_dim: int, max_event_bytes: int) -> _Candidate:
    """Check one record (the reference path); raises _RejectedError with the first reason
    that applies."""
    value = record.value
    if not value:
        raise _RejectedError("empty", "null value" if value is None else "zero-length value")
    if len(value) > max_event_bytes:
        raise _RejectedError("oversized", f"{len(value)} bytes > max_event_bytes={max_event_bytes}")
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:  # also invalid UTF-8 and depth > 1024
        raise _RejectedError("not_json", str(exc)[:200]) from None
    if type(doc) is not dict:
        raise _RejectedError("not_object", f"top-level JSON value is {type(doc).__name__}")

    event_id = doc.get("id")
    if event_id is None:
        raise _RejectedError("missing_id", "no 'id' field")
    if type(event_id) is not str or not event_id or len(event_id) > MAX_ID_CHARS:
        shown = f"{len(event_id)} characters" if type(event_id) is str else type(event_id).__name__
        raise _RejectedError("bad_id", f"'id' is {shown}")

    features = doc.get("features")
    if features is None:
        raise _RejectedError("bad_features", "no 'features' field")
    if type(features) is not list:
        raise _RejectedError(
            "bad_features", f"'features' is {type(features).__name__}, expected list"
        )
    # Exact types: bool, str, None and nested lists are rejected; numpy would happily convert
    # "1.5" or True, so this check cannot be left to the matrix build.
    if not _NUMBER_TYPES.issuperset(map(type, features)):
        bad = next(type(x).__name__ for x in features if type(x) not in _NUMBER_TYPES)
        raise _RejectedError("bad_features", f"'features' contains a {bad}")
    if len(features) != input_dim:
        raise _RejectedError("wrong_dimension", f"{len(features)} features, expected {input_dim}")

    label = _class_name(doc.get("label"), "label", "bad_label")
    task = _class_name(doc.get("task"), "task", "bad_task")

    ts = doc.get("ts")
    if ts is None:
        ts = record.timestamp_ms
    elif type(ts) is not int or not 0 <= ts <= MAX_TS_MS:
        raise _RejectedError("bad_timestamp", f"'ts' is {ts!r}"[:120])
    return _new_tuple(_Candidate, (record, event_id, features, label, task, ts))


def _without_value(record: SourceRecord) -> SourceRecord:
    return _new_tuple(SourceRecord, (record[0], record[1], record[2], None, record[4]))


class _Rows(NamedTuple):
    """The accepted records of a batch, in input order, column by column."""

    records: Sequence[SourceRecord]  # with their values: a batch check's dead letter needs one
    sources: list[SourceRecord]  # the same without their values (EventBatch.sources)
    ids: list[str]
    labels: list[str | None]
    tasks: list[str | None]
    timestamps_ms: np.ndarray  # int64
    features: np.ndarray  # float32 [len(records), input_dim]
    nonfinite: list[int]  # rows holding a NaN or an infinity as float32

    def take(self, keep: list[int]) -> _Rows:
        return _Rows(
            [self.records[i] for i in keep],
            [self.sources[i] for i in keep],
            [self.ids[i] for i in keep],
            [self.labels[i] for i in keep],
            [self.tasks[i] for i in keep],
            self.timestamps_ms[keep],
            self.features[keep],
            [],
        )


def decode_batch(
    records: Sequence[SourceRecord], input_dim: int, max_event_bytes: int, *, native: bool = True
) -> EventBatch:
    """Decode ``records`` into one batch of valid events plus the dead letters.

    ``offsets`` covers every record (valid and dead-lettered), so committing it after the
    batch is trained on (and its dead letters are durable) accounts for all of them.
    ``native=False`` sends every record through the reference path (tests and benchmarks
    compare the two).
    """
    if input_dim < 1:
        raise ValueError(f"input_dim must be >= 1, got {input_dim}")
    if max_event_bytes < 1:
        raise ValueError(f"max_event_bytes must be >= 1, got {max_event_bytes}")

    dead: list[DeadLetter] = []
    if native:
        offsets, blob, ids, labels, tasks, stamps, sources, nonfinite, unsure = _eventscan.scan(
            records, input_dim, max_event_bytes
        )
        matrix = np.frombuffer(blob, dtype=np.float32).reshape(len(ids), input_dim)
        timestamps = np.frombuffer(stamps, dtype=np.int64)
        rows = _Rows(records, sources, ids, labels, tasks, timestamps, matrix, nonfinite)
    else:
        offsets = _offsets(records)
        unsure = list(range(len(records)))
        empty = np.empty((0, input_dim), dtype=np.float32)
        rows = _Rows([], [], [], [], [], np.empty(0, dtype=np.int64), empty, [])
    if unsure:
        rows = _with_reference(records, unsure, rows, input_dim, max_event_bytes, dead)

    keep = _batch_checks(rows, dead)
    if keep is not None:
        # Batch-level rejections were appended last; restore per-partition offset order.
        dead.sort(key=lambda dl: (dl.source.topic, dl.source.partition, dl.source.offset))
        rows = rows.take(keep)

    return EventBatch(
        ids=tuple(rows.ids),
        features=rows.features,
        labels=tuple(rows.labels),
        tasks=tuple(rows.tasks),
        timestamps_ms=rows.timestamps_ms,
        sources=tuple(rows.sources),
        dead_letters=tuple(dead),
        offsets=offsets,
        consumed=len(records),
    )


def _offsets(records: Sequence[SourceRecord]) -> dict[TopicPartitionKey, int]:
    """``{(topic, partition): last offset + 1}`` over every record (what the scanner returns)."""
    offsets: dict[TopicPartitionKey, int] = {}
    for record in records:
        key = (record.topic, record.partition)
        if record.offset + 1 > offsets.get(key, -1):
            offsets[key] = record.offset + 1
    return offsets


def _with_reference(
    records: Sequence[SourceRecord],
    unsure: list[int],
    native: _Rows,
    input_dim: int,
    max_event_bytes: int,
    dead: list[DeadLetter],
) -> _Rows:
    """``native`` (the scanner's rows) merged in input order with the records of ``unsure``
    that the reference path accepts; those it rejects go to ``dead``."""
    parsed: dict[int, _Candidate] = {}
    for i in unsure:
        try:
            parsed[i] = _parse(records[i], input_dim, max_event_bytes)
        except _RejectedError as rej:
            dead.append(DeadLetter(rej.reason, rej.detail, records[i]))
    skipped = set(unsure)
    scanned = [i for i in range(len(records)) if i not in skipped]
    if not parsed:  # the common bad-input case: only rejections
        return native._replace(records=[records[i] for i in scanned])
    at = {i: k for k, i in enumerate(scanned)}
    order = sorted([*scanned, *parsed])
    features = np.empty((len(order), input_dim), dtype=np.float32)
    ids: list[str] = []
    labels: list[str | None] = []
    tasks: list[str | None] = []
    stamps: list[int] = []
    with np.errstate(over="ignore"):  # float32 overflow becomes inf: the non-finite check
        for row, i in enumerate(order):
            if i in parsed:
                c = parsed[i]
                event_id, label, task, ts = c.event_id, c.label, c.task, c.ts_ms
                features[row] = np.array(c.features, dtype=np.float32)
            else:
                k = at[i]
                event_id, label, task = native.ids[k], native.labels[k], native.tasks[k]
                ts = int(native.timestamps_ms[k])
                features[row] = native.features[k]
            ids.append(event_id)
            labels.append(label)
            tasks.append(task)
            stamps.append(ts)
    accepted = [records[i] for i in order]
    return _Rows(
        accepted,
        [_without_value(r) for r in accepted],
        ids,
        labels,
        tasks,
        np.array(stamps, dtype=np.int64),
        features,
        np.flatnonzero(~np.isfinite(features).all(axis=1)).tolist(),
    )


def _batch_checks(rows: _Rows, dead: list[DeadLetter]) -> list[int] | None:
    """Indices of rows that are finite and not duplicates (None: all of them); the others go
    to ``dead``.

    In input order, so "duplicate" means "a valid event with this id came earlier in the
    batch": a rejected first copy does not shadow a valid second one.
    """
    if not rows.nonfinite and len(set(rows.ids)) == len(rows.ids):
        return None  # the common case, without a loop in Python
    nonfinite = set(rows.nonfinite)
    keep: list[int] = []
    seen: set[str] = set()
    for i, event_id in enumerate(rows.ids):
        if i in nonfinite:
            dead.append(
                DeadLetter("non_finite", "a feature is NaN or infinite as float32", rows.records[i])
            )
        elif event_id in seen:
            dead.append(
                DeadLetter("duplicate_id", f"id {event_id[:64]!r} repeated", rows.records[i])
            )
        else:
            seen.add(event_id)
            keep.append(i)
    return keep


def dead_letter_payload(
    dl: DeadLetter,
    max_raw_bytes: int = DEFAULT_MAX_RAW_BYTES,
    rejected_by: Mapping[str, str | None] | None = None,
) -> bytes:
    """The JSON body of a DLQ message.

    ``{"reason", "detail", "source": {"topic", "partition", "offset"}, "raw": base64 | null,
    "raw_bytes": original length, "raw_truncated": bool, "rejected_by": {"learner", "group"}
    | null}``. ``raw`` keeps at most ``max_raw_bytes`` of the original value so that an
    oversized event still fits in one producer request; ``raw_truncated`` says when it was
    cut. ``rejected_by`` names the learner and consumer group that rejected the record, so
    two learners' dead letters on one DLQ can be told apart.
    """
    value = dl.source.value
    raw: str | None = None
    truncated = False
    size = 0
    if value is not None:
        size = len(value)
        truncated = size > max_raw_bytes
        raw = base64.b64encode(value[:max_raw_bytes] if truncated else value).decode("ascii")
    return orjson.dumps(
        {
            "reason": dl.reason,
            "detail": dl.detail,
            "source": {
                "topic": dl.source.topic,
                "partition": dl.source.partition,
                "offset": dl.source.offset,
            },
            "raw": raw,
            "raw_bytes": size,
            "raw_truncated": truncated,
            "rejected_by": dict(rejected_by) if rejected_by is not None else None,
        }
    )
