"""Kafka consumer thread that turns a topic into decoded micro-batches on a bounded queue.

Path of a record: ``poll`` -> :class:`MicroBatcher` (size | max latency) -> ``decode_batch``
-> dead letters to the DLQ producer -> :class:`EventBatch` on a bounded queue -> learner.

One logic, two client libraries: everything here and in :mod:`consumers.group` is written
against :class:`~consumers.client.ConsumerClient`; ``consumer.client`` picks kafka-python
(:mod:`consumers.kafka_python_client`, the default) or librdkafka
(:mod:`consumers.confluent_client`).

Threading: neither client's consumer is meant to be shared between threads, so ONE thread owns
it and does every call on it (poll, pause/resume, commit, close). The learner talks to that
thread through two queues: batches come out of one, commit requests go into the other.

Commits and rebalance events are the group member's part, in :mod:`consumers.group` (its
docstring lists the order of a commit and its INVARIANTs); lost broker connections are
reported by :mod:`consumers.broker_watch`.

Backpressure: when the hand-off queue is full, the thread polls nothing and waits for room.
Only a learner that has taken nothing for ``poll_timeout_ms`` (or a queue full for
:data:`~consumers.backpressure.MAX_HOLD_S` however steadily it drains) makes it pause every
assigned partition and keep polling briefly (so the member stays in the group) until the
learner makes room (:mod:`consumers.backpressure` says why). A batch is never dropped.

Rebalances (the clients' callbacks only record them; the consumer thread reconciles its
buffers after every ``poll``), fetch positions and lag: :mod:`consumers.partitions`.

Start position (resume offsets, known at start or handed over later):
:mod:`consumers.start_position`.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any, Final

import structlog

from consumers.backpressure import MAX_HOLD_S, HoldBeforePause
from consumers.batcher import MicroBatcher
from consumers.broker_watch import BrokerWatch
from consumers.client import ConsumerClient, Polled, TransientPollError, open_client
from consumers.config import SourceConfig
from consumers.dead_letters import send_dead_letters
from consumers.decode import decode_batch
from consumers.events import EventBatch, SourceRecord, TopicPartitionKey
from consumers.exceptions import BrokerUnavailableError, ConsumerError, SourceClosedError
from consumers.group import CommitRequest, OffsetCommitter
from consumers.partitions import PartitionTracker
from consumers.producer import JsonProducer
from consumers.protocols import NO_OFFSETS, STAT_COUNTERS, labelled
from consumers.start_position import StartPosition

log = structlog.get_logger(__name__)

# While paused for backpressure poll() fetches nothing; a short poll only drives the group
# protocol, and the thread otherwise sleeps until the learner takes a batch.
_PAUSED_POLL_MS: Final = 100
_START_TIMEOUT_S: Final = 120.0


_CLOSED: Final = object()  # queue sentinel: the consumer thread has exited


class KafkaBatchSource:
    """:class:`~consumers.protocols.EventSource` over a Kafka consumer group.

    ``dlq_producer`` is borrowed, not owned: the caller closes it after :meth:`stop`. It may
    be shared with other writers; the source flushes it before every commit.
    """

    def __init__(
        self,
        config: SourceConfig,
        client_options: Mapping[str, Any],
        dlq_producer: JsonProducer,
        on_health: Callable[[str | None], None] | None = None,
    ) -> None:
        self._config = config
        self._log = log.bind(topic=config.topic, group=config.group_id)
        self._client_options = dict(client_options)
        self._dlq = dlq_producer
        self._queue: queue.Queue[object] = queue.Queue(maxsize=config.queue_batches)
        self._wake = threading.Event()  # set by get/commit/stop: the consumer thread may act
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._done = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._close_timeout_ms = 10_000
        # Broker connectivity, told to ``on_health`` on each change (owned by the thread).
        self._broker = BrokerWatch(
            self._client_options.get("bootstrap_servers"), self._log, on_health
        )
        # Owned by the consumer thread.
        self._batcher = MicroBatcher(config.batch_size, config.max_latency_ms / 1000)
        self._pending: deque[EventBatch] = deque()  # decoded, waiting for room in the queue
        self._paused = False
        self._start = StartPosition(self._log)
        self._poll_failing = False  # the last poll raised TransientPollError
        # Shared with readers of stats()/assignment(), guarded by _stats_lock.
        self._stats_lock = threading.Lock()
        self._counters: Counter[str] = Counter()
        self._partitions = PartitionTracker(
            self._batcher, self._start, self._log, self._stats_lock, self._counters
        )
        self._offsets = OffsetCommitter(config, dlq_producer, self._log, self._count)

    # ---- EventSource ----------------------------------------------------------------------

    def start(self, resume_offsets: Mapping[TopicPartitionKey, int] = NO_OFFSETS) -> None:
        """Create the consumer on its own thread and subscribe; joining happens in the background.

        Raises :class:`BrokerUnavailableError` when the bootstrap servers cannot be reached.
        """
        self._begin(resume_offsets)

    def start_joining(self) -> None:
        """:meth:`start` before the start position is known: the group join begins now.

        A restarting learner joins while it imports torch, reads its checkpoint and loads its
        bank. Until :meth:`set_start` the consumer thread only drives the join: what a poll
        returned is held (not decoded, not handed off) and assigned partitions are paused.
        """
        self._begin(None)

    def set_start(self, resume_offsets: Mapping[TopicPartitionKey, int] = NO_OFFSETS) -> None:
        """The start position of a source begun with :meth:`start_joining` (any thread)."""
        self._start.set_later(resume_offsets)
        self._wake.set()

    def _begin(self, resume_offsets: Mapping[TopicPartitionKey, int] | None) -> None:
        if self._thread is not None:
            raise RuntimeError("KafkaBatchSource.start() called twice")
        self._start.set_now(resume_offsets)
        self._thread = threading.Thread(
            target=self._run, name=f"kafka-source-{self._config.topic}", daemon=True
        )
        self._thread.start()
        if not self._started.wait(_START_TIMEOUT_S):
            raise BrokerUnavailableError("the Kafka consumer did not start in time")
        if self._error is not None:
            if isinstance(self._error, ConsumerError):  # BrokerUnavailableError
                raise self._error
            raise SourceClosedError(
                f"creating the Kafka consumer failed: {self._error!r}"
            ) from self._error
        self._log.info(
            "kafka source started",
            client=self._config.client,
            resume_offsets=labelled(self._start.floor) or None,
            start="pending" if self._start.pending else "set",
        )

    def get(self, timeout_s: float) -> EventBatch | None:
        self._raise_if_unusable()
        try:
            item = self._queue.get(timeout=timeout_s) if timeout_s > 0 else self._queue.get_nowait()
        except queue.Empty:
            self._raise_if_unusable()
            return None
        if item is _CLOSED:
            self._queue.put_nowait(_CLOSED)  # later calls must see it too
            self._raise_if_unusable()
            raise SourceClosedError("the consumer thread exited")
        self._wake.set()  # there is room now: a paused consumer may resume
        assert isinstance(item, EventBatch)
        return item

    def commit(self, offsets: Mapping[TopicPartitionKey, int]) -> None:
        self._submit(offsets)

    def commit_sync(self, offsets: Mapping[TopicPartitionKey, int], timeout_s: float) -> bool:
        """True once committed; False on a failed commit or a timeout.

        After a failure (a rebalance in progress, a coordinator moving) the consumer thread
        retries the still-assigned partitions in the background; a request that timed out may
        still be carried out later. Partitions no longer assigned are never committed.
        """
        request = self._submit(offsets)
        return request.done.wait(timeout_s) and request.ok

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._close_timeout_ms = max(100, int(timeout_s * 1000 * 0.8))
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                self._log.warning("kafka consumer thread did not stop in time", timeout_s=timeout_s)
        self._log.info("kafka source stopped", **self._summary())

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            return {
                **{name: self._counters[name] for name in STAT_COUNTERS},
                "paused": self._paused,
                "committed": labelled(self._offsets.committed()),
                "lag": labelled(self._partitions.lag),
                "queue_depth": self._queue.qsize(),
            }

    def assignment(self) -> set[TopicPartitionKey]:
        with self._stats_lock:
            return set(self._partitions.assigned)

    def rebalance_times(self) -> tuple[float | None, float | None]:
        """``time.monotonic()`` when this member last completed a rebalance (was handed its
        partitions, possibly none) and when it last had partitions revoked or lost; None
        before the first. A revoke newer than the assignment is a rebalance under way. The
        clock is system-wide, so another process can compare it with its own
        (:mod:`consumers.process_source`)."""
        with self._stats_lock:
            return self._partitions.assigned_at, self._partitions.revoked_at

    # ---- caller-side helpers --------------------------------------------------------------

    def _raise_if_unusable(self) -> None:
        if self._error is not None:
            raise SourceClosedError(f"the consumer thread died: {self._error!r}") from self._error
        if self._stopped or self._done.is_set():
            raise SourceClosedError("the source is stopped")
        if self._thread is None:
            raise SourceClosedError("the source is not started")

    def _submit(self, offsets: Mapping[TopicPartitionKey, int]) -> CommitRequest:
        self._raise_if_unusable()
        request = self._offsets.submit(offsets)
        self._wake.set()
        return request

    def _summary(self) -> dict[str, Any]:
        s = self.stats()
        return {k: s[k] for k in ("polled", "events", "dead_lettered", "batches", "committed")}

    # ---- consumer thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            consumer = open_client(self._config, self._client_options)
        except BaseException as exc:  # noqa: BLE001 - reported by start() in the caller
            self._error = exc
            self._done.set()
            self._started.set()
            return
        self._started.set()
        try:
            self._loop(consumer)
            self._offsets.serve(consumer, final=True)  # honour what was asked before stop()
        except BaseException as exc:  # noqa: BLE001 - surfaced by get() as SourceClosedError
            self._error = exc
            self._log.exception("kafka consumer thread died")
        finally:
            self._done.set()
            self._offsets.fail_waiting()
            closing = time.monotonic()
            try:
                consumer.close(self._close_timeout_ms / 1000)
            except Exception as exc:  # noqa: BLE001 - closing is best effort; nothing to commit
                self._log.warning("closing the kafka consumer failed", error=repr(exc))
            self._log.info("kafka consumer closed", close_s=round(time.monotonic() - closing, 3))
            # Wakes a waiting get(); a full queue needs no wake-up (get() returns at once).
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_CLOSED)

    def _loop(self, consumer: ConsumerClient) -> None:
        cfg = self._config
        next_paused_poll = 0.0
        # Lasting backpressure pauses (consumers.backpressure); bounded by max.poll.interval.
        hold = HoldBeforePause(
            cfg.poll_timeout_ms / 1000, min(MAX_HOLD_S, cfg.max_poll_interval_ms / 2000)
        )
        while not self._stopping.is_set():
            if self._start.pending and not self._hold_for_start(consumer):
                continue
            self._offsets.serve(consumer)
            handed = self._emit_ready()
            if self._pending and not self._paused:
                # The queue is full: wait for room without polling, so nothing more is
                # fetched, and without pausing while the learner keeps taking batches
                # (pausing would make librdkafka drop its prefetched records, and a
                # kafka-python fetch in flight; figures in docs/performance.md).
                now = time.monotonic()
                pause_at = hold.pause_at(now, progressed=handed > 0)
                if now < pause_at:
                    self._wake.wait(pause_at - now)
                    self._wake.clear()
                    continue
            if self._pending:
                # Backpressure: the learner has stalled (or the hold ran out). Fetch nothing
                # more and hand batches over as soon as the learner takes one (get() sets
                # _wake). poll() is still called every poll_timeout_ms, briefly, to drive the
                # group protocol (a rebalance) and the max.poll.interval; heartbeats run on
                # the clients' own threads. Polling on every hand-over would cost a
                # fetch-less poll each time.
                self._pause_all(consumer)
                wait_s = next_paused_poll - time.monotonic()
                if wait_s > 0:
                    self._wake.wait(wait_s)
                    self._wake.clear()
                    continue
                next_paused_poll = time.monotonic() + cfg.poll_timeout_ms / 1000
                timeout_ms = min(cfg.poll_timeout_ms, _PAUSED_POLL_MS)
            else:
                # Only here, with nothing decoded waiting and less than a batch buffered, is
                # fetching worth it again.
                hold.clear()
                self._resume_all(consumer)
                timeout_ms = cfg.poll_timeout_ms
                until_ready = self._batcher.time_until_ready()
                if until_ready is not None:  # a partial batch must leave within its latency
                    timeout_ms = min(timeout_ms, max(1, int(until_ready * 1000) + 1))
            polled = self._poll(consumer, timeout_ms)
            if polled:
                self._partitions.ingest(polled)
                self._partitions.update_lag(consumer)

    def _poll(self, consumer: ConsumerClient, timeout_ms: int) -> Polled | None:
        """One poll, its rebalance acted on; what it returned, less what came for partitions
        just sought to their start (fetched from the old position). None when the poll failed:
        the thread has waited (:meth:`_poll_failed`) and polls again."""
        try:
            polled = consumer.poll(timeout_ms / 1000, self._config.max_poll_records)
        except TransientPollError as exc:
            self._poll_failed(consumer, exc)
            return None
        self._poll_failing = False
        self._broker.observe(consumer, got_records=bool(polled))
        # Rebalance callbacks ran during poll(); act on them before buffering what it
        # returned, which belongs to the new assignment.
        sought = self._partitions.reconcile(consumer)
        if sought and polled:
            polled = [(key, records) for key, records in polled if key not in sought]
        return polled

    def _poll_failed(self, consumer: ConsumerClient, exc: TransientPollError) -> None:
        """A retriable poll failure: the health watch learns of it, the thread waits a poll
        timeout (or until stopped) instead of spinning, and polls again."""
        if not self._poll_failing:  # once per run of failures; BrokerWatch reports the outage
            self._poll_failing = True
            self._log.warning("poll failed; retrying", error=str(exc))
        self._broker.observe(consumer, got_records=False)
        self._stopping.wait(self._config.poll_timeout_ms / 1000)

    def _hold_for_start(self, consumer: ConsumerClient) -> bool:
        """Before :meth:`set_start`: drive the join and hold what comes; True once applied.

        Unassigned, it polls as usual (the join happens inside poll). Assigned, the partitions
        are paused, so nothing more is fetched from a position that may be the wrong one, and
        it polls briefly once per ``poll_timeout_ms`` to follow rebalances.
        """
        cfg = self._config
        if self._start.known.is_set():
            self._start.apply_late()
            # Held records of a partition sought now came from the old position: dropped.
            self._partitions.seek_start(consumer, consumer.assignment())
            consumer.resume_all()
            return True
        timeout_ms = cfg.poll_timeout_ms
        if self._partitions.assigned:
            consumer.pause_all()
            if self._wake.wait(cfg.poll_timeout_ms / 1000):
                self._wake.clear()
                return False
            timeout_ms = min(cfg.poll_timeout_ms, _PAUSED_POLL_MS)
        polled = self._poll(consumer, timeout_ms)  # nothing is sought while the start is pending
        if polled is None:
            return False
        if polled:
            self._partitions.ingest(polled)
        if self._partitions.assigned:
            consumer.pause_all()
        return False

    def _emit_ready(self) -> int:
        """Decode the ready batches there is room for, then hand them over together; the
        number handed over.

        One burst rather than decode-and-put one at a time: a learner blocked in get() is
        woken by the first put and takes the rest without blocking again, instead of being
        woken (and, on a busy machine, preempting this thread only to wait for the GIL) once
        per batch (figures in docs/performance.md).
        """
        handed = 0
        while True:
            if not self._pending:
                room = max(1, self._queue.maxsize - self._queue.qsize())
                while len(self._pending) < room and self._batcher.ready():
                    self._pending.append(self._decode(self._batcher.take()))
                if not self._pending:
                    return handed
            while self._pending:
                try:
                    self._queue.put_nowait(self._pending[0])
                except queue.Full:
                    return handed
                self._pending.popleft()
                handed += 1

    def _decode(self, records: list[SourceRecord]) -> EventBatch:
        cfg = self._config
        batch = decode_batch(records, cfg.input_dim, cfg.max_event_bytes)
        if batch.dead_letters:
            send_dead_letters(batch.dead_letters, records, cfg, self._dlq, self._log)
        self._log.debug("batch decoded", events=len(batch), consumed=batch.consumed)
        with self._stats_lock:
            self._counters["batches"] += 1
            self._counters["events"] += len(batch)
            self._counters["dead_lettered"] += len(batch.dead_letters)
        return batch

    def _pause_all(self, consumer: ConsumerClient) -> None:
        # Called on every backpressured iteration: a rebalance may have added partitions.
        consumer.pause_all()
        if not self._paused:
            self._paused = True
            with self._stats_lock:
                self._counters["paused_events"] += 1
            self._log.info(
                "backpressure: partitions paused", queue_batches=self._config.queue_batches
            )

    def _resume_all(self, consumer: ConsumerClient) -> None:
        if not self._paused:
            return
        consumer.resume_all()
        self._paused = False
        self._log.info("backpressure released: partitions resumed")

    def _count(self, name: str) -> None:
        with self._stats_lock:
            self._counters[name] += 1
