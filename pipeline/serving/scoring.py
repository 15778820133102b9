"""``supcon-stream predict``: score a JSONL, CSV, NPZ or Parquet file with a model bundle.

Writes one prediction per row (id, label, confidence, and in an NPZ the embeddings too).
When the file has labels it also measures accuracy, per-class accuracy and the expected
calibration error, with the bundle's calibrated temperature and, for NCM, with the fixed
uncalibrated one beside it.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import structlog

from pipeline.exceptions import ConfigError
from pipeline.learning.inference import NCM_TEMPERATURE
from pipeline.quality import expected_calibration_error
from pipeline.serving.predictor import Predictions, Predictor
from pipeline.streams.files import load_feature_file

log = structlog.get_logger(__name__)

OUTPUT_SUFFIXES = (".jsonl", ".csv", ".npz", ".parquet")


@dataclass
class ScoreReport:
    rows: int
    model: str
    model_version: int
    out: str
    seconds: float
    labeled: bool
    accuracy: float | None = None
    per_class_accuracy: dict[str, float] = field(default_factory=dict)
    ece: float | None = None  # with the bundle's temperature (calibrated)
    ece_uncalibrated: float | None = None  # NCM at the fixed temperature 0.1
    temperature: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def score_file(
    model: str | Path,
    source: str | Path,
    out: str | Path,
    label_column: str = "label",
    id_column: str = "id",
) -> ScoreReport:
    """Predict every row of ``source`` with the bundle at ``model``; write ``out``."""
    out = Path(out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--out {out}: expected a {', '.join(OUTPUT_SUFFIXES)} file")
    predictor = Predictor.load(model)
    table = load_feature_file(source, label_column=label_column, id_column=id_column)
    if table.features.shape[1] != predictor.input_dim:
        raise ConfigError(
            f"{source}: rows have {table.features.shape[1]} features, the model "
            f"(version {predictor.version}) expects {predictor.input_dim}"
        )
    started = time.monotonic()
    preds = predictor.predict(table.features)
    _write(out, table.ids, preds, predictor.version)
    report = ScoreReport(
        rows=len(table.ids),
        model=str(predictor.bundle.path),
        model_version=predictor.version,
        out=str(out),
        seconds=round(time.monotonic() - started, 3),
        labeled=table.labels is not None,
        temperature=predictor.temperature if predictor.classifier == "ncm" else None,
    )
    if table.labels is not None:
        truth = [str(label) for label in table.labels]
        _measure(report, truth, preds)
        if predictor.classifier == "ncm":
            raw = predictor.predict(table.features, temperature=NCM_TEMPERATURE)
            hits = [p == t for p, t in zip(raw.labels, truth, strict=True)]
            report.ece_uncalibrated = _round(
                expected_calibration_error(raw.confidences.tolist(), hits)
            )
    log.info("file scored", rows=report.rows, out=str(out), version=predictor.version)
    return report


def _measure(report: ScoreReport, truth: list[str], preds: Predictions) -> None:
    hits = [p == t for p, t in zip(preds.labels, truth, strict=True)]
    report.accuracy = _round(sum(hits) / len(hits))
    per_class: dict[str, list[bool]] = {}
    for t, ok in zip(truth, hits, strict=True):
        per_class.setdefault(t, []).append(ok)
    report.per_class_accuracy = {c: round(sum(v) / len(v), 6) for c, v in sorted(per_class.items())}
    report.ece = _round(expected_calibration_error(preds.confidences.tolist(), hits))


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def _write(out: Path, ids: list[str], preds: Predictions, version: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    conf = [round(float(c), 6) for c in preds.confidences.tolist()]
    suffix = out.suffix.lower()
    if suffix == ".jsonl":
        with out.open("wb") as fh:
            for i, label, c in zip(ids, preds.labels, conf, strict=True):
                row = {"id": i, "label": label, "confidence": c, "model_version": version}
                fh.write(orjson.dumps(row) + b"\n")
    elif suffix == ".csv":
        with out.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "label", "confidence", "model_version"])
            for i, label, c in zip(ids, preds.labels, conf, strict=True):
                writer.writerow([i, "" if label is None else label, c, version])
    elif suffix == ".npz":
        np.savez(
            out,
            ids=np.asarray(ids, dtype=str),
            labels=np.asarray(["" if x is None else x for x in preds.labels], dtype=str),
            confidences=preds.confidences,
            embeddings=preds.embeddings,
            model_version=np.asarray(version),
        )
    else:
        _write_parquet(out, ids, preds.labels, conf, version)


def _write_parquet(
    out: Path, ids: list[str], labels: list[str | None], conf: list[float], version: int
) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            f"--out {out}: writing Parquet needs the pyarrow package (`pip install pyarrow`)"
        ) from None
    table = pa.table(
        {"id": ids, "label": labels, "confidence": conf, "model_version": [version] * len(ids)}
    )
    pq.write_table(table, out)
