"""``supcon-stream predict`` over files: outputs, accuracy, per-class accuracy, ECE."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import structlog
from serving_helpers import publish_model

from pipeline.cli import main
from pipeline.learning.inference import NCM_TEMPERATURE
from pipeline.quality import expected_calibration_error
from pipeline.serving.predictor import Predictor
from pipeline.serving.scoring import score_file


def _csv(path: Path, feats: np.ndarray, labels: list[str] | None) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["id", *[f"x{i}" for i in range(feats.shape[1])], *(["label"] if labels else [])]
        )
        for i, row in enumerate(feats.tolist()):
            w.writerow([f"r{i}", *row, *([labels[i]] if labels else [])])


def test_labeled_csv_reports_accuracy_and_ece_against_the_predictor(tmp_path: Path) -> None:
    published, _, _, queries = publish_model(tmp_path / "models", temperature=0.05)
    feats = queries.numpy()
    predictor = Predictor.load(published.path)
    expected = predictor.predict(feats)
    # Truth: the model's answer for even rows, another class for odd rows.
    truth = [
        lab if i % 2 == 0 else ("dog" if lab != "dog" else "cat")
        for i, lab in enumerate(expected.labels)
    ]
    _csv(tmp_path / "in.csv", feats, truth)
    report = score_file(tmp_path / "models", tmp_path / "in.csv", tmp_path / "out.jsonl")
    hits = [i % 2 == 0 for i in range(len(truth))]
    assert report.rows == 50
    assert report.labeled
    assert report.model_version == 1
    assert report.accuracy == pytest.approx(0.5)
    assert report.ece == pytest.approx(
        expected_calibration_error(expected.confidences.tolist(), hits), abs=1e-6
    )
    raw = predictor.predict(feats, temperature=NCM_TEMPERATURE)
    assert report.ece_uncalibrated == pytest.approx(
        expected_calibration_error(raw.confidences.tolist(), hits), abs=1e-6
    )
    for cls, acc in report.per_class_accuracy.items():
        rows = [i for i, t in enumerate(truth) if t == cls]
        assert acc == pytest.approx(sum(hits[i] for i in rows) / len(rows), abs=1e-6)
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == [f"r{i}" for i in range(50)]
    assert [x["label"] for x in lines] == expected.labels


def test_unlabeled_npz_gets_predictions_and_embeddings_without_metrics(tmp_path: Path) -> None:
    published, _, _, queries = publish_model(tmp_path / "models")
    np.savez(tmp_path / "in.npz", X=queries.numpy())
    report = score_file(published.path, tmp_path / "in.npz", tmp_path / "out.npz")
    assert not report.labeled
    assert report.accuracy is None
    assert report.ece is None
    with np.load(tmp_path / "out.npz") as out:
        assert out["embeddings"].shape == (50, 6)
        assert list(out["ids"][:2]) == ["in-0", "in-1"]


@pytest.fixture
def _restore_logging() -> Iterator[None]:
    """main() points structlog at capsys' stderr, which closes after the test."""
    yield
    structlog.reset_defaults()


@pytest.mark.usefixtures("_restore_logging")
def test_cli_predict_prints_the_report_and_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    publish_model(tmp_path / "models")
    _csv(tmp_path / "in.csv", np.zeros((4, 8)), ["cat", "dog", "cat", "7"])
    rc = main(
        [
            "predict",
            str(tmp_path / "in.csv"),
            "--model",
            str(tmp_path / "models"),
            "--out",
            str(tmp_path / "out.csv"),
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 4
    assert report["accuracy"] is not None
    _csv(tmp_path / "narrow.csv", np.zeros((2, 3)), None)
    rc = main(
        [
            "predict",
            str(tmp_path / "narrow.csv"),
            "--model",
            str(tmp_path / "models"),
            "--out",
            str(tmp_path / "o.jsonl"),
        ]
    )
    assert rc == 2
    assert "expects 8" in capsys.readouterr().err
    rc = main(
        [
            "predict",
            str(tmp_path / "in.csv"),
            "--model",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "o.jsonl"),
        ]
    )
    assert rc == 1
    assert "no model bundle" in capsys.readouterr().err
