"""The native scanner of decode_batch accepts only what the reference path accepts, with the
same values bit for bit."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from hostile import DIM, MAX_EVENT_BYTES, finite, hostile, json_values
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers import _eventscan
from consumers.decode import decode_batch
from consumers.events import EventBatch, SourceRecord


@st.composite
def near_valid(draw: st.DrawFn) -> bytes:
    """Valid-looking events with what a fast parser could get wrong."""
    eid = draw(st.sampled_from(["a", "b[1]", 'q"x', "é", "x" * 256, "x" * 257, "", "tab\tx"]))
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
                ',"label":-0',
                ',"label":1.0',
                ',"label":1e2',
                ',"task":123456789012345678901',
                ',"ts":1.5',
                ',"ts":null,"task":null',
                ',"other":"x","flag":true,"n":-1.5e-3,"z":null',
                ',"feature\\u0073":1',
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


def _decode(
    values: list[bytes | None], native: bool, max_bytes: int = MAX_EVENT_BYTES
) -> EventBatch:
    records = [SourceRecord("events", i % 2, i, v, 1234) for i, v in enumerate(values)]
    return decode_batch(records, DIM, max_bytes, native=native)


def _assert_same(values: list[bytes | None], max_bytes: int = MAX_EVENT_BYTES) -> None:
    native = _decode(values, native=True, max_bytes=max_bytes)
    reference = _decode(values, native=False, max_bytes=max_bytes)
    assert native.ids == reference.ids
    assert native.labels == reference.labels
    assert native.tasks == reference.tasks
    assert np.array_equal(native.timestamps_ms, reference.timestamps_ms)
    assert native.features.dtype == reference.features.dtype == np.float32
    assert native.features.tobytes() == reference.features.tobytes()
    assert native.sources == reference.sources
    assert [(d.reason, d.detail, d.source) for d in native.dead_letters] == [
        (d.reason, d.detail, d.source) for d in reference.dead_letters
    ]
    assert native.offsets == reference.offsets
    assert native.consumed == reference.consumed


@settings(max_examples=400, deadline=None)
@given(payloads)
def test_native_path_decodes_exactly_like_the_reference_path(values: list[bytes]) -> None:
    _assert_same(values)


# Number texts where a quick conversion could round differently from orjson + numpy: every
# JSON number form, 17 significant digits (Python's repr of a double), float32 midpoints and
# their neighbours, values near the float32 limits, long mantissas and large exponents.
def _float32_midpoints(draw: st.DrawFn) -> str:
    f = np.float32(draw(st.floats(allow_nan=False, allow_infinity=False, width=32)))
    with np.errstate(over="ignore"):  # above the largest float32: inf, an invalid number
        up = np.nextafter(f, np.float32(np.inf), dtype=np.float32)
    mid = (float(f) + float(up)) / 2  # exact in a double
    return repr(draw(st.sampled_from([mid, np.nextafter(mid, 0.0), np.nextafter(mid, np.inf)])))


number_texts = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(width=32, allow_nan=False, allow_infinity=False).map(lambda f: repr(float(f))),
    st.composite(_float32_midpoints)(),
    st.builds(
        lambda sign, whole, frac, exp: f"{sign}{whole}{frac}{exp}",
        st.sampled_from(["", "-"]),
        st.sampled_from(["0", "1", "9", "12345678901234567890", "3402823", "1"]),
        st.sampled_from(["", ".0", ".5", ".000001", ".1234567890123456789012", ".00000000000"]),
        st.sampled_from(["", "e0", "E+5", "e-45", "e38", "e39", "e-310", "e400", "e-400", "e22"]),
    ),
    st.integers(-(2**64), 2**64).map(str),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(number_texts, min_size=DIM, max_size=DIM), min_size=1, max_size=8))
def test_numbers_convert_exactly_like_the_reference_path(rows: list[list[str]]) -> None:
    values: list[bytes | None] = [
        b'{"id":"e%d","features":[%s]}' % (i, ",".join(row).encode()) for i, row in enumerate(rows)
    ]
    _assert_same(values)


def test_plain_events_are_all_taken_by_the_scanner() -> None:
    """The scanner is the path plain events take: nothing of theirs goes to the reference."""
    rng = np.random.default_rng(0)
    values = [
        orjson.dumps(
            {
                "id": f"e{i}",
                "features": rng.normal(size=DIM).astype(np.float32).tolist(),
                "label": i % 3,
                "task": "t",
                "ts": 5 + i,
            }
        )
        for i in range(64)
    ]
    records = [SourceRecord("events", 0, i, v, 1) for i, v in enumerate(values)]
    offsets, blob, ids, labels, tasks, stamps, sources, nonfinite, unsure = _eventscan.scan(
        records, DIM, 4096
    )
    assert unsure == []
    assert nonfinite == []
    assert offsets == {("events", 0): 64}
    assert ids == [f"e{i}" for i in range(64)]
    assert labels == [str(i % 3) for i in range(64)]
    assert tasks == ["t"] * 64
    assert np.frombuffer(stamps, dtype=np.int64).tolist() == [5 + i for i in range(64)]
    assert sources == [r._replace(value=None) for r in records]
    assert all(type(s) is SourceRecord for s in sources)
    expected = np.array([orjson.loads(v)["features"] for v in values], dtype=np.float32)
    assert blob == expected.tobytes()


def test_a_large_batch_is_scanned_without_the_gil_with_the_same_result() -> None:
    """Above 256 KiB of values the scanner gives up the GIL for its first pass; the batch
    must not change (here 40 events of ~8 KiB, a third of them unsure)."""
    rng = np.random.default_rng(1)
    values: list[bytes | None] = []
    for i in range(40):
        doc = {"id": f"e{i}", "features": rng.normal(size=DIM).tolist(), "pad": "x" * 8000}
        if i % 3 == 0:
            doc["pad"] = "é"  # non-ASCII: the reference path decides
            doc["note"] = "y" * 8000
        values.append(orjson.dumps(doc))
    assert sum(len(v) for v in values if v) > 256 * 1024
    _assert_same(values, max_bytes=65_536)
    assert len(_decode(values, native=True, max_bytes=65_536)) == 40


def test_scanner_leaves_what_it_is_not_sure_of() -> None:
    plain = orjson.dumps({"id": "e1", "features": [0.5] * DIM, "label": 2, "ts": 9})
    unsure = [
        plain.replace(b'"ts":9', b'"ts":9,"id":"e2"'),  # a repeated name: orjson keeps the last
        plain.replace(b"[0.5,", b"[[0.5],"),  # nested
        plain.replace(b'"label":2', b'"label":true'),
        plain.replace(b'"e1"', b'"\u00e9"'),  # an escape
        plain.replace(b'"e1"', '"é"'.encode()),  # non-ASCII text
        plain.replace(b"0.5]", b"0.5,0.5]"),  # one feature too many
        plain + b" x",
        b"[1, 2]",
        b"",
        None,
    ]
    records = [SourceRecord("events", 0, i, v, 1) for i, v in enumerate([plain, *unsure])]
    _, _, ids, *_, left = _eventscan.scan(records, DIM, 4096)
    assert ids == ["e1"]
    assert left == list(range(1, len(records)))


def test_scanner_flags_rows_that_are_not_finite_as_float32() -> None:
    values = [
        b'{"id":"a","features":[%s]}' % b",".join([b"1"] * DIM),
        b'{"id":"b","features":[%s]}' % b",".join([b"1e39"] + [b"1"] * (DIM - 1)),
        b'{"id":"c","features":[%s]}' % b",".join([b"-3.5e38"] * DIM),
    ]
    records = [SourceRecord("events", 0, i, v, 1) for i, v in enumerate(values)]
    *_, nonfinite, unsure = _eventscan.scan(records, DIM, 4096)
    assert unsure == []
    assert nonfinite == [1, 2]
    assert [d.reason for d in decode_batch(records, DIM, 4096).dead_letters] == ["non_finite"] * 2


def test_scanner_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match="SourceRecord"):
        _eventscan.scan([("t", 0, 0)], DIM, 4096)
    with pytest.raises(ValueError, match="input_dim"):
        _eventscan.scan([], 0, 4096)
