"""The telemetry channel (Redis streams) against a real redis-server."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import redis

from pipeline.config import RedisSettings
from pipeline.devtools.devstack import free_port, start_redis, stop_process
from pipeline.telemetry.channel import (
    MALFORMED,
    TelemetryReader,
    TelemetryWriter,
    stream_key,
    telemetry_client,
)
from pipeline.telemetry.records import ClassifierScores, EndRecord, EvalRecord, StepRecord

pytestmark = pytest.mark.integration


def _step(n: int, learner: str = "ce") -> StepRecord:
    return StepRecord(learner=learner, step=n, ts=1000 * n)


def test_write_discover_read(redis_client: redis.Redis, unique: str) -> None:
    prefix = f"t{unique}"
    for name in ("ce", "supcon"):
        writer = TelemetryWriter(redis_client, prefix, name, maxlen=1000)
        # An integer key (a JSONL label) is written as JSON keys always are: a string.
        int_keyed: dict = {3: 0.5}
        writer.emit(StepRecord(learner=name, step=1, ts=1, per_class_loss=int_keyed))
        writer.emit(EvalRecord(name, 1, 2, "ncm", {"ncm": ClassifierScores({"3": 1.0})}))
        writer.emit(EndRecord(learner=name, step=1))
        assert writer.stats.emitted == 3
    redis_client.set(f"{prefix}:telemetry:not-a-stream", b"x")  # only streams are learners
    reader = TelemetryReader(redis_client, prefix)
    assert reader.discover() == ["ce", "supcon"]

    records = reader.read({"ce": "0-0", "supcon": "0-0"}, count=10)
    assert [(r.learner, r.kind) for r in records] == [
        ("ce", "step"),
        ("ce", "eval"),
        ("ce", "end"),
        ("supcon", "step"),
        ("supcon", "eval"),
        ("supcon", "end"),
    ]
    first = records[0]
    assert first.record == StepRecord(learner="ce", step=1, ts=1, per_class_loss={"3": 0.5})
    assert records[1].record == EvalRecord("ce", 1, 2, "ncm", {"ncm": ClassifierScores({"3": 1.0})})
    assert records[2].record == EndRecord(learner="ce", step=1)
    cursors = {r.learner: r.id for r in records}
    assert reader.read(cursors) == []
    assert [r.kind for r in reader.read({"ce": first.id})] == ["eval", "end"]
    assert [r.kind for r in reader.read_range("ce", "0-0", records[1].id)] == ["step", "eval"]
    assert [r.kind for r in reader.read_range("ce", first.id, records[2].id)] == ["eval", "end"]


def test_read_blocks_at_most_block_ms(
    redis_client: redis.Redis, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks: list[int | None] = []
    xread = redis_client.xread

    def recording_xread(*args: Any, **kwargs: Any) -> Any:
        blocks.append(kwargs.get("block"))
        return xread(*args, **kwargs)

    monkeypatch.setattr(redis_client, "xread", recording_xread)
    reader = TelemetryReader(redis_client, f"t{unique}")
    started = time.monotonic()
    assert reader.read({"nobody": "0-0"}, block_ms=200) == []
    # It did wait (Redis held the reply), and only as long as asked: the server was told
    # BLOCK 200, which it honours; BLOCK 0 would have meant "forever".
    assert time.monotonic() - started >= 0.15
    assert blocks == [200]


def test_malformed_entry_still_moves_the_cursor(redis_client: redis.Redis, unique: str) -> None:
    prefix = f"t{unique}"
    key = stream_key(prefix, "ce")
    redis_client.xadd(key, {"kind": "step", "data": b"{not json"})
    redis_client.xadd(key, {"data": b"{}"})
    redis_client.xadd(key, {"kind": "step", "data": b"[1, 2]"})
    redis_client.xadd(key, {"kind": "step", "data": b'{"step": 7}'})  # no learner, no ts
    TelemetryWriter(redis_client, prefix, "ce", maxlen=1000).emit(_step(7))
    records = TelemetryReader(redis_client, prefix).read({"ce": "0-0"})
    assert [r.kind for r in records] == [MALFORMED, MALFORMED, MALFORMED, MALFORMED, "step"]
    assert all(r.record is None and r.error for r in records[:-1])
    assert records[-1].record == _step(7)


def test_a_hand_written_wire_entry_is_read(redis_client: redis.Redis, unique: str) -> None:
    """The wire format is two fields, ``kind`` and ``data`` (JSON): any writer may use it."""
    prefix = f"t{unique}"
    data = b'{"learner": "ce", "step": 3, "ts": 3000, "loss": 0.5, "per_class_loss": {"a": 0.5}}'
    redis_client.xadd(stream_key(prefix, "ce"), {"kind": "step", "data": data})
    (entry,) = TelemetryReader(redis_client, prefix).read({"ce": "0-0"})
    assert entry.record == StepRecord("ce", 3, 3000, loss=0.5, per_class_loss={"a": 0.5})


def test_maxlen_trims_approximately(redis_client: redis.Redis, unique: str) -> None:
    writer = TelemetryWriter(redis_client, f"t{unique}", "ce", maxlen=100)
    for step in range(1000):
        writer.emit(_step(step))
    length = redis_client.xlen(writer.key)
    assert 100 <= length < 1000


class _ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_writer_survives_a_redis_outage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    server = start_redis(port, tmp_path)
    client = telemetry_client(RedisSettings(url=f"redis://127.0.0.1:{port}/0"), timeout_s=0.5)
    clock = _ManualClock()
    attempts: list[float] = []  # the writer's clock at each round trip to Redis
    pipeline = client.pipeline

    def recording_pipeline(*args: Any, **kwargs: Any) -> Any:
        attempts.append(clock.now)
        return pipeline(*args, **kwargs)

    monkeypatch.setattr(client, "pipeline", recording_pipeline)
    writer = TelemetryWriter(
        client, "t", "ce", maxlen=1000, retry_backoff_s=(0.05, 0.1), clock=clock
    )
    try:
        writer.emit(_step(1))
        stop_process(server.pid)

        # Redis is down: buffered, neither raised nor stalled. One failed round trip (the
        # client's short timeout bounds it), then the back-off keeps the next emit off Redis.
        writer.emit(_step(2))
        writer.emit(_step(3))
        assert attempts == [0.0, 0.0]
        assert writer.stats.buffered == 2

        server = start_redis(port, tmp_path)  # same data dir: its AOF brings record 1 back
        clock.now = 0.06  # past the back-off
        writer.emit(_step(4))
        assert attempts == [0.0, 0.0, 0.06]
        assert writer.stats.buffered == 0
        assert writer.stats.emitted == 4
        records = TelemetryReader(client, "t").read({"ce": "0-0"})
        assert [r.record.step for r in records if r.record] == [1, 2, 3, 4]
    finally:
        client.close()
        stop_process(server.pid)
