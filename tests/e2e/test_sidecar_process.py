"""A running `supcon-stream sidecar` process has no libtorch mapped (it never imports torch)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from pipeline.telemetry.channel import TelemetryWriter
from pipeline.telemetry.records import ClassifierScores, EvalRecord

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc"),
]

LEARNER = "ce"


def heavy_libraries(pid: int) -> set[str]:
    """Mapped files of ``pid`` that belong to torch or FAISS."""
    # A maps line: address perms offset dev inode [path]; anonymous mappings have no path.
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    paths = {fields[5] for fields in (line.split(maxsplit=5) for line in lines) if len(fields) == 6}
    return {p for p in paths if "libtorch" in p or "torch/lib" in p or "faiss" in p}


@contextmanager
def child(args: list[str], **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_check_sees_libtorch_in_a_process_that_imports_torch() -> None:
    """Control: the maps check below is not vacuous."""
    code = "import sys, torch; print('ready', flush=True); sys.stdin.readline()"
    with child([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        assert any("torch" in path for path in heavy_libraries(proc.pid))


def test_running_sidecar_maps_no_torch(
    bootstrap: str, redis_url: str, redis_client: redis.Redis, unique: str, tmp_path: Path
) -> None:
    prefix = f"side{unique}"
    writer = TelemetryWriter(redis_client, prefix, LEARNER, maxlen=1000)
    writer.emit(
        EvalRecord(LEARNER, 1, 1000, "ncm", {"ncm": ClassifierScores({"a": 1.0})}, current_task="0")
    )
    last_id = redis_client.xrevrange(writer.key, count=1)[0][0]
    cursor_key = f"{prefix}:sidecar:cursor:{LEARNER}"
    settings = [
        f"kafka.bootstrap_servers={bootstrap}",
        f"kafka.topic_prefix={prefix}",
        f"redis.url={redis_url}",
        f"redis.key_prefix={prefix}",
        "sidecar.rediscover_every_s=0.2",
    ]
    args = [arg for pair in settings for arg in ("--set", pair)]
    log_path = tmp_path / "sidecar.log"
    with (
        log_path.open("wb") as log,
        child(
            [sys.executable, "-m", "pipeline.cli", "sidecar", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
        ) as proc,
    ):
        # Up and working: the cursor is saved only once the record's metrics were flushed to
        # Kafka, so by then the sidecar has read Redis, created its producer and published.
        deadline = time.monotonic() + 60
        while redis_client.get(cursor_key) != last_id:
            assert proc.poll() is None, log_path.read_text()[-2000:]
            assert time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.1)
        assert heavy_libraries(proc.pid) == set()
        assert proc.poll() is None
