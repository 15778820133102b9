"""The learner against a real broker and a real redis-server: bad input, counts, restart."""

from __future__ import annotations

import base64
import threading
import time

import orjson
import pytest
from kafka import KafkaProducer

from consumers.admin import ensure_topics
from consumers.testing import read_topic_json
from pipeline.config import Settings, load_settings
from pipeline.learner.checkpoint import load_latest
from pipeline.learner.loop import RunLimits, run_learner

pytestmark = pytest.mark.integration

DIM = 8


def _until(events: int) -> RunLimits:
    """Stop once ``events`` more are consumed; the idle limit only ends a run that lost some
    (a short idle limit could end a run on a loaded machine before the last fetch)."""
    return RunLimits(max_events=events, exit_when_idle_s=30.0)


def _settings(bootstrap: str, redis_url: str, unique: str, tmp_path, **extra: str) -> Settings:
    overrides = {
        "kafka.bootstrap_servers": bootstrap,
        "kafka.topic_prefix": f"t{unique}",
        "kafka.partitions": "2",
        "redis.url": redis_url,
        "redis.key_prefix": f"t{unique}",
        "model.input_dim": str(DIM),
        "model.hidden_dim": "32",
        "model.embed_dim": "16",
        "model.proj_dim": "16",
        "consumer.batch_size": "16",
        "consumer.max_latency_ms": "100",
        "bank.capacity": "64",
        "eval.every_steps": "5",
        "eval.probe_fraction": "0.1",
        "checkpoint.dir": str(tmp_path / "ckpt"),
        "checkpoint.every_steps": "5",
        "train.torch_threads": "1",
        **extra,
    }
    return load_settings(None, [f"{k}={v}" for k, v in overrides.items()], environ={})


def _event(i: int, label: object = "auto", dim: int = DIM, task: int = 0) -> dict:
    return {
        "id": f"e{i}",
        "features": [((i * 7 + j) % 11) / 11 for j in range(dim)],
        "label": (i % 3) if label == "auto" else label,
        "task": task,
    }


MALFORMED: list[tuple[bytes, str]] = [
    (b"{not json", "not_json"),
    (b"[1, 2, 3]", "not_object"),
    (orjson.dumps({"features": [0.0] * DIM, "label": 1}), "missing_id"),
    (orjson.dumps({"id": "w1", "features": [0.0] * (DIM + 1), "label": 1}), "wrong_dimension"),
    (b'{"id": "n1", "features": [NaN, 0, 0, 0, 0, 0, 0, 0], "label": 1}', "not_json"),
    (
        orjson.dumps({"id": "n2", "features": [1e308 * 10 if False else 1e39] * DIM, "label": 1}),
        "non_finite",
    ),
    (orjson.dumps({"id": "s1", "features": ["x"] * DIM, "label": 1}), "bad_features"),
    (orjson.dumps({"id": "b1", "features": [0.0] * DIM, "label": [1]}), "bad_label"),
    (b"x" * 70_000, "oversized"),
]


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    for v in values:
        producer.send(topic, v)
    producer.flush()
    producer.close()


def _read_all(bootstrap: str, topic: str, expect: int, timeout_s: float = 20.0) -> list[dict]:
    return read_topic_json(bootstrap, topic, expect, timeout_s)


