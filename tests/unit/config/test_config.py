from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import Settings, load_settings
from pipeline.exceptions import ConfigError

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


@pytest.mark.parametrize("name", ["local.yaml", "compose.yaml"])
def test_shipped_configs_load(name):
    settings = load_settings(CONFIGS / name, environ={})
    assert isinstance(settings, Settings)
    assert settings.kafka.events_topic == "supcon.events"


def test_unknown_key_is_named(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 0.01\n  learning_rate: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train\.learning_rate'"):
        load_settings(cfg, environ={})


def test_bad_value_is_named_with_the_value(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"train\.lr: .*greater than 0.*-1"):
        load_settings(cfg, environ={})


def test_a_covariance_left_unshrunk_is_refused_at_load(tmp_path):
    """Shrinkage 0 would read the stream means through a singular covariance (infinite
    scores until the stream holds more events than dimensions): a config error instead."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("eval:\n  covariance_shrinkage: 0\n")
    with pytest.raises(ConfigError, match=r"eval\.covariance_shrinkage: .*greater than 0"):
        load_settings(cfg, environ={})
    cfg.write_text("eval:\n  covariance_shrinkage: null\n")
    assert load_settings(cfg, environ={}).eval.covariance_shrinkage is None


def test_unknown_section_is_named(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_settings(cfg, environ={})


def test_environment_then_overrides_win():
    env = {"SUPCON_STREAM__TRAIN__LR": "0.5", "SUPCON_STREAM__KAFKA__PARTITIONS": "8"}
    settings = load_settings(None, ["train.lr=0.25"], environ=env)
    assert settings.train.lr == 0.25
    assert settings.kafka.partitions == 8


def test_bad_environment_value_is_named():
    with pytest.raises(ConfigError, match=r"consumer\.batch_size"):
        load_settings(None, environ={"SUPCON_STREAM__CONSUMER__BATCH_SIZE": "lots"})


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        load_settings(None, ["train.lr"], environ={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "missing.yaml", environ={})


def test_not_a_mapping(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(cfg, environ={})


def test_settings_are_frozen():
    settings = load_settings(None, environ={})
    with pytest.raises(Exception, match="frozen"):
        settings.train.lr = 3  # type: ignore[misc]


def test_redacted_dump_hides_secrets():
    settings = load_settings(
        None,
        [
            "kafka.sasl_mechanism=PLAIN",
            "kafka.sasl_username=u",
            "kafka.sasl_password=hunter2",
            "redis.password=s3cret",
        ],
        environ={},
    )
    dump = str(settings.redacted())
    assert "hunter2" not in dump
    assert "s3cret" not in dump
    assert settings.kafka.client_options()["sasl_plain_password"] == "hunter2"


def test_derived_names():
    settings = load_settings(None, ["train.objective=ce", "kafka.topic_prefix=p"], environ={})
    assert settings.learner_name == "ce"
    assert settings.group_id == "p.learner.ce"
    assert settings.kafka.dlq_topic == "p.dlq"
    assert not settings.train.replay_enabled
    assert load_settings(None, environ={}).train.replay_enabled


def test_sasl_scram_over_tls_and_redis_tls_from_config():
    settings = load_settings(
        None,
        [
            "kafka.security_protocol=SASL_SSL",
            "kafka.sasl_mechanism=SCRAM-SHA-512",
            "kafka.sasl_username=learner",
            "kafka.sasl_password=scram-secret",
            "kafka.ssl_cafile=/etc/ca.pem",
            "kafka.ssl_certfile=/etc/client.pem",
            "kafka.ssl_keyfile=/etc/client.key",
            "kafka.ssl_password=key-secret",
            "kafka.ssl_check_hostname=false",
            "redis.url=rediss://redis:6380/0",
            "redis.ssl_cafile=/etc/ca.pem",
        ],
        environ={"SUPCON_STREAM__REDIS__PASSWORD": "env-secret"},
    )
    opts = settings.kafka.client_options()
    assert opts["security_protocol"] == "SASL_SSL"
    # kafka-python takes SCRAM credentials in its sasl_plain_* options too.
    assert opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert opts["sasl_plain_username"] == "learner"
    assert opts["sasl_plain_password"] == "scram-secret"
    assert opts["ssl_cafile"] == "/etc/ca.pem"
    assert opts["ssl_certfile"] == "/etc/client.pem"
    assert opts["ssl_keyfile"] == "/etc/client.key"
    assert opts["ssl_password"] == "key-secret"
    assert opts["ssl_check_hostname"] is False
    assert opts["reconnect_backoff_max_ms"] >= opts["reconnect_backoff_ms"]
    assert settings.redis.tls_options() == {"ssl_ca_certs": "/etc/ca.pem"}
    dump = str(settings.redacted())
    assert "scram-secret" not in dump
    assert "key-secret" not in dump
    assert "env-secret" not in dump
    assert settings.redis.password is not None
    assert settings.redis.password.get_secret_value() == "env-secret"


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    # Plain YAML keeps the last value silently; a weight typed twice is a mistake to report.
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  loss_terms:\n    supcon: 1.0\n    supcon: 0.1\n")
    with pytest.raises(ConfigError, match=r"line 4: key 'supcon' is given twice"):
        load_settings(cfg, environ={})
    cfg.write_text("train:\n  lr: 0.1\ntrain:\n  seed: 3\n")
    with pytest.raises(ConfigError, match=r"line 3: key 'train' is given twice"):
        load_settings(cfg, environ={})


def test_stream_mean_eviction_needs_the_stream_class_means():
    pairs = ["bank.eviction=stream_mean"]
    assert load_settings(None, pairs, environ={}).bank.eviction == "stream_mean"
    with pytest.raises(ConfigError, match=r"stream_mean needs eval\.class_means stream"):
        load_settings(None, [*pairs, "eval.class_means=bank"], environ={})


def test_the_default_adaptive_eviction_keeps_stream_means_even_for_a_head_classifier():
    """The default eviction aims at the stream class means, so the learner keeps them whatever
    its classifier; under ``eval.class_means: bank`` it loads and chooses mean-preserving."""
    import torch

    from pipeline.learner.predictions import make_stream_means

    cpu = torch.device("cpu")
    ce = load_settings(None, ["train.objective=ce"], environ={})
    assert ce.bank.eviction == "adaptive"
    assert make_stream_means(ce, cpu) is not None
    random_ce = load_settings(None, ["train.objective=ce", "bank.eviction=random"], environ={})
    assert make_stream_means(random_ce, cpu) is None
    bank_means = load_settings(None, ["eval.class_means=bank"], environ={})
    assert bank_means.bank.eviction == "adaptive"
    assert make_stream_means(bank_means, cpu) is None
