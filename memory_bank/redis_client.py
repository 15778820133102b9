"""The one Redis client factory of the project (bank store, telemetry writer, sidecar).

Kept apart from :mod:`memory_bank.redis_store` and free of torch, numpy and FAISS, so the
sidecar process can use it without loading any of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


class _Secret(Protocol):
    """pydantic's ``SecretStr``, without importing pydantic here."""

    def get_secret_value(self) -> str: ...


def make_redis_client(
    url: str,
    username: str | None = None,
    password: str | _Secret | None = None,
    socket_timeout_s: float = 5.0,
    tls_options: Mapping[str, str] | None = None,
    *,
    connect_timeout_s: float | None = None,
    retries: int = 0,
    health_check_interval_s: int = 30,
) -> redis.Redis:
    """A client with binary replies and bounded socket waits.

    ``password`` may be a plain string or a ``SecretStr`` (unwrapped only here, so settings
    dumps stay redacted). ``connect_timeout_s`` defaults to ``socket_timeout_s``.
    ``retries`` are redis-py's own, immediate (no back-off): the default 0 suits callers
    that retry with back-off and log each attempt themselves (the bank store), since two
    retry layers multiply the waits; 1 covers a pooled connection that Redis closed while
    idle. ``health_check_interval_s`` pings a connection idle that long before using it
    (0: never).
    """
    kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": (
            socket_timeout_s if connect_timeout_s is None else connect_timeout_s
        ),
        "health_check_interval": health_check_interval_s,
        "retry": Retry(NoBackoff(), retries),
        **(tls_options or {}),
    }
    if username is not None:
        kwargs["username"] = username
    if password is not None:
        kwargs["password"] = password if isinstance(password, str) else password.get_secret_value()
    return redis.Redis.from_url(url, **kwargs)
