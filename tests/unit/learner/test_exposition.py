"""The learner's Prometheus series, rendered without any broker or Redis."""

from __future__ import annotations

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from consumers.events import EventBatch, SourceRecord
from pipeline.learner.exposition import LearnerExposition


def _samples(expo: LearnerExposition) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(expo.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _batch(n: int, ts_ms: int) -> EventBatch:
    return EventBatch(
        ids=tuple(f"e{i}" for i in range(n)),
        features=np.zeros((n, 2), dtype=np.float32),
        labels=("a",) * n,
        tasks=(None,) * n,
        timestamps_ms=np.full(n, ts_ms, dtype=np.int64),
        sources=tuple(SourceRecord("t", 0, i, None, ts_ms) for i in range(n)),
        consumed=n + 2,
    )


def test_batch_counts_by_fate_reason_steps_and_durations() -> None:
    expo = LearnerExposition("l1", "supcon", max_classes=4)
    ids = (("learner", "l1"), ("objective", "supcon"))
    batch = _batch(3, ts_ms=0)  # epoch: an event-to-trained latency past every bucket
    fates = {"consumed": 5, "trained": 2, "held_out": 1, "predicted": 0}
    expo.batch_done(batch, fates, {"not_json": 2}, [0, 1], (2, 1), (0.02, 0.01))
    expo.batch_done(batch, fates, {"class_limit": 1}, [], (0, 0), (0.003, None))
    got = _samples(expo)
    assert got[("supcon_events_consumed_total", ids)] == 10
    assert got[("supcon_events_trained_total", ids)] == 4
    assert got[("supcon_events_held_out_total", ids)] == 2
    assert got[("supcon_events_predicted_total", ids)] == 0
    assert got[("supcon_events_dead_lettered_total", (*ids, ("reason", "not_json")))] == 2
    assert got[("supcon_events_dead_lettered_total", (*ids, ("reason", "class_limit")))] == 1
    assert got[("supcon_train_steps_total", ids)] == 2
    assert got[("supcon_train_steps_skipped_total", ids)] == 1
    assert got[("supcon_batch_duration_seconds_count", ids)] == 2
    assert got[("supcon_train_duration_seconds_count", ids)] == 1
    assert got[("supcon_event_to_trained_seconds_count", ids)] == 2
    assert got[("supcon_event_to_trained_seconds_bucket", (("le", "300.0"), *ids))] == 0


def test_lag_bank_and_ages() -> None:
    expo = LearnerExposition("l1", "ce", max_classes=4)
    ids = (("learner", "l1"), ("objective", "ce"))
    assert expo.lag_due(10.0)
    assert not expo.lag_due(10.5)
    assert expo.lag_due(11.0)
    expo.lag({"supcon.events:0": 7, "supcon.events:3": 0})
    expo.bank(5, {"a": 3, "b": 2})
    expo.checkpointed()
    got = _samples(expo)
    lag = (*ids, ("partition", "0"), ("topic", "supcon.events"))
    assert got[("supcon_consumer_lag", tuple(sorted(lag)))] == 7
    assert got[("supcon_bank_items", ids)] == 5
    assert got[("supcon_bank_class_items", tuple(sorted((*ids, ("class", "b")))))] == 2
    assert 0 <= got[("supcon_checkpoint_age_seconds", ids)] < 60
    assert ("supcon_commit_age_seconds", ids) in got
