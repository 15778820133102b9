"""The trained-id ledger and the health board, without any broker or Redis."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.learner.health import HealthBoard, health_path, healthy, read_status
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


def test_health_board_reports_outage_and_recovery(tmp_path: Path) -> None:
    board = HealthBoard("l1", health_path(tmp_path / "l1"))
    redis = board.reporter("redis")
    board.start(every_s=0.05)
    board.set_state("running")
    assert board.snapshot()["status"] == "running"
    redis("Connection refused")
    snap = json.loads(health_path(tmp_path / "l1").read_text())
    assert snap["status"] == "degraded"
    assert snap["components"]["redis"]["up"] is False
    assert "refused" in snap["components"]["redis"]["error"]
    assert not healthy(read_status(tmp_path, 30.0))
    redis(None)
    snap = board.snapshot()
    assert snap["status"] == "running"
    assert snap["components"]["redis"]["outages"] == 1
    assert snap["components"]["redis"]["last_outage_s"] >= 0
    assert healthy(read_status(tmp_path, 30.0))
    board.close()
    assert read_status(tmp_path, 30.0)["l1"]["status"] == "stopped"


def _backdate(path: Path, seconds: float) -> None:
    """Make a health file look last written ``seconds`` ago (no sleep, so no race with load)."""
    snap = json.loads(path.read_text())
    snap["updated"] = time.time() - seconds
    path.write_text(json.dumps(snap))


def test_stale_or_missing_health_is_not_healthy(tmp_path: Path) -> None:
    board = HealthBoard("old", health_path(tmp_path / "old"))
    board.set_state("running")
    _backdate(health_path(tmp_path / "old"), 60.0)
    report = read_status(tmp_path, stale_after_s=30.0)
    assert report["old"]["status"] == "unresponsive"
    assert read_status(tmp_path, 30.0, ["ghost"])["ghost"]["status"] == "unknown"
    assert not healthy(read_status(tmp_path / "empty", 30.0))


def test_staleness_compares_the_unrounded_age(tmp_path: Path) -> None:
    # The age is shown rounded to 0.1 s; 0.04 s would round to 0.0 and hide a stale file.
    board = HealthBoard("hung", health_path(tmp_path / "hung"))
    board.set_state("running")
    _backdate(health_path(tmp_path / "hung"), 0.04)
    report = read_status(tmp_path, stale_after_s=0.01)
    assert report["hung"]["status"] == "unresponsive"
    assert report["hung"]["age_s"] == round(report["hung"]["age_s"], 1)  # shown rounded
    assert read_status(tmp_path, stale_after_s=3600.0)["hung"]["status"] == "running"


def test_healthz_endpoint(tmp_path: Path) -> None:
    board = HealthBoard("web", None)
    kafka = board.reporter("kafka_consumer")
    board.start(every_s=1.0, http_port=0)
    try:
        board.set_state("running")
        url = f"http://127.0.0.1:{board.http_port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200
            assert json.loads(resp.read())["status"] == "running"
        kafka("no connection to any broker")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=5)
        assert err.value.code == 503
        assert json.loads(err.value.read())["components"]["kafka_consumer"]["up"] is False
    finally:
        board.close()
