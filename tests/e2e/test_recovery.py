"""Crash recovery with real processes: SIGKILL at random moments during a replay.

The full-size drill (20k events, 10 kills) is ``bench/kill9.py``; this is the same drill with
small numbers so that it runs in ``make test``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.chaos import KillDrill, run_kill_drill

pytestmark = pytest.mark.e2e


def drill_pairs(bootstrap: str, redis_url: str, prefix: str, workdir: Path) -> list[str]:
    """Settings of a drill learner: ledger on, short session and checkpoint intervals."""
    return [
        f"kafka.bootstrap_servers={bootstrap}",
        f"kafka.topic_prefix={prefix}",
        f"redis.url={redis_url}",
        f"redis.key_prefix={prefix}",
        f"checkpoint.dir={workdir / 'ckpt'}",
        "checkpoint.ledger=true",
        "checkpoint.every_steps=20",
        "checkpoint.every_seconds=2",
        # A SIGKILLed member holds its partitions until its session expires.
        "consumer.session_timeout_ms=3000",
        "bank.capacity=300",
        "train.torch_threads=1",
    ]


def test_sigkill_at_random_moments_loses_nothing(bootstrap, redis_url, unique, tmp_path):
    pairs = drill_pairs(bootstrap, redis_url, f"k9{unique}", tmp_path)
    drill = KillDrill(events=1500, kills=3, rate=150.0, seed=7, max_delay_s=4.0)
    report = run_kill_drill(drill, pairs, tmp_path / "logs")
    assert report.produced == 1500
    assert report.never_trained == 0, report.as_dict()
    assert report.probes_trained == 0
    assert report.committed == report.produced, report.as_dict()
    assert report.bank_duplicate_ids == 0
    assert report.bank_untrained_ids == 0
    assert 0 < report.bank_items <= 300
    assert report.ok
