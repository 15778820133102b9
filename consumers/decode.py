"""Decode and validate a micro-batch of raw Kafka records into an :class:`EventBatch`.

Bad payloads are data, not errors: every record of the input comes out either as a row of the
batch or as a :class:`DeadLetter` with a machine-readable reason (INVARIANT 5 of the design:
``len(batch) + len(batch.dead_letters) == batch.consumed == len(records)``). Nothing in here
raises on any byte string.

Cost model (the Kafka client, not decoding, should set the pace): one ``orjson.loads`` and a
few ``type`` checks per record in Python, then ONE numpy call builds the float32 matrix of all
valid rows and ONE vectorised ``np.isfinite`` finds non-finite rows. The type of every feature
(numbers only; numpy would convert ``true`` or ``"1.5"`` without a word) is proved for the
whole batch at once on the raw bytes when it can be (:func:`_numbers_only`), and checked value
by value only when it cannot. Figures in docs/performance.md.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, NamedTuple, cast

import numpy as np
import orjson

from consumers import fast_decode
from consumers.events import DeadLetter, EventBatch, SourceRecord, TopicPartitionKey
from consumers.fast_decode import FastEvent

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
    features: list[Any] | Any  # numbers (reference path) or packed float64 (fast path)
    label: str | None
    task: str | None
    ts_ms: int


# Every byte a JSON number (or the separators between numbers) can be made of.
_NUMBER_BYTES: Final = b"0123456789+-.eE, \t\n\r"


def _numbers_only(values: Sequence[bytes | None]) -> bool:
    """True when every JSON array in ``values`` holds numbers only (a sufficient test).

    With the number bytes deleted, an array of numbers reads ``[]``; any other element leaves
    a trace between the brackets (a quote, a letter of true/false/null, a brace, a bracket).
    So if every ``[`` is directly followed by ``]``, every array, the features included, holds
    numbers only, whatever the strings contain (a ``[`` inside a string that is not followed
    by ``]`` only makes this return False). One pass over the batch's bytes in C replaces a
    type check per feature; False just means the per-feature check runs.
    """
    skeleton = b"".join(v for v in values if v).translate(None, _NUMBER_BYTES)
    return skeleton.count(b"[") == skeleton.count(b"[]")


def _parse(
    record: SourceRecord, input_dim: int, max_event_bytes: int, check_types: bool = True
) -> _Candidate:
    """Check one record; raises _RejectedError with the first reason that applies.

    ``check_types=False`` skips the per-feature type check, for records that
    :func:`_numbers_only` has cleared.
    """
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
    if check_types and not _NUMBER_TYPES.issuperset(map(type, features)):
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


def decode_batch(
    records: Sequence[SourceRecord], input_dim: int, max_event_bytes: int
) -> EventBatch:
    """Decode ``records`` into one batch of valid events plus the dead letters.

    ``offsets`` covers every record (valid and dead-lettered), so committing it after the
    batch is trained on (and its dead letters are durable) accounts for all of them.
    """
    if input_dim < 1:
        raise ValueError(f"input_dim must be >= 1, got {input_dim}")
    if max_event_bytes < 1:
        raise ValueError(f"max_event_bytes must be >= 1, got {max_event_bytes}")

    offsets: dict[TopicPartitionKey, int] = {}
    for record in records:
        key = (record.topic, record.partition)
        if record.offset + 1 > offsets.get(key, -1):
            offsets[key] = record.offset + 1
    dead: list[DeadLetter] = []
    candidates = _candidates(records, input_dim, max_event_bytes, dead)
    matrix = _matrix(candidates, input_dim)
    finite = np.asarray(np.isfinite(matrix).all(axis=1))

    keep = _batch_checks(candidates, finite, dead)
    if len(keep) != len(candidates):
        # Batch-level rejections were appended last; restore per-partition offset order.
        dead.sort(key=lambda dl: (dl.source.topic, dl.source.partition, dl.source.offset))
        matrix = np.ascontiguousarray(matrix[keep])
        candidates = [candidates[i] for i in keep]

    return EventBatch(
        ids=tuple(c.event_id for c in candidates),
        features=matrix,
        labels=tuple(c.label for c in candidates),
        tasks=tuple(c.task for c in candidates),
        timestamps_ms=np.array([c.ts_ms for c in candidates], dtype=np.int64),
        sources=tuple(_without_value(c.record) for c in candidates),
        dead_letters=tuple(dead),
        offsets=offsets,
        consumed=len(records),
    )


def _candidates(
    records: Sequence[SourceRecord], input_dim: int, max_event_bytes: int, dead: list[DeadLetter]
) -> list[_Candidate]:
    """Records that pass the per-record checks, in order; the others go to ``dead``.

    The fast path (:mod:`consumers.fast_decode`, when simdjson is installed) takes the records
    it is sure of; the reference path :func:`_parse` decides the rest.
    """
    fast: list[FastEvent | None] = [None] * len(records)
    if fast_decode.available():
        read = fast_decode.reader(input_dim, max_event_bytes)
        fast = [read(record.value) for record in records]
    todo = [r.value for r, ev in zip(records, fast, strict=True) if ev is None]
    check_types = bool(todo) and not _numbers_only(todo)
    candidates: list[_Candidate] = []
    for record, ev in zip(records, fast, strict=True):
        if ev is not None:
            ts = record.timestamp_ms if ev[4] is None else ev[4]
            candidates.append(_new_tuple(_Candidate, (record, ev[0], ev[1], ev[2], ev[3], ts)))
            continue
        try:
            candidates.append(_parse(record, input_dim, max_event_bytes, check_types))
        except _RejectedError as rej:
            dead.append(DeadLetter(rej.reason, rej.detail, record))
    return candidates


def _matrix(candidates: list[_Candidate], input_dim: int) -> np.ndarray:
    """The float32 rows of the candidates' features (packed doubles or lists of numbers).

    float32 overflow (e.g. 1e39) becomes inf on purpose: the non-finite check rejects it.
    """
    if not candidates:
        return np.empty((0, input_dim), dtype=np.float32)
    packed = [i for i, c in enumerate(candidates) if type(c.features) is not list]
    with np.errstate(over="ignore"):
        if len(packed) == len(candidates):  # all from the fast path: one join, one cast
            blob = b"".join([cast("bytes", c.features) for c in candidates])
            doubles = np.frombuffer(blob, dtype=np.float64)
            return doubles.astype(np.float32).reshape(len(candidates), input_dim)
        if not packed:
            return np.array([c.features for c in candidates], dtype=np.float32)
        matrix = np.empty((len(candidates), input_dim), dtype=np.float32)
        listed = [i for i, c in enumerate(candidates) if type(c.features) is list]
        blob = b"".join([cast("bytes", candidates[i].features) for i in packed])
        doubles = np.frombuffer(blob, dtype=np.float64).reshape(len(packed), input_dim)
        matrix[packed] = doubles
        matrix[listed] = np.array([candidates[i].features for i in listed], dtype=np.float32)
        return matrix


def _batch_checks(
    candidates: list[_Candidate], finite: np.ndarray, dead: list[DeadLetter]
) -> list[int]:
    """Indices of candidates that are finite and not duplicates; the others go to ``dead``.

    In input order, so "duplicate" means "a valid event with this id came earlier in the
    batch": a rejected first copy does not shadow a valid second one.
    """
    if finite.all() and len({c.event_id for c in candidates}) == len(candidates):
        return list(range(len(candidates)))  # the common case, without a loop in Python
    keep: list[int] = []
    seen: set[str] = set()
    for i, c in enumerate(candidates):
        if not finite[i]:
            dead.append(
                DeadLetter("non_finite", "a feature is NaN or infinite as float32", c.record)
            )
        elif c.event_id in seen:
            dead.append(DeadLetter("duplicate_id", f"id {c.event_id[:64]!r} repeated", c.record))
        else:
            seen.add(c.event_id)
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
