"""Fuzz a running learner: hostile payloads between valid neighbours, on a real broker.

Every rejected event must land in the DLQ with its reason, the valid neighbours must be
trained (ledger), held out or predicted, the learner must not die, and
trained + held out + dead-lettered + predicted == consumed.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest
from hostile import DIM, MAX_EVENT_BYTES, hostile_stream
from hypothesis import HealthCheck, given, settings
from kafka import KafkaProducer

from consumers.admin import ensure_topics
from consumers.decode import REASONS
from consumers.testing import read_topic_json
from pipeline.config import load_settings
from pipeline.devtools.chaos import read_topic_ids
from pipeline.learner.ledger import ledger_path, read_ledger
from pipeline.learner.loop import RunLimits, run_learner
from pipeline.learner.probes import is_probe

pytestmark = pytest.mark.integration


def _read_letters(bootstrap: str, topic: str, expect: int) -> list[dict]:
    return read_topic_json(bootstrap, topic, expect, timeout_s=20)


@settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(items=hostile_stream("L", max_size=80))
def test_running_learner_survives_hostile_input(bootstrap, redis_url, tmp_path, items):
    prefix = f"fz{uuid.uuid4().hex[:10]}"
    s = load_settings(
        None,
        [
            f"kafka.bootstrap_servers={bootstrap}",
            f"kafka.topic_prefix={prefix}",
            "kafka.partitions=1",
            f"redis.url={redis_url}",
            f"redis.key_prefix={prefix}",
            f"model.input_dim={DIM}",
            "model.hidden_dim=32",
            "model.embed_dim=16",
            "model.proj_dim=16",
            "model.max_classes=8",
            "bank.capacity=64",
            "consumer.batch_size=16",
            "consumer.max_latency_ms=100",
            f"consumer.max_event_bytes={MAX_EVENT_BYTES}",
            f"checkpoint.dir={Path(tmp_path) / prefix}",
            "checkpoint.ledger=true",
            "train.torch_threads=1",
        ],
        environ={},
    )
    k = s.kafka
    ensure_topics(k.client_options(), k.all_topics(), 1, 1, timeout_s=30)
    valid_labeled = [v for v, r in items if r is None and orjson.loads(v).get("label") is not None]
    # Duplicate ids: a valid event sent twice in a row (same batch: duplicate_id; split
    # across two batches: trained twice, which the bank ignores).
    values = [v for v, _ in items] + valid_labeled[:1] * 2
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=2**20)
    for v in values:
        producer.send(k.events_topic, v)
    producer.flush(30)
    producer.close()

    # Stops once every record is consumed; the idle limit only ends a run that lost some.
    summary = run_learner(s, threading.Event(), RunLimits(len(values), exit_when_idle_s=30.0))

    c = summary.counters
    assert c["consumed"] == len(values)
    assert c["trained"] + c["held_out"] + c["dead_lettered"] + c["predicted"] == c["consumed"]
    expected = Counter(r for _, r in items if r is not None)
    letters = _read_letters(bootstrap, k.dlq_topic, int(c["dead_lettered"]))
    got = Counter(d["reason"] for d in letters)
    assert len(letters) == c["dead_lettered"]
    assert set(got) <= {*REASONS, "class_limit"}
    extra = got - expected
    assert set(extra) <= {"duplicate_id"}, (got, expected)
    assert expected - got == Counter()
    assert all(d["source"]["topic"] == k.events_topic for d in letters)
    trained = read_ledger(ledger_path(s.checkpoint_dir)).counts
    for v in valid_labeled:
        event_id = orjson.loads(v)["id"]
        assert (event_id in trained) != is_probe(event_id, s.eval.probe_fraction)
    unlabeled = [orjson.loads(v)["id"] for v, r in items if r is None]
    unlabeled = [i for i in unlabeled if i not in {orjson.loads(v)["id"] for v in valid_labeled}]
    if unlabeled:
        predicted = read_topic_ids(bootstrap, k.predictions_topic, len(unlabeled), timeout_s=20)
        assert set(unlabeled) <= set(predicted)
