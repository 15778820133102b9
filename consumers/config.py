"""The Kafka source's settings, with the one set of bounds every caller shares.

:class:`ConsumerTuning` holds the consumer knobs and their bounds. The learner's settings
(``pipeline.config.ConsumerSettings``, the ``consumer`` section) subclass it, so a bad value
fails at start with its dotted key (``consumer.batch_size``); :class:`SourceConfig` adds what
one source needs besides (topic, group, input width, DLQ topic) and builds from any tuning with
:meth:`SourceConfig.from_tuning`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ConsumerTuning(BaseModel):
    """Consumer knobs shared by the settings file and :class:`SourceConfig` (frozen)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The Kafka client library of the source (consumers/client.py): kafka-python, the
    # project's default, or confluent (librdkafka, the ``fast`` extra), which consumes and
    # hands over whole batches in C (side-by-side figures in docs/performance.md).
    client: Literal["kafka-python", "confluent"] = "kafka-python"
    batch_size: int = Field(32, ge=1, le=65_536)
    max_latency_ms: int = Field(250, ge=1)
    queue_batches: int = Field(8, ge=1)
    poll_timeout_ms: int = Field(1000, ge=10)
    max_poll_records: int = Field(2000, ge=1)
    fetch_max_bytes: int = Field(52_428_800, ge=1024)
    max_partition_fetch_bytes: int = Field(4_194_304, ge=1024)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    # The broker default minimum (group.min.session.timeout.ms) of Apache Kafka. A restart
    # waits for the group join, whose length the broker ties to this timeout
    # (docs/performance.md, Restart).
    session_timeout_ms: int = Field(6_000, ge=1000)
    max_poll_interval_ms: int = Field(300_000, ge=1000)
    max_event_bytes: int = Field(65_536, ge=64)


class SourceConfig(ConsumerTuning):
    """Everything the Kafka source needs besides connection options."""

    topic: str = Field(min_length=1)
    group_id: str = Field(min_length=1)
    input_dim: int = Field(ge=1)
    dlq_topic: str = Field(min_length=1)
    commit_timeout_ms: int = Field(10_000, ge=1)
    dlq_flush_timeout_s: float = 30.0
    learner: str | None = None
    """Named in every dead letter this source writes, beside the group (``rejected_by``)."""

    @model_validator(mode="after")
    def _check_topics(self) -> SourceConfig:
        if self.topic == self.dlq_topic:
            raise ValueError("dlq_topic must differ from topic")
        return self

    @classmethod
    def from_tuning(
        cls,
        tuning: ConsumerTuning,
        *,
        topic: str,
        group_id: str,
        input_dim: int,
        dlq_topic: str,
        learner: str | None = None,
    ) -> SourceConfig:
        """The source of ``topic`` with the knobs of ``tuning`` (e.g. the ``consumer`` settings)."""
        knobs = {name: getattr(tuning, name) for name in ConsumerTuning.model_fields}
        return cls(
            **knobs,
            topic=topic,
            group_id=group_id,
            input_dim=input_dim,
            dlq_topic=dlq_topic,
            learner=learner,
        )

    def rejected_by(self) -> dict[str, str | None]:
        """Who rejects this source's dead letters: ``{"learner", "group"}``."""
        return {"learner": self.learner, "group": self.group_id}

    def consumer_options(self) -> dict[str, Any]:
        """kafka-python consumer settings derived from this config (connection excluded)."""
        return {
            "group_id": self.group_id,
            # Offsets are committed only by the learner, after a checkpoint covers them.
            "enable_auto_commit": False,
            "auto_offset_reset": self.auto_offset_reset,
            "max_poll_records": self.max_poll_records,
            "fetch_max_bytes": self.fetch_max_bytes,
            "max_partition_fetch_bytes": self.max_partition_fetch_bytes,
            "session_timeout_ms": self.session_timeout_ms,
            "heartbeat_interval_ms": max(100, min(3000, self.session_timeout_ms // 3)),
            "max_poll_interval_ms": self.max_poll_interval_ms,
            # check_crcs stays on: with the crc32c package it is cheap.
        }
