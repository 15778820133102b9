"""``supcon-stream demo --data FILE``: the three learners through the product on a user's own
labeled file, on a devstack of its own (real broker, real redis-server, free loopback ports)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_tools import run_cli

from pipeline.devtools.devstack import free_port

pytestmark = pytest.mark.e2e

FEATURES = 16
PER_CLASS = 120


def _stream(path):
    """Four well-separated Gaussian classes in two tasks of two, task by task, as an NPZ."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0.0, 4.0, size=(4, FEATURES))
    x, y, task = [], [], []
    for t, classes in enumerate(((0, 1), (2, 3))):
        labels = np.repeat(classes, PER_CLASS)
        rng.shuffle(labels)
        x.append(centres[labels] + rng.normal(size=(len(labels), FEATURES)))
        y.append(labels)
        task.append(np.full(len(labels), t))
    np.savez(
        path, X=np.concatenate(x).astype(np.float32), y=np.concatenate(y), task=np.concatenate(task)
    )
    return 4 * PER_CLASS


def _own_stack(tmp_path) -> list[str]:
    pairs = [
        f"devstack.dir={tmp_path / 'stack'}",
        f"devstack.broker_port={free_port()}",
        f"devstack.redis_port={free_port()}",
    ]
    return [arg for pair in pairs for arg in ("--set", pair)]


def test_the_demo_runs_three_learners_on_a_labeled_file_of_another_width(tmp_path):
    data = tmp_path / "stream.npz"
    events = _stream(data)
    out = tmp_path / "out"
    result = run_cli(
        "demo", "--data", str(data), "--out", str(out), *_own_stack(tmp_path), timeout=400
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["scenario"] == "stream.npz"
    assert list(report["learners"]) == ["ce", "ce_replay", "supcon"]
    for name, row in report["learners"].items():
        # Every event of the file reached every learner and none was refused: the learners
        # took the file's 16 features (the default model.input_dim is 64).
        assert row["events"] == events, name
        assert row["dead_lettered"] == 0, name
        assert row["trained"] + row["held_out"] == events, name
        assert set(row["per_task_accuracy"]) == {"0", "1"}, name
    assert "scenario: stream.npz" in result.stdout


def test_a_width_the_learners_would_refuse_fails_before_anything_starts(tmp_path):
    data = tmp_path / "stream.npz"
    _stream(data)
    result = run_cli(
        "demo", "--data", str(data), *_own_stack(tmp_path), "--set", "model.input_dim=64"
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "16 features per event but model.input_dim is 64" in lines[0]
    assert not (tmp_path / "stack").exists()  # no broker, no redis-server was started


def test_an_unknown_source_is_a_one_line_error(tmp_path):
    result = run_cli("demo", "--data", str(tmp_path / "missing.npz"), *_own_stack(tmp_path))
    assert result.returncode == 2
    assert "neither a built-in scenario" in result.stderr
