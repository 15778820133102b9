"""The demo's table and report.json: three learners, accuracy beside wall time per event."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.config import load_settings
from pipeline.devtools.demo import (
    ARMS,
    LEARNER_TIMEOUT_PER_EVENT_S,
    LEARNER_TIMEOUT_S,
    LEARNERS,
    build_report,
    check_fits,
    format_table,
    learner_timeout_s,
)
from pipeline.exceptions import ConfigError
from pipeline.streams.scenarios import Scenario


def _metrics(acc: float) -> dict[str, Any]:
    return {
        "forgetting": {
            "avg_accuracy": acc,
            "avg_forgetting": 1.0 - acc,
            "per_task_accuracy": {"0": acc, "1": acc / 2},
            "classifier": "ncm",
        },
        "loss": {},
    }


def _result(events_per_s: float) -> dict[str, Any]:
    return {
        "consumed": 1797,
        "events_per_s": events_per_s,
        "trained": 1519,
        "held_out": 278,
        "dead_lettered": 0,
        "skipped_steps": 0,
    }


def test_the_three_arms_are_the_trap_the_baseline_and_the_product() -> None:
    assert LEARNERS == ("ce", "ce_replay", "supcon")
    by_name = {arm.name: arm for arm in ARMS}
    assert (by_name["ce"].objective, by_name["ce"].replay) == ("ce", False)
    assert (by_name["ce_replay"].objective, by_name["ce_replay"].replay) == ("ce", True)
    assert (by_name["supcon"].objective, by_name["supcon"].replay) == ("supcon", True)


def test_report_and_table_keep_every_learner_with_its_wall_time_per_event() -> None:
    metrics = {"ce": _metrics(0.3), "ce_replay": _metrics(0.9), "supcon": _metrics(0.95)}
    results = {"ce": _result(800.0), "ce_replay": _result(400.0), "supcon": _result(250.0)}
    report = build_report(metrics, results, "split-digits")
    learners = report["learners"]
    assert list(learners) == ["ce", "ce_replay", "supcon"]
    assert learners["ce_replay"]["replay"] is True
    assert learners["ce"]["replay"] is False
    assert learners["supcon"]["wall_ms_per_event"] == 4.0
    assert learners["ce"]["wall_ms_per_event"] == 1.25
    table = format_table(report)
    lines = table.splitlines()
    assert lines[0] == "scenario: split-digits"
    assert "ms/event" in lines[1]
    rows = {line.split()[0]: line.split() for line in lines[3:6]}
    assert rows["ce_replay"][1:4] == ["ce", "yes", "0.900"]
    assert rows["supcon"][-1] == "4.00"


def test_a_learner_that_measured_no_rate_has_no_time_per_event() -> None:
    report = build_report({"ce": _metrics(0.3)}, {"ce": _result(0.0)}, "split-digits")
    assert report["learners"]["ce"]["wall_ms_per_event"] is None
    assert format_table(report).splitlines()[3].split()[-1] == "–"


def test_a_long_stream_gets_more_time_and_a_short_one_the_floor() -> None:
    assert learner_timeout_s(100) == LEARNER_TIMEOUT_S
    assert learner_timeout_s(100_000) == 100_000 * LEARNER_TIMEOUT_PER_EVENT_S


def test_a_stream_the_learners_cannot_take_is_refused_with_the_setting_to_change() -> None:
    fits = load_settings(None, ["model.input_dim=784"])
    check_fits(fits, _stream(784, 10), "mnist.npz")  # no error
    with pytest.raises(ConfigError, match=r"mnist.npz has 784 features .* model.input_dim is 64"):
        check_fits(load_settings(None, []), _stream(784, 10), "mnist.npz")
    with pytest.raises(ConfigError, match=r"120 classes .* model.max_classes=120"):
        check_fits(fits, _stream(784, 120), "mnist.npz")


def _stream(width: int, classes: int) -> Scenario:
    labels = tuple(range(classes))
    return Scenario("mnist.npz", width, 0, labels, (labels,), lambda: iter(()))
