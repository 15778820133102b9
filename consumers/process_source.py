"""An :class:`~consumers.protocols.EventSource` over several consumer processes.

Why: in one process, kafka-python's per-record work and decoding share one GIL (their cost
per event: docs/performance.md), which caps a learner that trains faster than that, i.e. one
on a GPU. Here each of ``processes`` child processes runs its own
:class:`~consumers.source.KafkaBatchSource` as a member of the same consumer group, so the
group splits the partitions between them, and sends its decoded batches to the learner
through one bounded ``multiprocessing`` queue. The learner's process only unpickles batches.

Commits: the learner's ``commit`` goes to every child; each commits only the partitions it
owns now (its source flushes its own DLQ producer first, as always), so the INVARIANT holds
per partition: an offset is committed only after the checkpoint covering it is durable and
the dead letters before it are. ``commit_sync`` is True once every child has answered True.

Batches of different children interleave; within a partition they stay in order (one child
owns a partition, and its batches travel through the queue in order).

Children are started with ``spawn`` (no torch or threads inherited) and stopped one at a
time: each leaves the group, and the next is stopped only once the others have completed the
rebalance that leave caused. Tansu wedges a group when a member leaves while a rebalance is in
progress (the members left behind never get their partitions, and neither does the learner's
next start: docs/performance.md); each leave costs a rebalance, about half of
``session_timeout_ms`` on Tansu.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Final

import structlog

from consumers.config import SourceConfig
from consumers.events import EventBatch, TopicPartitionKey
from consumers.exceptions import SourceClosedError
from consumers.protocols import NO_OFFSETS, STAT_COUNTERS
from consumers.source import KafkaBatchSource

log = structlog.get_logger(__name__)

_STATUS_EVERY_S: Final = 0.5
_CHILD_GET_S: Final = 0.1
_KILL_WAIT_S: Final = 5.0


def _child_main(
    index: int,
    config: SourceConfig,
    client_options: dict[str, Any],
    resume: dict[TopicPartitionKey, int] | None,
    out: Any,
    commands: Any,
    status: Any,
    log_level: int,
) -> None:
    """One consumer process: a KafkaBatchSource feeding ``out``, commands from ``commands``.

    ``resume`` None: the source only joins until a "start" command brings the start position
    (:meth:`ProcessBatchSource.start_joining`).
    """
    from consumers.producer import JsonProducer
    from consumers.runtime import tune_gc

    tune_gc()
    # The parent stops its children with the "stop" command, after its final commit; a Ctrl-C
    # or a SIGTERM sent to the whole process group must not kill them before that.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(log_level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    structlog.contextvars.bind_contextvars(consumer_process=index)
    producer = JsonProducer(client_options)
    source = KafkaBatchSource(config, client_options, producer)
    out.cancel_join_thread()  # at stop, unsent batches are dropped: nothing was committed
    next_status = 0.0
    try:
        if resume is None:
            source.start_joining()
        else:
            source.start(resume)
        while True:
            if _serve_commands(index, source, producer, commands, status):
                return
            now = time.monotonic()
            if now >= next_status:
                status.put(
                    (
                        "stats",
                        index,
                        source.stats(),
                        sorted(source.assignment()),
                        source.rebalance_times(),
                    )
                )
                next_status = now + _STATUS_EVERY_S
            batch = source.get(_CHILD_GET_S)
            while batch is not None:
                try:
                    out.put(batch, timeout=_CHILD_GET_S)
                    batch = None
                except queue.Full:  # the learner is behind: keep serving commands
                    if _serve_commands(index, source, producer, commands, status):
                        return
    finally:
        source.stop(timeout_s=10.0)
        producer.close()


def _serve_commands(
    index: int, source: KafkaBatchSource, producer: Any, commands: Any, status: Any
) -> bool:
    """Run pending commands; True when told to stop.

    Every commit command flushes this child's DLQ producer first, even when it owns none of
    the partitions: a partition that moved to another child since this one dead-lettered some
    of its records is committed by the other child, and those records must be durable too.
    """
    while True:
        try:
            command = commands.get_nowait()
        except queue.Empty:
            return False
        if command[0] == "stop":
            return True
        if command[0] == "start":
            source.set_start(command[1])
            continue
        _, offsets, request_id, timeout_s = command
        flushed = True
        try:
            producer.flush(timeout_s or 30.0)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which withholds success
            flushed = False
            log.warning("dead-letter flush failed before a commit", error=repr(exc))
        owned = source.assignment()
        mine = {key: offset for key, offset in offsets.items() if key in owned}
        if request_id is None:
            if mine and flushed:
                source.commit(mine)
            continue
        ok = flushed and (source.commit_sync(mine, timeout_s) if mine else True)
        status.put(("commit", index, request_id, ok, sorted(mine) if ok else []))


class ProcessBatchSource:
    """:class:`~consumers.protocols.EventSource` over ``processes`` consumer processes."""

    def __init__(
        self,
        config: SourceConfig,
        client_options: Mapping[str, Any],
        processes: int,
        *,
        log_level: int = 20,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self._config = config
        self._client_options = dict(client_options)
        self._processes = processes
        self._log_level = log_level
        self._ctx = mp.get_context("spawn")
        self._out: Any = self._ctx.Queue(maxsize=config.queue_batches)
        self._status: Any = self._ctx.Queue()
        self._commands: list[Any] = []
        self._children: list[Any] = []
        self._stats: dict[int, dict[str, Any]] = {}
        self._assigned: dict[int, set[TopicPartitionKey]] = {}
        self._rebalanced: dict[int, tuple[float | None, float | None]] = {}
        self._replies: dict[str, dict[int, tuple[bool, set[TopicPartitionKey]]]] = {}
        self._stopped = False
        self._log = log.bind(topic=config.topic, group=config.group_id, processes=processes)

    def start(self, resume_offsets: Mapping[TopicPartitionKey, int] = NO_OFFSETS) -> None:
        self._spawn(_resume(resume_offsets))

    def start_joining(self) -> None:
        """:meth:`start` before the start position is known: the children join the group and
        hold what they fetch until :meth:`set_start` (as
        :meth:`~consumers.source.KafkaBatchSource.start_joining` does in one process)."""
        self._spawn(None)

    def set_start(self, resume_offsets: Mapping[TopicPartitionKey, int] = NO_OFFSETS) -> None:
        """The start position of a source begun with :meth:`start_joining`."""
        self._raise_if_unusable()
        for commands in self._commands:
            commands.put(("start", _resume(resume_offsets)))

    def settled(self) -> bool:
        """Whether, as last reported, every child owns a share of the partitions of one
        completed rebalance: disjoint shares that together cover all the partitions any child
        reported, none empty unless there are more children than partitions."""
        self._drain_status()
        if not self._children or len(self._assigned) < self._processes:
            return False
        if self._joining(range(self._processes)):
            return False
        shares = list(self._assigned.values())
        every: set[TopicPartitionKey] = set().union(*shares)
        if sum(len(share) for share in shares) != len(every):
            return False  # overlapping shares: a report from before the last rebalance
        empty = sum(1 for share in shares if not share)
        return bool(every) and empty == max(0, self._processes - len(every))

    def _spawn(self, resume: dict[TopicPartitionKey, int] | None) -> None:
        if self._children:
            raise RuntimeError("ProcessBatchSource.start() called twice")
        for index in range(self._processes):
            commands = self._ctx.Queue()
            child = self._ctx.Process(
                target=_child_main,
                args=(
                    index,
                    self._config,
                    self._client_options,
                    resume,
                    self._out,
                    commands,
                    self._status,
                    self._log_level,
                ),
                name=f"supcon-consumer-{index}",
                daemon=True,
            )
            child.start()
            self._commands.append(commands)
            self._children.append(child)
        self._log.info("consumer processes started", pids=[c.pid for c in self._children])

    def get(self, timeout_s: float) -> EventBatch | None:
        self._raise_if_unusable()
        self._drain_status()
        try:
            batch = self._out.get(timeout=timeout_s) if timeout_s > 0 else self._out.get_nowait()
        except queue.Empty:
            self._raise_if_unusable()
            return None
        assert isinstance(batch, EventBatch)
        return batch

    def commit(self, offsets: Mapping[TopicPartitionKey, int]) -> None:
        self._raise_if_unusable()
        for commands in self._commands:
            commands.put(("commit", dict(offsets), None, 0.0))

    def commit_sync(self, offsets: Mapping[TopicPartitionKey, int], timeout_s: float) -> bool:
        self._raise_if_unusable()
        request_id = uuid.uuid4().hex
        self._replies[request_id] = {}
        for commands in self._commands:
            commands.put(("commit", dict(offsets), request_id, timeout_s))
        deadline = time.monotonic() + timeout_s + 1.0
        while len(self._replies[request_id]) < len(self._children):
            if time.monotonic() >= deadline or not any(c.is_alive() for c in self._children):
                break
            self._drain_status(wait_s=0.05)
        replies = self._replies.pop(request_id)
        committed: set[TopicPartitionKey] = set().union(*(keys for _, keys in replies.values()))
        # True only when every child answered and the partitions they committed cover all of
        # ``offsets``: one owned by no child (mid-rebalance) was not committed.
        return (
            len(replies) == len(self._children)
            and all(ok for ok, _ in replies.values())
            and committed >= set(offsets)
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the children one at a time; ``timeout_s`` is the budget of each step.

        A step: the child leaves the group and exits, then the children still running complete
        the rebalance its leave caused (the next leave must not fall inside it: see the module
        docstring). The whole stop takes at most ``processes`` × ``timeout_s`` plus a few
        seconds per child that must be killed.

        A child still running at the end of its step is killed (SIGKILL: children ignore
        SIGTERM, see ``_child_main``). Nothing is lost or skipped by that: a child commits only
        when the learner tells it to, after the checkpoint that covers the offsets, so what a
        killed child had fetched beyond that is read again by the group's next owner.
        """
        if self._stopped:
            return
        self._stopped = True
        remaining = list(range(len(self._children)))
        # A stop may come while the group is still forming (or rebalancing for another
        # reason): the first leave waits for that, within the first child's budget.
        self._wait_rebalanced(remaining, None, time.monotonic() + timeout_s)
        while remaining:
            index = remaining.pop(0)
            # Told to stop now, the child leaves the group within this step; a rebalance the
            # others complete after this moment includes its leave (or one already under way
            # when it was told, which the wait below cannot tell apart).
            told_at = time.monotonic()
            deadline = told_at + timeout_s
            self._stop_child(index, deadline)
            exited_at = time.monotonic()
            self._wait_rebalanced(remaining, told_at, deadline)
            self._log.info(
                "consumer process stopped",
                consumer_process=index,
                exitcode=self._children[index].exitcode,
                exit_s=round(exited_at - told_at, 3),
                rebalance_s=round(time.monotonic() - exited_at, 3),
            )
        self._discard_batches()
        self._drain_status()
        self._log.info("consumer processes stopped", **self._summary())

    def _stop_child(self, index: int, deadline: float) -> None:
        """Tell one child to stop; kill it if it has not exited by ``deadline``."""
        child = self._children[index]
        if child.is_alive():
            self._commands[index].put(("stop",))
        while child.is_alive() and time.monotonic() < deadline:
            self._discard_batches()  # a child blocked on a full queue must get through
            child.join(0.05)
        if child.is_alive():
            self._log.warning("consumer process did not stop in time; killed", pid=child.pid)
            child.kill()
            child.join(_KILL_WAIT_S)
            if child.is_alive():  # not even SIGKILL (uninterruptible I/O): left to the OS
                self._log.error("consumer process survived SIGKILL", pid=child.pid)

    def _wait_rebalanced(self, others: list[int], since: float | None, deadline: float) -> None:
        """Wait until no child still running is in a rebalance, each having been given its
        partitions after ``since`` (the rebalance of the last leave is complete), or until
        ``deadline``."""
        waiting = self._joining(others, since)
        while waiting and time.monotonic() < deadline:
            self._discard_batches()
            self._drain_status(wait_s=0.05)
            waiting = self._joining(others, since)
        if waiting:
            self._log.warning(
                "the group did not complete its rebalance before the next consumer process left",
                processes_waited_for=waiting,
            )

    def _joining(self, indexes: Iterable[int], since: float | None = None) -> list[int]:
        """The children (running) that, as last reported, are not members with partitions
        given after ``since``: not joined yet, revoked and not re-assigned, or older."""
        out = []
        for index in indexes:
            assigned_at, revoked_at = self._rebalanced.get(index, (None, None))
            if not self._children[index].is_alive():
                continue
            if (
                assigned_at is None
                or (revoked_at is not None and revoked_at > assigned_at)
                or (since is not None and assigned_at <= since)
            ):
                out.append(index)
        return out

    def stats(self) -> dict[str, Any]:
        self._drain_status()
        committed: dict[str, int] = {}
        lag: dict[str, int] = {}
        for child_stats in self._stats.values():
            committed.update(child_stats.get("committed", {}))
            lag.update(child_stats.get("lag", {}))
        depth = 0
        with contextlib.suppress(NotImplementedError):  # qsize() is missing on macOS
            depth = self._out.qsize()
        return {
            **self._totals(),
            "paused": any(bool(c.get("paused")) for c in self._stats.values()),
            "committed": committed,
            "lag": lag,
            "queue_depth": depth,
            "processes": self._processes,
        }

    def assignment(self) -> set[TopicPartitionKey]:
        self._drain_status()
        return set().union(*self._assigned.values()) if self._assigned else set()

    # ---- internals ------------------------------------------------------------------------

    def _drain_status(self, wait_s: float = 0.0) -> None:
        while True:
            try:
                message = self._status.get(timeout=wait_s) if wait_s else self._status.get_nowait()
            except queue.Empty:
                return
            wait_s = 0.0
            if message[0] == "stats":
                _, index, child_stats, assigned, rebalanced = message
                self._stats[index] = child_stats
                self._assigned[index] = {(str(t), int(p)) for t, p in assigned}
                self._rebalanced[index] = rebalanced
            elif message[0] == "commit":
                _, index, request_id, ok, keys = message
                if request_id in self._replies:
                    self._replies[request_id][index] = (
                        bool(ok),
                        {(str(t), int(p)) for t, p in keys},
                    )

    def _discard_batches(self) -> None:
        while True:
            try:
                self._out.get_nowait()
            except queue.Empty:
                return

    def _raise_if_unusable(self) -> None:
        if self._stopped:
            raise SourceClosedError("the source is stopped")
        if not self._children:
            raise SourceClosedError("the source is not started")
        dead = [c for c in self._children if not c.is_alive()]
        if dead:
            codes = {c.name: c.exitcode for c in dead}
            raise SourceClosedError(f"consumer processes exited: {codes}")

    def _summary(self) -> dict[str, int]:
        totals = self._totals()
        return {k: totals[k] for k in ("polled", "events", "dead_lettered", "batches")}

    def _totals(self) -> dict[str, int]:
        """Counters summed over the children's latest reports."""
        totals: Counter[str] = Counter()
        for child_stats in self._stats.values():
            for name in STAT_COUNTERS:
                totals[name] += int(child_stats.get(name, 0))
        return {name: totals[name] for name in STAT_COUNTERS}


def _resume(offsets: Mapping[TopicPartitionKey, int]) -> dict[TopicPartitionKey, int]:
    return {(str(t), int(p)): int(o) for (t, p), o in offsets.items()}
