"""Pacing of topic playback (pure, with an injected clock)."""

from __future__ import annotations

import orjson

from consumers.slice import SliceRecord
from pipeline.streams.topic_playback import SpeedPacer, event_time_ms


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        self.now += seconds


def test_speed_holds_each_record_until_its_scaled_event_time():
    clock = FakeClock()
    pacer = SpeedPacer(10.0, clock=clock, sleep=clock.sleep)
    for ts in (1_000, 1_000, 3_000, 21_000):
        pacer.wait(ts)
    # 20 s of event time at 10x: 2 s of wall time, slept only where a record was early.
    assert clock.slept == [0.2, 1.8]
    assert clock.now - 100.0 == 2.0


def test_a_late_sender_does_not_sleep_to_catch_up():
    clock = FakeClock()
    pacer = SpeedPacer(1.0, clock=clock, sleep=clock.sleep)
    pacer.wait(0)
    clock.now += 5.0  # the producer stalled for 5 s
    pacer.wait(1_000)  # due at +1 s, now +5 s: sent at once, no sleep
    pacer.wait(6_000)  # due at +6 s: waits the remaining 1 s, not 5
    assert clock.slept == [1.0]


def test_event_time_prefers_the_events_ts_field_when_asked():
    rec = SliceRecord(0, 7, b"k", orjson.dumps({"id": "a", "ts": 1234}), 999)
    assert event_time_ms(rec, "record") == 999
    assert event_time_ms(rec, "event") == 1234
    bad = SliceRecord(0, 8, None, b"not json", 555)
    assert event_time_ms(bad, "event") == 555
