"""The ``serve`` process's Prometheus series and ``/healthz``, without any broker (clocks
injected)."""

from __future__ import annotations

import orjson
from prometheus_client.parser import text_string_to_metric_families

from pipeline.serving.exposition import ServeExposition

Key = tuple[str, tuple[tuple[str, str], ...]]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _samples(expo: ServeExposition) -> dict[Key, float]:
    out = {}
    for family in text_string_to_metric_families(expo.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counts_after_batches_version_switches_and_rejections() -> None:
    wall = Clock(1000.0)
    expo = ServeExposition("supcon", stale_after_s=30.0, clock=Clock(0.0), wall_clock=wall)
    ids = (("learner", "supcon"),)
    expo.model(1, 0, 0)
    got = _samples(expo)
    # Every series present from the start, at 0, so rate() sees the first events.
    assert got[("supcon_serve_events_consumed_total", ids)] == 0
    assert got[("supcon_serve_events_skipped_total", (*ids, ("reason", "labeled")))] == 0
    assert got[("supcon_serve_events_dead_lettered_total", (*ids, ("reason", "not_json")))] == 0
    assert got[("supcon_serve_model_switches_total", ids)] == 0

    expo.batch_done(16, 10, 4, ["not_json", "bad_features"], seconds=0.02)
    wall.now = 1004.0
    expo.committed()
    expo.batch_done(5, 5, 0, [], seconds=0.3)
    expo.model(2, 1, 0)  # switched to version 2
    expo.model(2, 1, 1)  # a rejected bundle: version 2 stays
    expo.model(2, 1, 1)  # the same totals again count nothing
    wall.now = 1010.5
    got = _samples(expo)
    assert got[("supcon_serve_events_consumed_total", ids)] == 21
    assert got[("supcon_serve_events_answered_total", ids)] == 15
    assert got[("supcon_serve_events_skipped_total", (*ids, ("reason", "labeled")))] == 4
    assert got[("supcon_serve_events_dead_lettered_total", (*ids, ("reason", "not_json")))] == 1
    assert got[("supcon_serve_events_dead_lettered_total", (*ids, ("reason", "bad_features")))] == 1
    assert got[("supcon_serve_model_version", ids)] == 2
    assert got[("supcon_serve_model_switches_total", ids)] == 1
    assert got[("supcon_serve_bundles_rejected_total", ids)] == 1
    assert got[("supcon_serve_batch_duration_seconds_count", ids)] == 2
    assert got[("supcon_serve_batch_duration_seconds_bucket", (("le", "0.025"), *ids))] == 1
    assert got[("supcon_serve_commit_age_seconds", ids)] == 6.5


def test_healthz_turns_503_once_the_loop_made_no_progress_for_stale_after_s() -> None:
    clock = Clock(100.0)
    expo = ServeExposition("ce", stale_after_s=30.0, clock=clock)
    expo.model(3, 0, 0)
    healthz = expo.healthz()
    code, body, _ = healthz()
    assert code == 200
    assert orjson.loads(body) == {
        "live": True,
        "loop_age_s": 0.0,
        "learner": "ce",
        "model_version": 3,
    }
    clock.now = 130.0
    assert healthz()[0] == 200  # exactly at the bound: still live
    clock.now = 130.5
    code, body, _ = healthz()
    assert code == 503
    assert orjson.loads(body)["loop_age_s"] == 30.5
    assert _samples(expo)[("supcon_serve_live", (("learner", "ce"),))] == 0
    expo.tick()  # an idle poll ended: progress again
    assert healthz()[0] == 200
    assert _samples(expo)[("supcon_serve_live", (("learner", "ce"),))] == 1
    clock.now = 200.0
    expo.batch_done(1, 1, 0, [], seconds=0.01)  # a batch is progress too
    assert healthz()[0] == 200
