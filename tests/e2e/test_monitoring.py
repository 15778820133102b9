"""Monitoring against real processes: two learners and a sidecar (the CLI, as in production)
scraped by a real Prometheus (Debian's binary), queried through its HTTP API.

Shows: the series of learner and sidecar in Prometheus; ``/readyz`` 503 while a learner owns
no partition and 200 once it does; a burst of malformed events raising the DLQ-rate alert's
expression; a step blocked on purpose turning ``/healthz`` to 503 and the learner-down
alert's expression true.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson
import pytest
from kafka import KafkaProducer
from prometheus_tools import (
    PROMETHEUS,
    Prometheus,
    alert_expr,
    dashboard_queries,
    poll,
    running_prometheus,
)

from consumers.admin import ensure_topics
from pipeline.config import load_settings
from pipeline.devtools.devstack import free_port
from pipeline.devtools.spawn import cli_command, set_args, spawn

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (make system-deps)"),
]

DIM = 8
STALLABLE = Path(__file__).with_name("stallable_learner.py")
T = TypeVar("T")


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
    except OSError:
        return 0, {}


def _events(start: int, n: int) -> list[bytes]:
    rng = np.random.default_rng(start)
    out = []
    for i in range(start, start + n):
        label = i % 3
        feats = rng.normal(label, 0.3, DIM).round(4).tolist()
        out.append(orjson.dumps({"id": f"e{i}", "features": feats, "label": str(label)}))
    return out


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    for v in values:
        producer.send(topic, v)
    producer.flush()
    producer.close()


@contextlib.contextmanager
def _process(cmd: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = spawn(cmd, log)
    try:
        yield proc
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _log_since(log: Path, offset: int) -> str:
    return log.read_bytes()[offset:].decode(errors="replace") if log.exists() else ""


def _rebalanced(log_text: str) -> bool:
    """The learner logged its partitions revoked, then assigned again: a rebalance done."""
    revoked = log_text.find("partitions revoked")
    return revoked >= 0 and "partitions assigned" in log_text[revoked:]


def _poll_logged(what: str, fn: Callable[[], T | None], timeout_s: float, log: Path) -> T:
    """:func:`poll`, with the learner's log tail in the failure (why it never got there)."""
    try:
        return poll(what, fn, timeout_s)
    except AssertionError as exc:
        tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
        raise AssertionError(f"{exc}\n--- {log.name} ---\n{tail}") from None


def _every_dashboard_query_runs(prom: Prometheus) -> None:
    """Each panel query of the Grafana dashboard, with its variables filled in as Grafana
    would, is valid PromQL for this Prometheus (an invalid one answers HTTP 400)."""
    answered = {}
    for expr in dashboard_queries():
        promql = expr.replace("$learner", ".*").replace("$__rate_interval", "1m")
        answered[expr] = prom.query(promql)
    with_data = [e for e, result in answered.items() if result]
    throughput = next(e for e in answered if "supcon_events_consumed_total" in e)
    assert throughput in with_data
    assert len(with_data) >= len(answered) // 2, sorted(set(answered) - set(with_data))


