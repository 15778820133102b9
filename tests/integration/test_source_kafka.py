"""KafkaBatchSource against a real (Tansu) broker: contract, DLQ, commits, backpressure, resume.

Every test runs once per Kafka client library (``consumer.client``: kafka-python and
confluent): both clients sit behind the same source and must behave the same.

Each test uses a fresh topic ``t-<unique>`` and consumer group. Consumers are stopped ~0.5 s
apart (Tansu can wedge a group when two members leave within ~0.3 s of each other), and
``session_timeout_ms`` is short because Tansu delays a group join by about half of it.
"""

from __future__ import annotations

import base64
import contextlib
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import pytest
import structlog
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition
from waiting import wait_until

from consumers.admin import ensure_topics
from consumers.client import CLIENT_NAMES
from consumers.events import EventBatch
from consumers.exceptions import ProducerError, SourceClosedError
from consumers.producer import JsonProducer
from consumers.protocols import EventSource, labelled
from consumers.source import KafkaBatchSource, SourceConfig
from consumers.testing import (
    CONTRACT_INPUT_DIM,
    CONTRACT_PARTITIONS,
    EventSourceContract,
    SourceFactory,
    drain,
    merged_offsets,
)

pytestmark = pytest.mark.integration

STAGGER_S = 0.5


class Harness:
    """Topics, producers and sources of one test; tears everything down in a safe order."""

    def __init__(self, bootstrap: str, unique: str, client: str = "kafka-python") -> None:
        self.client = client
        self.options: dict[str, Any] = {
            "bootstrap_servers": [bootstrap],
            "client_id": f"test-{unique}",
            "request_timeout_ms": 10_000,
        }
        self.topic = f"t-{unique}"
        self.dlq = f"t-{unique}.dlq"
        self.group = f"g-{unique}"
        self.sources: list[KafkaBatchSource] = []
        self.dlq_producer: JsonProducer | None = None
        ensure_topics(self.options, [self.topic, self.dlq], CONTRACT_PARTITIONS, 1, 20.0)

    def produce(self, payloads: Sequence[tuple[int, bytes | None]]) -> None:
        producer = KafkaProducer(
            bootstrap_servers=self.options["bootstrap_servers"],
            enable_idempotence=False,
            linger_ms=5,
        )
        for partition, value in payloads:
            # A null value needs a key (kafka-python refuses a record with neither).
            producer.send(
                self.topic, value, key=None if value is not None else b"k", partition=partition
            )
        producer.flush(10)
        producer.close()

    def source(self, batch_size: int = 8, **overrides: Any) -> KafkaBatchSource:
        if self.dlq_producer is None:
            self.dlq_producer = JsonProducer(self.options)
        settings: dict[str, Any] = {
            "topic": self.topic,
            "group_id": self.group,
            "input_dim": CONTRACT_INPUT_DIM,
            "dlq_topic": self.dlq,
            "batch_size": batch_size,
            "max_latency_ms": 100,
            "poll_timeout_ms": 1000,
            "session_timeout_ms": 2000,
            "client": self.client,
            **overrides,
        }
        source = KafkaBatchSource(SourceConfig(**settings), self.options, self.dlq_producer)
        self.sources.append(source)
        return source

    def stop(self, source: EventSource) -> None:
        source.stop(10.0)
        time.sleep(STAGGER_S)

    def committed(self) -> dict[int, int | None]:
        reader = KafkaConsumer(
            bootstrap_servers=self.options["bootstrap_servers"],
            group_id=self.group,
            enable_auto_commit=False,
        )
        try:
            return {
                p: reader.committed(TopicPartition(self.topic, p), timeout_ms=10_000)
                for p in range(CONTRACT_PARTITIONS)
            }
        finally:
            reader.close(autocommit=False)

    def read_dlq(self, count: int, timeout_s: float = 15.0) -> list[dict[str, Any]]:
        reader = KafkaConsumer(
            bootstrap_servers=self.options["bootstrap_servers"],
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        reader.assign([TopicPartition(self.dlq, p) for p in range(CONTRACT_PARTITIONS)])
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        try:
            while len(found) < count and time.monotonic() < deadline:
                for messages in reader.poll(timeout_ms=1000).values():
                    found.extend(orjson.loads(m.value) for m in messages)
        finally:
            reader.close(autocommit=False)
        return found

    def close(self) -> None:
        for source in self.sources:
            source.stop(10.0)
            time.sleep(STAGGER_S)
        if self.dlq_producer is not None:
            with contextlib.suppress(ProducerError):  # already closed by a test
                self.dlq_producer.close(5.0)


@pytest.fixture(params=CLIENT_NAMES)
def harness(bootstrap: str, unique: str, request: pytest.FixtureRequest) -> Iterator[Harness]:
    h = Harness(bootstrap, unique, request.param)
    yield h
    h.close()


# ---- the shared contract ------------------------------------------------------------------


@pytest.fixture
def source_factory(harness: Harness) -> SourceFactory:
    def make(
        payloads: Sequence[tuple[int, bytes | None]], batch_size: int
    ) -> tuple[EventSource, str]:
        harness.produce(payloads)
        return harness.source(batch_size), harness.topic

    return make


class TestKafkaSourceContract(EventSourceContract):
    pass


# ---- Kafka-specific behaviour -------------------------------------------------------------


def _event(i: int, partition: int) -> bytes:
    return orjson.dumps(
        {"id": f"e{partition}-{i}", "features": [i, partition, 0.0, 1.5], "label": f"c{i % 4}"}
    )


MALFORMED: dict[str, bytes | None] = {
    "empty": None,
    "not_json": b'{"id": "x", "features": [1, 2',
    "not_object": b"[1, 2, 3, 4]",
    "missing_id": b'{"features": [1, 2, 3, 4]}',
    "bad_id": b'{"id": 5, "features": [1, 2, 3, 4]}',
    "bad_features": b'{"id": "bf", "features": [1, true, 3, 4]}',
    "wrong_dimension": b'{"id": "wd", "features": [1, 2, 3]}',
    "non_finite": b'{"id": "nf", "features": [1, 2, 3, 1e39]}',
    "bad_label": b'{"id": "bl", "features": [1, 2, 3, 4], "label": 1.5}',
    "bad_task": b'{"id": "bt", "features": [1, 2, 3, 4], "task": false}',
    "bad_timestamp": b'{"id": "bs", "features": [1, 2, 3, 4], "ts": -5}',
    "oversized": b'{"id": "big", "features": [1, 2, 3, 4], "pad": "' + b"x" * 600 + b'"}',
}


@pytest.fixture
def json_log_lines() -> Iterator[list[str]]:
    """Render structlog as JSON lines (as in production) and collect them."""
    lines: list[str] = []

    class Sink:
        def msg(self, message: str) -> None:
            lines.append(message)

        info = debug = warning = error = critical = exception = msg

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=lambda *_: Sink(),
        cache_logger_on_first_use=False,
    )
    yield lines
    structlog.reset_defaults()


