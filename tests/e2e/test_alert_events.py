"""Alerts as events: a CE learner forgetting on split-digits makes the sidecar publish a
``firing`` record on ``<prefix>.alerts``; trained again on every class (an IID pass over the
digits), it recovers and the sidecar publishes ``resolved``. Real broker, redis-server,
learner and sidecar processes (the CLI)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from consumers.admin import ensure_topics
from consumers.reading import read_topic_json
from pipeline.config import load_settings
from pipeline.devtools.spawn import cli_command, run, set_args, spawn

pytestmark = pytest.mark.e2e


def _iid_digits(path: Path, passes: int) -> int:
    """Every digit, shuffled, ``passes`` times (new ids), as a JSONL file; returns the count."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = np.round(digits.data / 16.0, 4)
    rng = np.random.default_rng(7)
    lines = []
    for p in range(passes):
        for i in rng.permutation(len(features)):
            event = {
                "id": f"iid-{p}-{i}",
                "features": features[i].tolist(),
                "label": int(digits.target[i]),
            }
            lines.append(orjson.dumps(event))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return len(lines)


def _wait_for(
    bootstrap: str, topic: str, match: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    for _ in range(12):  # read from the start each time; up to 12 × 10 s
        found = [r for r in read_topic_json(bootstrap, topic, 10_000, timeout_s=10) if match(r)]
        if found:
            return found[0]
    raise AssertionError(f"no matching record on {topic}")


def test_ce_forgetting_fires_then_resolves_on_the_alerts_topic(
    bootstrap: str, redis_url: str, unique: str, tmp_path: Path
) -> None:
    prefix = f"alrt{unique}"
    pairs = [
        f"kafka.bootstrap_servers={bootstrap}",
        f"kafka.topic_prefix={prefix}",
        "kafka.partitions=1",
        f"redis.url={redis_url}",
        f"redis.key_prefix={prefix}",
        "train.objective=ce",
        "consumer.batch_size=32",
        "eval.every_steps=5",
        f"checkpoint.dir={tmp_path / 'ckpt'}",
        "slo.forgetting_max=0.3",
        "sidecar.publish_every_s=0.5",
    ]
    settings = load_settings(overrides=pairs)
    k = settings.kafka
    ensure_topics(k.client_options(), k.all_topics(), 1, 1, timeout_s=30)
    log = tmp_path / "run.log"

    def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
        done = run(cli_command(*args, *set_args(pairs)), log, timeout_s=300)
        assert done.returncode == 0, log.read_text()[-3000:]
        return done

    sidecar = spawn(cli_command("sidecar", *set_args(pairs)), tmp_path / "sidecar.log")
    try:
        cli("replay", "split-digits")
        cli("learn", "--exit-when-idle", "3")
        firing = _wait_for(
            bootstrap,
            k.alerts_topic,
            lambda r: r["slo"] == "forgetting" and r["state"] == "firing",
        )
        assert firing["learner"] == "ce"
        assert firing["objective"] == "ce"
        assert firing["severity"] == "ticket"
        assert firing["threshold"] == 0.3
        assert firing["evidence"]["avg_forgetting"] > 0.3
        assert firing["ts"] == firing["since"] > 0

        # Every class again, mixed: the head relearns the old classes and forgetting falls.
        _iid_digits(tmp_path / "iid.jsonl", passes=2)
        cli("replay", str(tmp_path / "iid.jsonl"))
        cli("learn", "--exit-when-idle", "3")
        resolved = _wait_for(
            bootstrap,
            k.alerts_topic,
            lambda r: r["slo"] == "forgetting" and r["state"] == "resolved",
        )
        assert resolved["since"] == firing["since"]
        assert resolved["ts"] > firing["ts"]
        assert resolved["evidence"]["avg_forgetting"] <= 0.3
    finally:
        sidecar.terminate()
        try:
            sidecar.wait(timeout=30)
        except subprocess.TimeoutExpired:
            sidecar.kill()
            sidecar.wait()
