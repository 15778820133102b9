"""The demo's table and report.json: three learners, accuracy beside wall time per event."""

from __future__ import annotations

from typing import Any

from pipeline.devtools.demo import ARMS, LEARNERS, build_report, format_table


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
