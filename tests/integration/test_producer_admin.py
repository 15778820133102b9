"""JsonProducer and ensure_topics against real brokers, including a broker restart.

The restart tests start their own broker on a free port (the session broker must stay up for
the other tests) and stop it by PID.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from consumers import admin
from consumers.admin import ensure_topics
from consumers.exceptions import BrokerUnavailableError, ProducerError
from consumers.producer import JsonProducer
from pipeline.devtools.devstack import ManagedProcess, free_port, start_broker, stop_process

pytestmark = pytest.mark.integration


def options(address: str) -> dict[str, Any]:
    return {
        "bootstrap_servers": [address],
        "client_id": "test-producer",
        "request_timeout_ms": 5_000,
    }


def read_all(address: str, topic: str, count: int, timeout_s: float = 15.0) -> list[bytes]:
    reader = KafkaConsumer(
        bootstrap_servers=[address], enable_auto_commit=False, auto_offset_reset="earliest"
    )
    reader.assign([TopicPartition(topic, 0)])
    values: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(values) < count and time.monotonic() < deadline:
            for messages in reader.poll(timeout_ms=500).values():
                values.extend(m.value for m in messages)
    finally:
        reader.close(autocommit=False)
    return values


def test_send_dicts_and_bytes_then_flush(bootstrap: str, unique: str) -> None:
    topic = f"t-{unique}"
    ensure_topics(options(bootstrap), [topic], 1, 1, 20.0)
    ensure_topics(options(bootstrap), [topic], 1, 1, 20.0)  # idempotent
    producer = JsonProducer(options(bootstrap))
    producer.send(topic, {"n": 1})
    producer.send(topic, b'{"n": 2}', key=b"k")
    producer.flush(10.0)
    assert producer.pending == 0
    producer.close()
    assert [orjson.loads(v)["n"] for v in read_all(bootstrap, topic, 2)] == [1, 2]


def test_producer_recreated_after_broker_restart(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    broker = start_broker(port, tmp_path)
    producer: JsonProducer | None = None
    try:
        ensure_topics(options(address), ["restart"], 1, 1, 20.0)
        # Idempotent on purpose: that is the client that wedges on UnknownProducerId.
        producer = JsonProducer(options(address), enable_idempotence=True, recreate_backoff_s=0.2)
        producer.send("restart", {"n": 0})
        producer.flush(10.0)

        stop_process(broker.pid, timeout_s=0.5)
        broker = start_broker(port, tmp_path)  # memory storage: topics are gone
        ensure_topics(options(address), ["restart"], 1, 1, 20.0)

        for n in range(1, 4):
            producer.send("restart", {"n": n})
        producer.flush(20.0)
        assert producer.recreated == 1
        assert producer.pending == 0
        assert sorted(orjson.loads(v)["n"] for v in read_all(address, "restart", 3)) == [1, 2, 3]
    finally:
        if producer is not None:
            producer.close(2.0)
        stop_process(broker.pid, timeout_s=0.5)


def test_sends_are_held_while_the_broker_is_down_and_delivered_after(tmp_path: Path) -> None:
    """send() never fails the caller during an outage; flush() reports it, then recovers."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    broker = start_broker(port, tmp_path)
    health: list[str | None] = []
    producer: JsonProducer | None = None
    try:
        ensure_topics(options(address), ["held"], 1, 1, 20.0)
        producer = JsonProducer(
            options(address), recreate_backoff_s=0.2, max_block_ms=2_000, on_health=health.append
        )
        stop_process(broker.pid, timeout_s=0.5)
        for n in range(3):
            producer.send("held", {"n": n})  # must not raise while the broker is away
        with pytest.raises(ProducerError):
            producer.flush(3.0)
        assert producer.pending == 3
        assert health
        assert health[-1] is not None  # the outage was reported

        broker = start_broker(port, tmp_path)
        ensure_topics(options(address), ["held"], 1, 1, 20.0)
        producer.flush(20.0)
        assert producer.pending == 0
        assert health[-1] is None  # and its end
        assert sorted(orjson.loads(v)["n"] for v in read_all(address, "held", 3)) == [0, 1, 2]
    finally:
        if producer is not None:
            producer.close(2.0)
        stop_process(broker.pid, timeout_s=0.5)


def test_ensure_topics_waits_for_a_starting_broker(tmp_path: Path) -> None:
    port = free_port()
    started: list[ManagedProcess] = []
    timer = threading.Timer(1.5, lambda: started.append(start_broker(port, tmp_path)))
    timer.start()
    try:
        t0 = time.monotonic()
        ensure_topics(options(f"127.0.0.1:{port}"), ["late-a", "late-b"], 2, 1, 20.0)
        assert time.monotonic() - t0 >= 1.0
    finally:
        timer.join()
        for proc in started:
            stop_process(proc.pid, timeout_s=0.5)


def test_ensure_topics_gives_up_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()  # nothing listens there
    sleeps: list[float] = []
    bootstrap_waits_ms: list[int] = []
    kafka_admin_client = admin.KafkaAdminClient

    def recording_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    def recording_admin(**kwargs: Any) -> Any:
        bootstrap_waits_ms.append(kwargs["bootstrap_timeout_ms"])
        return kafka_admin_client(**kwargs)

    monkeypatch.setattr(
        admin, "time", SimpleNamespace(monotonic=time.monotonic, sleep=recording_sleep)
    )
    monkeypatch.setattr(admin, "KafkaAdminClient", recording_admin)
    with pytest.raises(BrokerUnavailableError, match=f"127.0.0.1:{port}"):
        ensure_topics(options(f"127.0.0.1:{port}"), ["never"], 1, 1, 1.5)
    # It gives up at its deadline, however slow the machine: the back-off sleeps fit in the
    # 1.5 s, and each connection attempt may wait for the broker only for the time left.
    assert sum(sleeps) < 1.5
    assert bootstrap_waits_ms
    assert bootstrap_waits_ms[0] <= 1500
    assert bootstrap_waits_ms == sorted(bootstrap_waits_ms, reverse=True)
