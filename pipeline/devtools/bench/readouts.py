"""The classifiers a benchmark run is scored with (its read-outs) and the scoring itself.

A run of ``bench forgetting`` / ``compare`` is read by its natural classifier (the table's
figure) and, beside it, by other classifiers of the same network (:func:`readouts`): NCM (with
the learner's class means, ``eval.class_means``), the other kind of class means, the head and
the ensemble of both when a head trains beside a representation objective, class-restricted
drift compensation (:mod:`pipeline.learning.drift`) and, with ``--ema-decay``, the natural
classifier through averaged weights (:data:`EMA_READOUT`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.config import EvalSettings, TrainSettings
from pipeline.learning.drift import DriftFollower, RunningClassMeans
from pipeline.learning.inference import class_means, predict_ensemble, predict_head, predict_ncm
from pipeline.learning.model import StreamNet
from pipeline.learning.objectives import HEAD_TERMS, loss_weights, natural_classifier
from pipeline.learning.stream_means import TaskClassMeans
from pipeline.quality import expected_calibration_error

# The read-out of the weight average (``BenchConfig.ema_decay``): the natural classifier, read
# with the averaged weights.
EMA_READOUT = "ema"

# NCM over the bank re-encoded by the current encoder, beside the learner's stream means
BANK_READOUT = "ncm_bank"
# NCM over the stream means, beside the bank's, when the learner reads the bank
STREAM_READOUT = "ncm_stream"
# NCM over stream means moved by the drift of the class's own bank items only
CLASS_DRIFT_READOUT = "sdc_class"
# the learner's stream means read by cosine, without the shared covariance
COSINE_READOUT = "ncm_cosine"

Predictor = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def predictor(
    classifier: str,
    model: StreamNet,
    bank_x: torch.Tensor,
    bank_y: torch.Tensor,
    drift: DriftFollower[RunningClassMeans] | None = None,
) -> Predictor:
    """(labels, confidences) for the test rows, given the classes seen so far (bool mask).

    ``drift`` holds the running class means of the read-outs that read them (:func:`drift_sets`,
    ``ncm`` among them under ``eval.class_means: stream``); NCM's other read-outs re-encode the
    bank.
    """
    stream = drift.means if drift is not None else {}
    if classifier == COSINE_READOUT:
        learner = stream["ncm"]
        assert isinstance(learner, TaskClassMeans)
        cosine = learner.cosine_means()
        return lambda x, _seen: predict_ncm(model, x, cosine)
    if classifier in stream:
        stream_means = stream[classifier].class_means()
        return lambda x, _seen: predict_ncm(model, x, stream_means)
    if classifier == "head":
        return lambda x, seen: predict_head(model, x, seen)
    means = stream["ncm"].class_means() if "ncm" in stream else class_means(model, bank_x, bank_y)
    if classifier == "ensemble":
        return lambda x, seen: predict_ensemble(model, x, means, seen)
    bank_means = class_means(model, bank_x, bank_y)
    return lambda x, _seen: predict_ncm(model, x, bank_means)


def readouts(train_cfg: TrainSettings, eval_cfg: EvalSettings) -> tuple[str, ...]:
    """The classifiers a run scores: its natural one first, then NCM, and, when a head is
    trained beside a representation objective, the head and the ensemble of both.

    ``ncm`` reads the class means the learner reads (``eval.class_means``). A representation
    objective is also read with the other kind (``ncm_bank`` or ``ncm_stream``) and with the
    class-restricted drift compensation (``sdc_class``), without changing the run.
    """
    natural = natural_classifier(train_cfg)
    head_trained = HEAD_TERMS & set(loss_weights(train_cfg))
    extra: tuple[str, ...] = ()
    if natural == "ncm":
        stream = eval_cfg.class_means == "stream"
        other = BANK_READOUT if stream else STREAM_READOUT
        cosine = (COSINE_READOUT,) if stream and eval_cfg.covariance_shrinkage is not None else ()
        extra = (
            other,
            *cosine,
            CLASS_DRIFT_READOUT,
            *(("head", "ensemble") if head_trained else ()),
        )
    return tuple(dict.fromkeys((natural, "ncm", *extra)))


def drift_sets(
    names: tuple[str, ...], eval_cfg: EvalSettings, max_classes: int, dim: int
) -> DriftFollower[RunningClassMeans] | None:
    """The running class means the read-outs ``names`` need, following no encoder yet; None
    when none does."""
    sigmas: dict[str, float | None] = {}
    if eval_cfg.class_means == "stream" and "ncm" in names:
        sigmas["ncm"] = eval_cfg.drift_sigma
    if STREAM_READOUT in names:
        sigmas[STREAM_READOUT] = eval_cfg.drift_sigma
    if CLASS_DRIFT_READOUT in names:
        sigmas[CLASS_DRIFT_READOUT] = None
    if not sigmas:
        return None
    sets: dict[str, RunningClassMeans] = {
        name: RunningClassMeans(max_classes, dim, sigma) for name, sigma in sigmas.items()
    }
    for name in ("ncm", STREAM_READOUT):  # the learner's stream means: per class and task
        if name in sets:
            sets[name] = TaskClassMeans(
                max_classes,
                dim,
                eval_cfg.drift_sigma,
                eval_cfg.means_per_class,
                shrinkage=eval_cfg.covariance_shrinkage,
            )
    return DriftFollower(sets)


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
