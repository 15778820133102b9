"""Typed telemetry records: JSON round trips, the wire field names, and malformed input."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from pipeline.config import SidecarSettings
from pipeline.sidecar.state import LearnerState, SidecarState
from pipeline.telemetry.channel import MALFORMED, decode_entry
from pipeline.telemetry.records import (
    ClassifierScores,
    EndRecord,
    EvalRecord,
    StepRecord,
    TelemetryDecodeError,
    decode_record,
)

STEP = StepRecord(
    learner="ce",
    step=12,
    ts=1_700_000_000_123,
    objective="ce",
    group="g",
    events_total=120,
    trained_total=96,
    batch_events=10,
    trained=8,
    held_out=1,
    predicted=0,
    dead_lettered=1,
    loss=0.731245,
    per_class_loss={"0": 0.5, "cat": 1.25},
    skipped=False,
    skipped_total=2,
    elapsed_s=6.125,
    prequential_correct=61,
    prequential_total=80,
)
EVAL = EvalRecord(
    learner="ce",
    step=12,
    ts=1_700_000_000_456,
    primary="head",
    classifiers={
        "ncm": ClassifierScores({"0": 1.0, "cat": 0.5}, 0.125),
        "head": ClassifierScores({"0": 0.75, "cat": 0.25}, None),
    },
    objective="ce",
    group="g",
    events_total=120,
    class_task={"0": "t0", "cat": None},
    current_task="t0",
    probe_sizes={"0": 10, "cat": 3},
)
END = EndRecord(learner="ce", step=12, events_total=120, elapsed_s=6.5)

# The field names the learner has always written (the sidecar of an older release reads them).
WIRE_FIELDS = {
    "step": {
        "learner", "objective", "group", "step", "ts", "events_total", "trained_total",
        "batch_events", "trained", "held_out", "predicted", "dead_lettered", "loss",
        "per_class_loss", "skipped", "skipped_total", "elapsed_s", "prequential_correct",
        "prequential_total",
    },
    "eval": {
        "learner", "objective", "group", "step", "ts", "events_total", "primary",
        "classifiers", "class_task", "current_task", "probe_sizes",
    },
    "end": {"learner", "step", "events_total", "elapsed_s", "world_size", "model_digest"},
}  # fmt: skip


@pytest.mark.parametrize("record", [STEP, EVAL, END], ids=["step", "eval", "end"])
def test_round_trip(record: StepRecord | EvalRecord | EndRecord) -> None:
    data = record.to_json()
    assert type(record).from_json(data) == record
    assert decode_record(record.KIND, data) == record
    assert set(orjson.loads(data)) == WIRE_FIELDS[record.KIND]


def test_classifier_scores_are_nested_objects_on_the_wire() -> None:
    payload = orjson.loads(EVAL.to_json())
    assert payload["classifiers"]["ncm"] == {
        "per_class_accuracy": {"0": 1.0, "cat": 0.5},
        "ece": 0.125,
        "ece_calibrated": None,
        "temperature": None,
    }


def test_calibrated_ece_is_optional_both_ways() -> None:
    # An older learner's scores (no calibration fields) decode with None ...
    old = orjson.loads(EVAL.to_json())
    for scores in old["classifiers"].values():
        del scores["ece_calibrated"], scores["temperature"]
    assert EvalRecord.from_json(orjson.dumps(old)) == EVAL
    # ... and a newer learner's calibration travels through to the sidecar's payload.
    calibrated = ClassifierScores({"0": 1.0}, 0.2, ece_calibrated=0.03, temperature=0.04)
    record = dataclasses.replace(EVAL, primary="ncm", classifiers={"ncm": calibrated})
    assert EvalRecord.from_json(record.to_json()) == record
    state = LearnerState("ce", SidecarSettings())
    state.apply(record)
    payload = state.forgetting_payload()
    assert (payload["ece"], payload["ece_calibrated"]) == (0.2, 0.03)


def test_optional_fields_default_and_unknown_fields_are_ignored() -> None:
    # What an older learner might write, plus a field from a newer one.
    old = {"learner": "ce", "step": 3, "ts": 3000, "loss": 1.5, "added_later": [1, 2]}
    record = StepRecord.from_json(orjson.dumps(old))
    assert record == StepRecord(learner="ce", step=3, ts=3000, loss=1.5)
    assert EndRecord.from_json(b'{"learner": "ce", "step": 1}') == EndRecord("ce", 1)


def test_lenient_values_are_normalised() -> None:
    # JSON carries no NaN (orjson writes it as null); from_dict may still be handed one.
    per_class = {"a": 0.5, "b": None, "c": "nan-ish", "d": True, "e": float("nan"), 7: 2}
    step = StepRecord.from_dict(
        {"learner": "ce", "step": 1, "ts": 1, "loss": float("inf"), "per_class_loss": per_class}
    )
    assert step.loss is None  # not finite
    assert step.per_class_loss == {"a": 0.5, "7": 2.0}  # entries that are not finite numbers
    evaluation = EvalRecord.from_json(
        b'{"learner": "ce", "step": 1, "ts": 1, "primary": "ncm",'
        b' "classifiers": {"ncm": {"per_class_accuracy": {"a": 1}}},'
        b' "class_task": {"a": 0, "b": null}, "current_task": 1}'
    )
    assert evaluation.class_task == {"a": "0", "b": None}  # integer tasks read as strings
    assert evaluation.current_task == "1"
    assert evaluation.classifiers == {"ncm": ClassifierScores({"a": 1.0}, None)}


def test_unknown_kind_decodes_to_none() -> None:
    assert decode_record("something-new", b"{}") is None


def _with(record: StepRecord | EvalRecord, **changes: Any) -> bytes:
    payload = orjson.loads(record.to_json())
    payload.update(changes)
    return orjson.dumps({k: v for k, v in payload.items() if v != "<absent>"})


@pytest.mark.parametrize(
    ("kind", "data", "message"),
    [
        ("step", b"{not json", "not JSON"),
        ("step", b"[1, 2]", "list, not an object"),
        ("end", b'"end"', "str, not an object"),
        ("step", _with(STEP, step="<absent>"), "step.step is missing"),
        ("step", _with(STEP, ts=None), "step.ts is missing"),
        ("step", _with(STEP, step=True), "step.step is bool"),
        ("step", _with(STEP, step=1.5), "step.step is float"),
        ("step", _with(STEP, learner=7), "step.learner is int"),
        ("step", _with(STEP, loss="low"), "step.loss is str"),
        ("step", _with(STEP, skipped="no"), "step.skipped is str"),
        ("step", _with(STEP, per_class_loss=[1.0]), "step.per_class_loss is list"),
        ("eval", _with(EVAL, classifiers="<absent>"), "eval.classifiers is missing"),
        ("eval", _with(EVAL, classifiers={"head": [1]}), "eval.classifiers.head is list"),
        (
            "eval",
            _with(EVAL, classifiers={"head": {"per_class_accuracy": ["not", "a", "map"]}}),
            "eval.classifiers.head.per_class_accuracy is list",
        ),
        ("eval", _with(EVAL, current_task=[0]), "eval.current_task is list"),
        ("eval", _with(EVAL, class_task={"a": 1.5}), "eval.class_task.a is float"),
        ("eval", _with(EVAL, probe_sizes={"a": "ten"}), "eval.probe_sizes.a is str"),
    ],
)
def test_malformed_payloads_raise_one_typed_error(kind: str, data: bytes, message: str) -> None:
    with pytest.raises(TelemetryDecodeError, match=message):
        decode_record(kind, data)


def test_decode_error_is_a_value_error_of_the_project() -> None:
    from pipeline.exceptions import SupconStreamError

    assert issubclass(TelemetryDecodeError, SupconStreamError)
    assert issubclass(TelemetryDecodeError, ValueError)


def test_decode_entry_reads_the_stream_fields() -> None:
    entry = decode_entry("ce", b"5-0", {b"kind": b"step", b"data": STEP.to_json()})
    assert (entry.learner, entry.id, entry.kind, entry.record, entry.error) == (
        "ce",
        "5-0",
        "step",
        STEP,
        None,
    )
    unknown = decode_entry("ce", "6-0", {"kind": "newer", "data": "{}"})
    assert (unknown.kind, unknown.record, unknown.error) == ("newer", None, None)


@pytest.mark.parametrize(
    "fields",
    [
        {b"data": b"{}"},
        {b"kind": b"step"},
        {b"kind": b"step", b"data": b"{not json"},
        {b"kind": b"\xff", b"data": b"{}"},
        {b"kind": b"eval", b"data": _with(EVAL, step="12")},
        None,
    ],
)
def test_malformed_entries_are_logged_and_marked(fields: dict[bytes, bytes] | None) -> None:
    with capture_logs() as logs:
        entry = decode_entry("ce", b"7-0", fields)
    assert (entry.kind, entry.record, entry.id) == (MALFORMED, None, "7-0")
    assert entry.error
    assert [e["event"] for e in logs] == ["malformed telemetry entry"]


def test_sidecar_counts_malformed_entries_and_ignores_unknown_kinds() -> None:
    state = SidecarState(SidecarSettings())
    bad = decode_entry("ce", b"1-0", {b"kind": b"step", b"data": b"[]"})
    newer = decode_entry("ce", b"2-0", {b"kind": b"newer", b"data": b"{}"})
    assert state.apply(bad) == []
    assert state.apply(newer) == []
    assert state.malformed == 1
    good = decode_entry("ce", b"3-0", {b"kind": b"end", b"data": END.to_json()})
    assert state.apply(good) == []  # an end with nothing seen before publishes nothing
    assert state.learners["ce"].step == 12
