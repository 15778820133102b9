"""The per-client stages of ``supcon-stream bench throughput``: each Kafka client side by side.

For each client of ``consumer.client`` (kafka-python, confluent) on the same topic of the run:

- **raw consume**: the bare client (assigned partitions, no group) with the learner's fetch
  settings, records counted and dropped: the ceiling of the client;
- **parse floor**: the same bare client plus ``orjson.loads`` of every record value and nothing
  else: the least any JSON ingest path can cost with that client;
- ingest-only and end-to-end are the stages of
  :mod:`~pipeline.devtools.bench.throughput_stages`, run with ``consumer.client`` set.

:func:`measure_decode` times the decoding alone, offline, per event: ``orjson.loads`` of each
value, and the source's ``decode_batch`` (parse + validate + one matrix per batch).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from pipeline.config import Settings
from pipeline.devtools.bench.throughput_stages import Synthetic, rate, source_config

_RAW_DEADLINE_S = 300.0


def _fetch_settings(settings: Settings) -> Any:
    return source_config(settings, group="raw-unused")


def _kafka_python_loop(settings: Settings, on_values: Callable[[list[Any]], None]) -> Any:
    """A bare kafka-python consumer of every partition from the start; yields value lists."""
    from kafka import KafkaConsumer, TopicPartition

    cfg = _fetch_settings(settings)
    fetch = {
        k: v
        for k, v in cfg.consumer_options().items()
        if k in ("max_poll_records", "fetch_max_bytes", "max_partition_fetch_bytes")
    }
    consumer = KafkaConsumer(
        **settings.kafka.client_options(), enable_auto_commit=False, group_id=None, **fetch
    )
    topic = settings.kafka.events_topic
    parts = [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)

    def poll() -> int:
        polled = consumer.poll(timeout_ms=1000, max_records=cfg.max_poll_records)
        n = 0
        for messages in polled.values():
            on_values([m.value for m in messages])
            n += len(messages)
        return n

    return poll, consumer.close


def _confluent_loop(settings: Settings, on_values: Callable[[list[Any]], None]) -> Any:
    """A bare librdkafka consumer of every partition from the start (no group joined)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from consumers.confluent_client import FETCH_QUEUE_BACKOFF_MS, librdkafka_config

    cfg = _fetch_settings(settings)
    consumer = Consumer(
        {
            **librdkafka_config(settings.kafka.client_options()),
            "group.id": "bench-raw-unused",  # required by librdkafka; never joined (assign)
            "enable.auto.commit": False,
            "fetch.max.bytes": cfg.fetch_max_bytes,
            "max.partition.fetch.bytes": cfg.max_partition_fetch_bytes,
            "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,  # as the source's consumer
        }
    )
    topic = settings.kafka.events_topic
    consumer.assign(
        [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(settings.kafka.partitions)]
    )

    def poll() -> int:
        messages = consumer.consume(num_messages=cfg.max_poll_records, timeout=1.0)
        on_values([m.value() for m in messages if m.error() is None])
        return len(messages)

    return poll, consumer.close


def _bare(settings: Settings, total: int, client: str, parse: bool) -> dict[str, Any]:
    loads = orjson.loads

    def parse_all(values: list[bytes]) -> None:
        for value in values:
            loads(value)

    def drop(values: list[bytes]) -> None:
        del values

    loop = _confluent_loop if client == "confluent" else _kafka_python_loop
    poll, close = loop(settings, parse_all if parse else drop)
    count = seen = 0  # records after the first poll that returned some; all records
    first: float | None = None  # end of the first poll that returned records
    first_began = 0.0  # ... and its start
    deadline = time.monotonic() + _RAW_DEADLINE_S
    try:
        while seen < total and time.monotonic() < deadline:
            began = time.perf_counter()
            n = poll()
            seen += n
            if first is not None:
                count += n
            elif n:  # the clock starts when the first records are in: joins are not counted
                first, first_began = time.perf_counter(), began
        end = time.perf_counter()  # before close(): leaving is not consuming
    finally:
        close()
    if count == 0 and first is not None:
        # Everything came in that first poll (a short stream): time it whole.
        count, elapsed = seen, end - first_began
    else:
        elapsed = end - (first or end)
    return {
        "client": client,
        "events": seen,
        "timed_events": count,
        "seconds": round(elapsed, 3),
        "events_per_s": rate(count, elapsed),
        "us_per_event": round(elapsed / count * 1e6, 3) if count else None,
    }


def measure_raw(settings: Settings, total: int, client: str) -> dict[str, Any]:
    """The bare client: records fetched, counted and dropped."""
    return _bare(settings, total, client, parse=False)


def measure_parse_floor(settings: Settings, total: int, client: str) -> dict[str, Any]:
    """The bare client plus ``orjson.loads`` of every record value, nothing else."""
    return _bare(settings, total, client, parse=True)


def measure_decode(data: Synthetic, count: int, batch_size: int) -> dict[str, Any]:
    """Per-event cost of decoding alone, offline (best of 3 passes over ``count`` events)."""
    from consumers.decode import decode_batch
    from consumers.events import SourceRecord

    values = [data.payload(i) for i in range(count)]
    records = [SourceRecord("bench", 0, i, v, 0) for i, v in enumerate(values)]
    dim = data.features.shape[1]

    def best(run: Callable[[], object]) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        return round(min(times) / count * 1e6, 3)

    def decode_all(native: bool) -> None:
        for i in range(0, count, batch_size):
            decode_batch(records[i : i + batch_size], dim, 65_536, native=native)

    loads = orjson.loads
    loads_us = best(lambda: [loads(v) for v in values])
    decode_us = best(lambda: decode_all(native=True))
    # The same through the reference path alone (no native scanner), side by side.
    reference_us = best(lambda: decode_all(native=False))
    return {
        "events": count,
        "batch_size": batch_size,
        "orjson_loads_us_per_event": loads_us,
        "decode_batch_us_per_event": decode_us,
        "decode_batch_reference_path_us_per_event": reference_us,
        "native_over_loads": round(decode_us / loads_us, 3),
    }
