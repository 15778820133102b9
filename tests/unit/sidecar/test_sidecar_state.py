"""The sidecar's payload building (pure: SidecarState), with hand-computed values."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest

from pipeline.config import SidecarSettings
from pipeline.sidecar.state import Publication, SidecarState
from pipeline.telemetry.channel import MALFORMED, TelemetryEntry, decode_entry

approx = pytest.approx
CFG = SidecarSettings(window=3, ema_alpha=0.5, publish_every_s=2.0, rate_window_s=10.0)


_ids = itertools.count(1)


def rec(kind: str, payload: dict[str, Any], learner: str = "ce") -> TelemetryEntry:
    """The entry the reader makes of this stream entry (the wire format, decoded)."""
    fields = {b"kind": kind.encode(), b"data": orjson.dumps(payload)}
    return decode_entry(learner, f"{next(_ids)}-0".encode(), fields)


def step(n: int, loss: float | None, per_class: dict[str, float], **extra: Any) -> dict[str, Any]:
    return {
        "learner": "ce",
        "objective": "ce",
        "group": "g",
        "step": n,
        "ts": n * 1000,
        "events_total": n * 10,
        "batch_events": 10,
        "loss": loss,
        "per_class_loss": per_class,
        "skipped": loss is None,
        **extra,
    }


def evaluation(n: int, head: dict[str, float], current_task: int, **extra: Any) -> dict[str, Any]:
    return {
        "learner": "ce",
        "objective": "ce",
        "group": "g",
        "step": n,
        "ts": n * 1000,
        "events_total": n * 10,
        "primary": "head",
        # NCM numbers differ on purpose: only the primary classifier may be used.
        "classifiers": {
            "ncm": {"per_class_accuracy": dict.fromkeys(head, 1.0)},
            "head": {"per_class_accuracy": head, "ece": 0.125},
        },
        # Tasks as ints, as a JSONL user may send them: normalised to strings.
        "class_task": {"a": 0, "b": 0, "c": 1, "d": 1},
        "current_task": current_task,
        "probe_sizes": dict.fromkeys(head, 10),
        **extra,
    }


def only(pubs: list[Publication], stream: str) -> dict[str, Any]:
    found = [p.payload for p in pubs if p.stream == stream]
    assert len(found) == 1, pubs
    return found[0]


def feed_steps(state: SidecarState) -> None:
    state.apply(rec("step", step(1, 1.0, {"0": 1.0}, skipped_total=0)))
    state.apply(rec("step", step(2, None, {}, skipped_total=1)))
    state.apply(
        rec(
            "step",
            step(
                3,
                2.0,
                {"0": 3.0, "1": 1.0},
                skipped_total=1,
                prequential_correct=6,
                prequential_total=10,
            ),
        )
    )
    state.apply(
        rec(
            "step",
            step(4, 3.0, {"0": 2.0}, skipped_total=1, prequential_correct=15, prequential_total=20),
        )
    )


def test_loss_payload() -> None:
    state = SidecarState(CFG)
    feed_steps(state)
    payload = only(state.due_loss(now=100.0), "loss")
    assert payload == {
        "learner": "ce",
        "objective": "ce",
        "group": "g",
        "step": 4,
        "ts": 4000,
        "window": 3,
        "loss_mean": approx((1.0 + 2.0 + 3.0) / 3),  # the skipped step does not count
        "loss_ema": approx(2.25),  # 1 → 0.5·2 + 0.5·1 = 1.5 → 0.5·3 + 0.5·1.5
        "per_class_loss": {"0": approx((1.0 + 3.0 + 2.0) / 3), "1": approx(1.0)},
        "events_total": 40,
        "events_per_s": approx(30 / 3.0),  # 3 batches of 10 after the anchor, over 3 s
        "skipped_steps": 1,
        "prequential_accuracy": approx(0.75),
        "final": False,
    }


def test_loss_is_published_per_period_and_only_with_new_steps() -> None:
    state = SidecarState(CFG)
    assert state.due_loss(now=0.0) == []
    feed_steps(state)
    assert len(state.due_loss(now=10.0)) == 1
    assert state.due_loss(now=20.0) == []  # nothing new
    state.apply(rec("step", step(5, 1.0, {})))
    assert state.due_loss(now=11.0) == []  # new data, but within publish_every_s
    assert len(state.due_loss(now=12.0)) == 1


def test_skipped_steps_counted_when_the_learner_sends_no_total() -> None:
    state = SidecarState(CFG)
    state.apply(rec("step", step(1, None, {})))
    state.apply(rec("step", step(2, None, {})))
    payload = only(state.due_loss(now=0.0), "loss")
    assert payload["skipped_steps"] == 2
    assert payload["loss_mean"] is None
    assert payload["prequential_accuracy"] is None


def test_forgetting_payloads_use_the_primary_classifier() -> None:
    state = SidecarState(CFG)
    p1 = only(state.apply(rec("eval", evaluation(10, {"a": 1.0, "b": 0.8}, 0))), "forgetting")
    assert p1["classifier"] == "head"
    assert p1["avg_forgetting"] is None
    assert p1["per_task_accuracy"] == {"0": approx(0.9)}

    pubs = state.apply(rec("eval", evaluation(20, {"a": 0.4, "b": 0.8, "c": 1.0, "d": 0.6}, 1)))
    p2 = only(pubs, "forgetting")
    assert p2 == {
        "learner": "ce",
        "objective": "ce",
        "group": "g",
        "step": 20,
        "ts": 20_000,
        "events_total": 200,
        "classifier": "head",
        "per_class_accuracy": {"a": 0.4, "b": 0.8, "c": 1.0, "d": 0.6},
        "best_accuracy": {"a": 1.0, "b": 0.8, "c": 1.0, "d": 0.6},
        "forgetting": {"a": approx(0.6), "b": 0.0, "c": 0.0, "d": 0.0},
        "avg_forgetting": approx((0.6 + 0.0) / 2),  # a, b: first seen in task 0 < current 1
        "avg_accuracy": approx((0.4 + 0.8 + 1.0 + 0.6) / 4),
        "per_task_accuracy": {"0": approx(0.6), "1": approx(0.8)},
        "per_task_forgetting": {"0": approx(0.3), "1": 0.0},
        "anytime_avg_accuracy": approx((0.9 + 0.7) / 2),
        "backward_transfer": None,
        # Task 0 ended before this evaluation: its lowest accuracy since is this one.
        "min_task_accuracy": {"0": approx(0.6)},
        "avg_min_accuracy": approx(0.6),
        "ece": 0.125,  # the primary classifier's
        "ece_calibrated": None,  # NCM after temperature scaling; the head has none
        "accuracy_matrix": [{"task": "0", "accuracy": {"0": approx(0.9)}}],
        "current_task": "1",
        "evaluations": 2,
        "final": False,
    }


def test_end_publishes_final_loss_and_forgetting() -> None:
    state = SidecarState(CFG)
    feed_steps(state)
    state.apply(rec("eval", evaluation(4, {"a": 1.0, "b": 0.8}, 0)))
    state.apply(rec("eval", evaluation(8, {"a": 0.4, "b": 0.8, "c": 1.0, "d": 0.6}, 1)))
    pubs = state.apply(
        rec("end", {"learner": "ce", "step": 9, "events_total": 90, "elapsed_s": 1.5})
    )
    assert [p.stream for p in pubs] == ["loss", "forgetting"]
    assert all(p.learner == "ce" for p in pubs)
    loss = only(pubs, "loss")
    assert loss["final"] is True
    assert (loss["step"], loss["events_total"]) == (9, 90)
    forgetting = only(pubs, "forgetting")
    assert forgetting["final"] is True
    assert forgetting["accuracy_matrix"] == [
        {"task": "0", "accuracy": {"0": approx(0.9)}},
        {"task": "1", "accuracy": {"0": approx(0.6), "1": approx(0.8)}},
    ]
    # BWT = R[1, 0] − R[0, 0] = 0.6 − 0.9
    assert forgetting["backward_transfer"] == approx(-0.3)
    assert state.due_loss(now=1e9) == []  # the end already published the loss
    # A new run of the same learner clears `final`.
    state.apply(rec("step", step(10, 1.0, {})))
    assert only(state.due_loss(now=1e9), "loss")["final"] is False


def test_learners_are_kept_apart() -> None:
    state = SidecarState(CFG)
    state.apply(rec("step", step(1, 1.0, {}), learner="a"))
    state.apply(rec("step", step(1, 5.0, {}), learner="b"))
    by_learner = {p.learner: p.payload["loss_mean"] for p in state.due_loss(now=0.0)}
    assert by_learner == {"a": 1.0, "b": 5.0}


def test_bad_records_are_skipped_not_fatal() -> None:
    state = SidecarState(CFG)
    assert state.apply(rec(MALFORMED, {"error": "x"})) == []
    assert state.apply(rec("something-new", {})) == []
    bad_eval = evaluation(1, {"a": 1.0}, 0)
    bad_eval["classifiers"] = {"head": {"per_class_accuracy": ["not", "a", "map"]}}
    assert state.apply(rec("eval", bad_eval)) == []
    bad_step = step(1, 1.0, {"0": "nan-ish"})
    state.apply(rec("step", bad_step))  # a non-numeric per-class loss is ignored
    assert only(state.due_loss(now=0.0), "loss")["per_class_loss"] == {}
