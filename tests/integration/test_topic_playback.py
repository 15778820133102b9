"""``replay topic:NAME`` against a real broker: exact slices, keys and timestamps kept."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import orjson
import pytest
import structlog
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from consumers.admin import ensure_topics
from pipeline import cli

pytestmark = pytest.mark.integration


def _produce(bootstrap: str, topic: str, tag: str, n: int, ts0: int | None = None) -> list[str]:
    """n keyed events; with ``ts0`` their record timestamps are ts0 + 100 ms * i."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    for i in range(n):
        event = {"id": f"{tag}-{i}", "features": [0.0, 1.0], "label": i % 2}
        stamp = ts0 + 100 * i if ts0 is not None else None
        producer.send(topic, orjson.dumps(event), key=event["id"].encode(), timestamp_ms=stamp)
    producer.flush(30)
    producer.close()
    return [f"{tag}-{i}" for i in range(n)]


def _read(bootstrap: str, topic: str, expect: int, timeout_s: float = 30.0) -> list:
    """(key, id, timestamp, partition, offset) of every record of ``topic``."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
    consumer.assign(parts)
    consumer.seek_to_beginning()
    out: list = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(out) < expect:
        for tp, records in consumer.poll(timeout_ms=500).items():
            out.extend(
                (r.key, orjson.loads(r.value)["id"], r.timestamp, tp.partition, r.offset)
                for r in records
            )
    time.sleep(1.0)  # anything beyond `expect` would show up now
    for tp, records in consumer.poll(timeout_ms=500).items():
        out.extend(
            (r.key, orjson.loads(r.value)["id"], r.timestamp, tp.partition, r.offset)
            for r in records
        )
    consumer.close()
    return out


def _replay(bootstrap: str, args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    try:
        code = cli.main(["replay", *args, "--set", f"kafka.bootstrap_servers={bootstrap}"])
    finally:
        structlog.reset_defaults()
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def test_time_slice_copies_exactly_the_middle_burst_with_keys_and_timestamps(
    bootstrap, unique, capsys
):
    archive = f"arch{unique}"
    ensure_topics({"bootstrap_servers": bootstrap}, [archive], 2, 1, timeout_s=30)
    _produce(bootstrap, archive, "a", 200)
    time.sleep(1.5)
    after_a = datetime.now(UTC).isoformat()
    time.sleep(1.5)
    middle = _produce(bootstrap, archive, "b", 200)
    time.sleep(1.5)
    after_b = str(int(time.time() * 1000))
    time.sleep(1.5)
    _produce(bootstrap, archive, "c", 200)
    original = {rid: (key, ts) for key, rid, ts, _p, _o in _read(bootstrap, archive, 600)}

    report = _replay(
        bootstrap,
        [f"topic:{archive}", "--from", after_a, "--until", after_b, "--to-prefix", f"n{unique}"],
        capsys,
    )
    assert report["sent"] == 200
    copied = _read(bootstrap, f"n{unique}.events", 200)
    assert sorted(rid for _k, rid, *_ in copied) == sorted(middle)
    for key, rid, ts, _p, _o in copied:
        assert (key, ts) == original[rid]  # key and original timestamp kept


def test_offset_slice_copies_exactly_those_offsets(bootstrap, unique, capsys):
    archive = f"arch{unique}"
    ensure_topics({"bootstrap_servers": bootstrap}, [archive], 2, 1, timeout_s=30)
    _produce(bootstrap, archive, "a", 100)
    records = _read(bootstrap, archive, 100)
    want = {
        rid for _k, rid, _t, p, o in records if (p == 0 and 5 <= o < 15) or (p == 1 and o >= 30)
    }

    report = _replay(
        bootstrap,
        [f"topic:{archive}", "--from", "0:5,1:30", "--until", "0:15", "--to-prefix", f"o{unique}"],
        capsys,
    )
    assert report["sent"] == len(want)
    assert {rid for _k, rid, *_ in _read(bootstrap, f"o{unique}.events", len(want))} == want


def test_speed_never_runs_ahead_of_event_time(bootstrap, unique, capsys):
    """30 records whose timestamps span 2.9 s, at --speed 2: at least 1.45 s. (The accuracy
    of --speed is measured, not asserted: a loaded machine only makes it slower.)"""
    archive = f"arch{unique}"
    ensure_topics({"bootstrap_servers": bootstrap}, [archive], 2, 1, timeout_s=30)
    _produce(bootstrap, archive, "a", 30, ts0=int(time.time() * 1000) - 60_000)
    report = _replay(
        bootstrap, [f"topic:{archive}", "--speed", "2", "--to-prefix", f"p{unique}"], capsys
    )
    assert report["sent"] == 30
    assert report["event_time_span_s"] == pytest.approx(2.9)
    assert report["elapsed_s"] >= 2.9 / 2


def test_bad_topic_slices_are_one_line_errors(bootstrap, unique, capsys):
    def run(*args: str) -> tuple[int, str]:
        try:
            code = cli.main(["replay", *args, "--set", f"kafka.bootstrap_servers={bootstrap}"])
        finally:
            structlog.reset_defaults()
        return code, capsys.readouterr().err.strip()

    code, err = run(f"topic:missing{unique}", "--to-prefix", f"m{unique}")
    assert code == 2
    assert "does not exist" in err
    code, err = run("topic:x", "--from", "soon")
    assert code == 2
    assert "not a position" in err
    code, err = run("split-digits", "--speed", "2")
    assert code == 2
    assert "topic:NAME" in err
