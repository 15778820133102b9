"""Secure connections from config: Redis with requirepass, an ACL user and TLS; Kafka over TLS.

Each test starts its own redis-server (and, for Kafka TLS, its own broker behind a TLS
terminator, see tests/tls_tools.py); secrets travel as ``SecretStr`` from the settings.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import orjson
import pytest
import redis
from kafka import KafkaProducer
from pydantic import SecretStr
from structlog.testing import capture_logs
from tls_tools import Certs, TlsTerminator, make_certs

from consumers.admin import ensure_topics
from consumers.client import CLIENT_NAMES
from memory_bank.exceptions import BankUnavailableError
from memory_bank.protocols import StoredItem
from memory_bank.redis_store import RedisBankStore, make_redis_client
from pipeline.config import load_settings
from pipeline.devtools.chaos import committed_total
from pipeline.devtools.devstack import free_port, start_broker, start_redis, stop_process
from pipeline.learner.ledger import ledger_path, read_ledger
from pipeline.learner.loop import RunLimits, run_learner

pytestmark = pytest.mark.integration

ACL_USER, ACL_PASSWORD = "learner", "acl-Pa55-word"
REQUIRE_PASSWORD = "require-Pa55"


def _acl_args() -> list[str]:
    # An ACL user limited to the pipeline's keys and the commands it uses (scripts included).
    return ["--user", ACL_USER, "on", f">{ACL_PASSWORD}", "~supcon*", "~sec*", "&*", "+@all"]


def _tls_args(port: int, certs: Certs) -> list[str]:
    return [
        "--port", "0",
        "--tls-port", str(port),
        "--tls-cert-file", str(certs.cert),
        "--tls-key-file", str(certs.key),
        "--tls-ca-cert-file", str(certs.ca),
        "--tls-auth-clients", "no",
    ]  # fmt: skip


def _store(client: redis.Redis, name: str) -> RedisBankStore:
    return RedisBankStore(client, "sec", name, input_dim=4, embed_dim=2, retries=2, backoff_s=0.01)


def _item(i: int) -> StoredItem:
    return StoredItem(
        id=f"i{i}",
        features=np.full(4, i, dtype=np.float32),
        embedding=np.array([1.0, 0.0], dtype=np.float32),
        label="a",
        task=None,
    )


def test_redis_acl_user_and_requirepass(tmp_path: Path) -> None:
    port = free_port()
    proc = start_redis(port, tmp_path, password=REQUIRE_PASSWORD, extra_args=_acl_args())
    url = f"redis://127.0.0.1:{port}/0"
    try:
        acl = make_redis_client(url, ACL_USER, SecretStr(ACL_PASSWORD))
        store = _store(acl, "acl")
        store.apply([_item(1), _item(2)], [], {"a": 2})
        assert {it.id for it in store.load().items} == {"i1", "i2"}
        # requirepass protects the default user.
        default = make_redis_client(url, None, SecretStr(REQUIRE_PASSWORD))
        assert len(_store(default, "acl").load().items) == 2
        # A wrong password is refused at once, not retried as if Redis were down.
        wrong = make_redis_client(url, ACL_USER, SecretStr("nope"))
        with capture_logs() as logs, pytest.raises(BankUnavailableError, match="refused"):
            _store(wrong, "acl").load()
        assert [e for e in logs if e["event"] == "bank_store_retry"] == []  # no back-off
        with pytest.raises(BankUnavailableError):
            _store(make_redis_client(url), "acl").load()  # no credentials at all
        # The ACL user cannot touch keys outside its patterns.
        with pytest.raises(redis.exceptions.NoPermissionError):
            acl.set("other:key", b"x")
    finally:
        stop_process(proc.pid)


def test_redis_over_tls(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    port = free_port()
    proc = start_redis(port, tmp_path, extra_args=_tls_args(port, certs))
    try:
        client = make_redis_client(
            f"rediss://127.0.0.1:{port}/0", tls_options={"ssl_ca_certs": str(certs.ca)}
        )
        store = _store(client, "tls")
        store.apply([_item(3)], [], {"a": 1})
        assert [it.id for it in store.load().items] == ["i3"]
        plaintext = make_redis_client(f"redis://127.0.0.1:{port}/0", socket_timeout_s=1.0)
        with pytest.raises(BankUnavailableError):
            _store(plaintext, "tls").load()
    finally:
        stop_process(proc.pid)


@pytest.mark.parametrize("client", CLIENT_NAMES)
def test_learner_over_kafka_tls_and_redis_tls_with_acl(tmp_path: Path, client: str) -> None:
    """The whole learner with every connection secured from settings alone, with either
    Kafka client (librdkafka gets the TLS settings under its own names)."""
    certs = make_certs(tmp_path / "certs")
    broker_port, tls_port, redis_port = free_port(), free_port(), free_port()
    broker = start_broker(broker_port, tmp_path / "stack", advertised_port=tls_port)
    terminator = TlsTerminator(tls_port, broker_port, certs).start()
    redis_proc = start_redis(
        redis_port,
        tmp_path,
        password=REQUIRE_PASSWORD,
        extra_args=[*_acl_args(), *_tls_args(redis_port, certs)],
    )
    try:
        s = load_settings(
            None,
            [
                f"kafka.bootstrap_servers=127.0.0.1:{tls_port}",
                "kafka.security_protocol=SSL",
                f"kafka.ssl_cafile={certs.ca}",
                "kafka.topic_prefix=supcon-sec",
                "kafka.partitions=1",
                f"redis.url=rediss://127.0.0.1:{redis_port}/0",
                f"redis.ssl_cafile={certs.ca}",
                f"redis.username={ACL_USER}",
                f"redis.password={ACL_PASSWORD}",
                "redis.key_prefix=supcon-sec",
                "model.input_dim=4",
                "model.hidden_dim=16",
                "model.embed_dim=8",
                "model.proj_dim=8",
                "consumer.batch_size=8",
                "consumer.max_latency_ms=100",
                f"consumer.client={client}",
                f"checkpoint.dir={tmp_path / 'ckpt'}",
                "checkpoint.ledger=true",
                "train.torch_threads=1",
            ],
            environ={},
        )
        k = s.kafka
        ensure_topics(k.client_options(), k.all_topics(), 1, 1, timeout_s=30)
        producer = KafkaProducer(**k.client_options(), acks="all")
        for i in range(40):
            event = {"id": f"s{i}", "features": [i % 3, 1.0, 0.5, i % 2], "label": i % 2}
            producer.send(k.events_topic, orjson.dumps(event))
        producer.flush(30)
        producer.close()
        # Stops once all 40 are consumed; the idle limit only ends a run that lost some.
        summary = run_learner(s, threading.Event(), RunLimits(40, exit_when_idle_s=30.0))
        assert summary.counters["consumed"] == 40
        assert summary.bank_size > 0
        assert read_ledger(ledger_path(s.checkpoint_dir)).trainings == summary.counters["trained"]
        assert committed_total(s) == 40
    finally:
        stop_process(redis_proc.pid)
        terminator.close()
        stop_process(broker.pid)
