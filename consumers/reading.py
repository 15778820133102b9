"""Reading a topic from its start without a consumer group, for tools and checks.

Nothing is committed and no group is joined, so reading never moves a learner's offsets:
the crash drills (:mod:`pipeline.devtools.chaos`) and the tests read what was produced, or
what a learner wrote to the predictions and dead-letter topics, this way.
"""

from __future__ import annotations

import time
from typing import Any

import orjson


def read_topic_json(bootstrap: str, topic: str, expect: int, timeout_s: float = 60.0) -> list[Any]:
    """The parsed JSON value of every record in ``topic``, read without a group (nothing is
    committed), until ``expect`` records arrived or ``timeout_s`` passed."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=1000,
    )
    values: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(values) < expect and time.monotonic() < deadline:
            values.extend(orjson.loads(m.value) for m in consumer)
    finally:
        consumer.close()
    return values
