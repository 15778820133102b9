"""Playback without a broker: source resolution errors and the token bucket's pacing."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.exceptions import ConfigError
from pipeline.streams.playback import TokenBucket, run_replay


def test_unknown_source_is_a_config_error(tmp_path: Path) -> None:
    # Never connected: the source is resolved before any broker is needed.
    settings = Settings.model_validate({"kafka": {"bootstrap_servers": "127.0.0.1:1"}})
    with pytest.raises(ConfigError, match="neither a built-in scenario"):
        run_replay(settings, "no-such-scenario")
    with pytest.raises(ConfigError, match="neither a built-in scenario"):
        run_replay(settings, str(tmp_path / "missing.jsonl"))


def test_token_bucket_closed_form() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(rate=10.0, burst=1.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        bucket.acquire()
    # One token at start, then one every 0.1 s.
    assert slept == pytest.approx([0.1, 0.1, 0.1, 0.1])
    now[0] += 10.0  # idle: the bucket refills only up to the burst
    bucket.acquire()
    bucket.acquire()
    assert len(slept) == 5
