"""Rolling metrics and forgetting, checked against values computed by hand."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest

from pipeline.quality import (
    Ema,
    ForgettingResult,
    ForgettingTracker,
    PerKeyRollingMean,
    Rate,
    RollingMean,
    RollingMetric,
    expected_calibration_error,
)

approx = pytest.approx


def test_every_metric_satisfies_the_protocol() -> None:
    # Type-checked by mypy: each metric fits RollingMetric[observation, result].
    mean: RollingMetric[float, float | None] = RollingMean(3)
    ema: RollingMetric[float, float | None] = Ema(0.5)
    per_key: RollingMetric[Mapping[str, float], dict[str, float]] = PerKeyRollingMean(3)
    rate: RollingMetric[tuple[float, float], float | None] = Rate(10.0)
    forgetting: RollingMetric[Mapping[str, float], ForgettingResult] = ForgettingTracker()
    mean.update(1.0)
    ema.update(1.0)
    per_key.update({"a": 1.0})
    rate.update((1.0, 0.0))
    forgetting.update({"a": 1.0})
    assert (mean.result(), ema.result(), per_key.result(), rate.result()) == (
        1.0,
        1.0,
        {"a": 1.0},
        None,
    )
    assert forgetting.result().avg_accuracy == 1.0


class TestRollingMean:
    def test_empty_is_none(self) -> None:
        assert RollingMean(3).result() is None

    def test_mean_of_last_window_values(self) -> None:
        m = RollingMean(3)
        for x in (1.0, 2.0, 3.0, 4.0):
            m.update(x)
        assert m.result() == approx((2 + 3 + 4) / 3)
        assert len(m) == 3

    def test_partial_window(self) -> None:
        m = RollingMean(5)
        m.update(1.0)
        m.update(4.0)
        assert m.result() == approx(2.5)

    def test_rejects_bad_window(self) -> None:
        with pytest.raises(ValueError, match="window"):
            RollingMean(0)


class TestEma:
    def test_seeded_with_first_value(self) -> None:
        e = Ema(0.5)
        assert e.result() is None
        e.update(1.0)
        assert e.result() == approx(1.0)
        e.update(3.0)  # 0.5·3 + 0.5·1
        assert e.result() == approx(2.0)
        e.update(5.0)  # 0.5·5 + 0.5·2
        assert e.result() == approx(3.5)

    def test_alpha_one_tracks_last_value(self) -> None:
        e = Ema(1.0)
        for x in (3.0, 7.0, 2.0):
            e.update(x)
        assert e.result() == approx(2.0)

    @pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
    def test_rejects_bad_alpha(self, alpha: float) -> None:
        with pytest.raises(ValueError, match="alpha"):
            Ema(alpha)


def test_per_key_rolling_mean_moves_each_key_independently() -> None:
    m = PerKeyRollingMean(2)
    m.update({"a": 1.0, "b": 10.0})
    m.update({"a": 3.0})
    m.update({"a": 5.0, "b": 20.0})
    assert m.result() == {"a": approx(4.0), "b": approx(15.0)}


class TestRate:
    def test_needs_two_observations(self) -> None:
        r = Rate(10.0)
        assert r.result() is None
        r.update((5, 0.0))
        assert r.result() is None

    def test_events_after_the_anchor_over_the_span(self) -> None:
        r = Rate(10.0)
        r.update((10, 0.0))
        r.update((20, 1.0))
        r.update((30, 2.0))
        assert r.result() == approx((20 + 30) / 2.0)

    def test_window_keeps_one_anchor_before_the_horizon(self) -> None:
        r = Rate(10.0)
        for count, t in ((10, 0.0), (20, 1.0), (30, 2.0), (40, 20.0)):
            r.update((count, t))
        # Horizon 10: (0, 10) and (1, 20) fall out, (2, 30) stays as the anchor.
        assert r.result() == approx(40 / 18.0)

    def test_zero_span_is_none(self) -> None:
        r = Rate(10.0)
        r.update((5, 1.0))
        r.update((5, 1.0))
        assert r.result() is None

    def test_clock_going_back_starts_over(self) -> None:
        r = Rate(10.0)
        r.update((10, 100.0))
        r.update((10, 101.0))
        r.update((7, 50.0))
        assert r.result() is None
        r.update((8, 52.0))
        assert r.result() == approx(8 / 2.0)


class TestForgettingWithoutTasks:
    """No tasks: "seen before" means evaluated at least twice."""

    def test_closed_form(self) -> None:
        t = ForgettingTracker()
        t.update({"a": 0.8})
        r = t.result()
        assert r.avg_forgetting is None
        assert r.avg_accuracy == approx(0.8)
        assert r.anytime_avg_accuracy == approx(0.8)

        t.update({"a": 0.6, "b": 0.9})
        r = t.result()
        assert r.forgetting == {"a": approx(0.2), "b": approx(0.0)}
        assert r.seen_before == ("a",)
        assert r.avg_forgetting == approx(0.2)
        assert r.avg_accuracy == approx(0.75)
        assert r.anytime_avg_accuracy == approx((0.8 + 0.75) / 2)

        t.update({"a": 0.7, "b": 0.5})
        r = t.result()
        assert r.per_class_accuracy == {"a": approx(0.7), "b": approx(0.5)}
        assert r.best_accuracy == {"a": approx(0.8), "b": approx(0.9)}
        assert r.forgetting == {"a": approx(0.1), "b": approx(0.4)}
        assert r.avg_forgetting == approx(0.25)
        assert r.avg_accuracy == approx(0.6)
        assert r.anytime_avg_accuracy == approx((0.8 + 0.75 + 0.6) / 3)
        assert r.evaluations == 3
        assert r.per_task_accuracy == {}
        assert r.per_task_forgetting == {}
        assert r.accuracy_matrix == ()
        assert r.backward_transfer is None
        assert r.current_task is None

    def test_improvement_is_not_negative_forgetting(self) -> None:
        t = ForgettingTracker()
        t.update({"a": 0.5})
        t.update({"a": 0.9})
        assert t.result().forgetting == {"a": approx(0.0)}

    def test_class_missing_from_an_eval_keeps_its_last_value(self) -> None:
        t = ForgettingTracker()
        t.update({"a": 0.5, "b": 1.0})
        t.update({"a": 0.7})
        r = t.result()
        assert r.per_class_accuracy == {"a": approx(0.7), "b": approx(1.0)}
        assert r.seen_before == ("a",)

    def test_nan_accuracy_is_ignored(self) -> None:
        t = ForgettingTracker()
        t.update({"a": 0.5, "b": math.nan})
        assert t.result().per_class_accuracy == {"a": approx(0.5)}


def _matrix(r: ForgettingResult) -> list[tuple[str, dict[str, float]]]:
    return [(row.task, row.accuracy) for row in r.accuracy_matrix]


CLASS_TASK = {"a": "0", "b": "0", "c": "1", "d": "1", "e": "2"}


def _three_tasks() -> ForgettingTracker:
    t = ForgettingTracker()
    t.update({"a": 1.0, "b": 0.8}, class_task={"a": "0", "b": "0"}, current_task="0")
    t.update({"a": 0.9, "b": 0.9}, class_task={"a": "0", "b": "0"}, current_task="0")
    t.update({"a": 0.5, "b": 0.7, "c": 1.0, "d": 0.6}, class_task=CLASS_TASK, current_task="1")
    t.update(
        {"a": 0.3, "b": 0.5, "c": 0.6, "d": 0.4, "e": 1.0},
        class_task=CLASS_TASK,
        current_task="2",
    )
    return t


class TestForgettingWithTasks:
    """Class-incremental, 3 tasks: a,b in task 0; c,d in task 1; e in task 2."""

    def test_same_task_classes_are_not_seen_before(self) -> None:
        t = ForgettingTracker()
        t.update({"a": 1.0, "b": 0.8}, class_task={"a": "0", "b": "0"}, current_task="0")
        t.update({"a": 0.9, "b": 0.9}, class_task={"a": "0", "b": "0"}, current_task="0")
        r = t.result()
        assert r.forgetting == {"a": approx(0.1), "b": approx(0.0)}
        assert r.seen_before == ()
        assert r.avg_forgetting is None
        assert r.per_task_accuracy == {"0": approx(0.9)}
        assert r.accuracy_matrix == ()

    def test_second_task(self) -> None:
        t = ForgettingTracker()
        t.update({"a": 1.0, "b": 0.8}, class_task={"a": "0", "b": "0"}, current_task="0")
        t.update({"a": 0.9, "b": 0.9}, class_task={"a": "0", "b": "0"}, current_task="0")
        t.update({"a": 0.5, "b": 0.7, "c": 1.0, "d": 0.6}, class_task=CLASS_TASK, current_task="1")
        r = t.result()
        assert r.forgetting == {
            "a": approx(0.5),
            "b": approx(0.2),
            "c": approx(0.0),
            "d": approx(0.0),
        }
        assert r.seen_before == ("a", "b")
        assert r.avg_forgetting == approx(0.35)
        assert r.avg_accuracy == approx((0.5 + 0.7 + 1.0 + 0.6) / 4)
        assert r.per_task_accuracy == {"0": approx(0.6), "1": approx(0.8)}
        assert r.per_task_forgetting == {"0": approx(0.3), "1": approx(0.0)}
        # Task 0 ended at the previous evaluation, where its accuracy was (0.9 + 0.9) / 2.
        assert _matrix(r) == [("0", approx({"0": 0.9}))]
        assert r.backward_transfer is None  # needs two rows

    def test_third_task(self) -> None:
        r = _three_tasks().result()
        assert r.forgetting == {
            "a": approx(0.7),
            "b": approx(0.4),
            "c": approx(0.4),
            "d": approx(0.2),
            "e": approx(0.0),
        }
        assert r.seen_before == ("a", "b", "c", "d")
        assert r.avg_forgetting == approx((0.7 + 0.4 + 0.4 + 0.2) / 4)
        assert r.avg_accuracy == approx((0.3 + 0.5 + 0.6 + 0.4 + 1.0) / 5)
        assert r.per_task_accuracy == {"0": approx(0.4), "1": approx(0.5), "2": approx(1.0)}
        # Task best: t0 0.9 (evals 1-2), t1 0.8 (eval 3).
        assert r.per_task_forgetting == {"0": approx(0.5), "1": approx(0.3), "2": approx(0.0)}
        assert _matrix(r) == [("0", approx({"0": 0.9})), ("1", approx({"0": 0.6, "1": 0.8}))]
        # BWT = R[1, 0] − R[0, 0]
        assert r.backward_transfer == approx(0.6 - 0.9)
        assert r.anytime_avg_accuracy == approx((0.9 + 0.9 + 0.7 + 0.56) / 4)
        assert r.current_task == "2"

    def test_finish_closes_the_last_task(self) -> None:
        t = _three_tasks()
        t.finish()
        r = t.result()
        assert _matrix(r)[-1] == ("2", approx({"0": 0.4, "1": 0.5, "2": 1.0}))
        # BWT = mean(R[2,0] − R[0,0], R[2,1] − R[1,1]) = mean(0.4 − 0.9, 0.5 − 0.8)
        assert r.backward_transfer == approx(((0.4 - 0.9) + (0.5 - 0.8)) / 2)

    def test_finish_then_more_of_the_same_task_replaces_the_row(self) -> None:
        t = _three_tasks()
        t.finish()
        t.finish()
        assert len(t.result().accuracy_matrix) == 3
        t.update({"e": 0.8}, class_task=CLASS_TASK, current_task="2")
        t.update({"f": 1.0}, class_task={**CLASS_TASK, "f": "3"}, current_task="3")
        rows = t.result().accuracy_matrix
        assert [row.task for row in rows] == ["0", "1", "2"]
        assert rows[-1].accuracy["2"] == approx(0.8)

    def test_first_task_of_a_class_never_changes(self) -> None:
        t = ForgettingTracker()
        t.update({"a": 1.0}, class_task={"a": "0"}, current_task="0")
        t.update({"a": 0.5}, class_task={"a": "1"}, current_task="1")
        r = t.result()
        assert r.seen_before == ("a",)
        assert r.per_task_accuracy == {"0": approx(0.5)}

    def test_class_without_task_falls_back_to_evaluation_count(self) -> None:
        t = ForgettingTracker()
        t.update({"a": 1.0, "x": 1.0}, class_task={"a": "0", "x": None}, current_task="0")
        assert t.result().seen_before == ()
        t.update({"a": 0.5, "x": 0.5}, class_task={"a": "0", "x": None}, current_task="0")
        r = t.result()
        assert r.seen_before == ("x",)
        assert r.avg_forgetting == approx(0.5)
        assert r.per_task_accuracy == {"0": approx(0.5)}


# -- stability gap and calibration ---------------------------------------------------------


def test_stability_gap_is_the_lowest_task_accuracy_after_the_task_ended() -> None:
    tasks = {"a": "0", "b": "0", "c": "1", "d": "1", "e": "2", "f": "2"}
    t = ForgettingTracker()
    t.update({"a": 1.0, "b": 0.8}, class_task=tasks, current_task="0")
    t.update({"a": 0.2, "b": 0.6}, class_task=tasks, current_task="0")  # still task 0: no gap
    assert t.result().min_task_accuracy == {}
    assert t.result().avg_min_accuracy is None
    t.update({"a": 0.5, "b": 0.7, "c": 1.0, "d": 1.0}, class_task=tasks, current_task="1")
    t.update({"a": 0.9, "b": 0.9, "c": 0.4, "d": 0.6}, class_task=tasks, current_task="1")
    r = t.result()
    assert r.min_task_accuracy == {"0": pytest.approx(0.6)}  # the dip, not the recovery
    t.update({"a": 0.8, "b": 0.8, "c": 0.7, "d": 0.9, "e": 1.0, "f": 1.0}, current_task="2")
    r = t.result()
    assert r.min_task_accuracy == {"0": pytest.approx(0.6), "1": pytest.approx(0.8)}
    assert r.avg_min_accuracy == pytest.approx(0.7)


def test_ece_closed_form() -> None:
    # Bin (0.8667, 0.9333]: accuracy 1/2, confidence 0.9; bin (0.5333, 0.6]: accuracy 1, 0.6.
    ece = expected_calibration_error([0.9, 0.9, 0.6, 0.6], [True, False, True, True])
    assert ece == pytest.approx(2 / 4 * 0.4 + 2 / 4 * 0.4)
    assert expected_calibration_error([1.0, 1.0], [True, True]) == 0.0
    assert expected_calibration_error([0.0], [False]) == 0.0  # confidence 0 lands in bin 1
    assert expected_calibration_error([], []) is None
    assert expected_calibration_error([0.75] * 4, [1, 1, 1, 0], bins=1) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="confidences"):
        expected_calibration_error([0.5], [])
