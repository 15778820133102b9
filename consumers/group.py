"""The consumer thread's part as a group member: rebalance events and offset commits.

Both run on :class:`~consumers.source.KafkaBatchSource`'s consumer thread (the one that owns
the :class:`~consumers.client.ConsumerClient`), except what is marked "any thread".

Order of a commit (each step waits for the previous one):
  1. the learner checkpoints, then calls ``commit(offsets)`` (INVARIANT: offsets are committed
     only after the checkpoint that covers them is durable; the source cannot check that);
  2. the consumer thread flushes the DLQ producer (INVARIANT: a dead letter is durable before
     the offset that covers it is committed, or a crash could lose a rejected event);
  3. the consumer thread commits synchronously, never below what it already committed, and
     only partitions it owns.

Rebalances: the clients' callbacks only record what happened
(:class:`~consumers.client.RebalanceRecorder`); the consumer thread drains the record after
every ``poll`` and reconciles its buffers (:mod:`consumers.partitions`). Commits never run
inside a callback.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

import structlog

from consumers.client import CommitError, ConsumerClient
from consumers.config import SourceConfig
from consumers.events import TopicPartitionKey
from consumers.exceptions import ProducerError
from consumers.producer import JsonProducer
from consumers.protocols import labelled, partition_label

_COMMIT_RETRY_S: Final = 1.0


def partition_labels(partitions: Iterable[TopicPartitionKey]) -> list[str]:
    return [partition_label(key) for key in sorted(partitions)]


@dataclass(slots=True)
class CommitRequest:
    offsets: dict[TopicPartitionKey, int]
    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False


class OffsetCommitter:
    """Serves the learner's commit requests on the consumer thread (order in the module doc).

    ``count`` is told the name of each counter to bump (``commits``, ``commit_failures``).
    """

    def __init__(
        self,
        config: SourceConfig,
        dlq_producer: JsonProducer,
        logger: structlog.typing.FilteringBoundLogger,
        count: Callable[[str], None],
    ) -> None:
        self._config = config
        self._dlq = dlq_producer
        self._log = logger
        self._count = count
        self._requests: queue.SimpleQueue[CommitRequest] = queue.SimpleQueue()
        # Owned by the consumer thread.
        self._retry: dict[TopicPartitionKey, int] = {}  # failed commits, tried again later
        self._retry_at = 0.0
        # Read by any thread through committed(), guarded by _lock.
        self._lock = threading.Lock()
        self._committed: dict[TopicPartitionKey, int] = {}

    def submit(self, offsets: Mapping[TopicPartitionKey, int]) -> CommitRequest:
        """Queue a request (any thread); the consumer thread serves it at its next turn."""
        request = CommitRequest({(str(t), int(p)): int(o) for (t, p), o in offsets.items()})
        self._requests.put(request)
        return request

    def committed(self) -> dict[TopicPartitionKey, int]:
        """The offsets committed so far (any thread)."""
        with self._lock:
            return dict(self._committed)

    def serve(self, client: ConsumerClient, final: bool = False) -> None:
        """Commit what was asked, and failed commits once their retry is due (or ``final``)."""
        requests: list[CommitRequest] = []
        while True:
            try:
                requests.append(self._requests.get_nowait())
            except queue.Empty:
                break
        retry_due = bool(self._retry) and (final or time.monotonic() >= self._retry_at)
        if not requests and not retry_due:
            return
        # Requests are merged: the newest offsets cover the older ones, one commit serves all.
        merged = dict(self._retry)
        self._retry = {}
        for request in requests:
            for key, offset in request.offsets.items():
                merged[key] = max(offset, merged.get(key, offset))
        ok = self._commit(client, merged)
        for request in requests:
            request.ok = ok
            request.done.set()

    def fail_waiting(self) -> None:
        """Answer every request still queued with a failure (the consumer thread is exiting)."""
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            request.done.set()  # ok stays False

    def _commit(self, client: ConsumerClient, offsets: dict[TopicPartitionKey, int]) -> bool:
        committed = self.committed()
        # Never move a committed offset backwards (a re-delivered batch after a rebalance can
        # ask for less than what is already covered).
        wanted = {k: o for k, o in offsets.items() if o > committed.get(k, -1)}
        if not wanted:
            return True
        # INVARIANT: a dead letter is durable before the offset that covers it is committed.
        try:
            self._dlq.flush(self._config.dlq_flush_timeout_s)
        except ProducerError as exc:
            self._log.error(
                "commit withheld: dead letters are not durable",
                error=repr(exc),
                offsets=labelled(wanted),
            )
            self._count("commit_failures")
            return False
        assigned = client.assignment()
        foreign = [k for k in wanted if k not in assigned]
        if foreign:
            self._log.warning(
                "not committing partitions no longer assigned",
                partitions=partition_labels(foreign),
            )
        to_commit = {key: o for key, o in wanted.items() if key in assigned}
        if not to_commit:
            self._count("commit_failures")
            return False
        try:
            client.commit(to_commit, self._config.commit_timeout_ms / 1000)
        except CommitError as exc:
            # CommitFailedError / RebalanceInProgressError (the group is rebalancing) or a
            # coordinator that moved or timed out. Retried after the next polls, for the
            # partitions still assigned then (a partition that moved is re-read by its new
            # owner: at-least-once). The learner's next commit would cover it too, but an
            # idle learner sends none.
            self._log.warning(
                "commit failed; will retry", error=repr(exc), offsets=labelled(wanted)
            )
            self._count("commit_failures")
            for key, offset in to_commit.items():
                self._retry[key] = max(offset, self._retry.get(key, offset))
            self._retry_at = time.monotonic() + _COMMIT_RETRY_S
            return False
        with self._lock:
            self._committed.update(to_commit)
        self._count("commits")
        self._log.debug("offsets committed", offsets=labelled(wanted))
        return not foreign
