"""A fast path of :func:`consumers.decode.decode_batch` that makes no Python object per feature.

With ``orjson`` every feature of every event becomes a Python float, and the float32 matrix is
then built from those objects: two steps of per-feature work in Python's allocator, about as
costly as the whole JSON parse (figures in docs/performance.md). ``simdjson`` (PyPI
``pysimdjson``, in the ``fast`` extra) parses the event into its own tape and copies the
``features`` array out as packed doubles; the batch's matrix is then one ``frombuffer`` and one
cast. Only ``id``, ``label``, ``task`` and ``ts`` become Python objects.

INVARIANT: the fast path only ever *accepts*. A record it accepts would be accepted by the
reference path (:func:`consumers.decode._parse`) with the same values; anything it is not sure
of (a parse error, a duplicate field name, a nested or second array, a non-number feature, a
field of the wrong type) returns None and the reference path decides, with its reasons. So
rejections and their reasons do not depend on whether ``simdjson`` is installed
(tests/unit/consumers/test_decode_fuzz.py compares the two paths on generated input).

One difference is left, by design: an integer feature above 2**53 goes through a double on
the way to float32 here (two roundings) and straight to float32 on the reference path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Final

simdjson: Any
try:  # the ``fast`` extra
    import simdjson
except ImportError:  # pragma: no cover - exercised where the extra is not installed
    simdjson = None

MAX_ID_CHARS: Final = 256
MAX_TS_MS: Final = 2**63 - 1

# (event id, packed float64 features, label, task, ts or None)
FastEvent = tuple[str, Any, str | None, str | None, int | None]
_UNSURE: Final = object()

_local = threading.local()  # one parser per thread: a simdjson parser is not thread-safe


def available() -> bool:
    return simdjson is not None


def _class_name(value: object) -> object:
    """A label or task as the reference path normalises it, or ``_UNSURE``."""
    if value is None:
        return None
    if type(value) is str:
        return value if value else _UNSURE
    if type(value) is int:  # exact type: bool is a subclass of int and is rejected
        return str(value)
    return _UNSURE


def reader(input_dim: int, max_event_bytes: int) -> Callable[[bytes | None], FastEvent | None]:
    """``read(value)``: the event's fields, or None when the reference path must decide."""
    if simdjson is None:
        raise RuntimeError("the fast decoder needs pysimdjson (pip install '.[fast]')")
    parser = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = simdjson.Parser()
    parse = parser.parse
    obj_type, array_type = simdjson.Object, simdjson.Array

    def document(value: bytes | None) -> tuple[Any, set[str]] | None:
        # One array in the whole record (the features): no nesting, no second array that
        # simdjson would flatten or the reference path would see differently.
        if not value or len(value) > max_event_bytes or value.find(b"[", value.find(b"[") + 1) >= 0:
            return None
        try:
            doc = parse(value)
        except (ValueError, TypeError, UnicodeDecodeError):
            return None
        if type(doc) is not obj_type:
            return None
        names = list(doc.keys())
        present = set(names)
        # orjson keeps the last of a repeated name; a lookup here would find the first.
        return (doc, present) if len(present) == len(names) else None

    def read(value: bytes | None) -> FastEvent | None:
        found = document(value)
        if found is None:
            return None
        doc, present = found
        # A lookup of an absent name costs an exception in simdjson: look up present ones.
        event_id = doc["id"] if "id" in present else None
        features: Any = doc["features"] if "features" in present else None
        label = _class_name(doc["label"]) if "label" in present else None
        task = _class_name(doc["task"]) if "task" in present else None
        ts = doc["ts"] if "ts" in present else None
        if (
            type(event_id) is not str
            or not 0 < len(event_id) <= MAX_ID_CHARS
            or type(features) is not array_type
            or len(features) != input_dim  # one array, not nested: input_dim doubles packed
            or label is _UNSURE
            or task is _UNSURE
            or not (ts is None or (type(ts) is int and 0 <= ts <= MAX_TS_MS))
        ):
            return None
        try:
            packed = features.as_buffer(of_type="d")  # numbers only, else TypeError
        except (TypeError, ValueError):
            return None
        return event_id, packed, label, task, ts  # type: ignore[return-value]

    return read
