"""Replay into a real broker: a built-in scenario and a JSONL file with a malformed line."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition

from pipeline.config import Settings
from pipeline.streams.playback import ReplayReport, run_replay


def make_settings(bootstrap: str, unique: str, partitions: int = 4) -> Settings:
    return Settings.model_validate(
        {
            "kafka": {
                "bootstrap_servers": bootstrap,
                "topic_prefix": f"t{unique}",
                "partitions": partitions,
            }
        }
    )


def read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 15.0) -> list[Any]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    records: list[Any] = []
    try:
        partitions = consumer.partitions_for_topic(topic)
        assert partitions, f"topic {topic} does not exist"
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        consumer.seek_to_beginning()
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
    finally:
        consumer.close()
    return records


@pytest.mark.integration
def test_scenario_lands_in_the_topic_keyed_by_id(bootstrap: str, unique: str) -> None:
    settings = make_settings(bootstrap, unique)
    seen: list[ReplayReport] = []
    report = run_replay(settings, "split-digits", limit=300, seed=0, progress=seen.append)
    assert (report.sent, report.total, report.unkeyed, report.done) == (300, 300, 0, True)
    assert report.topic == settings.kafka.events_topic
    assert seen[-1] == report
    assert report.as_dict()["events_per_s"] > 0

    records = read_all(bootstrap, report.topic, expected=300)
    assert len(records) == 300
    events = [orjson.loads(r.value) for r in records]
    assert all(r.key == e["id"].encode() for r, e in zip(records, events, strict=True))
    assert {e["task"] for e in events} <= {0, 1}  # the first 300 events: tasks 0 and 1
    assert all(len(e["features"]) == 64 for e in events)
    assert len({r.partition for r in records}) > 1  # keys spread over the 4 partitions

    # Replaying again sends every id to the partition it went to the first time.
    first = {r.key: r.partition for r in records}
    run_replay(settings, "split-digits", limit=300, seed=0)
    again = read_all(bootstrap, report.topic, expected=600)
    assert len(again) == 600
    assert all(first[r.key] == r.partition for r in again)


@pytest.mark.integration
def test_jsonl_file_with_a_malformed_line(bootstrap: str, unique: str, tmp_path: Path) -> None:
    settings = make_settings(bootstrap, unique, partitions=1)
    good = [
        {"id": "e1", "features": [0.1, 0.2], "label": "cat"},
        {"id": "e2", "features": [0.3, 0.4], "label": 2, "task": "t0"},
        {"id": 7, "features": [0.5, 0.6]},
    ]
    lines = [orjson.dumps(good[0]), orjson.dumps(good[1]), b"{not json", orjson.dumps(good[2])]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n\n")

    report = run_replay(settings, str(path))
    assert (report.sent, report.total, report.unkeyed) == (4, None, 1)
    records = read_all(bootstrap, settings.kafka.events_topic, expected=4)
    assert [r.value for r in records] == lines  # passed through byte for byte, in order
    assert [r.key for r in records] == [b"e1", b"e2", None, b"7"]


@pytest.mark.integration
def test_rate_paces_the_replay(bootstrap: str, unique: str) -> None:
    settings = make_settings(bootstrap, unique, partitions=1)
    report = run_replay(settings, "split-digits", rate=100.0, limit=40)
    assert report.sent == 40
    # 40 events at 100/s: the first is free, the other 39 wait ~10 ms each. No upper bound
    # (a loaded machine is slower): tests/unit/streams/test_playback.py checks the exact
    # waits against a fake clock.
    assert report.elapsed_s >= 0.3
