"""Topic bootstrap: create what is missing and wait until the metadata shows it.

Safe to run from every process at start-up (learner, sidecar, replay): an existing topic is
left as it is, and a broker that is still starting is retried with backoff until the deadline.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import structlog
from kafka import KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError

from consumers.exceptions import BrokerUnavailableError

log = structlog.get_logger(__name__)

_MAX_BACKOFF_S = 2.0


def _missing_or_unready(admin: KafkaAdminClient, topics: list[str]) -> list[str]:
    """Topics absent from the metadata, or with a partition that has no leader yet."""
    described = {t.get("name"): t for t in admin.describe_topics(topics)}
    pending = []
    for name in topics:
        info = described.get(name)
        partitions = (info or {}).get("partitions") or []
        ready = (
            info is not None
            and info.get("error_code", 0) == 0
            and bool(partitions)
            and all(p.get("error_code", 0) == 0 and p.get("leader_id", -1) >= 0 for p in partitions)
        )
        if not ready:
            pending.append(name)
    return pending


def _create(
    admin: KafkaAdminClient, topics: list[str], partitions: int, replication_factor: int
) -> None:
    spec = {
        name: {"num_partitions": partitions, "replication_factor": replication_factor}
        for name in topics
    }
    response = admin.create_topics(spec, raise_errors=False)
    for result in response.get("topics", []):
        code = result.get("error_code", 0)
        if code in (0, TopicAlreadyExistsError.errno):
            continue  # another process may have created it first: that is fine
        raise KafkaError(
            f"creating topic {result.get('name')!r} failed: error {code} "
            f"{result.get('error_message') or ''}".strip()
        )


def ensure_topics(
    client_options: Mapping[str, Any],
    topics: Iterable[str],
    partitions: int,
    replication_factor: int,
    timeout_s: float = 30.0,
) -> None:
    """Create the missing ``topics`` and return once all of them have a leader everywhere.

    Existing topics are not changed (their partition count may differ from ``partitions``).
    Raises :class:`BrokerUnavailableError` naming the bootstrap servers and the last error
    when this is not done within ``timeout_s``.
    """
    wanted = sorted(set(topics))
    if not wanted:
        return
    deadline = time.monotonic() + timeout_s
    backoff_s = 0.1
    last_error: object = None
    attempt = 0
    admin: KafkaAdminClient | None = None
    try:
        while True:
            attempt += 1
            try:
                if admin is None:
                    remaining_ms = int((deadline - time.monotonic()) * 1000)
                    admin = KafkaAdminClient(
                        **client_options, bootstrap_timeout_ms=max(remaining_ms, 100)
                    )
                pending = _missing_or_unready(admin, wanted)
                if not pending:
                    log.info("topics ready", topics=wanted, attempts=attempt)
                    return
                _create(admin, pending, partitions, replication_factor)
                last_error = f"not ready yet: {', '.join(pending)}"
            except KafkaError as exc:
                # The broker may still be starting: drop the client, back off, reconnect.
                last_error = exc
                log.info("broker not ready; will retry", error=repr(exc), attempt=attempt)
                if admin is not None:
                    admin.close()
                    admin = None
            if time.monotonic() + backoff_s >= deadline:
                break
            time.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)
    finally:
        if admin is not None:
            admin.close()
    servers = client_options.get("bootstrap_servers")
    raise BrokerUnavailableError(
        f"topics {wanted} not ready on {servers} within {timeout_s:g} s "
        f"({attempt} attempts); last error: {last_error!r}. Is the broker running and "
        f"reachable at that address?"
    )
