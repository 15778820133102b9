"""``supcon-stream bench forgetting`` from the command line, on a tiny grid."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def _bench_forgetting(*args: str, timeout: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "bench", "forgetting", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_bench_forgetting_writes_table_json_and_plot(tmp_path):
    result = _bench_forgetting(
        "--seeds",
        "1",
        "--memories",
        "20",
        "--methods",
        "ce_finetune,supcon",
        "--set",
        "train.iters_per_batch=1",
        "--out",
        str(tmp_path),
        "--log-level",
        "WARNING",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary["final_accuracy"]) == {"ce_finetune@0", "supcon@20"}
    assert summary["final_accuracy"]["supcon@20"] > summary["final_accuracy"]["ce_finetune@0"]
    for name in ("forgetting.md", "forgetting.json", "forgetting.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_bench_forgetting_rejects_an_unknown_method(tmp_path):
    result = _bench_forgetting("--methods", "sgd", "--out", str(tmp_path), timeout=120)
    assert result.returncode == 2
    assert "--methods" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
