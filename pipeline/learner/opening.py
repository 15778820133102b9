"""What a learner opens before torch: health board, Redis, producer, source, the bank's read.

A restart is on the path of every crash recovery, and most of it used to run one thing after
the other: interpreter and torch import, checkpoint read, group join, bank load. None of the
input/output needs torch, so :func:`open_io` (imported and run by ``learn`` before torch is)
starts the two slow ones at once (docs/performance.md, "Restart"):

- the **group join**: the source starts with its start position pending
  (:meth:`~consumers.source.KafkaBatchSource.start_joining`); the assembly hands the
  checkpoint's offsets over once it has read them, and nothing is decoded or handed off
  before that;
- the **bank read**: the store's snapshot is read from Redis on a thread; the assembly builds
  the mirror from it once torch and the model are ready.

Without ``early`` (tools that build a context in-process), the source is started by the
assembly once the checkpoint is read, and the bank is read there, as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from consumers.exceptions import BrokerUnavailableError
from consumers.producer import JsonProducer
from consumers.protocols import EventSource
from consumers.source import KafkaBatchSource
from memory_bank.exceptions import BankUnavailableError
from memory_bank.protocols import BankSnapshot
from memory_bank.redis_client import make_redis_client
from memory_bank.redis_store import RedisBankStore, ping_redis
from pipeline.config import Settings
from pipeline.learner.health import HealthBoard, health_path
from pipeline.learner.start import StartRequest, prepare_lineage

log = structlog.get_logger(__name__)
T = TypeVar("T")


@dataclass
class Opened:
    """The learner's connections, opened; ``joining``: the source started without offsets."""

    health: HealthBoard
    redis: Any
    producer: JsonProducer
    source: EventSource
    joining: KafkaBatchSource | None = None
    snapshot: Future[BankSnapshot] | None = None  # the bank's read, running on a thread

    def close(self) -> None:
        """Stop what was started (whatever failed later must leave nothing behind)."""
        try:
            self.source.stop(timeout_s=10.0)
        finally:
            self.producer.close()


def open_io(
    settings: Settings,
    stop: threading.Event,
    request: StartRequest,
    *,
    early: bool = False,
    rank: int = 0,
) -> Opened:
    """Health board, Redis client, producer and source; with ``early``, join and read the bank.

    ``rank``: this process's rank in a data-parallel group (its own health file; only rank 0
    prepares a new lineage). Ranks open without ``early``: a rank's bank is read through
    :class:`~pipeline.learner.sharing.FollowerStore` or the leader's store in the assembly.
    """
    r = settings.redis
    health = HealthBoard(
        settings.learner_name,
        health_path(settings.checkpoint_dir, rank),
        stale_after_s=settings.health.stale_after_s,
    )
    client = make_redis_client(
        r.url, r.username, r.password, r.socket_timeout_s, tls_options=r.tls_options()
    )
    if rank == 0 and (request.reset or request.position is not None):
        # Before anything connects: a refused --from must leave nothing behind.
        prepare_lineage(settings, request, lambda name: _set_bank_aside(settings, client, name))
    client_options = settings.kafka.client_options()
    producer = until_reachable(
        lambda: JsonProducer(client_options, on_health=health.reporter("kafka_producer")),
        "kafka",
        settings.learner.startup_wait_s,
        stop,
        health.reporter("kafka_producer"),
    )
    opened = Opened(health, client, producer, _make_source(settings, producer, health))
    if not early:
        return opened
    try:
        if isinstance(opened.source, KafkaBatchSource):
            opened.source.start_joining()
            opened.joining = opened.source
        opened.snapshot = _read_bank_on_a_thread(settings, client, health, stop)
    except BaseException:
        opened.close()
        raise
    return opened


def bank_store(settings: Settings, client: Any, **options: Any) -> RedisBankStore:
    """This learner's bank in Redis, retried with the ``redis`` section's back-off."""
    r, m = settings.redis, settings.model
    return RedisBankStore(
        client,
        r.key_prefix,
        settings.learner_name,
        m.input_dim,
        m.embed_dim,
        retries=r.retries,
        backoff_s=r.retry_backoff_s,
        **options,
    )


