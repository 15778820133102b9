"""ProcessBatchSource against a real (Tansu) broker: two consumer processes in one group
deliver every record once, dead letters included, and commit only what each owns; stopped, N
processes leave the group usable for the next member and leave no process behind; with either
Kafka client."""

from __future__ import annotations

import socket
import time

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition
from waiting import wait_until

from consumers.admin import ensure_topics
from consumers.client import CLIENT_NAMES
from consumers.exceptions import SourceClosedError
from consumers.process_source import ProcessBatchSource
from consumers.source import SourceConfig
from consumers.testing import CONTRACT_INPUT_DIM, CONTRACT_PARTITIONS, drain, merged_offsets

pytestmark = pytest.mark.integration


def _config(topic: str, group: str, dlq: str, client: str, **extra: int) -> SourceConfig:
    """The contract stream's source; a short session (2 s) unless ``extra`` says otherwise."""
    settings = {"session_timeout_ms": 2000, **extra}
    return SourceConfig(
        topic=topic,
        group_id=group,
        input_dim=CONTRACT_INPUT_DIM,
        dlq_topic=dlq,
        client=client,
        **settings,
    )


@pytest.mark.parametrize("client", CLIENT_NAMES)
def test_two_consumer_processes_deliver_everything_once_and_commit(
    bootstrap: str, unique: str, client: str
) -> None:
    options = {"bootstrap_servers": [bootstrap], "request_timeout_ms": 10_000}
    topic, dlq, group = f"p-{unique}", f"p-{unique}.dlq", f"pg-{unique}"
    ensure_topics(options, [topic, dlq], CONTRACT_PARTITIONS, 1, 20.0)
    producer = KafkaProducer(bootstrap_servers=[bootstrap], linger_ms=5)
    total = 400
    for i in range(total):
        value = orjson.dumps(
            {"id": f"e{i}", "features": [float(i), 0.0, 1.0, 2.0], "label": f"c{i % 3}"}
        )
        producer.send(
            topic, b"not json" if i % 100 == 7 else value, partition=i % CONTRACT_PARTITIONS
        )
    producer.flush(10)
    producer.close()

    config = _config(topic, group, dlq, client, batch_size=16, max_latency_ms=100)
    source = ProcessBatchSource(config, options, processes=2)
    source.start()
    try:
        batches = drain(source, total, timeout_s=90.0)
        assert sum(b.consumed for b in batches) == total
        ids = [i for b in batches for i in b.ids]
        assert len(ids) == len(set(ids)) == total - 4
        assert sum(len(b.dead_letters) for b in batches) == 4
        assert {d.reason for b in batches for d in b.dead_letters} == {"not_json"}

        offsets = merged_offsets(batches)
        assert source.commit_sync(offsets, 20.0) is True
        deadline = time.monotonic() + 10
        while len(source.assignment()) < CONTRACT_PARTITIONS and time.monotonic() < deadline:
            time.sleep(0.2)
        assert source.assignment() == {(topic, p) for p in range(CONTRACT_PARTITIONS)}
        # Each child reports its counters every 0.5 s: wait for the reports of the last batches.
        wait_until(lambda: source.stats()["events"] == total - 4, 15.0, "the children's counts")
        stats = source.stats()
        assert stats["processes"] == 2
        assert stats["dead_lettered"] == 4
    finally:
        source.stop(15.0)
    with pytest.raises(SourceClosedError):
        source.get(0.1)

    reader = KafkaConsumer(bootstrap_servers=[bootstrap], group_id=group, enable_auto_commit=False)
    try:
        committed = {
            p: reader.committed(TopicPartition(topic, p), timeout_ms=10_000)
            for p in range(CONTRACT_PARTITIONS)
        }
    finally:
        reader.close(autocommit=False)
    assert committed == dict.fromkeys(range(CONTRACT_PARTITIONS), total // CONTRACT_PARTITIONS)


def _join_alone(
    bootstrap: str, topic: str, group: str, partitions: int, timeout_s: float
) -> set[int]:
    """The partitions a fresh member of ``group`` is given within ``timeout_s``."""
    consumer = KafkaConsumer(
        bootstrap_servers=[bootstrap],
        group_id=group,
        enable_auto_commit=False,
        session_timeout_ms=2000,
        heartbeat_interval_ms=600,
    )
    consumer.subscribe([topic])
    try:
        deadline = time.monotonic() + timeout_s
        while len(consumer.assignment()) < partitions and time.monotonic() < deadline:
            consumer.poll(timeout_ms=1000)
        return {tp.partition for tp in consumer.assignment()}
    finally:
        consumer.close(autocommit=False)


@pytest.mark.parametrize("client", CLIENT_NAMES)
def test_stopping_several_processes_leaves_the_group_usable(
    bootstrap: str, unique: str, client: str
) -> None:
    """Each child leaves only once the others have completed the rebalance of the previous
    leave: leaves 0.5 s apart (the old stagger) got the group stuck on Tansu, and the next
    member of the group (the learner's next start) was never given a partition (4 of 4 runs
    with 4 processes, 1 of 4 with 3 processes on 2 partitions)."""
    options = {"bootstrap_servers": [bootstrap], "request_timeout_ms": 10_000}
    topic, dlq, group = f"s-{unique}", f"s-{unique}.dlq", f"sg-{unique}"
    partitions = 4
    ensure_topics(options, [topic, dlq], partitions, 1, 20.0)
    config = _config(topic, group, dlq, client)
    source = ProcessBatchSource(config, options, processes=4)
    source.start()
    try:
        wait_until(source.settled, 60.0, "four consumer processes sharing the partitions")
    finally:
        source.stop(15.0)
    assert not [c.pid for c in source._children if c.is_alive()]
    assert _join_alone(bootstrap, topic, group, partitions, 45.0) == set(range(partitions))


def test_a_child_that_does_not_stop_in_time_is_killed() -> None:
    """Children ignore SIGTERM (the learner stops them after its final commit), so one that
    cannot stop in time must be killed, not left running after stop() returned. Here the
    children hang in their consumer's first metadata request to a broker that never answers."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        host, port = silent.getsockname()[:2]
        options = {"bootstrap_servers": [f"{host}:{port}"], "request_timeout_ms": 300_000}
        config = _config("never", "never", "never.dlq", "confluent", session_timeout_ms=6_000)
        source = ProcessBatchSource(config, options, processes=2)
        source.start()
        source.stop(0.5)
        alive = [c.pid for c in source._children if c.is_alive()]
        for child in source._children:
            child.kill()  # before the fix they would outlive the test
        assert alive == []
