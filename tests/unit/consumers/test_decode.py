"""decode_batch: every record is either a row or a dead letter with the right reason."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.decode import REASONS, dead_letter_payload, decode_batch
from consumers.events import DeadLetter, SourceRecord

DIM = 3


def rec(value: bytes | None, offset: int = 0, partition: int = 0, ts: int = 5) -> SourceRecord:
    return SourceRecord("events", partition, offset, value, ts)


def event(**fields: Any) -> bytes:
    base: dict[str, Any] = {"id": "e1", "features": [0.1, 0.2, 0.3]}
    base.update(fields)
    return orjson.dumps({k: v for k, v in base.items() if v is not ...})


def reason_of(value: bytes | None, max_bytes: int = 65_536) -> str | None:
    batch = decode_batch([rec(value)], DIM, max_bytes)
    assert len(batch) + len(batch.dead_letters) == 1
    return batch.dead_letters[0].reason if batch.dead_letters else None


def test_valid_event_round_trip() -> None:
    batch = decode_batch(
        [
            rec(event(id="a", label=3, task="t1", ts=42), offset=7),
            rec(event(id="b", label="cat", features=[1, 2, 3]), offset=8, ts=99),
            rec(event(id="c", label=None), offset=9),
        ],
        DIM,
        1024,
    )
    assert batch.ids == ("a", "b", "c")
    assert batch.features.dtype == np.float32
    assert batch.features.flags.c_contiguous
    np.testing.assert_allclose(batch.features[1], [1, 2, 3])
    assert batch.labels == ("3", "cat", None)  # int labels normalised to str
    assert batch.tasks == ("t1", None, None)
    assert batch.timestamps_ms.dtype == np.int64
    assert batch.timestamps_ms.tolist() == [42, 99, 5]  # event ts, else the record's
    assert batch.offsets == {("events", 0): 10}
    assert batch.consumed == 3
    assert all(s.value is None for s in batch.sources)
    assert [s.offset for s in batch.sources] == [7, 8, 9]


def test_unknown_fields_are_ignored() -> None:
    assert reason_of(event(extra={"nested": [1, 2]}, more="x")) is None


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "empty"),
        (b"", "empty"),
        (b"{not json", "not_json"),
        (b"\xff\xfe{}", "not_json"),
        (b"[" * 5000 + b"]" * 5000, "not_json"),  # orjson's depth limit is 1024
        (b'{"id": "a", "features": ' + b"[" * 2000 + b"]" * 2000 + b"}", "not_json"),
        (b"[1, 2]", "not_object"),
        (b'"text"', "not_object"),
        (event(id=...), "missing_id"),
        (event(id=None), "missing_id"),
        (event(id=""), "bad_id"),
        (event(id=7), "bad_id"),
        (event(id="x" * 257), "bad_id"),
        (event(features=...), "bad_features"),
        (event(features="1,2,3"), "bad_features"),
        (event(features=[1.0, "2", 3.0]), "bad_features"),
        (event(features=[1.0, True, 3.0]), "bad_features"),
        (event(features=[1.0, None, 3.0]), "bad_features"),
        (event(features=[[1.0], 2.0, 3.0]), "bad_features"),
        (event(features=[1.0, 2.0]), "wrong_dimension"),
        (event(features=[]), "wrong_dimension"),
        (event(features=[1.0, 1e39, 3.0]), "non_finite"),
        (event(label=True), "bad_label"),
        (event(label=""), "bad_label"),
        (event(label=1.5), "bad_label"),
        (event(label=["a"]), "bad_label"),
        (event(task=False), "bad_task"),
        (event(task={"a": 1}), "bad_task"),
        (event(ts=-1), "bad_timestamp"),
        (event(ts=1.5), "bad_timestamp"),
        (event(ts="2024-01-01"), "bad_timestamp"),
        (event(ts=True), "bad_timestamp"),
        (event(ts=2**63), "bad_timestamp"),  # past the int64 timestamps column
    ],
)
def test_reasons(value: bytes | None, reason: str) -> None:
    assert reason in REASONS
    assert reason_of(value) == reason


def test_valid_edge_values() -> None:
    assert reason_of(event(id="x" * 256)) is None
    assert reason_of(event(label=0, task=0, ts=0)) is None
    assert reason_of(event(features=[0, -1, 2**62])) is None


def test_oversized_is_checked_before_parsing() -> None:
    value = b"{" + b" " * 100  # would be not_json if parsed
    assert reason_of(value, max_bytes=50) == "oversized"
    assert reason_of(event(), max_bytes=len(event())) is None


def test_duplicate_id_rejects_the_second_valid_copy() -> None:
    batch = decode_batch(
        [
            rec(event(id="a", features=[1.0, 1e39, 0.0]), offset=0),  # invalid first copy
            rec(event(id="a"), offset=1),
            rec(event(id="a"), offset=2),
            rec(event(id="b"), offset=3),
        ],
        DIM,
        1024,
    )
    assert batch.ids == ("a", "b")
    assert [s.offset for s in batch.sources] == [1, 3]
    assert [(d.reason, d.source.offset) for d in batch.dead_letters] == [
        ("non_finite", 0),
        ("duplicate_id", 2),
    ]
    assert batch.features.shape == (2, DIM)
    assert batch.features.flags.c_contiguous


def test_offsets_cover_every_record_per_partition() -> None:
    batch = decode_batch(
        [rec(event(id="a"), 10, 0), rec(b"bad", 11, 0), rec(b"bad", 4, 1), rec(None, 20, 2)],
        DIM,
        1024,
    )
    assert batch.offsets == {("events", 0): 12, ("events", 1): 5, ("events", 2): 21}
    assert batch.consumed == 4
    assert len(batch) == 1


@pytest.mark.parametrize(
    "features",
    [
        b"[1, true, 3]",
        b"[1, false, 3]",
        b'[1, "1.5", 3]',
        b"[1, null, 3]",
        b"[1, [2], 3]",
        b'[1,\n"2", 3]',
    ],
)
def test_batch_type_proof_never_lets_a_non_number_through(features: bytes) -> None:
    """The batch-wide byte test (_numbers_only) may only skip the per-feature check when it
    is sound: a non-number among clean neighbours, even beside strings holding brackets,
    still becomes bad_features and nothing else in the batch changes."""
    bad = b'{"id": "x[]", "features": ' + features + b', "label": "[1]"}'
    clean = [rec(event(id=f"c{i}", label="[]"), offset=i) for i in range(5)]
    batch = decode_batch([*clean, rec(bad, offset=5)], DIM, 65_536)
    assert batch.ids == tuple(f"c{i}" for i in range(5))
    assert [d.reason for d in batch.dead_letters] == ["bad_features"]


def test_batch_type_proof_accepts_numbers_in_every_json_form() -> None:
    values = [b'{"id": "a", "features": [1, -2.5e-3, 3E+2]}', b'{"id":"b","features":[ 0 ,1\t,2 ]}']
    batch = decode_batch([rec(v, offset=i) for i, v in enumerate(values)], DIM, 65_536)
    assert batch.ids == ("a", "b")
    np.testing.assert_allclose(batch.features, [[1, -0.0025, 300], [0, 1, 2]], rtol=1e-6)


def test_empty_input() -> None:
    batch = decode_batch([], DIM, 1024)
    assert len(batch) == 0
    assert batch.features.shape == (0, DIM)
    assert batch.offsets == {}
    assert batch.consumed == 0


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="input_dim"):
        decode_batch([], 0, 1024)


def test_dead_letter_payload() -> None:
    raw = b"\x00\xffnot json"
    dl = DeadLetter("not_json", "boom", SourceRecord("events", 2, 41, raw, 7))
    doc = orjson.loads(dead_letter_payload(dl))
    assert doc["reason"] == "not_json"
    assert doc["detail"] == "boom"
    assert doc["source"] == {"topic": "events", "partition": 2, "offset": 41}
    assert base64.b64decode(doc["raw"]) == raw
    assert doc["raw_truncated"] is False
    assert doc["raw_bytes"] == len(raw)


def test_dead_letter_payload_null_and_truncated() -> None:
    doc = orjson.loads(dead_letter_payload(DeadLetter("empty", "", rec(None))))
    assert doc["raw"] is None
    big = DeadLetter("oversized", "", rec(b"a" * 1000))
    doc = orjson.loads(dead_letter_payload(big, max_raw_bytes=100))
    assert base64.b64decode(doc["raw"]) == b"a" * 100
    assert doc["raw_truncated"] is True
    assert doc["raw_bytes"] == 1000


def test_every_reason_has_a_meaning() -> None:
    assert all(isinstance(v, str) and v for v in REASONS.values())
    assert len(REASONS) == 13


ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson can serialise
json_values = st.recursive(
    st.none() | st.booleans() | ints | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)


def _near_events() -> st.SearchStrategy[bytes]:
    """Mostly-well-formed events, so that the run also reaches the late checks and valid rows.

    Ids come from a tiny alphabet so that duplicates within a batch happen.
    """
    good_features = st.lists(
        st.floats(allow_nan=False, allow_infinity=False, width=32) | st.integers(-5, 5),
        min_size=DIM,
        max_size=DIM,
    )
    huge_features = st.lists(st.just(1e39) | st.floats(-1, 1), min_size=DIM, max_size=DIM)
    fields = st.fixed_dictionaries(
        {
            "id": st.text("ab", min_size=1, max_size=2) | ints | st.none(),
            "features": good_features | good_features | huge_features | json_values,
        },
        optional={
            "label": st.integers(0, 3) | st.text(max_size=3) | json_values,
            "task": st.integers(0, 3) | json_values,
            "ts": st.integers(0, 2**40) | json_values,
        },
    )
    return fields.map(orjson.dumps)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.none(), st.binary(max_size=64), _near_events(), _near_events()),
            st.integers(0, 2),
        ),
        max_size=20,
    )
)
def test_arbitrary_bytes_never_raise_and_are_accounted_for(
    items: list[tuple[bytes | None, int]],
) -> None:
    records = [rec(value, offset=i, partition=p) for i, (value, p) in enumerate(items)]
    batch = decode_batch(records, DIM, 256)
    assert len(batch) + len(batch.dead_letters) == batch.consumed == len(records)
    assert {d.reason for d in batch.dead_letters} <= REASONS.keys()
    assert batch.features.shape == (len(batch), DIM)
    assert np.isfinite(batch.features).all()
    assert len(set(batch.ids)) == len(batch.ids)
    for p in {r.partition for r in records}:
        assert (
            batch.offsets[("events", p)] == max(r.offset for r in records if r.partition == p) + 1
        )
    seen = sorted(
        [*(s.offset for s in batch.sources), *(d.source.offset for d in batch.dead_letters)]
    )
    assert seen == list(range(len(records)))
    for payload in map(dead_letter_payload, batch.dead_letters):
        assert isinstance(orjson.loads(payload), dict)


def test_dead_letter_payload_names_who_rejected_it() -> None:
    dl = DeadLetter("not_json", "boom", rec(b"x"))
    assert orjson.loads(dead_letter_payload(dl))["rejected_by"] is None
    doc = orjson.loads(dead_letter_payload(dl, rejected_by={"learner": "ce", "group": "g.ce"}))
    assert doc["rejected_by"] == {"learner": "ce", "group": "g.ce"}