def test_valid_events_batched_malformed_to_dlq_and_offsets_committed(
    harness: Harness, json_log_lines: list[str]
) -> None:
    n_valid = 200
    payloads: list[tuple[int, bytes | None]] = [(i % 2, _event(i, i % 2)) for i in range(n_valid)]
    for j, value in enumerate(MALFORMED.values()):  # spread the bad ones between good ones
        payloads.insert(7 * j + 3, (j % 2, value))
    # duplicate_id needs the same id twice in one batch: one partition, adjacent records.
    payloads.insert(50, (0, _event(0, 0)))
    payloads.insert(51, (0, _event(0, 0)))
    harness.produce(payloads)
    total = len(payloads)

    source = harness.source(batch_size=32, max_event_bytes=512)
    source.start()
    batches = drain(source, total)

    assert sum(b.consumed for b in batches) == total
    ids = Counter(i for b in batches for i in b.ids)
    assert set(ids) == {f"e{i % 2}-{i}" for i in range(n_valid)}
    reasons = Counter(dl.reason for b in batches for dl in b.dead_letters)
    # e0-0 was produced three times: once among the first records and twice adjacent; only a
    # copy inside the same batch as a valid one is a duplicate_id, the others are re-deliveries
    # the bank de-duplicates.
    assert {k: v for k, v in reasons.items() if k != "duplicate_id"} == dict.fromkeys(MALFORMED, 1)
    assert reasons["duplicate_id"] + ids["e0-0"] == 3
    for batch in batches:
        assert len(batch) + len(batch.dead_letters) == batch.consumed
        assert batch.features.shape == (len(batch), CONTRACT_INPUT_DIM)

    final = merged_offsets(batches)
    per_partition = Counter(p for p, _ in payloads)
    assert final == {(harness.topic, p): per_partition[p] for p in range(CONTRACT_PARTITIONS)}
    assert source.commit_sync(final, 15.0) is True
    stats = source.stats()
    assert stats["committed"] == labelled(final)
    assert stats["lag"] == dict.fromkeys(labelled(final), 0)
    assert stats["dead_lettered"] == sum(reasons.values())

    # The DLQ was flushed before the commit: every dead letter is readable now.
    letters = harness.read_dlq(sum(reasons.values()))
    assert Counter(d["reason"] for d in letters) == reasons
    by_reason = {d["reason"]: d for d in letters}
    for reason, value in MALFORMED.items():
        doc = by_reason[reason]
        assert doc["source"]["topic"] == harness.topic
        assert doc["raw"] == (base64.b64encode(value).decode() if value is not None else None)
    source.stop(10.0)
    time.sleep(STAGGER_S)
    assert harness.committed() == {p: per_partition[p] for p in range(CONTRACT_PARTITIONS)}

    # Every line is valid JSON, and a batch's lines carry its topic and offset ranges.
    logged = [orjson.loads(line) for line in json_log_lines]
    dead = [e for e in logged if e["event"] == "dead-lettered events"]
    assert sum(e["count"] for e in dead) == sum(reasons.values())
    assert all(e["topic"] == harness.topic and e["offsets"] for e in dead)


