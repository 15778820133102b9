"""The held-out probe set and the evaluation run on it.

INVARIANT: probe events are never trained on. Whether a labeled event is a probe is decided
by a hash of its id (:func:`is_probe`), so the same event is held out again after a restart
or re-delivery and cannot leak into training. The probe set is saved in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch

from pipeline.learner.predictions import predict_knn, refresh_means
from pipeline.learning.calibration import fit_temperature, targets_in
from pipeline.learning.inference import (
    ClassMeans,
    ncm_from_logits,
    ncm_logits,
    per_class_accuracy,
    predict_head,
    predict_ncm,
)
from pipeline.learning.objectives import HEAD_TERMS, chosen_classifier, loss_weights
from pipeline.quality import expected_calibration_error
from pipeline.telemetry.records import ClassifierScores, EvalRecord

if TYPE_CHECKING:
    from pipeline.learner.context import LearnerContext


def is_probe(event_id: str, fraction: float) -> bool:
    """Deterministic hold-out draw: the same id always gets the same answer."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(event_id.encode(), digest_size=8, person=b"probe").digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


class ProbeSet:
    """Up to ``per_class`` held-out examples per class, kept on the learner's device."""

    def __init__(self, per_class: int, input_dim: int, device: torch.device) -> None:
        self.per_class = per_class
        self.input_dim = input_dim
        self.device = device
        self._features: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._ids: set[str] = set()

    def __len__(self) -> int:
        return sum(len(v) for v in self._features.values())

    def sizes(self) -> dict[int, int]:
        return {label: len(rows) for label, rows in self._features.items()}

    def add(self, event_id: str, features: torch.Tensor, label: int) -> bool:
        """Keep the example if its class has room; duplicates (re-delivery) are ignored."""
        rows = self._features[label]
        if event_id in self._ids or len(rows) >= self.per_class:
            return False
        rows.append(features.to(self.device, torch.float32))
        self._ids.add(event_id)
        return True

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        feats: list[torch.Tensor] = []
        labels: list[int] = []
        for label, rows in sorted(self._features.items()):
            feats.extend(rows)
            labels.extend([label] * len(rows))
        if not feats:
            return (
                torch.empty(0, self.input_dim, device=self.device),
                torch.empty(0, dtype=torch.long, device=self.device),
            )
        return torch.stack(feats), torch.tensor(labels, dtype=torch.long, device=self.device)

    def state(self) -> dict[str, Any]:
        feats, labels = self.tensors()
        return {"features": feats.cpu(), "labels": labels.cpu(), "ids": sorted(self._ids)}

    def load_state(self, state: dict[str, Any]) -> None:
        self._features.clear()
        self._ids = set(state["ids"])
        for row, label in zip(state["features"], state["labels"].tolist(), strict=True):
            self._features[int(label)].append(row.to(self.device))


def evaluate(ctx: LearnerContext) -> EvalRecord:
    """Per-class accuracy and ECE on the held-out probes: NCM, kNN, and the head when trained.

    ``primary`` is ``eval.classifier`` (by default the objective's natural classifier).
    """
    feats, truth = ctx.probes.tensors()
    cfg = ctx.settings.train
    means = refresh_means(ctx, force=True)
    predictions = {"ncm": predict_ncm(ctx.state.model, feats, means)}  # at the fixed 0.1
    calibrated = calibrate_ncm(ctx, feats, truth, means)
    if len(ctx.bank) and feats.shape[0]:
        predictions["knn"] = predict_knn(ctx, feats)
    primary = chosen_classifier(cfg, ctx.settings.eval.classifier)
    if primary == "head" or HEAD_TERMS & set(loss_weights(cfg)):
        predictions["head"] = predict_head(ctx.state.model, feats, ctx.seen_classes)
    classifiers = {
        name: ClassifierScores(
            per_class_accuracy=per_class_accuracy(pred, truth, ctx.registry),
            ece=expected_calibration_error(conf.tolist(), (pred == truth).tolist()),
        )
        for name, (pred, conf) in predictions.items()
    }
    if calibrated is not None:
        classifiers["ncm"] = dataclasses.replace(
            classifiers["ncm"], ece_calibrated=calibrated, temperature=ctx.temperature
        )
    ctx.last_metrics = eval_metrics(primary, classifiers, len(truth))
    return EvalRecord(
        learner=ctx.name,
        step=ctx.state.step,
        ts=int(time.time() * 1000),
        primary=primary,
        classifiers=classifiers,
        objective=ctx.settings.train.objective,
        group=ctx.settings.group_id,
        events_total=ctx.counters.consumed,
        class_task=dict(ctx.registry.class_task),
        current_task=ctx.current_task,
        probe_sizes={ctx.registry.name(k): v for k, v in ctx.probes.sizes().items()},
    )


def calibrate_ncm(
    ctx: LearnerContext, feats: torch.Tensor, truth: torch.Tensor, means: ClassMeans
) -> float | None:
    """Fit NCM's temperature on the probes (temperature scaling); the ECE after it, or None.

    The fitted temperature becomes ``ctx.temperature``: the learner's own predictions and
    the exported bundles use it. With too few probes the previous temperature is kept and
    None is returned. The ECE is measured on the probes the temperature was fitted on (one
    parameter, so the optimism is small); ``supcon-stream predict`` on a held-out file gives
    the out-of-sample figure.
    """
    if means.classes.numel() < 2 or feats.shape[0] == 0:
        return None
    cosines = ncm_logits(ctx.state.model, feats, means)
    keep, columns = targets_in(means.classes, truth)
    fit = fit_temperature(cosines[keep], columns, ctx.temperature)
    if fit is None:
        return None
    ctx.temperature = fit.temperature
    pred, conf = ncm_from_logits(cosines, means, fit.temperature)
    return expected_calibration_error(conf.tolist(), (pred == truth).tolist())


def eval_metrics(
    primary: str, classifiers: dict[str, ClassifierScores], probes: int
) -> dict[str, Any]:
    """The summary of an evaluation a model bundle carries ("metrics at export")."""
    chosen = classifiers.get(primary) or next(iter(classifiers.values()), None)
    accuracy = chosen.per_class_accuracy if chosen else {}
    return {
        "classifier": primary,
        "probes": probes,
        "avg_accuracy": round(sum(accuracy.values()) / len(accuracy), 6) if accuracy else None,
        "per_class_accuracy": dict(accuracy),
        "ece": chosen.ece if chosen else None,
        "ece_calibrated": chosen.ece_calibrated if chosen else None,
    }
