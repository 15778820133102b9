"""Where a learner starts, on a real broker and redis-server: ``--from``, ``--reset``, the
checkpoint fallback that seeks back, and checkpoint offsets beyond a partition's end."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
import structlog
import torch
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from consumers.admin import ensure_topics
from pipeline import cli
from pipeline.config import Settings, load_settings
from pipeline.devtools.devstack import free_port, start_broker, stop_process
from pipeline.exceptions import SupconStreamError
from pipeline.learner.checkpoint import Checkpoint, list_checkpoints
from pipeline.learner.health import read_status
from pipeline.learner.ledger import ledger_path, read_ledger
from pipeline.learner.loop import RunLimits, run_learner
from pipeline.learner.probes import is_probe
from pipeline.learner.start import StartRequest

pytestmark = pytest.mark.integration

DIM = 8


def _pairs(bootstrap: str, redis_url: str, unique: str, tmp_path: Path, **extra: str) -> list[str]:
    overrides = {
        "kafka.bootstrap_servers": bootstrap,
        "kafka.topic_prefix": f"s{unique}",
        "kafka.partitions": "2",
        "redis.url": redis_url,
        "redis.key_prefix": f"s{unique}",
        "model.input_dim": str(DIM),
        "model.hidden_dim": "32",
        "model.embed_dim": "16",
        "model.proj_dim": "16",
        "consumer.batch_size": "32",
        "consumer.max_latency_ms": "100",
        "bank.capacity": "64",
        "eval.probe_fraction": "0.1",
        "checkpoint.dir": str(tmp_path / "ckpt"),
        "checkpoint.ledger": "true",
        "train.torch_threads": "1",
        **extra,
    }
    return [f"{k}={v}" for k, v in overrides.items()]


def _settings(pairs: list[str]) -> Settings:
    return load_settings(None, pairs, environ={})


def _produce(bootstrap: str, topic: str, tag: str, n: int) -> list[str]:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    ids = [f"{tag}-{i}" for i in range(n)]
    for i, event_id in enumerate(ids):
        event = {
            "id": event_id,
            "features": [((i * 7 + j) % 11) / 11 for j in range(DIM)],
            "label": i % 4,
        }
        producer.send(topic, orjson.dumps(event), key=event_id.encode())
    producer.flush(30)
    producer.close()
    return ids


def _learn(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict, str]:
    try:
        code = cli.main(["learn", "--exit-when-idle", "3", *args])
    finally:
        structlog.reset_defaults()  # main() bound the logger to capsys' stream
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return code, (json.loads(lines[-1]) if lines and code == 0 else {}), err


def _set(pairs: list[str]) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def test_from_a_time_between_two_bursts_consumes_exactly_the_second(
    bootstrap, redis_url, unique, tmp_path, capsys
):
    pairs = _pairs(bootstrap, redis_url, unique, tmp_path)
    k = _settings(pairs).kafka
    ensure_topics(k.client_options(), k.all_topics(), k.partitions, 1, timeout_s=30)
    _produce(bootstrap, k.events_topic, "a", 1000)
    time.sleep(2.0)
    between = datetime.now(UTC).isoformat()
    time.sleep(2.0)
    second = _produce(bootstrap, k.events_topic, "b", 1000)

    code, summary, err = _learn(["--name", "late", "--from", between, *_set(pairs)], capsys)
    assert code == 0, err[-2000:]
    assert summary["consumed"] == 1000
    late = _settings([*pairs, "learner.name=late"])
    trained = read_ledger(ledger_path(late.checkpoint_dir)).counts.keys()
    assert trained == {i for i in second if not is_probe(i, 0.1)}
    # The start point is in the checkpoint and in what `status` reports.
    status = read_status(late.checkpoint.dir, 60.0, ["late"])["late"]
    assert status["progress"]["start"]["from"].endswith("ms)")
    assert status["progress"]["start"]["offsets"]

    time.sleep(0.5)  # stagger group changes (broker quirk, DESIGN.md)
    code, summary, err = _learn(["--name", "all", "--from", "earliest", *_set(pairs)], capsys)
    assert code == 0, err[-2000:]
    assert summary["consumed"] == 2000

    # --from on a learner that has a checkpoint, without --reset: one line, exit 2.
    code, _, err = _learn(["--name", "late", "--from", "earliest", *_set(pairs)], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "--reset" in err


def test_reset_keeps_the_old_lineage_aside_and_starts_over(
    bootstrap, redis_url, redis_client, unique, tmp_path, capsys
):
    pairs = _pairs(bootstrap, redis_url, unique, tmp_path)
    settings = _settings(pairs)
    k = settings.kafka
    ensure_topics(k.client_options(), k.all_topics(), k.partitions, 1, timeout_s=30)
    _produce(bootstrap, k.events_topic, "a", 300)
    first = run_learner(settings, threading.Event(), RunLimits(exit_when_idle_s=3.0))
    assert first.counters["consumed"] == 300
    time.sleep(0.5)
    code, summary, err = _learn(["--reset", *_set(pairs)], capsys)
    assert code == 0, err[-2000:]
    # A fresh lineage starts at earliest: the whole log again, from step 0.
    assert summary["consumed"] == 300
    aside = [p for p in settings.checkpoint_dir.iterdir() if p.name.startswith("aside-")]
    assert len(aside) == 1
    assert list_checkpoints(aside[0])
    stamp = aside[0].name.removeprefix("aside-")
    old_bank = f"s{unique}:bank:{settings.learner_name}.aside-{stamp}:meta"
    assert redis_client.hlen(old_bank) > 0
    assert "fresh lineage" in err


def _events_from(bootstrap: str, topic: str, offsets: dict[tuple[str, int], int]) -> set[str]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    parts = [TopicPartition(t, p) for t, p in offsets]
    consumer.assign(parts)
    for tp in parts:
        consumer.seek(tp, offsets[(tp.topic, tp.partition)])
    ids: set[str] = set()
    deadline = time.monotonic() + 20
    idle = 0
    while time.monotonic() < deadline and idle < 3:
        polled = consumer.poll(timeout_ms=1000)
        idle = 0 if polled else idle + 1
        for records in polled.values():
            ids.update(orjson.loads(r.value)["id"] for r in records)
    consumer.close()
    return ids


def test_fallback_checkpoint_seeks_back_and_trains_the_gap_again(
    bootstrap, redis_url, unique, tmp_path
):
    pairs = _pairs(bootstrap, redis_url, unique, tmp_path, **{"checkpoint.every_steps": "3"})
    settings = _settings(pairs)
    k = settings.kafka
    ensure_topics(k.client_options(), k.all_topics(), k.partitions, 1, timeout_s=30)
    ids = _produce(bootstrap, k.events_topic, "a", 600)
    run_learner(settings, threading.Event(), RunLimits(exit_when_idle_s=3.0))
    newest, older = list_checkpoints(settings.checkpoint_dir)[:2]
    newest.write_bytes(b"corrupt")  # the fallback is `older`, behind the committed offsets
    older_offsets = Checkpoint.from_payload(torch.load(older, weights_only=True)).offsets
    gap = {
        i for i in _events_from(bootstrap, k.events_topic, older_offsets) if not is_probe(i, 0.1)
    }
    assert gap, "the older checkpoint must lie behind the newest one"

    time.sleep(0.5)
    run_learner(settings, threading.Event(), RunLimits(exit_when_idle_s=3.0))
    counts = read_ledger(ledger_path(settings.checkpoint_dir)).counts
    trainable = {i for i in ids if not is_probe(i, 0.1)}
    assert trainable - counts.keys() == set()  # zero never-trained
    assert {i for i, n in counts.items() if n >= 2} == gap  # the gap, trained again


def test_checkpoint_beyond_the_end_of_a_lost_log_stops_the_learner(redis_url, unique, tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    broker = start_broker(port, tmp_path / "stack")
    pairs = _pairs(address, redis_url, unique, tmp_path)
    settings = _settings(pairs)
    k = settings.kafka
    try:
        ensure_topics(k.client_options(), k.all_topics(), k.partitions, 1, timeout_s=30)
        _produce(address, k.events_topic, "a", 200)
        run_learner(settings, threading.Event(), RunLimits(exit_when_idle_s=3.0))
        stop_process(broker.pid)  # in-memory storage: the log is gone
        broker = start_broker(port, tmp_path / "stack")
        ensure_topics(k.client_options(), k.all_topics(), k.partitions, 1, timeout_s=30)
        _produce(address, k.events_topic, "b", 20)
        with pytest.raises(SupconStreamError) as err:
            run_learner(settings, threading.Event(), RunLimits(exit_when_idle_s=3.0))
        message = str(err.value)
        assert f"{k.events_topic}:0" in message
        assert f"{k.events_topic}:1" in message
        assert "--reset" in message
        assert "\n" not in message
        # --reset starts a fresh lineage on the new log.
        again = run_learner(
            settings, threading.Event(), RunLimits(exit_when_idle_s=3.0), StartRequest(reset=True)
        )
        assert again.counters["consumed"] == 20
    finally:
        stop_process(broker.pid)


@pytest.mark.parametrize("position", ["latest", "future"])
def test_from_latest_or_a_time_past_the_end_trains_only_what_comes_next(
    bootstrap, redis_url, unique, tmp_path, position
):
    pairs = _pairs(bootstrap, redis_url, unique, tmp_path)
    settings = _settings(pairs)
    k = settings.kafka
    ensure_topics(k.client_options(), k.all_topics(), k.partitions, 1, timeout_s=30)
    _produce(bootstrap, k.events_topic, "old", 300)
    text = "latest" if position == "latest" else str(int(time.time() * 1000) + 3_600_000)
    request = StartRequest.from_args(text, reset=False)
    result: list = []
    learner = threading.Thread(
        target=lambda: result.append(
            run_learner(settings, threading.Event(), RunLimits(exit_when_idle_s=4.0), request)
        )
    )
    learner.start()
    # The start offsets are durable (a step-0 checkpoint) before anything is read.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list_checkpoints(settings.checkpoint_dir):
        time.sleep(0.1)
    assert list_checkpoints(settings.checkpoint_dir)
    new = _produce(bootstrap, k.events_topic, "new", 50)
    learner.join(120)
    assert result, "the learner did not finish"
    assert result[0].counters["consumed"] == 50
    trained = read_ledger(ledger_path(settings.checkpoint_dir)).counts.keys()
    assert trained == {i for i in new if not is_probe(i, 0.1)}
