"""``supcon-stream serve`` as a real process: hot reload mid-stream, a corrupt bundle rejected,
every event answered exactly once, and its ``/metrics`` and ``/healthz`` saying so."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from cli_tools import run_cli
from kafka import KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from consumers.admin import ensure_topics
from consumers.testing import read_topic_json
from pipeline.config import load_settings
from pipeline.devtools.devstack import free_port, stop_process
from pipeline.devtools.spawn import child_env, cli_command, set_args, spawn
from pipeline.learner.loop import RunLimits, run_learner
from pipeline.serving.bundle import MANIFEST, WEIGHTS

pytestmark = pytest.mark.e2e

DIM = 8
CENTRES = np.random.default_rng(3).normal(size=(3, DIM))
DEADLINE_S = 120.0


def _event(i: int, labeled: bool) -> dict[str, Any]:
    rng = np.random.default_rng(i)
    cls = i % 3
    event: dict[str, Any] = {
        "id": f"e{i}",
        "features": (CENTRES[cls] + 0.6 * rng.normal(size=DIM)).tolist(),
    }
    if labeled:
        event["label"] = f"c{cls}"
    return event


class Producer:
    """Produces events and remembers where each landed (partition, offset)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        self.placed: dict[str, tuple[int, int]] = {}

    def send(self, events: list[dict[str, Any]], rate: float | None = None) -> None:
        futures = []
        for e in events:
            futures.append((e["id"], self._producer.send(self.topic, orjson.dumps(e))))
            if rate:
                time.sleep(1 / rate)
        self._producer.flush()
        for event_id, fut in futures:
            meta = fut.get(timeout=30)
            self.placed[event_id] = (meta.partition, meta.offset)

    def close(self) -> None:
        self._producer.close()


def _log_events(path: Path) -> list[dict[str, Any]]:
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def _wait_for_log(path: Path, event: str, **fields: Any) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        for line in _log_events(path):
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items()):
                return line
        time.sleep(0.3)
    raise AssertionError(f"no {event!r} {fields} in the serve log:\n{path.read_text()[-3000:]}")