def learner_bank_store(settings: Settings, client: Any, health: HealthBoard) -> RedisBankStore:
    """The store a learner writes through to: health reported, back-off capped."""
    return bank_store(
        settings,
        client,
        max_backoff_s=settings.redis.retry_max_backoff_s,
        on_health=health.reporter("redis"),
    )


def wait_for_redis(
    settings: Settings, client: Any, stop: threading.Event, health: HealthBoard | None = None
) -> None:
    report = health.reporter("redis") if health is not None else None
    wait_s = settings.learner.startup_wait_s
    until_reachable(lambda: ping_redis(client), "redis", wait_s, stop, report)


def _read_bank_on_a_thread(
    settings: Settings, client: Any, health: HealthBoard, stop: threading.Event
) -> Future[BankSnapshot]:
    """The store's snapshot, read on a daemon thread; errors come out of ``result()``."""
    future: Future[BankSnapshot] = Future()
    store = learner_bank_store(settings, client, health)

    def read() -> None:
        if not future.set_running_or_notify_cancel():
            return
        started = time.monotonic()
        try:
            wait_for_redis(settings, client, stop, health)
            snapshot = store.load()
        except BaseException as exc:  # noqa: BLE001 - handed to the assembly by result()
            future.set_exception(exc)
            return
        log.info("bank read", items=len(snapshot), seconds=round(time.monotonic() - started, 3))
        future.set_result(snapshot)

    threading.Thread(target=read, name="bank-read", daemon=True).start()
    return future


def _set_bank_aside(settings: Settings, client: Any, new_name: str) -> list[str]:
    wait_for_redis(settings, client, threading.Event())
    return bank_store(settings, client).set_aside(new_name)


def _make_source(settings: Settings, producer: JsonProducer, health: HealthBoard) -> EventSource:
    """The event source: in this process, or ``consumer.processes`` consumer processes."""
    from consumers.process_source import ProcessBatchSource
    from consumers.source import SourceConfig

    client_options = settings.kafka.client_options()
    source_config = SourceConfig.from_tuning(
        settings.consumer,
        topic=settings.kafka.events_topic,
        group_id=settings.group_id,
        input_dim=settings.model.input_dim,
        dlq_topic=settings.kafka.dlq_topic,
        learner=settings.learner_name,
    )
    if settings.consumer.processes > 1:
        # Polling and decoding in other processes, off this one's GIL (a GPU learner
        # outruns one kafka-python consumer); each child has its own DLQ producer.
        return ProcessBatchSource(
            source_config,
            client_options,
            settings.consumer.processes,
            log_level=logging.getLevelName(settings.logging.level),
        )
    return KafkaBatchSource(
        source_config,
        client_options,
        producer,
        on_health=health.reporter("kafka_consumer"),
    )


def until_reachable(
    make: Callable[[], T],
    what: str,
    wait_s: float,
    stop: threading.Event,
    report: Callable[[str | None], None] | None = None,
) -> T:
    """``make()``, retried with backoff while its server is unreachable at start.

    A learner started before its broker or Redis (a whole stack coming up at once) waits up
    to ``learner.startup_wait_s`` instead of exiting and being restarted in a loop; the wait
    shows in ``report`` (the health board) as that dependency being down.
    """
    deadline = time.monotonic() + wait_s
    delay = 1.0
    while True:
        try:
            made = make()
        except (BrokerUnavailableError, BankUnavailableError) as exc:
            if report is not None:
                report(str(exc))
            if time.monotonic() + delay > deadline or stop.is_set():
                raise
            log.warning("waiting for a dependency", dependency=what, error=str(exc), retry_s=delay)
            if stop.wait(delay):
                raise
            delay = min(30.0, 2 * delay)
        else:
            if report is not None:
                report(None)
            return made