def test_backpressure_pauses_and_loses_nothing(harness: Harness) -> None:
    total = 300
    harness.produce([(i % 2, _event(i, i % 2)) for i in range(total)])
    # Small polls, so most records are still on the broker while the source is paused.
    source = harness.source(batch_size=10, queue_batches=1, max_poll_records=20)
    source.start()

    batches: list[EventBatch] = []
    deadline = time.monotonic() + 30
    while sum(b.consumed for b in batches) < total and time.monotonic() < deadline:
        batch = source.get(1.0)
        if batch is None:
            continue
        batches.append(batch)
        if len(batches) == 2:
            # A learner stalled longer than the session timeout (2 s): the source stays
            # paused and keeps its group membership (heartbeats continue). The stall goes
            # on until the consumer thread has paused, however late a loaded machine runs it.
            time.sleep(2.5)
            wait_until(lambda: source.stats()["paused"] is True, 10.0, "the source to pause")
        elif len(batches) <= 5:
            time.sleep(0.2)
    stats = source.stats()
    # The 2.5 s stall pauses (after poll_timeout_ms of a full queue); the 0.2 s ones do not.
    assert stats["paused_events"] >= 1
    ids = [i for b in batches for i in b.ids]
    assert len(ids) == total
    assert set(ids) == {f"e{i % 2}-{i}" for i in range(total)}
    assert stats["revoked_dropped"] == 0
    assert source.commit_sync(merged_offsets(batches), 15.0) is True  # still a member


def test_steady_backpressure_holds_without_pausing(harness: Harness) -> None:
    """A learner slower than the consumer but taking batches steadily: the source waits for
    room without pausing (a pause would make librdkafka drop its prefetched records)."""
    total, batch_size = 2000, 10
    harness.produce([(i % 2, _event(i, i % 2)) for i in range(total)])
    # Large polls: each leaves many batches waiting behind a one-batch queue for longer than
    # the stall time (poll_timeout_ms), which used to be enough to pause.
    source = harness.source(batch_size=batch_size, queue_batches=1, max_poll_records=1000)
    source.start()
    taken = 0
    backlog = 0  # most records polled but not yet taken, seen after a get()
    deadline = time.monotonic() + 60
    while taken < total and time.monotonic() < deadline:
        batch = source.get(1.0)
        if batch is None:
            continue
        taken += batch.consumed
        backlog = max(backlog, source.stats()["polled"] - taken)
        time.sleep(0.02)  # 50 times shorter than the stall time
    stats = source.stats()
    assert taken == total
    assert backlog >= 10 * batch_size  # the queue was full behind a backlog: backpressure
    assert stats["paused_events"] == 0


