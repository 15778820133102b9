"""ProcessBatchSource against a real (Tansu) broker: two consumer processes in one group
deliver every record once, dead letters included, and commit only what each owns; with
either Kafka client."""

from __future__ import annotations

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

    config = SourceConfig(
        topic=topic,
        group_id=group,
        input_dim=CONTRACT_INPUT_DIM,
        dlq_topic=dlq,
        batch_size=16,
        max_latency_ms=100,
        session_timeout_ms=2000,
        client=client,
    )
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
