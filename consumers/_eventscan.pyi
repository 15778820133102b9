"""Types of the native scanner (consumers/_eventscan.c; what it returns is described there)."""

from collections.abc import Sequence
from typing import Any

from consumers.events import SourceRecord, TopicPartitionKey

def scan(
    records: Sequence[SourceRecord], input_dim: int, max_event_bytes: int, /
) -> tuple[
    dict[TopicPartitionKey, int],
    bytearray,
    list[str],
    list[str | None],
    list[str | None],
    bytearray,
    list[SourceRecord],
    list[int],
    list[int],
]: ...
def message_runs(
    messages: Sequence[Any], record_type: type[SourceRecord], /
) -> list[tuple[TopicPartitionKey, list[SourceRecord]]]: ...
