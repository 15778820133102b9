"""The GPU check and the GPU profile, run on the CPU as CI can: every stage, small sizes.

They are meant for a CUDA host (``bench/gpu_check.py``, ``bench/gpu_profile.py``); these runs
prove the scripts themselves (stack, stages, report), so that a lent GPU is not spent on a
broken script.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=280, check=False
    )


def test_gpu_check_dry_run_passes_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = _run(
        "bench/gpu_check.py", "--dry-run", "--events", "2000", "--processes", "2",
        "--learner-batches", "8", "--out", str(out), "--workdir", str(tmp_path / "stack"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failures"] == []
    assert report["cuda_tests"]["returncode"] == 0
    assert [r["batch_size"] for r in report["learner_only"]] == [32, 256, 1024]
    assert all(r["events_per_s"] > 0 for r in report["learner_only"])
    assert {r["kind"] for r in report["index"]} == {"faiss-gpu", "torch"}
    assert [r["client"] for r in report["end_to_end"]] == ["kafka-python", "confluent"]
    assert all(r["events"] == 2000 for r in report["end_to_end"])


def test_gpu_profile_on_the_cpu_writes_a_report_per_batch_size(tmp_path: Path) -> None:
    done = _run(
        "bench/gpu_profile.py", "--device", "cpu", "--batches", "3", "--batch-sizes", "16,64",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for size in (16, 64):
        text = (tmp_path / f"profile-{size}.txt").read_text()
        assert f"batch size {size}, device cpu, 3 batches" in text
        assert "process_batch" in text  # cProfile saw the learner's own functions
        assert "aten::" in text  # and the torch profiler its operators


def test_step_ab_counts_fewer_operators_with_fused_adam() -> None:
    done = _run("bench/step_ab.py", "--rounds", "1", "--steps", "6")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["fused"]["ms_per_step_median"] > 0
    # Fused Adam updates every parameter in one operator and skips a non-finite step in it,
    # where the unfused step clones and restores each parameter and moment.
    assert report["fused"]["top_level_ops_per_step"] < report["unfused"]["top_level_ops_per_step"]
