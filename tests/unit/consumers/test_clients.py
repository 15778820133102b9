"""consumer.client: the setting, and the translation of connection options to librdkafka names."""

from __future__ import annotations

import importlib.util

import pytest

from consumers.client import CLIENT_NAMES, RebalanceRecorder
from consumers.config import SourceConfig
from consumers.confluent_client import consumer_config, librdkafka_config
from pipeline.config import load_settings
from pipeline.exceptions import ConfigError


def test_client_setting_defaults_to_kafka_python_and_reaches_the_source_config() -> None:
    assert CLIENT_NAMES == ("kafka-python", "confluent")
    settings = load_settings(None, [], environ={})
    assert settings.consumer.client == "kafka-python"
    fast = load_settings(None, ["consumer.client=confluent"], environ={})
    config = SourceConfig.from_tuning(
        fast.consumer, topic="a.events", group_id="g", input_dim=4, dlq_topic="a.dlq"
    )
    assert config.client == "confluent"
    with pytest.raises(ConfigError, match=r"consumer\.client"):
        load_settings(None, ["consumer.client=librdkafka"], environ={})


def test_confluent_without_the_extra_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "confluent_kafka" else real(name, *a),
    )
    with pytest.raises(ConfigError, match=r"consumer\.client.*supcon-stream\[fast\]"):
        load_settings(None, ["consumer.client=confluent"], environ={})


def test_connection_options_map_to_librdkafka_names() -> None:
    settings = load_settings(
        None,
        [
            "kafka.bootstrap_servers=127.0.0.1:1,127.0.0.1:2",
            "kafka.security_protocol=SASL_SSL",
            "kafka.sasl_mechanism=SCRAM-SHA-512",
            "kafka.sasl_username=u",
            "kafka.sasl_password=p",
            "kafka.ssl_cafile=/ca.pem",
            "kafka.ssl_certfile=/c.pem",
            "kafka.ssl_keyfile=/k.pem",
            "kafka.ssl_password=kp",
            "kafka.ssl_check_hostname=false",
        ],
        environ={},
    )
    conf = librdkafka_config(settings.kafka.client_options())
    assert conf == {
        "bootstrap.servers": "127.0.0.1:1,127.0.0.1:2",
        "client.id": "supcon-stream",
        "security.protocol": "SASL_SSL",
        "socket.timeout.ms": 30_000,
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 5_000,
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "u",
        "sasl.password": "p",
        "ssl.ca.location": "/ca.pem",
        "ssl.certificate.location": "/c.pem",
        "ssl.key.location": "/k.pem",
        "ssl.key.password": "kp",
        "ssl.endpoint.identification.algorithm": "none",
    }
    # Hostname checking stays librdkafka's default ("https") unless switched off.
    plain = librdkafka_config(load_settings(None, [], environ={}).kafka.client_options())
    assert "ssl.endpoint.identification.algorithm" not in plain
    assert librdkafka_config({"ssl_check_hostname": True}) == {
        "ssl.endpoint.identification.algorithm": "https"
    }


def test_an_option_librdkafka_lacks_is_refused_not_dropped() -> None:
    with pytest.raises(ValueError, match="api_version"):
        librdkafka_config({"bootstrap_servers": "h:1", "api_version": (2, 0)})


def test_consumer_config_commits_only_by_hand() -> None:
    config = SourceConfig(
        topic="a", group_id="g", input_dim=4, dlq_topic="d", session_timeout_ms=6000
    )
    conf = consumer_config(config)
    assert conf["enable.auto.commit"] is False
    assert conf["enable.auto.offset.store"] is False
    assert conf["group.id"] == "g"
    assert conf["heartbeat.interval.ms"] < conf["session.timeout.ms"] == 6000


def test_rebalance_recorder_keeps_events_in_order() -> None:
    class TP:
        def __init__(self, topic: str, partition: int) -> None:
            self.topic, self.partition = topic, partition

    recorder = RebalanceRecorder()
    recorder.record("revoked", [TP("t", 0), TP("t", 1)])
    recorder.record("assigned", [TP("t", 1)])
    assert recorder.drain() == [
        ("revoked", frozenset({("t", 0), ("t", 1)})),
        ("assigned", frozenset({("t", 1)})),
    ]
    assert recorder.drain() == []
