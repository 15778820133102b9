"""A poll that raises: retriable failures are ridden out, anything else stops the source.

kafka-python 3.x raises a failed coordinator lookup (the broker cut off) out of poll(); before
this was handled, a learner whose broker vanished at the wrong moment died instead of
reconnecting. The client here is a scripted stand-in for the consumer thread's client; the
translation of kafka-python's own errors is checked against the real adapter below.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, cast

import orjson
import pytest
from kafka.errors import KafkaConnectionError, TopicAuthorizationFailedError

import consumers.source as source_module
from consumers.client import Polled, RebalanceEvent, TransientPollError
from consumers.config import SourceConfig
from consumers.events import SourceRecord, TopicPartitionKey
from consumers.exceptions import SourceClosedError
from consumers.kafka_python_client import KafkaPythonClient
from consumers.producer import JsonProducer
from consumers.source import KafkaBatchSource
from pipeline.config import load_settings

TOPIC = "pe.events"
KEY: TopicPartitionKey = (TOPIC, 0)


def _record(offset: int) -> SourceRecord:
    value = orjson.dumps({"id": f"e{offset}", "features": [0.1, 0.2, 0.3, 0.4], "label": "a"})
    return SourceRecord(TOPIC, 0, offset, value, 1)


class ScriptedClient:
    """Answers each poll with the next step of ``script``: an exception to raise or records."""

    def __init__(self, script: list[BaseException | list[SourceRecord]]) -> None:
        self.script = script
        self.polls = 0
        self._assigned_told = False

    def poll(self, timeout_s: float, max_records: int) -> Polled:
        self.polls += 1
        step = self.script.pop(0) if self.script else []
        if isinstance(step, BaseException):
            raise step
        return [(KEY, step)] if step else []

    def drain_rebalances(self) -> list[RebalanceEvent]:
        if self._assigned_told:
            return []
        self._assigned_told = True
        return [("assigned", frozenset({KEY}))]

    def assignment(self) -> frozenset[TopicPartitionKey]:
        return frozenset({KEY})

    def seek(self, key: TopicPartitionKey, offset: int) -> None:
        return None

    def pause_all(self) -> None:
        return None

    def resume_all(self) -> None:
        return None

    def commit(self, offsets: Mapping[TopicPartitionKey, int], timeout_s: float) -> None:
        return None

    def highwater(self, key: TopicPartitionKey) -> int | None:
        return 3

    def connected(self) -> bool | None:
        return None

    def close(self, timeout_s: float) -> None:
        return None


class _NoDeadLetters:
    def send(self, topic: str, payload: Any) -> None:
        raise AssertionError("nothing here is dead-lettered")

    def flush(self, timeout_s: float = 30.0) -> None:
        return None


def _source(monkeypatch: pytest.MonkeyPatch, client: ScriptedClient) -> KafkaBatchSource:
    monkeypatch.setattr(source_module, "open_client", lambda config, options: client)
    tuning = load_settings(
        None, ["consumer.batch_size=3", "consumer.poll_timeout_ms=10"], environ={}
    ).consumer
    config = SourceConfig.from_tuning(
        tuning, topic=TOPIC, group_id="pe", input_dim=4, dlq_topic="pe.dlq"
    )
    dlq = cast(JsonProducer, _NoDeadLetters())
    return KafkaBatchSource(config, {"bootstrap_servers": "127.0.0.1:1"}, dlq)


def _first_batch(source: KafkaBatchSource, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = source.get(0.2)
        if batch is not None:
            return batch
    raise AssertionError("no batch arrived")


def test_retriable_poll_failures_are_ridden_out(monkeypatch: pytest.MonkeyPatch) -> None:
    cut = TransientPollError("KafkaConnectionError: 111 ECONNREFUSED")
    client = ScriptedClient([cut, cut, cut, [_record(0), _record(1), _record(2)]])
    source = _source(monkeypatch, client)
    source.start()
    try:
        batch = _first_batch(source)
        assert list(batch.ids) == ["e0", "e1", "e2"]
        assert client.polls >= 4
        assert source.get(0.0) is None  # still usable: no SourceClosedError
    finally:
        source.stop(timeout_s=10.0)


def test_any_other_poll_failure_stops_the_source(monkeypatch: pytest.MonkeyPatch) -> None:
    client = ScriptedClient([RuntimeError("a bug in the client")])
    source = _source(monkeypatch, client)
    try:
        # start() or a later get() says so, depending on how soon the consumer thread polls.
        with pytest.raises(SourceClosedError, match="a bug in the client"):
            _start_and_read(source, 30.0)
    finally:
        source.stop(timeout_s=10.0)


def _start_and_read(source: KafkaBatchSource, timeout_s: float) -> None:
    source.start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        source.get(0.2)


class _RaisingConsumer:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def poll(self, **kwargs: Any) -> dict[Any, Any]:
        raise self.exc


def _adapter(exc: Exception) -> KafkaPythonClient:
    client = object.__new__(KafkaPythonClient)  # no broker: only poll() is exercised
    client._consumer = cast(Any, _RaisingConsumer(exc))
    return client


def test_kafka_python_retriable_errors_become_transient_poll_errors() -> None:
    with pytest.raises(TransientPollError, match="ECONNREFUSED"):
        _adapter(KafkaConnectionError("111 ECONNREFUSED")).poll(0.1, 10)
    with pytest.raises(TopicAuthorizationFailedError):  # not retriable: not hidden
        _adapter(TopicAuthorizationFailedError()).poll(0.1, 10)
