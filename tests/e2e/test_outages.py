"""Outages and group changes with real processes: the learner CLI against its own broker or
redis-server, cut off or restarted mid-replay, and two learners sharing a group.

Each test starts what it breaks (the session's broker and Redis stay untouched) and checks the
learner's ledger, the committed offsets, the bank and the health file afterwards.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from cli_tools import SMALL_DIM, SMALL_LEARNER
from kafka import KafkaProducer
from waiting import wait_until

from pipeline.devtools.chaos import (
    TcpProxy,
    check_delivery,
    cli_command,
    committed_total,
    drill_pairs,
    drill_settings,
    read_topic_ids,
    set_args,
    spawn,
    wait_for_ledger,
)
from pipeline.devtools.devstack import free_port, start_broker, start_redis, stop_process
from pipeline.learner.health import health_path
from pipeline.learner.ledger import ledger_path, read_ledger
from pipeline.learner.probes import is_probe

pytestmark = pytest.mark.e2e

DIM, SMALL = SMALL_DIM, SMALL_LEARNER


def _events(tag: str, n: int, labeled: bool = True) -> list[dict[str, Any]]:
    return [
        {
            "id": f"{tag}-{i}",
            "features": [((i * 7 + j) % 11) / 11 for j in range(DIM)],
            "label": (i % 4) if labeled else None,
        }
        for i in range(n)
    ]


def _produce(bootstrap: str, topic: str, events: list[dict[str, Any]]) -> list[str]:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    for e in events:
        producer.send(topic, orjson.dumps(e), key=e["id"].encode())
    producer.flush(30)
    producer.close()
    return [e["id"] for e in events]


def _trainable(ids: list[str], fraction: float = 0.1) -> int:
    return sum(1 for i in ids if not is_probe(i, fraction))


def _health(ckpt_dir: Path) -> dict[str, Any]:
    try:
        return orjson.loads(health_path(ckpt_dir).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}


def _wait_health(
    ckpt_dir: Path, component: str, up: bool, timeout_s: float, log: Path
) -> dict[str, Any]:
    """The health snapshot once ``component`` reads ``up``; on timeout the learner's log tail
    says why (a learner that died leaves its last snapshot behind, unchanged)."""
    deadline = time.monotonic() + timeout_s
    snap: dict[str, Any] = {}
    while time.monotonic() < deadline:
        snap = _health(ckpt_dir)
        entry = snap.get("components", {}).get(component)
        if entry is not None and entry["up"] is up:
            return snap
        time.sleep(0.2)
    tail = log.read_text()[-4000:] if log.exists() else "(no learner log)"
    raise AssertionError(f"{component} never became up={up}: {snap}\n--- learner log ---\n{tail}")


def _settled_bank_items(settings: Any, ids: list[str], timeout_s: float = 30.0) -> int:
    """The bank's size once it has stopped growing: the last adds of a batch reach Redis a
    moment after its ledger line, and later on a loaded machine."""
    deadline = time.monotonic() + timeout_s
    last = check_delivery(settings, ids).bank_items
    while True:
        time.sleep(0.5)
        now = check_delivery(settings, ids).bank_items
        if now == last and now > 0:
            return now
        assert time.monotonic() < deadline, f"the bank never settled: {last} then {now} items"
        last = now


def _topics(pairs: list[str]) -> None:
    cmd = cli_command("topics", *set_args(pairs))
    done = subprocess.run(cmd, check=False, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr[-1000:]


def _stop(learner: subprocess.Popen[bytes], log: Path) -> None:
    learner.send_signal(signal.SIGTERM)
    try:
        learner.wait(timeout=60)
    finally:
        if learner.poll() is None:
            stop_process(learner.pid)
    assert learner.returncode == 0, log.read_text()[-3000:]


def test_broker_unreachable_mid_replay_loses_nothing(redis_url, unique, tmp_path):
    """A network cut between learner and a live broker: reconnect, then zero-loss checks."""
    upstream, port = free_port(), free_port()
    broker = start_broker(upstream, tmp_path / "stack", advertised_port=port)
    proxy = TcpProxy(upstream, port).start()
    address = f"127.0.0.1:{port}"
    pairs = [*drill_pairs(address, redis_url, f"cut{unique}", tmp_path), *SMALL]
    settings = drill_settings(pairs)
    log = tmp_path / "learner.log"
    learner = None
    try:
        _topics(pairs)
        ids = _produce(address, settings.kafka.events_topic, _events("a", 200))
        learner = spawn(cli_command("learn", *set_args(pairs)), log)
        ledger = ledger_path(settings.checkpoint_dir)
        assert wait_for_ledger(ledger, _trainable(ids), 90) == _trainable(ids), log.read_text()
        proxy.cut()
        _wait_health(settings.checkpoint_dir, "kafka_consumer", up=False, timeout_s=30, log=log)
        status = subprocess.run(
            cli_command("status", *set_args(pairs)), check=False, capture_output=True, timeout=60
        )
        assert status.returncode == 1  # the outage is visible, not a silent stall
        assert orjson.loads(status.stdout)["supcon"]["status"] == "degraded"
        time.sleep(2)  # offsets of the first half cannot be committed meanwhile
        proxy.restore()
        ids += _produce(address, settings.kafka.events_topic, _events("b", 200))
        assert wait_for_ledger(ledger, _trainable(ids), 90) == _trainable(ids), log.read_text()
        snap = _wait_health(
            settings.checkpoint_dir, "kafka_consumer", up=True, timeout_s=30, log=log
        )
        assert snap["components"]["kafka_consumer"]["outages"] >= 1
        assert learner.poll() is None, "the learner must ride out the outage"
        _stop(learner, log)
        status = subprocess.run(
            cli_command("status", *set_args(pairs)), check=False, capture_output=True, timeout=60
        )
        assert status.returncode == 0
        assert orjson.loads(status.stdout)["supcon"]["status"] == "stopped"
        report = check_delivery(settings, ids)
    finally:
        if learner is not None and learner.poll() is None:
            stop_process(learner.pid)
        proxy.close()
        stop_process(broker.pid)
    assert report.ok, report.as_dict()
    assert report.committed == report.produced == 400
    assert "broker unreachable; reconnecting with backoff" in log.read_text()


def test_redis_restart_mid_replay_loses_nothing(bootstrap, unique, tmp_path):
    """redis-server (AOF) stops while events arrive and comes back: retries, bank intact."""
    redis_port = free_port()
    redis_dir = tmp_path / "redis"
    redis_proc = start_redis(redis_port, redis_dir, appendonly=True)
    pairs = [
        *drill_pairs(bootstrap, f"redis://127.0.0.1:{redis_port}/0", f"rr{unique}", tmp_path),
        *SMALL,
    ]
    settings = drill_settings(pairs)
    log = tmp_path / "learner.log"
    learner = None
    try:
        _topics(pairs)
        ids = _produce(bootstrap, settings.kafka.events_topic, _events("a", 200))
        learner = spawn(cli_command("learn", *set_args(pairs)), log)
        ledger = ledger_path(settings.checkpoint_dir)
        assert wait_for_ledger(ledger, _trainable(ids), 90) == _trainable(ids), log.read_text()
        before = _settled_bank_items(settings, ids)
        stop_process(redis_proc.pid)  # SIGTERM: redis-server syncs its AOF and exits
        ids += _produce(bootstrap, settings.kafka.events_topic, _events("b", 200))
        _wait_health(settings.checkpoint_dir, "redis", up=False, timeout_s=30, log=log)
        redis_proc = start_redis(redis_port, redis_dir, appendonly=True)
        assert wait_for_ledger(ledger, _trainable(ids), 90) == _trainable(ids), log.read_text()
        snap = _wait_health(settings.checkpoint_dir, "redis", up=True, timeout_s=30, log=log)
        assert snap["components"]["redis"]["outages"] >= 1
        _stop(learner, log)
        report = check_delivery(settings, ids)
    finally:
        if learner is not None and learner.poll() is None:
            stop_process(learner.pid)
        stop_process(redis_proc.pid)
    assert report.ok, report.as_dict()
    assert report.committed == report.produced == 400
    assert report.bank_items >= before > 0
    assert "bank_store_retry" in log.read_text()


def test_broker_restart_reconnects_consumer_and_producers(redis_url, unique, tmp_path):
    """A real broker restart. Tansu keeps topics in memory only, so the restarted broker is
    empty and its offsets start again at 0, below the learner's fetch positions: events that
    land below those positions are not fetched (the broker lost its log; see
    docs/architecture.md, "Delivery guarantee"). So this checks what a restart must not
    break: the consumer reconnects, the predictions producer is recreated and delivers, and
    every event the new log holds beyond the old positions (the tail) is trained or predicted.
    """
    port = free_port()
    broker = start_broker(port, tmp_path / "stack")
    address = f"127.0.0.1:{port}"
    pairs = [*drill_pairs(address, redis_url, f"br{unique}", tmp_path), *SMALL]
    settings = drill_settings(pairs)
    log = tmp_path / "learner.log"
    learner = None
    topic = settings.kafka.events_topic
    try:
        _topics(pairs)
        first = _produce(address, topic, _events("a", 100))
        learner = spawn(cli_command("learn", *set_args(pairs)), log)
        ledger = ledger_path(settings.checkpoint_dir)
        assert wait_for_ledger(ledger, _trainable(first), 90) == _trainable(first)
        stop_process(broker.pid)
        _wait_health(settings.checkpoint_dir, "kafka_consumer", up=False, timeout_s=30, log=log)
        broker = start_broker(port, tmp_path / "stack")
        _topics(pairs)
        # 300 events fill each partition's new log past the old positions (~50 each).
        _produce(address, topic, _events("b", 300))
        tail = _produce(address, topic, _events("c", 100))
        unlabeled = _produce(address, topic, _events("v", 10, labeled=False))
        want = {i for i in tail if not is_probe(i, 0.1)}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not want <= read_ledger(ledger).counts.keys():
            time.sleep(0.5)
        predicted = read_topic_ids(address, settings.kafka.predictions_topic, 10, timeout_s=60)
        _wait_health(settings.checkpoint_dir, "kafka_consumer", up=True, timeout_s=30, log=log)
        assert learner.poll() is None, "the learner must not exit on a broker restart"
        _stop(learner, log)
    finally:
        if learner is not None and learner.poll() is None:
            stop_process(learner.pid)
        stop_process(broker.pid)
    assert want <= read_ledger(ledger).counts.keys(), log.read_text()[-3000:]
    # The predictions producer reconnected (recreated) and delivered to the new broker.
    assert set(unlabeled) <= set(predicted)


@pytest.mark.parametrize("leave", ["sigterm", "sigkill"])
def test_second_learner_joining_and_first_leaving_skip_nothing(
    bootstrap, redis_url, unique, tmp_path, leave
):
    """Two members of one group: B joins mid-stream, A leaves (SIGTERM, or SIGKILL so its
    partitions move only when its session expires); no event is skipped."""
    group = f"grp{unique}"
    base = [
        *drill_pairs(bootstrap, redis_url, f"rb{unique}", tmp_path),
        *SMALL,
        "kafka.partitions=4",
        f"consumer.group_id={group}",
    ]
    pairs_a, pairs_b = [*base, "learner.name=a"], [*base, "learner.name=b"]
    sa, sb = drill_settings(pairs_a), drill_settings(pairs_b)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = b = None
    try:
        _topics(pairs_a)
        ids = _produce(bootstrap, sa.kafka.events_topic, _events("x", 300))
        a = spawn(cli_command("learn", *set_args(pairs_a)), log_a)
        assert wait_for_ledger(ledger_path(sa.checkpoint_dir), 20, 90) >= 20, log_a.read_text()
        b = spawn(cli_command("learn", *set_args(pairs_b)), log_b)
        # y goes out once b owns partitions: produced earlier, a can fetch all of it before the
        # rebalance of b's join (a slow join on a loaded machine), and b, with nothing to read,
        # would never train.
        wait_until(
            lambda: "partitions assigned" in log_b.read_text(errors="replace"),
            timeout_s=120,
            what="b's partitions assigned",
        )
        ids += _produce(bootstrap, sa.kafka.events_topic, _events("y", 300))
        assert wait_for_ledger(ledger_path(sb.checkpoint_dir), 1, 90) >= 1, log_b.read_text()
        ids += _produce(bootstrap, sa.kafka.events_topic, _events("z", 300))
        if leave == "sigterm":
            _stop(a, log_a)  # its partitions move to b: revoked work is committed or re-read
        else:
            a.send_signal(signal.SIGKILL)
            a.wait(10)
        ids += _produce(bootstrap, sa.kafka.events_topic, _events("w", 300))
        union = {*read_ledger(ledger_path(sa.checkpoint_dir)).counts}
        expected = {i for i in ids if not is_probe(i, 0.1)}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not expected <= union:
            time.sleep(0.5)
            union = {*read_ledger(ledger_path(sa.checkpoint_dir)).counts} | {
                *read_ledger(ledger_path(sb.checkpoint_dir)).counts
            }
        time.sleep(1.0)  # stagger: a left a moment ago
        _stop(b, log_b)
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                stop_process(proc.pid)
    assert expected - union == set(), log_b.read_text()[-3000:]
    assert committed_total(sa) == len(ids) == 1200
    for settings in (sa, sb):
        report = check_delivery(settings, ids)
        assert report.bank_duplicate_ids == 0
        assert report.bank_untrained_ids == 0
        assert report.probes_trained == 0


@pytest.mark.parametrize("late", ["broker", "redis"])
def test_learner_started_before_its_broker_or_redis_waits(
    bootstrap, redis_url, unique, tmp_path, late
):
    """A stack coming up in any order: the learner waits for a dependency instead of exiting."""
    port = free_port()
    address = f"127.0.0.1:{port}" if late == "broker" else bootstrap
    redis_at = f"redis://127.0.0.1:{port}/0" if late == "redis" else redis_url
    pairs = [*drill_pairs(address, redis_at, f"wb{unique}", tmp_path), *SMALL]
    settings = drill_settings(pairs)
    log = tmp_path / "learner.log"
    if late == "redis":
        _topics(pairs)
    # The run ends when all 100 events are consumed, however long producing them takes after
    # the join; the idle exit is only a fallback that ends a run which missed events.
    learn = cli_command("learn", "--max-events", "100", "--exit-when-idle", "30", *set_args(pairs))
    learner = spawn(learn, log)
    started = None
    try:
        # Three failed attempts (1 s, then 2 s of back-off between them) and still running:
        # the learner waits for its dependency instead of exiting.
        wait_until(
            lambda: (
                learner.poll() is not None or log.read_text().count("waiting for a dependency") >= 3
            ),
            120.0,
            "three attempts to reach the dependency",
        )
        assert learner.poll() is None, log.read_text()[-2000:]
        if late == "redis":  # the wait is visible in the health file
            snap = _wait_health(settings.checkpoint_dir, "redis", up=False, timeout_s=30, log=log)
            assert snap["status"] == "starting"
            # Produced before Redis is up, so the events are there when the learner starts.
            ids = _produce(address, settings.kafka.events_topic, _events("a", 100))
            started = start_redis(port, tmp_path / "redis")
        else:
            started = start_broker(port, tmp_path / "stack")
            _topics(pairs)
            ids = _produce(address, settings.kafka.events_topic, _events("a", 100))
        assert learner.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        if learner.poll() is None:
            stop_process(learner.pid)
        if started is not None:
            stop_process(started.pid)
    assert read_ledger(ledger_path(settings.checkpoint_dir)).distinct == _trainable(ids)
    if late == "redis":
        assert "waiting for a dependency" in log.read_text()
