"""The EventSource contract, run against the Kafka-free InMemorySource.

tests/integration/test_source_contract.py runs the same suite against KafkaBatchSource.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from consumers.events import SourceRecord
from consumers.protocols import EventSource
from consumers.testing import CONTRACT_INPUT_DIM, EventSourceContract, InMemorySource, SourceFactory

TOPIC = "contract-events"


@pytest.fixture
def source_factory() -> SourceFactory:
    def make(
        payloads: Sequence[tuple[int, bytes | None]], batch_size: int
    ) -> tuple[EventSource, str]:
        next_offset: dict[int, int] = {}
        records = []
        for partition, value in payloads:
            offset = next_offset.get(partition, 0)
            next_offset[partition] = offset + 1
            records.append(SourceRecord(TOPIC, partition, offset, value, 1))
        return InMemorySource(records, batch_size, CONTRACT_INPUT_DIM), TOPIC

    return make


class TestInMemorySourceContract(EventSourceContract):
    pass


def test_in_memory_source_is_an_event_source() -> None:
    assert isinstance(InMemorySource([], 4, 2), EventSource)


def test_in_memory_source_keeps_dead_letters() -> None:
    source = InMemorySource([SourceRecord(TOPIC, 0, 0, b"nope")], 4, 2)
    source.start()
    batch = source.get(0.0)
    assert batch is not None
    assert batch.consumed == 1
    assert [d.reason for d in source.dead_letters] == ["not_json"]
    assert source.stats()["lag"] == {f"{TOPIC}:0": 0}


def test_source_config_checks_values_and_derives_client_options() -> None:
    from consumers.source import SourceConfig

    config = SourceConfig(topic="a.events", group_id="g", input_dim=8, dlq_topic="a.dlq")
    options = config.consumer_options()
    assert options["enable_auto_commit"] is False
    assert options["heartbeat_interval_ms"] < options["session_timeout_ms"]
    with pytest.raises(ValueError, match="batch_size"):
        SourceConfig(topic="a", group_id="g", input_dim=8, dlq_topic="d", batch_size=0)
    with pytest.raises(ValueError, match="dlq_topic"):
        SourceConfig(topic="a", group_id="g", input_dim=8, dlq_topic="a")
    with pytest.raises(ValueError, match="auto_offset_reset"):
        SourceConfig(
            topic="a",
            group_id="g",
            input_dim=8,
            dlq_topic="d",
            auto_offset_reset="none",  # type: ignore[arg-type]
        )


def test_settings_and_source_config_share_one_set_of_bounds() -> None:
    from consumers.config import ConsumerTuning, SourceConfig
    from pipeline.config import ConsumerSettings, load_settings
    from pipeline.exceptions import ConfigError

    assert issubclass(ConsumerSettings, ConsumerTuning)
    assert issubclass(SourceConfig, ConsumerTuning)
    for name, tuned in ConsumerTuning.model_fields.items():
        assert ConsumerSettings.model_fields[name].metadata == tuned.metadata, name
        assert SourceConfig.model_fields[name].metadata == tuned.metadata, name
    # The same bad value fails both ways: at start with its dotted key, and in SourceConfig.
    with pytest.raises(ConfigError, match=r"consumer\.poll_timeout_ms"):
        load_settings(None, ["consumer.poll_timeout_ms=5"], environ={})
    with pytest.raises(ValueError, match="poll_timeout_ms"):
        SourceConfig(topic="a", group_id="g", input_dim=8, dlq_topic="d", poll_timeout_ms=5)
    with pytest.raises(ValueError, match="topic"):
        SourceConfig(topic="", group_id="g", input_dim=8, dlq_topic="d")


def test_source_config_from_settings_takes_every_knob() -> None:
    from consumers.config import ConsumerTuning, SourceConfig
    from pipeline.config import load_settings

    settings = load_settings(
        None, ["consumer.batch_size=64", "consumer.auto_offset_reset=latest"], environ={}
    )
    config = SourceConfig.from_tuning(
        settings.consumer, topic="a.events", group_id="g", input_dim=8, dlq_topic="a.dlq"
    )
    for name in ConsumerTuning.model_fields:
        assert getattr(config, name) == getattr(settings.consumer, name), name
    assert (config.batch_size, config.auto_offset_reset) == (64, "latest")
    assert (config.topic, config.group_id, config.dlq_topic) == ("a.events", "g", "a.dlq")
    with pytest.raises(ValueError, match="frozen"):
        config.batch_size = 1  # type: ignore[misc]
