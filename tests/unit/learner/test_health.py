"""The health board, health.json staleness and /healthz, without any broker or Redis."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.exceptions import SupconStreamError
from pipeline.learner.health import HealthBoard, health_path, healthy, read_status


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
    assert read_status(tmp_path, 30.0)["l1"]["failure"] is None


def test_a_failed_learner_keeps_what_stopped_it(tmp_path: Path) -> None:
    board = HealthBoard("l2", health_path(tmp_path / "l2"))
    board.set_state("running")
    board.close("failed", "SourceClosedError: the kafka consumer thread died")
    report = read_status(tmp_path, 30.0)
    assert report["l2"]["status"] == "failed"
    assert report["l2"]["failure"] == "SourceClosedError: the kafka consumer thread died"
    assert not healthy(report)


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


def test_busy_healthz_port_is_one_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        board = HealthBoard("l", tmp_path / "health.json")
        with pytest.raises(SupconStreamError, match=rf"health.http_port: .*:{port}"):
            board.start(60.0, "127.0.0.1", port)
        board.close()


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_healthz_turns_503_when_the_loop_stops_ticking() -> None:
    clock = _Clock()
    board = HealthBoard("stuck", None, stale_after_s=10.0, clock=clock)
    board.start(every_s=60.0, http_port=0)
    try:
        board.set_state("running")
        url = f"http://127.0.0.1:{board.http_port}/healthz"
        clock.now += 9.0
        assert _get(url)[0] == 200
        assert board.live()
        clock.now += 2.0  # 11 s without a tick: the loop is stuck
        code, body = _get(url)
        assert code == 503
        assert json.loads(body)["status"] == "unresponsive"
        assert not board.live()
        board.tick()
        assert _get(url)[0] == 200
    finally:
        board.close()


def test_readyz_waits_for_every_readiness_part() -> None:
    clock = _Clock()
    board = HealthBoard("r", None, stale_after_s=10.0, clock=clock)
    board.start(every_s=60.0, http_port=0)
    url = f"http://127.0.0.1:{board.http_port}/readyz"
    try:
        board.set_state("running")
        board.mark_ready("checkpoint_restored")
        board.mark_ready("bank_loaded")
        code, body = _get(url)
        assert code == 503
        assert json.loads(body)["partitions_assigned"] is False
        board.mark_ready("partitions_assigned")
        assert _get(url)[0] == 200
        clock.now += 11.0  # a stuck loop is not ready either
        assert _get(url)[0] == 503
    finally:
        board.close()


def test_metrics_path_serves_the_renderer_and_404_without_one() -> None:
    board = HealthBoard("m", None)
    board.start(every_s=60.0, http_port=0)
    url = f"http://127.0.0.1:{board.http_port}/metrics"
    try:
        assert _get(url)[0] == 404
        board.serve_metrics(lambda: b"supcon_x 1.0\n")
        assert _get(url) == (200, b"supcon_x 1.0\n")
    finally:
        board.close()


def test_a_reported_change_is_on_file_when_the_report_returns_despite_the_writer(
    tmp_path: Path,
) -> None:
    """The background writer rewrites the file constantly; a change's own write must not be
    overtaken by a write of the state before it (they share the temp file)."""
    board = HealthBoard("l3", health_path(tmp_path / "l3"))
    redis = board.reporter("redis")
    board.set_state("running")
    board.start(every_s=0.0)  # write as fast as it can
    try:
        for _ in range(200):
            redis("Connection refused")
            assert json.loads(health_path(tmp_path / "l3").read_text())["status"] == "degraded"
            redis(None)
            assert json.loads(health_path(tmp_path / "l3").read_text())["status"] == "running"
    finally:
        board.close()
