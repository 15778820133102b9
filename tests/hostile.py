"""Hypothesis strategies for hostile event payloads, each with the DLQ reason it must get.

Shared by the decoder fuzz test (unit) and the running-learner fuzz test (integration).
``None`` as the expected reason means "valid: must be trained, held out or predicted".
"""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import strategies as st

DIM = 8
MAX_EVENT_BYTES = 4096

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | finite | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


def _doc(event_id: str, features: Any, **extra: Any) -> bytes:
    return orjson.dumps({"id": event_id, "features": features, **extra})


def _deep(depth: int) -> bytes:
    return b'{"id": "deep", "features": ' + b"[" * depth + b"]" * depth + b"}"


@st.composite
def hostile(draw: st.DrawFn, tag: str = "h") -> tuple[bytes, str | None]:
    """One payload and its expected reason (None: valid)."""
    n = draw(st.integers(0, 10**9))
    eid = f"{tag}-{n}"
    feats = draw(st.lists(finite, min_size=DIM, max_size=DIM))
    kind = draw(
        st.sampled_from(
            [
                "valid",
                "unknown_fields",
                "unlabeled",
                "bytes",
                "empty",
                "deep",
                "huge",
                "wrong_dim",
                "nan_token",
                "inf_float32",
                "not_object",
                "no_id",
                "bad_id",
                "wrong_types",
                "bad_label",
                "bad_ts",
                "oversized",
            ]
        )
    )
    label = draw(st.integers(0, 3))
    cases: dict[str, tuple[bytes, str | None]] = {
        "valid": (_doc(eid, feats, label=label), None),
        "unknown_fields": (
            _doc(eid, feats, label=label, extra=draw(json_values), meta={"x": [1, 2]}),
            None,
        ),
        "unlabeled": (_doc(eid, feats, label=None), None),
        "bytes": (b"\xff" + draw(st.binary(max_size=40)), "not_json"),
        "empty": (b"", "empty"),
        "deep": (_deep(draw(st.integers(1100, 1500))), "not_json"),
        # 500 numbers pass the size check but have the wrong length; 100k do not fit at all.
        "huge": (_doc(eid, [0.5] * 500, label=label), "wrong_dimension"),
        "wrong_dim": (
            _doc(eid, feats[: draw(st.integers(0, DIM - 1))], label=label),
            "wrong_dimension",
        ),
        "nan_token": (
            b'{"id": "' + eid.encode() + b'", "features": [NaN' + b", 0" * (DIM - 1) + b"]}",
            "not_json",
        ),
        "inf_float32": (_doc(eid, [1e39, *feats[1:]], label=label), "non_finite"),
        "not_object": (orjson.dumps(draw(st.lists(json_scalars, max_size=4))), "not_object"),
        "no_id": (orjson.dumps({"features": feats, "label": label}), "missing_id"),
        "bad_id": (_doc(draw(st.sampled_from(["", "x" * 300])), feats, label=label), "bad_id"),
        "wrong_types": (
            _doc(eid, [*feats[:-1], draw(st.sampled_from(["1.5", True, None, [1]]))]),
            "bad_features",
        ),
        "bad_label": (
            _doc(eid, feats, label=draw(st.sampled_from([1.5, True, [], {}]))),
            "bad_label",
        ),
        "bad_ts": (
            _doc(eid, feats, label=label, ts=draw(st.sampled_from([-1, "now", 1.5, 2**63]))),
            "bad_timestamp",
        ),
        "oversized": (_doc(eid, [0.5] * 100_000, label=label), "oversized"),
    }
    return cases[kind]


def hostile_stream(
    tag: str, max_size: int = 60
) -> st.SearchStrategy[list[tuple[bytes, str | None]]]:
    """A list of payloads; some valid ones are repeated later (duplicate ids)."""
    return st.lists(hostile(tag), min_size=1, max_size=max_size)
