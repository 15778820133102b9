"""When a full hand-off queue pauses the partitions: a stall, or a hold that ran out."""

from __future__ import annotations

import pytest

from consumers.backpressure import HoldBeforePause


def test_a_learner_that_keeps_taking_batches_is_not_paused_until_the_hold_runs_out() -> None:
    hold = HoldBeforePause(stall_s=1.0, max_hold_s=10.0)
    assert hold.pause_at(100.0, progressed=False) == 101.0
    # A batch taken every 0.5 s moves the stall deadline along...
    for step in range(1, 19):
        now = 100.0 + 0.5 * step
        assert hold.pause_at(now, progressed=True) == min(now + 1.0, 110.0)
    # ... but not past the longest hold, so the group protocol is still served.
    assert hold.pause_at(109.5, progressed=True) == 110.0
    assert hold.pause_at(110.2, progressed=True) == 110.0


def test_a_stalled_learner_pauses_after_the_stall_time() -> None:
    hold = HoldBeforePause(stall_s=1.0, max_hold_s=10.0)
    hold.pause_at(0.0, progressed=False)
    assert hold.pause_at(0.4, progressed=True) == 1.4
    # Wake-ups without a batch taken (a commit request, say) do not extend the hold.
    assert hold.pause_at(0.9, progressed=False) == 1.4
    assert hold.pause_at(1.5, progressed=False) == 1.4


def test_clear_starts_the_next_full_queue_afresh() -> None:
    hold = HoldBeforePause(stall_s=1.0, max_hold_s=3.0)
    hold.pause_at(0.0, progressed=False)
    assert hold.holding
    hold.clear()
    assert not hold.holding
    assert hold.pause_at(50.0, progressed=False) == 51.0
    assert hold.pause_at(52.5, progressed=True) == 53.0  # 50 + 3: the new hold's limit


def test_the_hold_is_never_shorter_than_the_stall_time() -> None:
    hold = HoldBeforePause(stall_s=2.0, max_hold_s=0.5)
    assert hold.pause_at(0.0, progressed=False) == 2.0


@pytest.mark.parametrize(("stall", "longest"), [(0.0, 1.0), (1.0, 0.0), (-1.0, 5.0)])
def test_non_positive_times_are_refused(stall: float, longest: float) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        HoldBeforePause(stall, longest)
