"""Shared fixtures.

Integration and e2e tests start one real Tansu broker and one real redis-server per session on
free loopback ports, and give each test a fresh topic prefix, consumer group and Redis key
prefix. Nothing here mocks Kafka or Redis.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.devtools.devstack import (
    ManagedProcess,
    free_port,
    start_broker,
    start_redis,
    stop_process,
)
from pipeline.devtools.s3store import DurableBroker


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def broker(stack_dir: Path) -> Iterator[ManagedProcess]:
    proc = start_broker(free_port(), stack_dir)
    yield proc
    stop_process(proc.pid)


@pytest.fixture(scope="session")
def redis_server(stack_dir: Path) -> Iterator[ManagedProcess]:
    proc = start_redis(free_port(), stack_dir)
    yield proc
    stop_process(proc.pid)


@pytest.fixture
def bootstrap(broker: ManagedProcess) -> str:
    return broker.address


@pytest.fixture
def redis_url(redis_server: ManagedProcess) -> str:
    return f"redis://{redis_server.address}/0"


@pytest.fixture
def redis_client(redis_url: str):  # type: ignore[no-untyped-def]
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def durable_broker(tmp_path: Path) -> Iterator[DurableBroker]:
    """A broker of its own whose log survives its restarts (Tansu on a local S3 server)."""
    stack = DurableBroker(tmp_path / "durable")
    yield stack
    stack.stop()


@pytest.fixture
def unique() -> str:
    """A short unique token for topic prefixes, group ids and Redis key prefixes."""
    return uuid.uuid4().hex[:10]
