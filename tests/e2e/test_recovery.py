"""Crash recovery with real processes: SIGKILL at random moments during a replay.

The full-size drill (20k events, 10 kills) is ``bench/kill9.py``; this is the same drill with
small numbers so that it runs in ``make test``.
"""

from __future__ import annotations

import pytest

from pipeline.devtools.chaos import KillDrill, drill_pairs, run_kill_drill

pytestmark = pytest.mark.e2e


def test_sigkill_at_random_moments_loses_nothing(bootstrap, redis_url, unique, tmp_path):
    pairs = [*drill_pairs(bootstrap, redis_url, f"k9{unique}", tmp_path), "bank.capacity=300"]
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


def test_configuration_dump_at_start_shows_no_secret(bootstrap, unique, tmp_path):
    """The learner logs its settings at start with every secret redacted."""
    import subprocess

    from pipeline.devtools.chaos import cli_command, set_args
    from pipeline.devtools.devstack import free_port, start_redis, stop_process

    redis_secret, kafka_secret = f"redis-{unique}-pw", f"kafka-{unique}-pw"
    port = free_port()
    redis_proc = start_redis(port, tmp_path, password=redis_secret)
    pairs = [
        *drill_pairs(bootstrap, f"redis://127.0.0.1:{port}/0", f"sec{unique}", tmp_path),
        f"redis.password={redis_secret}",
        "kafka.sasl_username=someone",
        f"kafka.sasl_password={kafka_secret}",
    ]
    try:
        topics = subprocess.run(
            cli_command("topics", *set_args(pairs)), check=False, capture_output=True, timeout=60
        )
        assert topics.returncode == 0, topics.stderr[-1000:]
        learn = subprocess.run(
            cli_command("learn", "--exit-when-idle", "1", *set_args(pairs)),
            check=False,
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        stop_process(redis_proc.pid)
    assert learn.returncode == 0, learn.stderr[-2000:]
    output = learn.stdout + learn.stderr
    dump = [line for line in output.splitlines() if "configuration" in line]
    assert dump, output[-2000:]
    assert "**********" in dump[0]
    assert redis_secret not in output
    assert kafka_secret not in output