def _get_until_closed(source: EventSource, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        source.get(1.0)


def test_consumer_thread_death_surfaces_in_get(harness: Harness) -> None:
    harness.produce([(0, b"not json")])
    source = harness.source(batch_size=1)
    assert harness.dlq_producer is not None
    harness.dlq_producer.close()  # the dead letter cannot be sent: the thread dies
    source.start()
    with pytest.raises(SourceClosedError, match="died") as info:
        _get_until_closed(source, 20.0)
    assert isinstance(info.value.__cause__, ProducerError)
    with pytest.raises(SourceClosedError):
        source.commit({(harness.topic, 0): 1})


def test_restart_with_resume_offsets_skips_covered_records(harness: Harness) -> None:
    first_n = 40
    harness.produce([(i % 2, _event(i, i % 2)) for i in range(first_n)])
    source = harness.source(batch_size=8)
    source.start()
    batches = drain(source, first_n)
    covered = merged_offsets(batches)
    # Crash between checkpoint and commit: only the first batch's offsets were committed,
    # but the checkpoint covers everything read so far.
    assert source.commit_sync(batches[0].offsets, 15.0)
    harness.stop(source)

    harness.produce([(i % 2, _event(i, i % 2)) for i in range(first_n, first_n + 10)])
    restarted = harness.source(batch_size=8)
    restarted.start(resume_offsets=covered)
    again = drain(restarted, 10)
    assert sorted(i for b in again for i in b.ids) == sorted(
        f"e{i % 2}-{i}" for i in range(first_n, first_n + 10)
    )
    # The source seeks to the resume offsets on assignment: the covered records beyond the
    # committed ones are not even fetched (before seeking, they were fetched and skipped).
    assert restarted.stats()["polled"] == 10
    assert restarted.stats()["skipped"] == 0
    assert restarted.get(0.5) is None


def test_start_position_handed_over_after_the_join(harness: Harness) -> None:
    """A restarting learner joins first and gives the checkpoint's offsets later."""
    harness.produce([(i % 2, _event(i, i % 2)) for i in range(40)])
    source = harness.source(batch_size=8)
    source.start()
    assert source.commit_sync(merged_offsets(drain(source, 40)), 15.0)
    harness.stop(source)
    harness.produce([(i % 2, _event(i, i % 2)) for i in range(40, 50)])

    restarted = harness.source(batch_size=8)
    restarted.start_joining()
    wait_until(lambda: len(restarted.assignment()) == 2, 30.0, "the partitions to be assigned")
    # Records of the new events may already be fetched: held, not handed off, until the
    # start position is known.
    assert restarted.get(1.0) is None
    # The checkpoint is behind the committed offset on partition 0 (an older checkpoint was
    # restored) and says nothing of partition 1, which starts at its committed offset.
    restarted.set_start({(harness.topic, 0): 15})
    with pytest.raises(RuntimeError, match="already set"):
        restarted.set_start({})
    again = drain(restarted, 15)
    expected = [f"e0-{i}" for i in range(30, 50, 2)] + [f"e1-{i}" for i in range(41, 50, 2)]
    assert sorted(i for b in again for i in b.ids) == sorted(expected)
    assert restarted.get(0.5) is None


def test_rebalance_between_two_members_loses_nothing(harness: Harness) -> None:
    first = harness.source(batch_size=8)
    harness.produce([(i % 2, _event(i, i % 2)) for i in range(40)])
    first.start()
    early = drain(first, 40)
    assert first.commit_sync(merged_offsets(early), 15.0)

    second = harness.source(batch_size=8)
    second.start()  # joining makes the group rebalance: each member ends with one partition
    harness.produce([(i % 2, _event(i, i % 2)) for i in range(40, 240)])
    seen: Counter[str] = Counter(i for b in early for i in b.ids)
    deadline = time.monotonic() + 30
    # Until every event came out and the rebalance settled (one partition per member).
    while time.monotonic() < deadline and (
        len(seen) < 240 or first.assignment() & second.assignment()
    ):
        for source in (first, second):
            batch = source.get(0.2)
            if batch is not None:
                seen.update(batch.ids)
                source.commit(batch.offsets)
    assert set(seen) == {f"e{i % 2}-{i}" for i in range(240)}  # at-least-once: none lost
    assert first.assignment() | second.assignment() == {
        (harness.topic, p) for p in range(CONTRACT_PARTITIONS)
    }
    assert not first.assignment() & second.assignment()
