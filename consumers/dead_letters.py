"""Dead letters of a decoded batch: sent to the DLQ and logged with the batch's offsets."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import structlog

from consumers.config import SourceConfig
from consumers.decode import dead_letter_payload
from consumers.events import DeadLetter, SourceRecord
from consumers.producer import JsonProducer


def _ranges(records: Sequence[SourceRecord]) -> dict[int, str]:
    """{partition: "first-last"} for log context (offsets ascend per partition in a batch)."""
    spans: dict[int, list[int]] = {}
    for r in records:
        spans.setdefault(r.partition, [r.offset, r.offset])[1] = r.offset
    return {p: f"{lo}-{hi}" for p, (lo, hi) in sorted(spans.items())}


def send_dead_letters(
    dead_letters: Sequence[DeadLetter],
    records: Sequence[SourceRecord],
    cfg: SourceConfig,
    dlq: JsonProducer,
    log: Any,
) -> None:
    """Send each one now; the flush that precedes the covering commit makes them durable.

    The batch's offset ranges are bound to the log context only here, when there is something
    to log: computing them for every batch is a per-event cost on the consumer thread.
    """
    with structlog.contextvars.bound_contextvars(topic=cfg.topic, offsets=_ranges(records)):
        for dl in dead_letters:
            dlq.send(cfg.dlq_topic, dead_letter_payload(dl, rejected_by=cfg.rejected_by()))
        log.warning(
            "dead-lettered events",
            count=len(dead_letters),
            reasons=dict(Counter(dl.reason for dl in dead_letters)),
            dlq=cfg.dlq_topic,
        )
