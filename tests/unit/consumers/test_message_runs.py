"""message_runs: librdkafka messages to the source's runs of SourceRecords (pure logic; the
real client runs it in the contract suite, tests/integration/test_source_kafka.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from consumers._eventscan import message_runs
from consumers.events import SourceRecord


@dataclass
class Message:
    """The accessors of confluent_kafka.Message that the source reads."""

    t: str
    p: int
    o: int
    v: bytes | None
    ts: int = 7
    err: object = None

    def error(self) -> object:
        return self.err

    def topic(self) -> str:
        return self.t

    def partition(self) -> int:
        return self.p

    def offset(self) -> int:
        return self.o

    def value(self) -> bytes | None:
        return self.v

    def timestamp(self) -> tuple[int, int]:
        return (1, self.ts)


def test_runs_of_one_partition_in_order_without_errored_messages() -> None:
    messages = [
        Message("a", 0, 10, b"x", ts=100),
        Message("a", 0, 11, None),
        Message("a", 1, 5, b"y"),
        Message("a", 1, 6, b"z", err="transient"),
        Message("b", 1, 7, b"w"),
        Message("a", 0, 12, b"v"),
    ]
    runs = message_runs(messages, SourceRecord)
    assert runs == [
        (("a", 0), [SourceRecord("a", 0, 10, b"x", 100), SourceRecord("a", 0, 11, None, 7)]),
        (("a", 1), [SourceRecord("a", 1, 5, b"y", 7)]),
        (("b", 1), [SourceRecord("b", 1, 7, b"w", 7)]),
        (("a", 0), [SourceRecord("a", 0, 12, b"v", 7)]),
    ]
    record = runs[0][1][0]
    assert type(record) is SourceRecord
    assert (record.topic, record.offset, record.timestamp_ms) == ("a", 10, 100)


def test_no_messages_and_only_errors_give_no_runs() -> None:
    assert message_runs([], SourceRecord) == []
    assert message_runs([Message("a", 0, 1, b"x", err="e")], SourceRecord) == []


def test_a_failing_accessor_raises_and_a_bad_record_type_is_refused() -> None:
    class Broken(Message):
        def offset(self) -> int:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        message_runs([Message("a", 0, 1, b"x"), Broken("a", 0, 2, b"y")], SourceRecord)
    with pytest.raises(TypeError, match="tuple subclass"):
        message_runs([], dict)  # type: ignore[arg-type]