def test_prometheus_scrapes_learners_and_sidecar_readiness_dlq_and_a_stuck_loop(
    bootstrap: str, redis_url: str, unique: str, tmp_path: Path
) -> None:
    prefix = f"mon{unique}"
    common = [
        f"kafka.bootstrap_servers={bootstrap}",
        f"kafka.topic_prefix={prefix}",
        "kafka.partitions=1",
        f"redis.url={redis_url}",
        f"redis.key_prefix={prefix}",
        f"model.input_dim={DIM}",
        "model.hidden_dim=32",
        "model.embed_dim=16",
        "model.proj_dim=16",
        "consumer.batch_size=32",
        "consumer.max_latency_ms=100",
        f"consumer.group_id={prefix}.shared",  # both learners in one group: one partition
        f"checkpoint.dir={tmp_path / 'ckpt'}",
        "eval.every_steps=5",
        "health.every_s=0.5",
        "health.stale_after_s=3",
    ]
    settings = load_settings(overrides=common)
    k = settings.kafka
    ensure_topics(k.client_options(), k.all_topics(), 1, 1, timeout_s=30)
    _produce(bootstrap, k.events_topic, _events(0, 300))
    ports = {"a": free_port(), "b": free_port(), "sidecar": free_port()}

    def learner(name: str) -> list[str]:
        pairs = [
            *common,
            f"learner.name={name}",
            f"health.http_port={ports[name]}",
            # Range assignment gives the one partition to the member whose id sorts first.
            f"kafka.client_id={name}-learner",
        ]
        args = ["learn", *set_args(pairs)]
        return [sys.executable, str(STALLABLE), str(tmp_path / f"stall-{name}"), *args]

    sidecar_cmd = cli_command(
        "sidecar",
        *set_args(
            [*common, f"sidecar.http_port={ports['sidecar']}", "sidecar.publish_every_s=0.5"]
        ),
    )
    url = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
    jobs = {
        "supcon-learner": [f"127.0.0.1:{ports['a']}", f"127.0.0.1:{ports['b']}"],
        "supcon-sidecar": [f"127.0.0.1:{ports['sidecar']}"],
    }
    with (
        _process(sidecar_cmd, tmp_path / "sidecar.log"),
        running_prometheus(tmp_path / "prometheus", jobs) as prom,
        _process(learner("a"), tmp_path / "a.log") as proc_a,
    ):
        poll("learner a ready", lambda: _get(f"{url['a']}/readyz")[0] == 200, timeout_s=120)
        log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
        a_before_b = log_a.stat().st_size
        with _process(learner("b"), log_b):
            poll(
                "learner b restored and loaded",
                lambda: _get(f"{url['b']}/readyz")[1].get("bank_loaded"),
                timeout_s=120,
            )
            # b's join rebalances the group: a loses the partition, then gets it back (its
            # member id sorts first). Only then is b a member that owns nothing. Stopping a
            # before that rebalance completes hits a Tansu 0.6.0 bug: the group leader leaving
            # mid-rebalance leaves the remaining member a follower whose SyncGroup fails
            # (error 27) forever, so b would never get the partition (Apache Kafka elects
            # a new leader).
            _poll_logged(
                "the rebalance of b's join (a's partition revoked, then assigned again)",
                lambda: _rebalanced(_log_since(log_a, a_before_b)),
                timeout_s=120,
                log=log_a,
            )
            # b is alive, restored, loaded and in the group, but a owns the only partition.
            code, body = _get(f"{url['b']}/readyz")
            assert _get(f"{url['b']}/healthz")[0] == 200
            assert code == 503
            assert body["partitions_assigned"] is False
            assert body["checkpoint_restored"] is True

            # Series of both processes reach Prometheus.
            def series(expr: str) -> list[dict[str, Any]]:
                return prom.query(expr)

            poll(
                "learner a's series",
                lambda: series('supcon_events_trained_total{learner="a"} > 0'),
                60,
            )
            poll("sidecar's quality series", lambda: series('supcon_loss_mean{learner="a"}'), 60)
            poll(
                "sidecar's accuracy series",
                lambda: series('supcon_class_accuracy{learner="a"}'),
                60,
            )
            poll("lag series", lambda: series('supcon_consumer_lag{learner="a"}'), 60)
            poll("b's readiness", lambda: series('supcon_learner_ready{learner="b"} == 0'), 60)
            targets = poll(
                "every target up",
                lambda: (t := prom.targets_up()) and all(h == "up" for h in t.values()) and t,
                60,
            )
            assert len(targets) == 3
            _every_dashboard_query_runs(prom)

            # a leaves: b gets the partition and becomes ready.
            _stop(proc_a)
            _poll_logged(
                "learner b ready",
                lambda: _get(f"{url['b']}/readyz")[0] == 200,
                timeout_s=120,
                log=log_b,
            )

            # A burst of malformed events: the DLQ-rate alert's expression turns true for b.
            _produce(bootstrap, k.events_topic, [b"not json"] * 200 + _events(1000, 50))
            dlq = alert_expr("SupconDeadLetterRateHigh")
            poll("the DLQ-rate expression for b", lambda: [
                s for s in prom.query(dlq) if s["metric"].get("learner") == "b"
            ], timeout_s=90)  # fmt: skip

            # A step blocked on purpose: /healthz 503 within stale_after_s, learner-down true.
            stall = tmp_path / "stall-b"
            stall.touch()
            _produce(bootstrap, k.events_topic, _events(2000, 40))
            started = time.monotonic()
            code, body = poll(
                "b's /healthz 503",
                lambda: (r := _get(f"{url['b']}/healthz"))[0] == 503 and r,
                timeout_s=60,
            )
            assert body["status"] == "unresponsive"
            assert body["loop_age_s"] > 3
            assert time.monotonic() - started < 60
            down = alert_expr("SupconLearnerDown")
            poll("the learner-down expression for b", lambda: [
                s for s in prom.query(down) if s["metric"].get("learner") == "b"
            ], timeout_s=60)  # fmt: skip
            stall.unlink()
            poll("b live again", lambda: _get(f"{url['b']}/healthz")[0] == 200, timeout_s=60)
