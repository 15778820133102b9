"""Drive the supcon-stream CLI as a user would: replay → learner → sidecar → metrics topics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from cli_tools import run_cli
from confluent_kafka import Consumer as ConfluentConsumer
from waiting import wait_until

from pipeline.devtools.devstack import stop_process

pytestmark = pytest.mark.e2e


def _stack_args(bootstrap: str, redis_url: str, prefix: str, tmp_path, *settings: str) -> list[str]:
    """--set arguments pointing a CLI command at the test stack, plus extra settings."""
    pairs = [
        f"kafka.bootstrap_servers={bootstrap}",
        f"kafka.topic_prefix={prefix}",
        f"redis.url={redis_url}",
        f"redis.key_prefix={prefix}",
        f"checkpoint.dir={tmp_path / 'ckpt'}",
        "train.torch_threads=1",
        *settings,
    ]
    return [arg for pair in pairs for arg in ("--set", pair)]


def test_bad_config_gives_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  objective: sgd\n")
    result = run_cli("config", "--config", str(cfg))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "train.objective" in lines[0]


def test_bad_cli_value_gives_one_line_and_exit_2():
    result = run_cli("learn", "--max-events", "-3")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--max-events" in result.stderr


def test_replay_learn_sidecar_metrics(bootstrap, redis_url, unique, tmp_path):
    prefix = f"e2e{unique}"
    common = _stack_args(
        bootstrap, redis_url, prefix, tmp_path, "sidecar.publish_every_s=0.5", "eval.every_steps=10"
    )
    log_path = tmp_path / "sidecar.log"
    with log_path.open("wb") as log:
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "sidecar", *common],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    try:
        replay = run_cli("replay", "split-digits", "--limit", "600", *common)
        assert replay.returncode == 0, replay.stderr
        assert json.loads(replay.stdout)["sent"] == 600
        # Stops at the 600th event; the idle limit only ends a run that lost some.
        learn = run_cli(
            "learn",
            "--objective",
            "supcon",
            "--max-events",
            "600",
            "--exit-when-idle",
            "30",
            *common,
            timeout=240,
        )
        assert learn.returncode == 0, learn.stderr[-2000:]
        summary = json.loads(learn.stdout.strip().splitlines()[-1])
        assert summary["consumed"] == 600
        assert summary["trained"] + summary["held_out"] == 600

        # Read back with confluent-kafka, a client the project itself does not use.
        consumer = ConfluentConsumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"reader-{unique}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        topics = [f"{prefix}.metrics.loss", f"{prefix}.metrics.forgetting"]
        # The sidecar creates its topics on first publish, possibly after the learner is
        # done: subscribe once they exist (a subscription to a missing topic is not
        # re-checked for minutes by librdkafka's default metadata refresh).
        wait_until(
            lambda: set(topics) <= set(consumer.list_topics(timeout=5).topics),
            60,
            "the sidecar's metrics topics",
        )
        consumer.subscribe(topics)
        seen: dict[str, list[dict]] = {"loss": [], "forgetting": []}
        deadline = time.monotonic() + 40
        # Until both topics were read: the final forgetting record can arrive in an earlier
        # fetch than the loss records (different topics and partitions).
        while time.monotonic() < deadline and not (
            seen["loss"] and any(r.get("final") for r in seen["forgetting"])
        ):
            msg = consumer.poll(1.0)
            if msg is None or msg.error():
                continue
            kind = "loss" if msg.topic().endswith(".loss") else "forgetting"
            assert msg.key() == b"supcon"
            seen[kind].append(json.loads(msg.value()))
        consumer.close()
    finally:
        stop_process(sidecar.pid)
    assert seen["loss"], log_path.read_text()[-2000:]
    assert all(r["learner"] == "supcon" and r["objective"] == "supcon" for r in seen["loss"])
    assert any(r["loss_mean"] is not None for r in seen["loss"])
    final = [r for r in seen["forgetting"] if r.get("final")]
    assert final, log_path.read_text()[-2000:]
    last = final[-1]
    # 600 events of split-digits cover tasks 0-1 (classes 0-3).
    assert set(last["per_class_accuracy"]) >= {"0", "1", "2"}
    assert 0.0 <= last["avg_accuracy"] <= 1.0
    assert last["avg_accuracy"] > 0.5
    assert 0.0 <= last["avg_forgetting"] <= 1.0


def test_sigterm_checkpoints_commits_and_exits_zero(bootstrap, redis_url, unique, tmp_path):
    """A running learner stops cleanly on SIGTERM: final checkpoint, committed offsets, exit 0."""
    import signal

    from kafka import KafkaConsumer, TopicPartition

    prefix = f"sig{unique}"
    common = _stack_args(
        bootstrap, redis_url, prefix, tmp_path, "kafka.partitions=1", "checkpoint.every_steps=3"
    )
    replay = run_cli("replay", "split-digits", "--limit", "300", *common)
    assert replay.returncode == 0, replay.stderr
    learner = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "learn", *common],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        ckpt_dir = tmp_path / "ckpt" / "supcon"
        while time.monotonic() < deadline and not list(ckpt_dir.glob("ckpt-*.pt")):
            time.sleep(0.2)  # the first periodic checkpoint proves it is training
        learner.send_signal(signal.SIGTERM)
        out, err = learner.communicate(timeout=30)
    finally:
        if learner.poll() is None:
            stop_process(learner.pid)
    assert learner.returncode == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["consumed"] > 0
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=f"{prefix}.learner.supcon", enable_auto_commit=False
    )
    committed = consumer.committed(TopicPartition(f"{prefix}.events", 0))
    consumer.close()
    # The committed offset covers exactly what the learner reports having consumed.
    assert committed == summary["consumed"]
