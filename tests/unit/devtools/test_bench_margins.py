"""SupCon + bank against CE + ER in the benchmark's report: paired margins and the share of
the gap to the joint bound, computed from hand-made runs whose answers are known."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.devtools.bench.forgetting import BenchConfig, RunResult
from pipeline.devtools.bench.forgetting_report import write_report
from pipeline.devtools.bench.margins import versus_baseline


def _run(method: str, seed: int, memory: int, accuracy: float) -> RunResult:
    return RunResult(
        method=method,
        seed=seed,
        memory=memory,
        final_accuracy=accuracy,
        forgetting=None,
        anytime_accuracy=None,
        min_accuracy=None,
        ncm_final_accuracy=accuracy,
        ece=None,
        curve=[(10, accuracy / 2), (20, accuracy)],
        seconds=1.0,
    )


def _no_constants(name: str) -> float:
    raise AssertionError(f"{name} in the report's JSON: not valid JSON")


def _grid(ce: list[float], supcon: list[float], joint: list[float] | None) -> list[RunResult]:
    runs = [_run("ce_er", s, 100, a) for s, a in enumerate(ce)]
    runs += [_run("supcon", s, 100, a) for s, a in enumerate(supcon)]
    runs += [_run("joint_supcon", s, 0, a) for s, a in enumerate(joint or [])]
    return runs


def test_the_margin_is_paired_by_seed_and_the_share_is_a_ratio_of_means() -> None:
    (m,) = versus_baseline(_grid([0.90, 0.90], [0.95, 0.97], [1.00, 1.00]))
    assert m.memory == 100
    assert m.seeds == (0, 1)
    assert m.per_seed == pytest.approx((5.0, 7.0))
    assert m.share is not None
    assert m.share.joint == "joint_supcon"
    assert m.share.value == pytest.approx(0.6)
    # Two seeds resample to {0,0}, {0,1}, {1,1}: shares 0.5, 0.6, 0.7; the percentile
    # interval lies within the extremes and covers the middle.
    assert 0.5 - 1e-9 <= m.share.low <= 0.6 <= m.share.high <= 0.7 + 1e-9
    assert m.share.resamples == 10_000


def test_equal_seeds_give_a_zero_width_interval() -> None:
    (m,) = versus_baseline(_grid([0.9] * 3, [0.96] * 3, [0.98] * 3))
    assert m.share is not None
    assert m.share.value == pytest.approx(0.75)
    assert m.share.low == pytest.approx(0.75)
    assert m.share.high == pytest.approx(0.75)


def test_only_seeds_both_arms_ran_count_and_a_missing_bound_gives_no_share() -> None:
    runs = [*_grid([0.90, 0.80], [0.95, 0.99], None), _run("supcon", 2, 100, 0.5)]
    (m,) = versus_baseline(runs)
    assert m.seeds == (0, 1)
    assert m.per_seed == pytest.approx((5.0, 19.0))
    assert m.share is None
    # A bound at or below CE + ER leaves no gap to close.
    (low,) = versus_baseline(_grid([0.90], [0.95], [0.85]))
    assert low.share is None
    # One seed: a share without an interval.
    (one,) = versus_baseline(_grid([0.90], [0.95], [1.0]))
    assert one.share is not None
    assert one.share.value == pytest.approx(0.5)
    assert math.isnan(one.share.low)
    assert one.share.resamples == 0


def test_no_comparison_without_both_arms() -> None:
    assert versus_baseline([_run("supcon", 0, 20, 0.9), _run("ce_finetune", 0, 0, 0.2)]) == []


def test_the_report_carries_the_comparison(tmp_path) -> None:
    cfg = BenchConfig(memories=(100,), seeds=2, methods=("ce_er", "supcon", "joint_supcon"))
    paths = write_report(_grid([0.90, 0.90], [0.95, 0.97], [1.0, 1.0]), cfg, tmp_path, 1.0)
    text = paths["markdown"].read_text()
    assert "| memory | seeds | margin (points) | per seed | share of the gap closed |" in text
    # mean +6.0 points; the half-width t(0.975, 1) · sd / √2 = 12.706 · √2 / √2
    assert "| 100 | 2 | +6.0 ± 12.7 | +5.0 to +7.0 | 60.0% (" in text
    report = json.loads(paths["json"].read_text())
    (row,) = report["versus_ce_er"]
    assert row["memory"] == 100
    assert row["margin_points"]["mean"] == pytest.approx(6.0)
    assert row["per_seed_points"] == pytest.approx([5.0, 7.0])
    assert row["gap_closed"]["share"] == pytest.approx(0.6)
    assert row["gap_closed"]["joint"] == "joint_supcon"


def test_a_one_seed_share_is_valid_json(tmp_path) -> None:
    cfg = BenchConfig(memories=(100,), seeds=1, methods=("ce_er", "supcon", "joint_supcon"))
    paths = write_report(_grid([0.90], [0.95], [1.0]), cfg, tmp_path, 1.0)
    report = json.loads(paths["json"].read_text(), parse_constant=_no_constants)
    gap = report["versus_ce_er"][0]["gap_closed"]
    assert gap["share"] == pytest.approx(0.5)
    assert gap["ci95_low"] is None
    assert gap["ci95_high"] is None
    assert "50.0% (Joint, offline (SupCon); one seed: no interval)" in paths["markdown"].read_text()