def test_malformed_events_are_dead_lettered_and_valid_ones_trained(
    bootstrap, redis_url, unique, tmp_path
):
    settings = _settings(bootstrap, redis_url, unique, tmp_path)
    k = settings.kafka
    ensure_topics(k.client_options(), k.all_topics(), k.partitions, 1, timeout_s=30)
    valid = [orjson.dumps(_event(i)) for i in range(200)]
    unlabeled = [orjson.dumps(_event(1000 + i, label=None)) for i in range(10)]
    # Interleave: every malformed record sits between valid neighbours.
    values: list[bytes] = []
    for i, v in enumerate(valid):
        values.append(v)
        if i % 20 == 0 and i // 20 < len(MALFORMED):
            values.append(MALFORMED[i // 20][0])
    values.extend(unlabeled)
    _produce(bootstrap, k.events_topic, values)

    summary = run_learner(settings, threading.Event(), _until(len(values)))
    c = summary.counters
    assert c["consumed"] == len(values)
    assert c["dead_lettered"] == len(MALFORMED)
    assert c["predicted"] == len(unlabeled)
    assert c["trained"] + c["held_out"] == len(valid)
    assert c["held_out"] > 0
    assert c["trained"] + c["held_out"] + c["dead_lettered"] + c["predicted"] == c["consumed"]

    letters = _read_all(bootstrap, k.dlq_topic, len(MALFORMED))
    assert len(letters) == len(MALFORMED)
    by_raw = {base64.b64decode(d["raw"]): d for d in letters if d["reason"] != "oversized"}
    for raw, reason in MALFORMED:
        if reason == "oversized":
            assert any(d["reason"] == "oversized" for d in letters)
            continue
        assert by_raw[raw]["reason"] == reason
        src = by_raw[raw]["source"]
        assert src["topic"] == k.events_topic
        assert src["offset"] >= 0
    # Two learners sharing a DLQ can tell their letters apart.
    assert {(d["rejected_by"]["learner"], d["rejected_by"]["group"]) for d in letters} == {
        (settings.learner_name, settings.group_id)
    }

    predictions = _read_all(bootstrap, k.predictions_topic, len(unlabeled))
    assert sorted(p["id"] for p in predictions) == sorted(f"e{1000 + i}" for i in range(10))
    assert all(p["learner"] == "supcon" and p["label"] in {"0", "1", "2"} for p in predictions)


def test_restart_resumes_from_checkpoint_without_retraining(bootstrap, redis_url, unique, tmp_path):
    settings = _settings(bootstrap, redis_url, unique, tmp_path)
    k = settings.kafka
    ensure_topics(k.client_options(), k.all_topics(), k.partitions, 1, timeout_s=30)
    _produce(bootstrap, k.events_topic, [orjson.dumps(_event(i)) for i in range(120)])
    first = run_learner(settings, threading.Event(), _until(120))
    assert first.counters["consumed"] == 120

    saved = load_latest(settings.checkpoint_dir)
    assert saved is not None
    assert saved.class_means is not None
    assert sorted(key[:2] for key in saved.class_means["keys"]) == [[0, "0"], [1, "0"], [2, "0"]]

    time.sleep(0.5)  # stagger group membership changes (broker quirk, see DESIGN.md)
    # the same classes come back under a new task (a new domain of the stream)
    later = [orjson.dumps(_event(i, task=1)) for i in range(120, 180)]
    _produce(bootstrap, k.events_topic, later)
    second = run_learner(settings, threading.Event(), _until(60))
    # Counters continue from the checkpoint; only the 60 new events were consumed.
    assert second.counters["consumed"] == 180
    assert second.steps > first.steps
    assert second.bank_size <= 64
    # the resumed class means kept task 0's and opened one per class for task 1
    resumed = load_latest(settings.checkpoint_dir)
    assert resumed is not None
    assert resumed.class_means is not None
    keys = sorted(key[:2] for key in resumed.class_means["keys"])
    assert keys == [[c, t] for c in range(3) for t in ("0", "1")]


def test_configured_objective_policy_and_unlabeled_training(
    bootstrap, redis_url, redis_client, unique, tmp_path
):
    """SupCon + 0.1 · detached CE, reservoir bank, uniform replay, unlabeled events trained
    on with NT-Xent, kNN predictions: counts hold, only labeled events are banked,
    evaluations report NCM, kNN (primary) and the head with their ECE."""
    from pipeline.telemetry.channel import TelemetryReader
    from pipeline.telemetry.records import EvalRecord, StepRecord

    settings = _settings(
        bootstrap,
        redis_url,
        unique,
        tmp_path,
        **{
            "train.loss_terms": "{supcon: 1.0, ce_detached: 0.1}",
            "train.train_unlabeled": "true",
            "train.replay_sampling": "random",
            "bank.policy": "reservoir",
            "bank.capacity": "300",
            "eval.classifier": "knn",
            "eval.knn_k": "5",
        },
    )
    k = settings.kafka
    ensure_topics(k.client_options(), k.all_topics(), k.partitions, 1, timeout_s=30)
    events = [_event(i, label=None if i % 4 == 3 else "auto") for i in range(160)]
    _produce(bootstrap, k.events_topic, [orjson.dumps(e) for e in events])

    summary = run_learner(settings, threading.Event(), _until(160))
    c = summary.counters
    assert c["consumed"] == 160
    assert c["predicted"] == 40
    assert c["trained"] + c["held_out"] == 120
    assert summary.skipped_steps == 0
    assert summary.bank_size == c["trained"]  # unlabeled events are never banked

    reader = TelemetryReader(redis_client, settings.redis.key_prefix)
    records = reader.read({settings.learner_name: "0-0"}, count=10_000)
    evals = [r.record for r in records if isinstance(r.record, EvalRecord)]
    assert evals
    last = evals[-1]
    assert last.primary == "knn"
    assert set(last.classifiers) == {"ncm", "knn", "head"}
    for classifier in last.classifiers.values():
        assert set(classifier.per_class_accuracy) == {"0", "1", "2"}
        assert classifier.ece is not None
        assert 0.0 <= classifier.ece <= 1.0
    steps = [
        r.record for r in records if isinstance(r.record, StepRecord) and r.record.loss is not None
    ]
    assert steps
    assert all(set(s.per_class_loss) <= {"0", "1", "2"} for s in steps)
    predictions = _read_all(bootstrap, k.predictions_topic, 40)
    assert len(predictions) == 40
    # Events predicted before anything was learned get no label; the rest a known class.
    assert {p["label"] for p in predictions} <= {"0", "1", "2", None}
    assert sum(p["label"] is not None for p in predictions) >= 30
