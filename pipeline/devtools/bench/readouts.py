"""The classifiers a benchmark run is scored with (its read-outs) and the scoring itself.

A run of ``bench forgetting`` / ``compare`` is read by its natural classifier (the table's
figure) and, beside it, by other classifiers of the same network (:func:`readouts`): NCM over
the bank, the head and the ensemble of both when a head trains beside a representation
objective, class means that follow the encoder (:mod:`pipeline.devtools.bench.drift`) and,
with ``--ema-decay``, the natural classifier through averaged weights (:data:`EMA_READOUT`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.config import TrainSettings
from pipeline.devtools.bench.drift import DRIFT_READOUTS, DriftFollower, RunningClassMeans
from pipeline.learning.inference import class_means, predict_ensemble, predict_head, predict_ncm
from pipeline.learning.model import StreamNet
from pipeline.learning.objectives import HEAD_TERMS, loss_weights, natural_classifier
from pipeline.quality import expected_calibration_error

# The read-out of the weight average (``BenchConfig.ema_decay``): the natural classifier, read
# with the averaged weights.
EMA_READOUT = "ema"

Predictor = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def predictor(
    classifier: str,
    model: StreamNet,
    bank_x: torch.Tensor,
    bank_y: torch.Tensor,
    drift: DriftFollower[RunningClassMeans] | None = None,
) -> Predictor:
    """(labels, confidences) for the test rows, given the classes seen so far (bool mask).

    ``drift`` holds the running class means of the :data:`DRIFT_READOUTS` read-outs.
    """
    if drift is not None and classifier in drift.means:
        stream_means = drift.means[classifier].class_means()
        return lambda x, _seen: predict_ncm(model, x, stream_means)
    if classifier == "head":
        return lambda x, seen: predict_head(model, x, seen)
    means = class_means(model, bank_x, bank_y)
    if classifier == "ensemble":
        return lambda x, seen: predict_ensemble(model, x, means, seen)
    return lambda x, _seen: predict_ncm(model, x, means)


def readouts(train_cfg: TrainSettings) -> tuple[str, ...]:
    """The classifiers a run scores: its natural one first, then NCM over the bank, and, when
    a head is trained beside a representation objective, the head and the ensemble of both.

    A representation objective is also read by NCM to running class means of the stream that
    follow the encoder (:data:`DRIFT_READOUTS`, semantic drift compensation): equal memory,
    one vector per class, kept beside the run without changing it.
    """
    natural = natural_classifier(train_cfg)
    head_trained = HEAD_TERMS & set(loss_weights(train_cfg))
    extra = ("head", "ensemble") if natural == "ncm" and head_trained else ()
    drift = tuple(DRIFT_READOUTS) if natural == "ncm" else ()
    return tuple(dict.fromkeys((natural, "ncm", *extra, *drift)))


@dataclass(frozen=True)
class Score:
    per_class_accuracy: dict[str, float]
    ece: float | None  # expected calibration error of the predictions (Guo et al. 2017)


def score_test_set(
    predict: Predictor, test_x: torch.Tensor, test_y: torch.Tensor, seen: torch.Tensor
) -> Score:
    """Per-class accuracy and ECE on the test rows of the classes seen so far."""
    rows = seen[test_y]
    x, y = test_x[rows], test_y[rows]
    predicted, confidence = predict(x, seen)
    correct = predicted == y
    acc = {str(c): float(correct[y == c].float().mean()) for c in torch.unique(y).tolist()}
    return Score(acc, expected_calibration_error(confidence.tolist(), correct.tolist()))
