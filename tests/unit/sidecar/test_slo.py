"""The sidecar's SLO evaluation (pure): every SLO fires in one case and not in another."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from pipeline.config import SidecarSettings, SloSettings
from pipeline.sidecar.exposition import SidecarExposition
from pipeline.sidecar.slo import SloEvaluator, StepCounts
from pipeline.sidecar.state import SidecarState
from pipeline.telemetry.channel import TelemetryEntry, decode_entry

SLO = SloSettings(loss_target=0.99, loss_max=1.0, min_evaluations=2)
_ids = itertools.count(1)


def _run_steps(ev: SloEvaluator, seconds: int, bad_every: int, start_s: int = 0) -> list[Any]:
    """One step per second for ``seconds``; every ``bad_every``-th has loss 5 (bad)."""
    changes = []
    for t in range(start_s, start_s + seconds):
        loss = 5.0 if bad_every and t % bad_every == 0 else 0.5
        changes += ev.step(loss, False, None, t * 1000)
    return changes


def test_step_counts_window_ratio() -> None:
    counts = StepCounts()
    for t in range(0, 100):
        counts.add(t, bad=t >= 90)
    ratio, n = counts.error_ratio(20)  # the last two buckets: 80..89 good, 90..99 bad
    assert n == 20
    assert ratio == 0.5
    assert counts.error_ratio(3600) == (0.1, 100)
    assert StepCounts().error_ratio(60) == (None, 0)


def test_page_fires_on_a_fast_burn_and_resolves() -> None:
    ev = SloEvaluator(SLO)
    # 1 bad step in 4: error ratio 0.25 > 14.4 × 1 % in both windows.
    changes = _run_steps(ev, 600, bad_every=4)
    fired = {c.slo: c for c in changes if c.state == "firing"}
    assert set(fired) == {"loss_burn_page", "loss_burn_ticket"}  # a fast burn is also slow
    assert fired["loss_burn_page"].severity == "page"
    assert fired["loss_burn_page"].evidence["burn_rate"] > 14.4
    # Healthy past the page's short window (5 min): the page clears, the ticket (30 min) not.
    changes = _run_steps(ev, 400, bad_every=0, start_s=600)
    assert [(c.slo, c.state) for c in changes] == [("loss_burn_page", "resolved")]
    changes = _run_steps(ev, 1800, bad_every=0, start_s=1000)
    assert [(c.slo, c.state) for c in changes] == [("loss_burn_ticket", "resolved")]


def test_ticket_fires_on_a_slow_burn_but_not_the_page() -> None:
    ev = SloEvaluator(SLO)
    # 1 bad in 10: 10 % error ratio, a 10× burn: above 6× (ticket), below 14.4× (page).
    changes = _run_steps(ev, 2400, bad_every=10)
    assert {(c.slo, c.state) for c in changes} == {("loss_burn_ticket", "firing")}


def test_no_loss_alert_within_budget() -> None:
    ev = SloEvaluator(SLO)
    assert _run_steps(ev, 3000, bad_every=200) == []  # 0.5 % bad: inside a 1 % budget
    assert ev.steps == 3000
    assert ev.bad_steps == 15


def test_relative_bound_and_skipped_steps() -> None:
    ev = SloEvaluator(SloSettings(loss_vs_mean=2.0))
    assert ev.loss_threshold(None) is None
    assert ev.loss_threshold(1.5) == 3.0
    ev.step(2.9, False, 1.5, 0)
    ev.step(3.1, False, 1.5, 1)
    ev.step(None, True, 1.5, 2)  # skipped (non-finite): bad
    ev.step(None, False, 1.5, 3)  # nothing trained: not counted
    assert (ev.steps, ev.bad_steps) == (3, 2)


def _eval(ev: SloEvaluator, n: int, forgetting: float, acc: float, ece: float) -> set[Any]:
    return {(c.slo, c.state) for c in ev.evaluation(n, forgetting, acc, ece, n * 1000)}


def test_eval_slos_fire_and_resolve() -> None:
    ev = SloEvaluator(SloSettings(forgetting_max=0.3, stability_gap_max=0.3, ece_max=0.2))
    assert _eval(ev, 1, 0.9, 0.9, 0.9) == set()  # before min_evaluations (3)
    assert _eval(ev, 2, 0.0, 0.9, 0.1) == set()
    assert _eval(ev, 3, 0.1, 0.85, 0.1) == set()  # all within bounds
    fired = _eval(ev, 4, 0.5, 0.4, 0.3)
    assert fired == {
        ("forgetting", "firing"),
        ("stability_gap", "firing"),  # best 0.9, now 0.4
        ("calibration", "firing"),
    }
    assert _eval(ev, 5, 0.5, 0.4, 0.3) == set()  # still firing: no new event
    assert _eval(ev, 6, 0.1, 0.8, 0.1) == {
        ("forgetting", "resolved"),
        ("stability_gap", "resolved"),
        ("calibration", "resolved"),
    }


def _entry(kind: str, payload: dict[str, Any]) -> TelemetryEntry:
    fields = {b"kind": kind.encode(), b"data": orjson.dumps(payload)}
    return decode_entry("ce", f"{next(_ids)}-0".encode(), fields)


def _eval_record(n: int, acc: dict[str, float]) -> dict[str, Any]:
    return {
        "learner": "ce",
        "objective": "ce",
        "group": "g",
        "step": n,
        "ts": n * 1000,
        "primary": "head",
        "classifiers": {"head": {"per_class_accuracy": acc, "ece": 0.05}},
    }


def test_state_publishes_alert_records_and_the_exposition_follows() -> None:
    state = SidecarState(SidecarSettings(), SloSettings(forgetting_max=0.3, min_evaluations=2))
    expo = SidecarExposition(max_labels=1, slo=state.slo)
    pubs = []
    for n, acc in enumerate(({"0": 0.9}, {"0": 0.95, "1": 0.9}, {"0": 0.1, "1": 0.95}), 1):
        made = state.apply(_entry("eval", _eval_record(n, acc)))
        expo.observe(made, state.learners)
        pubs += made
    alerts = [p.payload for p in pubs if p.stream == "alerts"]
    assert [(a["slo"], a["state"]) for a in alerts] == [
        ("forgetting", "firing"),
        ("stability_gap", "firing"),
    ]
    first = alerts[0]
    assert first["learner"] == "ce"
    assert first["evidence"]["avg_forgetting"] > 0.3
    assert first["threshold"] == 0.3
    assert first["ts"] == first["since"] == 3000
    expo.sync(state.learners)
    text = expo.render().decode()
    got = {
        (s.name, s.labels.get("slo") or s.labels.get("class")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert got[("supcon_slo_alert_firing", "forgetting")] == 1.0
    assert got[("supcon_slo_forgetting_max", None)] == 0.3
    assert got[("supcon_class_accuracy", "0")] == 0.1
    assert ("supcon_class_accuracy", "1") not in got  # past max_labels=1
    assert got[("supcon_sidecar_labels_dropped_total", None)] >= 1
    assert got[("supcon_loss_sli_steps_total", None)] == 0
