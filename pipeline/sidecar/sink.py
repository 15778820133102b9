"""Where the sidecar's publications go: a protocol and its Kafka implementation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import orjson
import structlog

from pipeline.config import Settings
from pipeline.sidecar.state import Publication

if TYPE_CHECKING:
    from consumers.producer import JsonProducer

log = structlog.get_logger(__name__)

_FLUSH_TIMEOUT_S = 30.0
# Short: a stop request waits for it, and the runner's back-off retries it anyway.
_TOPICS_TIMEOUT_S = 5.0


class MetricsSink(Protocol):
    """Where publications go. ``send`` queues (raising if it cannot), ``flush`` makes every
    queued record durable or raises; a record queued before a failed ``flush`` stays queued
    and must not be sent again (the sink retries it on the next ``flush``)."""

    def send(self, item: Publication) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class KafkaMetricsSink:
    """Publishes to the loss, forgetting and alerts topics through a lazily created JsonProducer.

    Lazily, because the broker may be down when the sidecar starts: creating the topics
    and the producer is retried by the runner's back-off like any other publish failure.
    JsonProducer keeps unacknowledged records and recreates its client itself.
    """

    def __init__(
        self,
        settings: Settings,
        flush_timeout_s: float = _FLUSH_TIMEOUT_S,
        topics_timeout_s: float = _TOPICS_TIMEOUT_S,
    ) -> None:
        kafka = settings.kafka
        self._kafka = kafka
        self._topics = {
            "loss": kafka.loss_topic,
            "forgetting": kafka.forgetting_topic,
            "alerts": kafka.alerts_topic,
        }
        self._flush_timeout_s = flush_timeout_s
        self._topics_timeout_s = topics_timeout_s
        self._producer: JsonProducer | None = None

    def _ready_producer(self) -> JsonProducer:
        if self._producer is None:
            from consumers.admin import ensure_topics
            from consumers.producer import JsonProducer

            options = self._kafka.client_options()
            ensure_topics(
                options,
                list(self._topics.values()),
                self._kafka.partitions,
                self._kafka.replication_factor,
                timeout_s=self._topics_timeout_s,
            )
            self._producer = JsonProducer(options)
        return self._producer

    def send(self, item: Publication) -> None:
        self._ready_producer().send(
            self._topics[item.stream], orjson.dumps(item.payload), key=item.learner.encode()
        )

    def flush(self) -> None:
        if self._producer is not None:
            self._producer.flush(timeout_s=self._flush_timeout_s)

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            # close() flushes first and raises if records are still undelivered; the cursor
            # was not advanced past them, so a restart re-derives and re-publishes them.
            try:
                producer.close(timeout_s=5.0)
            except Exception as exc:  # noqa: BLE001 - shutting down; logged, not fatal
                log.warning("metrics producer closed with undelivered records", error=str(exc))
