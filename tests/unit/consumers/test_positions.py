"""Parsing --from / --until positions (pure)."""

from __future__ import annotations

import pytest

from consumers.positions import PositionError, format_ms, parse_position


def test_named_positions():
    assert parse_position("earliest").kind == "earliest"
    assert parse_position(" latest ").kind == "latest"


def test_iso_time_without_zone_is_utc_and_epoch_ms_is_taken_as_is():
    iso = parse_position("2026-01-02T03:04:05")
    assert iso.kind == "time"
    assert iso.time_ms == 1767323045000
    assert parse_position("2026-01-02T03:04:05Z").time_ms == iso.time_ms
    assert parse_position("2026-01-02T04:04:05+01:00").time_ms == iso.time_ms
    assert parse_position("1767323045000").time_ms == iso.time_ms
    assert format_ms(1767323045000) == "2026-01-02T03:04:05.000+00:00"


def test_partition_offset_lists():
    pos = parse_position("0:120, 1:98")
    assert pos.kind == "offsets"
    assert dict(pos.offsets) == {0: 120, 1: 98}
    with pytest.raises(PositionError, match="given twice"):
        parse_position("0:1,0:2")
    with pytest.raises(PositionError, match="not a position"):
        parse_position("0:120", allow_offsets=False)


@pytest.mark.parametrize("text", ["yesterday", "12:00:00x", "", "1700000000"])
def test_bad_positions_say_what_is_expected(text):
    with pytest.raises(PositionError) as err:
        parse_position(text)
    assert "\n" not in str(err.value)
