"""Crash recovery with real processes: SIGKILL at random moments during a replay.

The full-size drill (20k events, 10 kills) is ``bench/kill9.py``; this is the same drill with
small numbers so that it runs in ``make test``.
"""

from __future__ import annotations

import pytest

from pipeline.chaos import KillDrill, drill_pairs, run_kill_drill

pytestmark = pytest.mark.e2e


def test_sigkill_at_random_moments_loses_nothing(bootstrap, redis_url, unique, tmp_path):
    pairs = [*drill_pairs(bootstrap, redis_url, f"k9{unique}", tmp_path), "bank.capacity=300"]
    drill = KillDrill(events=1500, kills=3, rate=150.0, seed=7, max_delay_s=4.0)
    report = run_kill_drill(drill, pairs, tmp_path / "logs")
    assert report.produced == 1500
    assert report.never_trained == 0, report.as_dict()
    assert report.probes_trained == 0
    assert report.committed == report.produced, report.as_dict()
    assert report.bank_duplicate_ids == 0
    assert report.bank_untrained_ids == 0
    assert 0 < report.bank_items <= 300
    assert report.ok
