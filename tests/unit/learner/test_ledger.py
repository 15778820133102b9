"""The trained-id ledger (append, torn lines, reopen), without any broker or Redis."""

from __future__ import annotations

from pathlib import Path

from pipeline.learner.ledger import TrainedLedger, iter_ledger, ledger_path, read_ledger


def test_ledger_counts_duplicates_and_survives_reopen(tmp_path: Path) -> None:
    path = ledger_path(tmp_path)
    ledger = TrainedLedger(path)
    ledger.record(1, ["a", "b"])
    ledger.record(2, ["c\nwith newline"])
    ledger.record(3, [])  # nothing trained: no line
    ledger.sync()
    ledger.close()
    again = TrainedLedger(path)  # a restarted learner appends
    again.record(4, ["b", "d"])
    again.close()
    report = read_ledger(path)
    assert report.distinct == 4
    assert report.trainings == 5
    assert report.duplicate_trainings == 1
    assert report.counts["c\nwith newline"] == 1
    assert report.never_trained({"a", "b", "x"}) == {"x"}
    assert [step for step, _ in iter_ledger(path)] == [1, 2, 4]


def test_torn_last_line_is_ignored_and_appends_continue(tmp_path: Path) -> None:
    path = ledger_path(tmp_path)
    ledger = TrainedLedger(path)
    ledger.record(1, ["a"])
    ledger.close()
    with path.open("ab") as fh:
        fh.write(b'{"step": 2, "ids": ["tor')  # a write cut by a machine crash
    assert read_ledger(path).distinct == 1
    ledger = TrainedLedger(path)
    ledger.record(3, ["z"])
    ledger.close()
    assert set(read_ledger(path).counts) == {"a", "z"}


def test_missing_ledger_reads_empty(tmp_path: Path) -> None:
    assert read_ledger(tmp_path / "none.jsonl").trainings == 0
