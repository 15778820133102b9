"""compare's split of a user's stream (pure)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from pipeline.devtools.bench.compare import LabeledStream, ProgressBar, check_stream, make_split
from pipeline.devtools.bench.forgetting import TEST_FRACTION, RunResult
from pipeline.exceptions import ConfigError


def _stream(tasks: bool = True) -> LabeledStream:
    labels = [name for name in ("cat", "dog", "eel", "fox") for _ in range(40)]
    x = np.arange(len(labels) * 3, dtype=np.float32).reshape(len(labels), 3)
    task = [str(i // 80) for i in range(len(labels))] if tasks else None
    return LabeledStream("s", x, labels, task, {})


def test_split_is_stratified_keeps_stream_order_and_cuts_at_task_changes():
    split = make_split(_stream(), seed=3)
    assert split.class_names == ("cat", "dog", "eel", "fox")
    assert split.input_dim == 3
    assert len(split.test_y) == pytest.approx(TEST_FRACTION * 160, abs=4)
    assert np.bincount(split.test_y.numpy()).tolist() == [12, 12, 12, 12]
    assert split.task_names == ("0", "1")
    order = np.concatenate(split.segments)
    assert order.tolist() == list(range(len(split.train_y)))  # recorded order, not shuffled
    # The features follow their rows: row i of the file has features 3i..3i+2.
    assert (np.diff(split.train_x[:, 0]) > 0).all()
    assert set(split.train_y[split.segments[0]].tolist()) == {0, 1}
    assert split.class_task == {"0": "0", "1": "0", "2": "1", "3": "1"}


def test_a_stream_without_tasks_is_one_segment_and_seeds_change_the_hold_out():
    a, b = make_split(_stream(tasks=False), 0), make_split(_stream(tasks=False), 1)
    assert a.task_names == ("0",)
    assert not np.array_equal(a.test_x.numpy(), b.test_x.numpy())


def test_too_little_data_is_one_clear_error():
    tiny = LabeledStream("t.npz", np.zeros((10, 2), np.float32), ["a"] * 10, None, {})
    with pytest.raises(ConfigError, match="at least 20 events of 2 classes"):
        check_stream(tiny)


def test_progress_bar_writes_one_line_per_run_when_not_a_terminal():
    out = io.StringIO()
    bar = ProgressBar(2, out)
    run = RunResult("supcon", 0, 20, 0.9, 0.1, 0.8, 0.7, 0.9, 0.05, [], 1.0)
    bar.update(run)
    bar.update(run)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[1].startswith("compare [########################] 2/2 runs")


def test_a_built_in_scenario_streams_in_its_own_order_with_its_tasks() -> None:
    from pipeline.devtools.bench.compare import load_scenario_stream

    stream = load_scenario_stream("blurry-digits")
    assert stream.name == "blurry-digits"
    assert stream.x.shape == (1797, 64)
    assert stream.tasks is not None
    assert sorted(set(stream.tasks)) == ["0", "1", "2", "3", "4"]
    # Blurred boundaries: some events of a task arrive inside a neighbour's span.
    assert stream.tasks[:400].count("1") > 0
    split = make_split(stream, 0)
    assert split.n_classes == 10
    assert set(split.task_names) == {"0", "1", "2", "3", "4"}
