"""When a full hand-off queue makes the consumer thread pause its partitions.

Pausing is for a learner that has *stopped* taking batches, not for one that is merely slower
than the consumer. Under steady backpressure the learner takes a batch every fraction of a
second while the batches already fetched wait their turn; pausing then buys nothing (nothing
more is fetched while the thread does not poll) and costs a refetch: librdkafka throws away
what it has prefetched for a partition when it is paused and fetches it again on resume, so a
confluent source that paused at every full second of backpressure fetched the rest of the
topic again and again (docs/performance.md, "Backpressure without refetching").

So the thread holds (waits for room, polling nothing) and pauses only when:

- the learner has taken nothing for ``stall_s`` (``consumer.poll_timeout_ms``): a stall, which
  may last (a checkpoint, an evaluation, a slow device); or
- the queue has stayed full for ``max_hold_s`` however steadily the learner takes batches, so
  the group protocol (a rebalance waiting on this member) is served at least that often.

Pure logic on the caller's clock; the consumer thread owns the instance.
"""

from __future__ import annotations

from typing import Final

# Longest hold while the learner keeps taking batches; a rebalance waits at most this long.
MAX_HOLD_S: Final = 10.0


class HoldBeforePause:
    """The time at which a continuously full queue should pause the partitions."""

    def __init__(self, stall_s: float, max_hold_s: float = MAX_HOLD_S) -> None:
        if stall_s <= 0 or max_hold_s <= 0:
            raise ValueError(f"hold times must be > 0, got {stall_s} and {max_hold_s}")
        self._stall_s = stall_s
        self._max_hold_s = max(max_hold_s, stall_s)
        self._full_since: float | None = None
        self._progress_at = 0.0

    @property
    def holding(self) -> bool:
        return self._full_since is not None

    def pause_at(self, now: float, progressed: bool) -> float:
        """Called on every pass while the queue is full; ``progressed``: the learner took a
        batch since the last call. Returns the time to pause at (``<= now``: pause now)."""
        if self._full_since is None:
            self._full_since = self._progress_at = now
        elif progressed:
            self._progress_at = now
        return min(self._progress_at + self._stall_s, self._full_since + self._max_hold_s)

    def clear(self) -> None:
        """The queue had room (nothing was left waiting): the next full queue starts afresh."""
        self._full_since = None
