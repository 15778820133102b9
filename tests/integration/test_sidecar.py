"""The sidecar end to end: synthetic telemetry in a real Redis → metrics on a real broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import pytest
import redis
from kafka import KafkaConsumer, TopicPartition
from structlog.testing import capture_logs

from pipeline.config import Settings
from pipeline.devtools.devstack import free_port
from pipeline.sidecar.service import SidecarRunner, run_sidecar
from pipeline.sidecar.sink import KafkaMetricsSink
from pipeline.telemetry.channel import TelemetryWriter
from pipeline.telemetry.records import EndRecord, EvalRecord, StepRecord

pytestmark = pytest.mark.integration

approx = pytest.approx
LEARNER = "ce-1"


def make_settings(bootstrap: str, redis_url: str, unique: str) -> Settings:
    return Settings.model_validate(
        {
            "kafka": {
                "bootstrap_servers": bootstrap,
                "topic_prefix": f"t{unique}",
                "partitions": 1,
            },
            "redis": {"url": redis_url, "key_prefix": f"t{unique}"},
            "sidecar": {
                "window": 3,
                "ema_alpha": 0.5,
                "publish_every_s": 0.2,
                "rediscover_every_s": 0.2,
                "progress_every_s": 1.0,
            },
        }
    )


def step(n: int, loss: float | None, per_class: dict[str, float], **extra: Any) -> dict[str, Any]:
    return {
        "learner": LEARNER,
        "objective": "ce",
        "group": "g",
        "step": n,
        "ts": n * 1000,
        "events_total": n * 10,
        "trained_total": n * 8,
        "batch_events": 10,
        "trained": 8,
        "held_out": 1,
        "predicted": 0,
        "dead_lettered": 1,
        "loss": loss,
        "per_class_loss": per_class,
        "skipped": loss is None,
        "elapsed_s": n * 0.5,
        **extra,
    }


def evaluation(n: int, head: dict[str, float], task: int) -> dict[str, Any]:
    return {
        "learner": LEARNER,
        "objective": "ce",
        "group": "g",
        "step": n,
        "ts": n * 1000,
        "events_total": n * 10,
        "primary": "head",
        "classifiers": {
            "ncm": {"per_class_accuracy": dict.fromkeys(head, 1.0)},
            "head": {"per_class_accuracy": head, "ece": 0.05},
        },
        "class_task": {"a": "0", "b": "0", "c": "1", "d": "1", "e": "2"},
        "current_task": str(task),
        "probe_sizes": dict.fromkeys(head, 10),
    }


STEPS = [
    step(1, 1.0, {"a": 1.0}, skipped_total=0, prequential_correct=0, prequential_total=0),
    step(2, None, {}, skipped_total=1, prequential_correct=4, prequential_total=8),
    step(
        3, 2.0, {"a": 3.0, "b": 1.0}, skipped_total=1, prequential_correct=6, prequential_total=10
    ),
    step(4, 3.0, {"a": 2.0}, skipped_total=1, prequential_correct=15, prequential_total=20),
]
EVAL_1 = evaluation(4, {"a": 1.0, "b": 0.8}, task=0)
EVAL_2 = evaluation(8, {"a": 0.4, "b": 0.8, "c": 1.0, "d": 0.6}, task=1)
EVAL_3 = evaluation(12, {"a": 0.2, "b": 0.6, "c": 0.5, "d": 0.6, "e": 1.0}, task=2)
END = {"learner": LEARNER, "step": 12, "events_total": 120, "elapsed_s": 6.0}


def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 15.0) -> list[Any]:
    """Every record of ``topic`` (no consumer group), waiting until ``expected`` arrived."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        partitions = None
        while partitions is None and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if partitions is None:
                time.sleep(0.1)
        assert partitions, f"topic {topic} never appeared"
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
    finally:
        consumer.close()
    return records


def payloads(records: list[Any]) -> list[dict[str, Any]]:
    return [orjson.loads(r.value) for r in records]