def _served(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """The answers of ``serve`` (the learner publishes its own predictions on the topic too)."""
    everything = read_topic_json(bootstrap, topic, 1_000_000, timeout_s=2.0)
    return [a for a in everything if a.get("server") == "serve"]


def _wait_for_answers(bootstrap: str, topic: str, count: int) -> None:
    deadline = time.monotonic() + DEADLINE_S
    answers: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        answers = _served(bootstrap, topic)
        if len(answers) >= count:
            return
    raise AssertionError(f"{len(answers)} of {count} answers")


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_for_series(base: str, want: dict[str, float]) -> dict[str, float]:
    """Scrape ``base/metrics`` until every named sample (label ``learner`` only) has its value."""
    deadline = time.monotonic() + DEADLINE_S
    got: dict[str, float] = {}
    while time.monotonic() < deadline:
        try:
            status, body = _get(f"{base}/metrics")
        except OSError:  # not listening yet
            status, body = 0, b""
        if status == 200:
            families = text_string_to_metric_families(body.decode())
            got = {
                s.name: s.value for f in families for s in f.samples if set(s.labels) == {"learner"}
            }
            if all(got.get(name) == value for name, value in want.items()):
                return got
        time.sleep(0.3)
    raise AssertionError(f"wanted {want}, last scrape {got}")


def _export(pairs: list[str]) -> dict[str, Any]:
    done = run_cli("export", *set_args(pairs), env=child_env(1))
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_serve_switches_versions_mid_stream_and_answers_each_event_once(
    bootstrap: str, redis_url: str, unique: str, tmp_path: Path
) -> None:
    pairs = [
        f"kafka.bootstrap_servers={bootstrap}",
        f"kafka.topic_prefix=s{unique}",
        "kafka.partitions=2",
        f"redis.url={redis_url}",
        f"redis.key_prefix=s{unique}",
        f"model.input_dim={DIM}",
        "model.hidden_dim=32",
        "model.embed_dim=16",
        "model.proj_dim=16",
        "consumer.batch_size=16",
        "consumer.max_latency_ms=100",
        "bank.capacity=96",
        "eval.every_steps=5",
        f"checkpoint.dir={tmp_path / 'ckpt'}",
        "train.torch_threads=1",
        f"export.dir={tmp_path / 'models'}",
    ]
    settings = load_settings(None, pairs, environ={})
    k = settings.kafka
    ensure_topics(k.client_options(), k.all_topics(), k.partitions, 1, timeout_s=30)
    events = Producer(bootstrap, k.events_topic)
    events.send([_event(i, labeled=True) for i in range(240)])
    run_learner(settings, threading.Event(), RunLimits(exit_when_idle_s=3.0))
    assert _export(pairs)["version"] == 1

    log_path = tmp_path / "serve.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve_args = set_args([*pairs, f"serve.http_port={port}"])
    serve = spawn(cli_command("serve", "--json-logs", *serve_args), log_path, stdout="log")
    try:
        # Phase A: version 1 answers the unlabeled events; the labeled ones are only counted.
        phase_a = [_event(1000 + i, labeled=False) for i in range(150)]
        events.send(phase_a)
        _wait_for_answers(bootstrap, k.predictions_topic, len(phase_a))
        # Its endpoints, once it answers: the 150 answers counted, version 1, live.
        first = _wait_for_series(
            base, {"supcon_serve_events_answered_total": 150, "supcon_serve_model_version": 1}
        )
        assert first["supcon_serve_model_switches_total"] == 0
        assert first["supcon_serve_live"] == 1
        status, body = _get(f"{base}/healthz")
        assert status == 200
        assert json.loads(body)["model_version"] == 1

        # Phase B: events keep flowing while version 2 is exported (more training first).
        events.send([_event(300 + i, labeled=True) for i in range(60)])
        run_learner(settings, threading.Event(), RunLimits(exit_when_idle_s=3.0))
        phase_b = [_event(2000 + i, labeled=False) for i in range(300)]
        streaming = threading.Thread(target=events.send, args=(phase_b, 150.0))
        streaming.start()
        time.sleep(0.5)
        second = _export(pairs)
        assert second["version"] == 2
        streaming.join()
        switched = _wait_for_log(log_path, "model switched", version=2)
        announced = _wait_for_log(log_path, "model announced", version=2)

        # Phase C: after the switch, version 2 answers everything.
        phase_c = [_event(3000 + i, labeled=False) for i in range(100)]
        events.send(phase_c)

        # Version 3 is corrupt: rejected with one log line; version 2 keeps serving.
        bad = Path(second["path"]).with_name("v000003")
        shutil.copytree(second["path"], bad)
        weights = bytearray((bad / WEIGHTS).read_bytes())
        weights[-1] ^= 0xFF
        (bad / WEIGHTS).write_bytes(bytes(weights))
        digest = json.loads((bad / MANIFEST).read_text())["digest"]
        announcer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
        ann = {"learner": settings.learner_name, "version": 3, "digest": digest, "step": 0}
        announcer.send(k.models_topic, orjson.dumps(ann), key=settings.learner_name.encode())
        announcer.flush()
        announcer.close()
        _wait_for_log(log_path, "model bundle rejected; serving keeps its version", version=3)
        phase_d = [_event(4000 + i, labeled=False) for i in range(100)]
        events.send(phase_d)

        unlabeled = phase_a + phase_b + phase_c + phase_d
        _wait_for_answers(bootstrap, k.predictions_topic, len(unlabeled))
        # The same story in the series: one switch, one rejection, counts that add up.
        last = _wait_for_series(
            base,
            {
                "supcon_serve_events_answered_total": len(unlabeled),
                "supcon_serve_events_consumed_total": len(unlabeled) + 300,
                "supcon_serve_model_version": 2,
                "supcon_serve_model_switches_total": 1,
                "supcon_serve_bundles_rejected_total": 1,
            },
        )
        assert last["supcon_serve_batch_duration_seconds_count"] >= 1
        assert last["supcon_serve_commit_age_seconds"] < DEADLINE_S
        assert _get(f"{base}/healthz")[0] == 200
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            rc = serve.wait(timeout=60)
        finally:
            stop_process(serve.pid)
        events.close()
    assert rc == 0, log_path.read_text()[-3000:]

    # Every unlabeled event answered exactly once (the whole topic is read, so a duplicate
    # would show), and nothing else answered.
    answers = _served(bootstrap, k.predictions_topic)
    counts = Counter(a["id"] for a in answers)
    assert sorted(counts) == sorted(e["id"] for e in unlabeled)
    assert max(counts.values()) == 1
    version = {a["id"]: a["model_version"] for a in answers}
    assert {version[e["id"]] for e in phase_a} == {1}
    assert {version[e["id"]] for e in phase_c + phase_d} == {2}
    # Mid-stream: per partition, in offset order, version 1 then version 2, never back.
    for partition in range(k.partitions):
        ordered = sorted(
            (events.placed[e["id"]][1], version[e["id"]])
            for e in phase_b
            if events.placed[e["id"]][0] == partition
        )
        seq = [v for _, v in ordered]
        assert seq == sorted(seq), f"partition {partition}: {seq}"
    assert {version[e["id"]] for e in phase_b} <= {1, 2}
    # The switch came before the next batch after the announcement was read.
    assert switched["batch"] == announced["batch"]
    rejected = [
        e for e in _log_events(log_path) if e.get("event", "").startswith("model bundle rejected")
    ]
    assert len(rejected) == 1

    summary = json.loads(
        [line for line in log_path.read_text().splitlines() if line.startswith('{"consumed"')][-1]
    )
    assert summary["answered"] == len(unlabeled)
    assert summary["labeled_skipped"] == 300
    assert summary["consumed"] == summary["answered"] + summary["labeled_skipped"]
    assert summary["model_version"] == 2
    assert summary["rejected"] == [3]
