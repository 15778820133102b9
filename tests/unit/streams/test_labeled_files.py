"""Labeled files (CSV, NPZ, JSONL, Parquet) loaded for playback, and their errors."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.exceptions import ConfigError
from pipeline.streams.files import load_labeled_file
from pipeline.streams.playback import open_source


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_csv_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    write_csv(
        path,
        [
            {"id": "a", "x1": 0.5, "note": "hi", "x2": 1, "label": 3, "task": 0},
            {"id": "b", "x1": -1.25, "note": "yo", "x2": 2, "label": "cat", "task": 1},
            {"id": "c", "x1": 0.0, "note": "", "x2": 3, "label": 3, "task": 1},
        ],
    )
    scenario = load_labeled_file(path)
    assert scenario.name == "data.csv"
    assert (scenario.input_dim, scenario.n_events) == (2, 3)
    assert scenario.classes == (3, "cat")
    assert scenario.tasks == ((3,), ("cat", 3))
    assert list(scenario) == [
        {"id": "a", "features": [0.5, 1.0], "label": 3, "task": 0},
        {"id": "b", "features": [-1.25, 2.0], "label": "cat", "task": 1},
        {"id": "c", "features": [0.0, 3.0], "label": 3, "task": 1},
    ]


def test_csv_custom_columns_without_task_or_id(tmp_path: Path) -> None:
    path = tmp_path / "plain.csv"
    write_csv(path, [{"y": 1, "a": 0.1, "b": 0.2}, {"y": 2, "a": 0.3, "b": 0.4}])
    scenario = load_labeled_file(path, label_column="y")
    assert scenario.tasks == ((1, 2),)
    assert list(scenario) == [
        {"id": "plain-0", "features": [0.1, 0.2], "label": 1},
        {"id": "plain-1", "features": [0.3, 0.4], "label": 2},
    ]


def test_npz_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    features = np.arange(12, dtype=np.float32).reshape(4, 3) / 4
    np.savez(path, X=features, y=np.array([0, 1, 1, 0]), task=np.array([0, 0, 1, 1]))
    scenario = load_labeled_file(path)
    events = list(scenario)
    assert (scenario.input_dim, scenario.n_events, scenario.tasks) == (3, 4, ((0, 1), (1, 0)))
    assert [e["features"] for e in events] == features.astype(np.float64).tolist()
    assert [(e["id"], e["label"], e["task"]) for e in events] == [
        ("data-0", 0, 0),
        ("data-1", 1, 0),
        ("data-2", 1, 1),
        ("data-3", 0, 1),
    ]
    other = tmp_path / "names.npz"
    np.savez(other, features=features, labels=np.array(["a", "b", "a", "b"]))
    assert [e["label"] for e in load_labeled_file(other)] == ["a", "b", "a", "b"]


def test_jsonl_features_list(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    lines = [
        {"id": 1, "features": [0.1, 0.2], "label": "x", "task": "t0"},
        {"id": 2, "features": [0.3, 0.4], "label": "y", "task": "t1"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    scenario = load_labeled_file(path)
    assert scenario.tasks == (("x",), ("y",))
    assert list(scenario)[1] == {"id": "2", "features": [0.3, 0.4], "label": "y", "task": "t1"}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("nolabel.csv", "id,x\na,1\n", r"no label column 'label'; columns: id, x"),
        ("nofeat.csv", "label,name\n1,abc\n", "no numeric feature columns"),
        ("gap.csv", "label,x,y\n1,0.5,1\n2,,1\n", r"row 2 has no value in feature column 'x'"),
        ("nan.csv", "label,x\n1,nan\n", "row 1 has a feature that is not a finite number"),
        ("badlabel.csv", "label,x\n1,0.5\n,0.2\n", r"row 2: 'label' is '', not an integer"),
        ("empty.csv", "label,x\n", "holds no labeled rows"),
        ("bad.jsonl", '{"label": 1, "x": 1}\n[1]\n', "line 2 is not a JSON object"),
        ("data.txt", "label,x\n1,2\n", "unsupported file type '.txt'"),
        ("broken.npz", "not a zip", "cannot read labeled file"),
    ],
)
def test_labeled_file_errors(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_labeled_file(path)


def test_npz_missing_arrays_and_lengths(tmp_path: Path) -> None:
    path = tmp_path / "nolabels.npz"
    np.savez(path, X=np.zeros((2, 2)))
    with pytest.raises(ConfigError, match=r"needs a feature array.*it holds X"):
        load_labeled_file(path)
    np.savez(path, X=np.zeros((2, 2)), y=np.zeros(3))
    with pytest.raises(ConfigError, match="label holds 3 values for 2 feature rows"):
        load_labeled_file(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read labeled file .*missing\.csv"):
        load_labeled_file(tmp_path / "missing.csv")


def test_parquet_without_pyarrow_or_pandas_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    for module in ("pyarrow", "pyarrow.parquet", "pandas"):
        monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    with pytest.raises(ConfigError, match="Parquet needs the pyarrow package"):
        load_labeled_file(path)


def test_replay_source_uses_labeled_loader_for_csv_but_not_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    write_csv(path, [{"id": "a", "x": 0.5, "label": 1}])
    messages, total = open_source(str(path), seed=0)
    assert total == 1
    assert list(messages) == [(b'{"id":"a","features":[0.5],"label":1}', "a")]
    raw = tmp_path / "data.jsonl"
    raw.write_text("not json\n")
    messages, total = open_source(str(raw), seed=0)
    assert total is None
    assert list(messages) == [(b"not json", None)]