@contextmanager
def running_sidecar(settings: Settings) -> Iterator[threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=run_sidecar, args=(settings, stop), daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(timeout=15.0)
        assert not thread.is_alive(), "the sidecar did not stop"


def wait_for(check: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_publishes_loss_and_forgetting(
    bootstrap: str, redis_url: str, redis_client: redis.Redis, unique: str
) -> None:
    settings = make_settings(bootstrap, redis_url, unique)
    writer = TelemetryWriter(redis_client, settings.redis.key_prefix, LEARNER, maxlen=1000)
    for payload in STEPS:
        writer.emit(StepRecord.from_dict(payload))
    writer.emit(EvalRecord.from_dict(EVAL_1))
    writer.emit(EvalRecord.from_dict(EVAL_2))
    writer.emit(EndRecord.from_dict(END))

    with running_sidecar(settings):
        forgetting = read_topic(bootstrap, settings.kafka.forgetting_topic, expected=3)
        loss = read_topic(bootstrap, settings.kafka.loss_topic, expected=1)

    assert {r.key for r in forgetting + loss} == {LEARNER.encode()}
    f1, f2, final = payloads(forgetting)
    assert (f1["step"], f1["classifier"], f1["final"]) == (4, "head", False)
    assert f1["avg_forgetting"] is None  # nothing from an earlier task yet
    assert f2 == {
        "learner": LEARNER,
        "objective": "ce",
        "group": "g",
        "step": 8,
        "ts": 8000,
        "events_total": 80,
        "classifier": "head",
        "per_class_accuracy": {"a": 0.4, "b": 0.8, "c": 1.0, "d": 0.6},
        "best_accuracy": {"a": 1.0, "b": 0.8, "c": 1.0, "d": 0.6},
        "forgetting": {"a": approx(0.6), "b": 0.0, "c": 0.0, "d": 0.0},
        "avg_forgetting": approx(0.3),  # (0.6 + 0.0) / 2 over a, b (task 0 < current 1)
        "avg_accuracy": approx(0.7),  # (0.4 + 0.8 + 1.0 + 0.6) / 4
        "per_task_accuracy": {"0": approx(0.6), "1": approx(0.8)},
        "per_task_forgetting": {"0": approx(0.3), "1": 0.0},  # task 0: 0.9 → 0.6
        "anytime_avg_accuracy": approx(0.8),  # (0.9 + 0.7) / 2
        "backward_transfer": None,
        "min_task_accuracy": {"0": approx(0.6)},  # task 0 since it ended: 0.6
        "avg_min_accuracy": approx(0.6),
        "ece": 0.05,
        "ece_calibrated": None,
        "accuracy_matrix": [{"task": "0", "accuracy": {"0": approx(0.9)}}],
        "current_task": "1",
        "evaluations": 2,
        "final": False,
    }
    assert final["final"] is True
    assert (final["step"], final["events_total"]) == (12, 120)
    assert final["accuracy_matrix"] == [
        {"task": "0", "accuracy": {"0": approx(0.9)}},
        {"task": "1", "accuracy": {"0": approx(0.6), "1": approx(0.8)}},
    ]
    assert final["backward_transfer"] == approx(0.6 - 0.9)

    (last_loss,) = payloads(loss)
    assert last_loss == {
        "learner": LEARNER,
        "objective": "ce",
        "group": "g",
        "step": 12,
        "ts": 8000,
        "window": 3,
        "loss_mean": approx(2.0),  # (1 + 2 + 3) / 3; the skipped step does not count
        "loss_ema": approx(2.25),  # 1 → 1.5 → 2.25 with alpha 0.5
        "per_class_loss": {"a": approx(2.0), "b": approx(1.0)},
        "events_total": 120,
        "events_per_s": approx(10.0),  # 30 events over steps 1 → 4 (3 s of learner time)
        "skipped_steps": 1,
        "prequential_accuracy": approx(0.75),
        "final": True,
    }


def test_restart_rebuilds_state_without_republishing(
    bootstrap: str, redis_url: str, redis_client: redis.Redis, unique: str
) -> None:
    settings = make_settings(bootstrap, redis_url, unique)
    prefix = settings.redis.key_prefix
    writer = TelemetryWriter(redis_client, prefix, LEARNER, maxlen=1000)
    for payload in STEPS:
        writer.emit(StepRecord.from_dict(payload))
    writer.emit(EvalRecord.from_dict(EVAL_1))
    writer.emit(EvalRecord.from_dict(EVAL_2))
    last_id = redis_client.xrevrange(writer.key, count=1)[0][0]
    cursor_key = f"{prefix}:sidecar:cursor:{LEARNER}"

    with running_sidecar(settings):
        read_topic(bootstrap, settings.kafka.forgetting_topic, expected=2)
        # The cursor is saved only after the flush: wait for it before stopping.
        wait_for(lambda: redis_client.get(cursor_key) == last_id)

    writer.emit(EvalRecord.from_dict(EVAL_3))
    writer.emit(EndRecord.from_dict(END))
    with running_sidecar(settings):
        forgetting = read_topic(bootstrap, settings.kafka.forgetting_topic, expected=4)
        loss = read_topic(bootstrap, settings.kafka.loss_topic, expected=2)
        time.sleep(0.5)  # room for a duplicate to show up, if the sidecar made one
        forgetting = read_topic(
            bootstrap, settings.kafka.forgetting_topic, expected=99, timeout_s=1
        )

    steps = [(p["step"], p["final"]) for p in payloads(forgetting)]
    assert steps == [(4, False), (8, False), (12, False), (12, True)]
    f3 = payloads(forgetting)[2]
    # Best accuracies come from evaluations read before the restart.
    assert f3["best_accuracy"] == {"a": 1.0, "b": 0.8, "c": 1.0, "d": 0.6, "e": 1.0}
    assert f3["forgetting"] == approx({"a": 0.8, "b": 0.2, "c": 0.5, "d": 0.0, "e": 0.0})
    assert f3["avg_forgetting"] == approx((0.8 + 0.2 + 0.5 + 0.0) / 4)
    assert f3["avg_accuracy"] == approx((0.2 + 0.6 + 0.5 + 0.6 + 1.0) / 5)
    assert f3["anytime_avg_accuracy"] == approx((0.9 + 0.7 + 0.58) / 3)
    assert f3["per_task_accuracy"] == approx({"0": 0.4, "1": 0.55, "2": 1.0})
    assert f3["per_task_forgetting"] == approx({"0": 0.5, "1": 0.25, "2": 0.0})
    # Rows: task 0 ended at eval 1 (0.9); task 1 at eval 2 (0.6, 0.8) → BWT = 0.6 − 0.9.
    assert f3["backward_transfer"] == approx(-0.3)
    final = payloads(forgetting)[3]
    # The end closes task 2's row: BWT = mean(0.4 − 0.9, 0.55 − 0.8).
    assert final["backward_transfer"] == approx(((0.4 - 0.9) + (0.55 - 0.8)) / 2)

    first_loss, final_loss = payloads(loss)
    assert first_loss["final"] is False
    assert final_loss["final"] is True
    # The rolling window was rebuilt from the stream, not started empty.
    assert final_loss["loss_mean"] == approx(2.0)
    assert redis_client.get(cursor_key) == redis_client.xrevrange(writer.key, count=1)[0][0]


def _kafka_failures(logs: list[dict[str, Any]]) -> int:
    retries = [e for e in logs if e["event"] == "sidecar error; retrying"]
    return sum(1 for e in retries if e["source"] == "kafka")


def test_kafka_down_keeps_running_and_holds_the_cursor(
    redis_url: str, redis_client: redis.Redis, unique: str
) -> None:
    settings = make_settings(f"127.0.0.1:{free_port()}", redis_url, unique)
    writer = TelemetryWriter(redis_client, settings.redis.key_prefix, LEARNER, maxlen=1000)
    writer.emit(EvalRecord.from_dict(EVAL_1))
    client = redis.Redis.from_url(redis_url)
    sink = KafkaMetricsSink(settings, topics_timeout_s=0.3)
    runner = SidecarRunner(settings, client, sink)
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    with capture_logs() as logs:
        thread.start()
        try:
            wait_for(lambda: runner.records_read >= 1)
            # A few failed publish attempts with back-off, counted rather than slept for.
            wait_for(lambda: _kafka_failures(logs) >= 2, timeout_s=30.0)
            assert thread.is_alive()
            assert runner.published == {"loss": 0, "forgetting": 0, "alerts": 0}
            cursor = redis_client.get(f"{settings.redis.key_prefix}:sidecar:cursor:{LEARNER}")
            assert cursor is None
        finally:
            stop.set()
            thread.join(timeout=10.0)
            sink.close()
            client.close()
    assert not thread.is_alive()
