"""The learner's classifier at serving time: class means, NCM / head / kNN, published predictions.

``eval.classifier`` picks the classifier (by default the objective's natural one: NCM, the
head for ce and focal). NCM's class means are, under ``eval.class_means: stream`` (the
default), running means of the stream that follow the encoder (:func:`follow_stream` after
every learned micro-batch, :mod:`pipeline.learning.stream_means`); under ``bank``, the bank's items
re-encoded every ``eval.prediction_refresh_steps``. Predictions of unlabeled events go to
``kafka.predictions_topic``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from consumers.events import EventBatch
from memory_bank.eviction import TARGETED_EVICTIONS
from pipeline.config import Settings
from pipeline.learning.inference import ClassMeans, class_means, predict_head, predict_ncm
from pipeline.learning.objectives import chosen_classifier
from pipeline.learning.stream_means import StreamClassMeans

if TYPE_CHECKING:
    from pipeline.learner.context import LearnerContext

PREDICTION_MEANS_ITEMS = 4096  # bank items re-encoded for the class means of predictions


def make_stream_means(settings: Settings, device: torch.device) -> StreamClassMeans | None:
    """The learner's stream class means, when its classifier is NCM over them or the bank's
    eviction aims at them (``bank.eviction: stream_mean`` or ``adaptive``)."""
    e = settings.eval
    ncm = chosen_classifier(settings.train, e.classifier) == "ncm"
    targeted = settings.bank.victim_rule in TARGETED_EVICTIONS
    if e.class_means != "stream" or not (ncm or targeted):
        return None
    m = settings.model
    return StreamClassMeans(
        m.max_classes,
        m.embed_dim,
        e.drift_sigma,
        e.drift_probe_items,
        device,
        per_class=e.means_per_class,
        shrinkage=e.covariance_shrinkage,
    )


def follow_stream(
    ctx: LearnerContext, x: torch.Tensor, y: torch.Tensor, tasks: Sequence[str | None]
) -> None:
    """After the labeled rows ``x, y`` (of the tasks ``tasks``) were learned and offered to
    the bank: the stream means move by the encoder's drift, then take in the rows
    (``eval.class_means: stream``; a mean per class and task)."""
    if ctx.stream_means is not None and y.numel():
        ctx.stream_means.follow(ctx.state.model, ctx.bank, x, y, tasks)


def refresh_means(ctx: LearnerContext, force: bool = False) -> ClassMeans:
    """NCM's class means: the stream means as they are (kept current by :func:`follow_stream`),
    or the bank's re-encoded by the current encoder every ``eval.prediction_refresh_steps``."""
    if ctx.stream_means is not None and len(ctx.stream_means):
        ctx.means = ctx.stream_means.means()
        ctx.means_step = ctx.state.step
        return ctx.means
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
