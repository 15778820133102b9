"""ProcessBatchSource without a broker: argument checks and the not-started state."""

from __future__ import annotations

import pytest

from consumers.exceptions import SourceClosedError
from consumers.process_source import ProcessBatchSource
from consumers.source import SourceConfig

CONFIG = SourceConfig(topic="t", group_id="g", input_dim=4, dlq_topic="t.dlq")


def test_rejects_zero_processes() -> None:
    with pytest.raises(ValueError, match="processes"):
        ProcessBatchSource(CONFIG, {"bootstrap_servers": ["127.0.0.1:1"]}, 0)


def test_not_started_source_refuses_work_and_reports_empty_state() -> None:
    source = ProcessBatchSource(CONFIG, {"bootstrap_servers": ["127.0.0.1:1"]}, 2)
    with pytest.raises(SourceClosedError, match="not started"):
        source.get(0.01)
    with pytest.raises(SourceClosedError, match="not started"):
        source.commit({("t", 0): 5})
    assert source.assignment() == set()
    stats = source.stats()
    assert stats["processes"] == 2
    assert stats["events"] == 0
    assert stats["committed"] == {}
