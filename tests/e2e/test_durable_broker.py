"""A broker restart with a log that survives it (Tansu on S3 storage, ``durable_broker``):
zero loss checked for real, not only reconnection (cf. test_outages.py's in-memory restart).

The learner CLI is mid-stream when the broker stops: it has trained part of the first 600
events. After the restart the broker still holds every record and committed offset; 200 more
events arrive; then the ledger, the committed offsets and the bank are checked.
"""

from __future__ import annotations

import signal
import subprocess

import orjson
import pytest
from cli_tools import SMALL_DIM, SMALL_LEARNER
from kafka import KafkaProducer

from consumers.positions import OffsetProbe
from pipeline.devtools.chaos import (
    check_delivery,
    cli_command,
    drill_pairs,
    drill_settings,
    set_args,
    spawn,
    wait_for_ledger,
)
from pipeline.devtools.devstack import stop_process
from pipeline.learner.ledger import ledger_path, read_ledger
from pipeline.learner.probes import is_probe

pytestmark = pytest.mark.e2e

DIM, SMALL = SMALL_DIM, SMALL_LEARNER


def _produce(bootstrap: str, topic: str, tag: str, n: int) -> list[str]:
    # A fresh producer per burst: after a broker restart an old one may be stuck (DESIGN.md).
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    ids = [f"{tag}-{i}" for i in range(n)]
    for i, event_id in enumerate(ids):
        event = {"id": event_id, "features": [((i * 7 + j) % 11) / 11 for j in range(DIM)]}
        producer.send(topic, orjson.dumps({**event, "label": i % 4}), key=event_id.encode())
    producer.flush(30)
    producer.close()
    return ids


def _log_end(bootstrap: str, topic: str) -> int:
    """Records in ``topic`` now (the sum of its partitions' high watermarks)."""
    with OffsetProbe({"bootstrap_servers": bootstrap}, topic) as probe:
        return sum(e.end for e in probe.extents().values())


def test_broker_restart_mid_stream_on_durable_storage_loses_nothing(
    durable_broker, redis_url, unique, tmp_path
):
    address = durable_broker.address
    pairs = [*drill_pairs(address, redis_url, f"dur{unique}", tmp_path), *SMALL]
    settings = drill_settings(pairs)
    topic = settings.kafka.events_topic
    log = tmp_path / "learner.log"
    done = subprocess.run(
        cli_command("topics", *set_args(pairs)), check=False, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-1000:]
    ids = _produce(address, topic, "a", 600)
    learner = spawn(cli_command("learn", *set_args(pairs)), log)
    try:
        ledger = ledger_path(settings.checkpoint_dir)
        assert wait_for_ledger(ledger, 50, 90) >= 50, log.read_text()[-3000:]
        # Mid-stream (part of the first 600 is trained), down for 2 s.
        durable_broker.restart_broker(down_s=2.0)
        trained_at_restart = read_ledger(ledger).distinct
        assert _log_end(address, topic) == 600  # the log survived the restart
        ids += _produce(address, topic, "b", 200)
        want = sum(1 for i in ids if not is_probe(i, settings.eval.probe_fraction))
        assert wait_for_ledger(ledger, want, 120) == want, log.read_text()[-3000:]
        assert learner.poll() is None, "the learner must ride out the restart"
        learner.send_signal(signal.SIGTERM)
        learner.wait(timeout=60)
        assert learner.returncode == 0, log.read_text()[-3000:]
    finally:
        if learner.poll() is None:
            stop_process(learner.pid)
    report = check_delivery(settings, ids)
    assert report.ok, report.as_dict()
    assert report.never_trained == 0
    assert report.committed == report.produced == 800
    assert report.bank_duplicate_ids == 0
    assert trained_at_restart < want  # the restart did come mid-stream
