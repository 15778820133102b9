"""A password written into ``redis.url`` works, and no command prints or logs it."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_tools import run_cli

from pipeline.devtools.devstack import free_port, start_redis, stop_process

pytestmark = pytest.mark.e2e


def test_config_command_prints_no_url_password() -> None:
    done = run_cli("config", "--set", "redis.url=redis://u:secret@127.0.0.1:1/0", timeout=180)
    assert done.returncode == 0, done.stderr
    assert "secret" not in done.stdout + done.stderr
    assert "redis://u:**********@127.0.0.1:1/0" in done.stdout


def test_learner_startup_log_shows_no_url_password(
    bootstrap: str, unique: str, tmp_path: Path
) -> None:
    secret = f"url-{unique}-pw"
    port = free_port()
    redis_proc = start_redis(port, tmp_path, password=secret)
    prefix = f"url{unique}"
    pairs = [
        f"kafka.bootstrap_servers={bootstrap}",
        f"kafka.topic_prefix={prefix}",
        # Redis 6+ takes requirepass as the password of the user "default".
        f"redis.url=redis://default:{secret}@127.0.0.1:{port}/0",
        f"redis.key_prefix={prefix}",
        f"checkpoint.dir={tmp_path / 'ckpt'}",
        "train.torch_threads=1",
    ]
    sets = [arg for pair in pairs for arg in ("--set", pair)]
    try:
        topics = run_cli("topics", *sets, timeout=60)
        assert topics.returncode == 0, topics.stderr[-1000:]
        learn = run_cli("learn", "--exit-when-idle", "1", *sets, timeout=180)
    finally:
        stop_process(redis_proc.pid)
    # Exit 0: the learner reached Redis with the credentials from the URL.
    assert learn.returncode == 0, learn.stderr[-2000:]
    output = learn.stdout + learn.stderr
    dump = [line for line in output.splitlines() if "configuration" in line]
    assert dump, output[-2000:]
    assert f"redis://default:**********@127.0.0.1:{port}/0" in dump[0]
    assert secret not in output
