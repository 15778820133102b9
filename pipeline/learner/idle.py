"""Waiting for the group join, then for batches: when a learner with nothing to do finishes.

Idle time counts from the group join, because joining can take seconds, and then from the end
of the last batch's processing: time spent training is not idle, however slow the machine. A
learner finishes when idle only with ``exit_when_idle_s`` (``--exit-when-idle``); otherwise it
waits for events until stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import structlog

from pipeline.exceptions import SupconStreamError

log = structlog.get_logger(__name__)

JOIN_TIMEOUT_S = 120.0


class IdleWatch:
    """Tracks the group join and the batches of one run; times are passed in by the caller.

    ``assignment`` gives the partitions the source owns so far (``source.assignment``).
    ``first_batch_at`` / ``last_batch_at`` give the run's active span for its summary (times
    of arrival); the idle clock restarts at ``batch_processed``.
    """

    def __init__(
        self,
        assignment: Callable[[], Collection[object]],
        topic: str,
        exit_when_idle_s: float | None,
        now: float,
        join_timeout_s: float = JOIN_TIMEOUT_S,
    ) -> None:
        self._assignment = assignment
        self.topic = topic
        self.exit_when_idle_s = exit_when_idle_s
        self.join_timeout_s = join_timeout_s
        self.started = now
        self.joined = False
        self.first_batch_at: float | None = None
        self.last_batch_at = now
        self._idle_since = now

    def batch_arrived(self, now: float) -> None:
        self.last_batch_at, self.joined, self._idle_since = now, True, now
        if self.first_batch_at is None:
            self.first_batch_at = now

    def batch_processed(self, now: float) -> None:
        """The batch is trained on, emitted and checkpointed: idle time starts only now."""
        self._idle_since = now

    def should_finish(self, now: float) -> bool:
        """After an empty ``get``: True once idle for ``exit_when_idle_s`` since the last batch
        was processed (or since the join, before any batch).

        Raises SupconStreamError when, with ``exit_when_idle_s`` set, no partition is
        assigned ``join_timeout_s`` after the start: the topic probably does not exist.
        """
        if not self.joined:
            self.joined = bool(self._assignment())
            self._idle_since = now
            if self.exit_when_idle_s is not None and now - self.started > self.join_timeout_s:
                raise SupconStreamError(
                    f"no partitions of {self.topic} assigned within "
                    f"{self.join_timeout_s:.0f} s; does the topic exist?"
                )
            return False
        idle_s = now - self._idle_since
        if self.exit_when_idle_s is not None and idle_s >= self.exit_when_idle_s:
            log.info("idle; finishing", idle_s=round(idle_s, 1))
            return True
        return False

    @property
    def active_s(self) -> float:
        """First batch received → last batch received (0 when none came)."""
        if self.first_batch_at is None:
            return 0.0
        return self.last_batch_at - self.first_batch_at
