"""TelemetryWriter never raises and never stalls: checked against a port nothing listens on.

These need no server: a real redis client gets a real "connection refused". The round trip
through a live redis-server is in tests/integration/test_sidecar_telemetry.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from structlog.testing import capture_logs

from pipeline.config import RedisSettings
from pipeline.devtools.devstack import free_port
from pipeline.telemetry.channel import TelemetryWriter, stream_key, telemetry_client
from pipeline.telemetry.records import EndRecord, StepRecord


class CountingRedis(redis.Redis):
    """A real client that counts how often the writer tries a round trip."""

    attempts = 0

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        self.attempts += 1
        return super().pipeline(*args, **kwargs)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dead_client() -> CountingRedis:
    # No retries: redis-py's default policy would spend ~4 s on each refused connection.
    return CountingRedis(
        host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )


def _step(n: int) -> StepRecord:
    return StepRecord(learner="learner-a", step=n, ts=1_000 + n)


def _writer(client: redis.Redis, clock: FakeClock, **kwargs: Any) -> TelemetryWriter:
    return TelemetryWriter(client, "t", "learner-a", 1000, clock=clock, **kwargs)


def test_stream_key() -> None:
    assert stream_key("supcon", "ce") == "supcon:telemetry:ce"


def test_emit_never_raises_and_buffers(dead_client: CountingRedis) -> None:
    writer = _writer(dead_client, FakeClock())
    for step in range(5):
        writer.emit(_step(step))
    stats = writer.stats
    assert (stats.emitted, stats.dropped, stats.buffered) == (0, 0, 5)


def test_buffer_is_bounded_and_drops_are_counted(dead_client: CountingRedis) -> None:
    writer = _writer(dead_client, FakeClock(), buffer_limit=3)
    for step in range(5):
        writer.emit(_step(step))
    stats = writer.stats
    assert (stats.emitted, stats.dropped, stats.buffered) == (0, 2, 3)


def test_retries_wait_for_the_backoff(dead_client: CountingRedis) -> None:
    clock = FakeClock()
    writer = _writer(dead_client, clock, retry_backoff_s=(1.0, 4.0))
    writer.emit(_step(0))
    assert dead_client.attempts == 1
    writer.emit(_step(1))  # within the 1 s back-off: buffered, no round trip
    assert dead_client.attempts == 1
    clock.now += 1.0
    writer.emit(_step(2))
    assert dead_client.attempts == 2
    clock.now += 1.0  # back-off doubled to 2 s
    writer.emit(_step(3))
    assert dead_client.attempts == 2
    clock.now += 1.0
    writer.emit(_step(4))
    assert dead_client.attempts == 3
    assert writer.stats.buffered == 5


def test_flush_ignores_the_backoff_and_reports(dead_client: CountingRedis) -> None:
    writer = _writer(dead_client, FakeClock())
    writer.emit(EndRecord(learner="learner-a", step=1))
    assert writer.flush() is False
    assert dead_client.attempts == 2


def test_failures_are_logged_at_most_once_per_period(dead_client: CountingRedis) -> None:
    clock = FakeClock()
    writer = _writer(dead_client, clock, log_every_s=30.0, retry_backoff_s=(0.0, 0.0))
    with capture_logs() as logs:
        for _ in range(10):
            writer.emit(_step(0))
        clock.now += 30.0
        writer.emit(_step(0))
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 2
    assert dead_client.attempts == 11


def test_unserialisable_payload_is_dropped_not_raised(dead_client: CountingRedis) -> None:
    writer = _writer(dead_client, FakeClock())
    # A programming error that typing did not catch (the learner passes no such thing).
    writer.emit(StepRecord(learner="learner-a", step=1, ts=1, per_class_loss={"a": object()}))
    assert writer.stats.dropped == 1
    assert dead_client.attempts == 0


def test_telemetry_client_has_short_timeouts() -> None:
    client = telemetry_client(RedisSettings(url="redis://127.0.0.1:1/0"), timeout_s=0.25)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 0.25
    assert kwargs["socket_connect_timeout"] == 0.25
    assert kwargs["retry"].get_retries() == 1
    client.close()


def test_sidecar_client_outwaits_its_blocking_reads() -> None:
    from pydantic import SecretStr

    from pipeline.config import Settings
    from pipeline.sidecar.service import sidecar_client

    settings = Settings.model_validate(
        {"redis": {"url": "redis://127.0.0.1:1/0", "password": "pw", "socket_timeout_s": 0.5}}
    )
    assert isinstance(settings.redis.password, SecretStr)
    client = sidecar_client(settings)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] >= 1.5  # XREAD blocks 0.5 s; the socket waits longer
    assert kwargs["socket_connect_timeout"] == 0.5
    assert kwargs["retry"].get_retries() == 1
    assert kwargs["password"] == "pw"  # unwrapped by the factory, nowhere else
    client.close()


def test_sidecar_imports_neither_torch_nor_numpy() -> None:
    """The sidecar command's import chain, in a fresh interpreter (this one may hold torch)."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, pipeline.cli, pipeline.sidecar.service, pipeline.signals;"
        "print(sorted(m for m in ('torch', 'faiss', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[3],  # this checkout first on sys.path
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == "[]"
