"""``supcon-stream bench throughput`` on a tiny stream: every stage runs against its own
broker and redis-server and the report holds every figure. Speeds are not asserted (the bench
measures them; tests do not time anything)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(560)
def test_bench_throughput_small_run_writes_both_reports(tmp_path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "bench",
            "throughput",
            "--events",
            "2000",
            "--bank-items",
            "3000",
            "--learner-events",
            "1000",
            "--latency-rate",
            "200",
            "--latency-seconds",
            "2",
            "--ingest-rounds",
            "2",
            "--ingest-events",
            "3000",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=500,  # both clients, three restarts
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[bench" in proc.stderr  # progress lines
    report = json.loads((out / "throughput.json").read_text())
    results = report["results"]
    assert set(results["clients"]) == {"kafka-python", "confluent"}
    for client in results["clients"].values():  # both clients, side by side
        # The ingest rounds read 3000 events of the topic, end-to-end about its first 2000.
        for stage in ("raw_consume", "parse_floor", "ingest_only"):
            assert client[stage]["events"] == 3000, stage
            assert client[stage]["events_per_s"] > 0
        # The learner stops after the micro-batch that reaches --max-events (at most one
        # default batch of 32 beyond it; the topic holds more).
        assert 2000 <= client["end_to_end"]["events"] < 2000 + 32
        assert client["end_to_end"]["events_per_s"] > 0
        for stage in ("raw_consume", "parse_floor", "ingest_only"):  # two rounds, the median
            rounds = client[stage]["rounds"]
            assert len(rounds) == 2, stage
            assert client[stage]["events_per_s"] == min(rounds), stage
    assert results["learner_only"]["events_per_s"] > 0
    assert results["decode"]["decode_batch_us_per_event"] > 0
    assert results["decode"]["decode_batch_reference_path_us_per_event"] > 0
    assert results["memory_bank"]["bank_items"] == 3000
    assert results["restart"]["bank_items"] == 3000
    assert results["restart"]["seconds"] > 0
    assert len(results["restart"]["runs"]) == 3
    assert results["latency"]["events"] > 0
    assert results["latency"]["p50_ms"] <= results["latency"]["p99_ms"]
    assert set(report["ratios"]["targets"]) == {
        "confluent ingest / parse floor >= 0.8",
        "confluent ingest / kafka-python ingest >= 3",
        "kafka-python end_to_end / min(ingest, learner) >= 0.8",
        "confluent end_to_end / min(ingest, learner) >= 0.8",
        "replay+search <= 10% of step",
        "restart <= 5 s in every run",
    }
    assert report["machine"]["cpu_count"] >= 1
    markdown = (out / "throughput.md").read_text()
    assert "| raw consume" in markdown
    assert "GPU" in markdown
    # The one-line JSON on stdout is the ratios.
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == report["ratios"]
