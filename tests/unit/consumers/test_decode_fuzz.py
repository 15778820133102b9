"""Fuzz the decoder with hostile payloads: each one gets exactly the reason it deserves."""

from __future__ import annotations

import orjson
from hostile import DIM, MAX_EVENT_BYTES, hostile_stream
from hypothesis import given, settings

from consumers.decode import REASONS, dead_letter_payload, decode_batch
from consumers.events import SourceRecord


@settings(max_examples=200, deadline=None)
@given(hostile_stream("d"))
def test_every_hostile_payload_is_rejected_with_its_reason(
    items: list[tuple[bytes, str | None]],
) -> None:
    valid = [value for value, reason in items if reason is None]
    if valid:  # the same id again in this batch
        items = [*items, (valid[0], "duplicate_id")]
    # A valid payload whose id came earlier (as a valid event) is a duplicate too.
    expected: list[str | None] = []
    seen: set[str] = set()
    for value, given_reason in items:
        reason = given_reason
        if reason is None or reason == "duplicate_id":
            event_id = orjson.loads(value)["id"]
            reason = "duplicate_id" if event_id in seen else None
            seen.add(event_id)
        expected.append(reason)
    records = [SourceRecord("events", 0, i, v, 0) for i, (v, _) in enumerate(items)]

    batch = decode_batch(records, DIM, MAX_EVENT_BYTES)

    assert len(batch) + len(batch.dead_letters) == batch.consumed == len(items)
    got = {dl.source.offset: dl.reason for dl in batch.dead_letters}
    want = {i: r for i, r in enumerate(expected) if r is not None}
    assert got == want
    assert set(got.values()) <= REASONS.keys()
    assert len(batch.labels) == len(batch.ids) == batch.features.shape[0]
    for dl in batch.dead_letters:
        letter = orjson.loads(dead_letter_payload(dl))
        assert letter["reason"] == dl.reason
        assert letter["source"]["offset"] == dl.source.offset
        assert len(dead_letter_payload(dl)) < 512 * 1024  # fits one producer request
