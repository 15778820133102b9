"""The learner's classifier at serving time: class means, NCM / head / kNN, published predictions.

``eval.classifier`` picks the classifier (by default the objective's natural one: NCM, the
head for ce and focal). Predictions of unlabeled events go to ``kafka.predictions_topic``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from consumers.events import EventBatch
from pipeline.learning.inference import ClassMeans, class_means, predict_head, predict_ncm
from pipeline.learning.objectives import chosen_classifier

if TYPE_CHECKING:
    from pipeline.learner.context import LearnerContext

PREDICTION_MEANS_ITEMS = 4096  # bank items re-encoded for the class means of predictions


def refresh_means(ctx: LearnerContext, force: bool = False) -> ClassMeans:
    """Class means of the current encoder, recomputed every ``eval.prediction_refresh_steps``."""
    every = ctx.settings.eval.prediction_refresh_steps
    if force or ctx.means is None or ctx.state.step - ctx.means_step >= every:
        if not force and len(ctx.bank) > PREDICTION_MEANS_ITEMS:
            # Predictions only (evaluation re-encodes everything): a class-balanced subset
            # bounds the re-encode of a large bank, which would otherwise delay the first
            # trained batch after a restart (docs/performance.md, "Learner").
            drawn = ctx.bank.sample(PREDICTION_MEANS_ITEMS)
            feats, labels = drawn.features, drawn.labels
        else:
            _, feats, labels = ctx.bank.occupied()
        ctx.means = class_means(ctx.state.model, feats, labels)
        ctx.means_step = ctx.state.step
    return ctx.means


def predict(ctx: LearnerContext, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``eval.classifier``: by default the objective's natural one (NCM; the head for ce and
    focal); kNN over the FAISS index falls back to NCM while the bank is empty."""
    choice = chosen_classifier(ctx.settings.train, ctx.settings.eval.classifier)
    if choice == "head":
        return predict_head(ctx.state.model, feats, ctx.seen_classes)
    if choice == "knn" and len(ctx.bank):
        return predict_knn(ctx, feats)
    return predict_ncm(ctx.state.model, feats, refresh_means(ctx), ctx.temperature)


def predict_knn(ctx: LearnerContext, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        ctx.state.model.eval()
        queries = torch.nn.functional.normalize(ctx.state.model.embed(feats).float(), dim=-1)
    return ctx.bank.knn_predict(queries, ctx.settings.eval.knn_k)


def publish_predictions(
    ctx: LearnerContext, batch: EventBatch, rows: list[int], feats: torch.Tensor
) -> None:
    labels, conf = predict(ctx, feats)
    if not bool(ctx.seen_classes.any()):
        # Nothing learned yet: publish "no label" rather than an arbitrary head index.
        labels = torch.full_like(labels, -1)
    for i, label, c in zip(rows, labels.tolist(), conf.tolist(), strict=True):
        ctx.producer.send(
            ctx.settings.kafka.predictions_topic,
            {
                "id": batch.ids[i],
                "label": ctx.registry.name(label) if label >= 0 else None,
                "confidence": round(float(c), 6),
                "learner": ctx.name,
            },
            key=batch.ids[i].encode(),
        )
