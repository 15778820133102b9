"""The simdjson fast path of decode_batch accepts only what the reference path accepts."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from hostile import DIM, MAX_EVENT_BYTES, finite, hostile, json_values
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers import fast_decode
from consumers.decode import decode_batch
from consumers.events import EventBatch, SourceRecord

pytestmark = pytest.mark.skipif(not fast_decode.available(), reason="needs the fast extra")


@st.composite
def near_valid(draw: st.DrawFn) -> bytes:
    """Valid-looking events with what a fast parser could get wrong."""
    eid = draw(st.sampled_from(["a", "b[1]", 'q"x', "é", "x" * 256, "x" * 257]))
    features: list[object] = draw(
        st.lists(finite | st.integers(-(2**53), 2**53), min_size=DIM, max_size=DIM)
    )
    body = orjson.dumps({"id": eid, "features": features}).decode()[1:-1]
    extra = draw(
        st.sampled_from(
            [
                "",
                ',"label":3',
                ',"label":"3"',
                ',"label":""',
                ',"label":true',
                ',"task":-7',
                ',"ts":0',
                ',"ts":-1',
                ',"ts":18446744073709551615',
                ',"id":"other"',
                ',"features":[1]',
                ',"label":null,"label":"z"',
                ',"nested":{"features":1,"id":2}',
                ',"nested":{"deep":{"x":"[not an array]"}}',
            ]
        )
    )
    text = "{" + body + extra + "}"
    text = draw(st.sampled_from([text, " " + text + "\n", text + " x", text[:-1]]))
    if draw(st.booleans()):
        text = text.replace("],", "] ,", 1).replace(":[", ": [ ", 1)
    tail = draw(json_values)
    if draw(st.booleans()):
        text = text[:-1] + ',"more":' + orjson.dumps(tail).decode() + "}"
    return text.encode()


payloads = st.lists(near_valid() | hostile("f").map(lambda item: item[0]), max_size=40)


def _decode(values: list[bytes], fast: bool) -> EventBatch:
    records = [SourceRecord("events", i % 2, i, v, 1234) for i, v in enumerate(values)]
    with pytest.MonkeyPatch.context() as mp:
        if not fast:
            mp.setattr(fast_decode, "simdjson", None)
        return decode_batch(records, DIM, MAX_EVENT_BYTES)


@settings(max_examples=300, deadline=None)
@given(payloads)
def test_fast_path_decodes_exactly_like_the_reference_path(values: list[bytes]) -> None:
    fast, reference = _decode(values, fast=True), _decode(values, fast=False)
    assert fast.ids == reference.ids
    assert fast.labels == reference.labels
    assert fast.tasks == reference.tasks
    assert np.array_equal(fast.timestamps_ms, reference.timestamps_ms)
    assert fast.features.dtype == reference.features.dtype == np.float32
    assert fast.features.tobytes() == reference.features.tobytes()
    assert fast.sources == reference.sources
    assert [(d.reason, d.source) for d in fast.dead_letters] == [
        (d.reason, d.source) for d in reference.dead_letters
    ]
    assert fast.offsets == reference.offsets


def test_fast_path_takes_plain_events_and_leaves_the_rest() -> None:
    read = fast_decode.reader(DIM, MAX_EVENT_BYTES)
    plain = orjson.dumps({"id": "e1", "features": [0.5] * DIM, "label": 2, "ts": 9})
    event = read(plain)
    assert event is not None
    assert event[0] == "e1"
    assert event[2:] == ("2", None, 9)
    assert np.frombuffer(event[1], dtype=np.float64).tolist() == [0.5] * DIM
    for unsure in (
        plain.replace(b'"ts":9', b'"ts":9,"id":"e2"'),  # a repeated name: orjson keeps the last
        plain.replace(b"[0.5,", b"[[0.5],"),  # nested (simdjson would flatten it)
        plain.replace(b'"label":2', b'"label":true'),
        b"[1, 2]",
        b"",
        None,
    ):
        assert read(unsure) is None
