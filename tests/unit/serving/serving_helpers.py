"""Small bundles for the serving unit tests: a seeded model and class means, no learner."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import ModelSettings
from pipeline.learning.discriminant import discriminant
from pipeline.learning.inference import ClassMeans, class_means
from pipeline.learning.model import StreamNet
from pipeline.serving.export import Provenance, bundle_parts
from pipeline.serving.registry import Published, publish

CONFIG = ModelSettings(input_dim=8, hidden_dim=16, embed_dim=6, proj_dim=4, max_classes=5)
LABELS = ["cat", "dog", "7"]


def make_model(seed: int = 0, config: ModelSettings = CONFIG) -> StreamNet:
    torch.manual_seed(seed)
    return StreamNet(config)


def make_means(model: StreamNet, seed: int = 0) -> tuple[ClassMeans, torch.Tensor]:
    """Class means over 30 random bank items of 3 classes; also returns query features."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(30, model.encoder[0].in_features, generator=g)
    labels = torch.arange(30) % 3
    queries = torch.randn(50, model.encoder[0].in_features, generator=g)
    return class_means(model, feats, labels), queries


def publish_model(
    registry: Path,
    seed: int = 0,
    temperature: float | None = 0.05,
    keep: int = 5,
    config: ModelSettings = CONFIG,
    classifier: str = "ncm",
    per_task: bool = False,
    shared_covariance: bool = False,
) -> tuple[Published, StreamNet, ClassMeans, torch.Tensor]:
    """``per_task``: class 0 has a second mean (the learner's means per class and task);
    ``shared_covariance``: the means read through one (a discriminant, weights and biases)."""
    model = make_model(seed, config)
    means, queries = make_means(model, seed)
    if per_task:
        extra = torch.nn.functional.normalize(torch.randn(1, means.means.shape[1]), dim=-1)
        means = ClassMeans(
            torch.cat([means.labels[:1], means.labels]), torch.cat([extra, means.means])
        )
    if shared_covariance:
        g = torch.Generator().manual_seed(seed)
        spread = torch.randn(20, means.means.shape[1], generator=g).double()
        means = discriminant(means.labels, 0.9 * means.means, spread.T @ spread / 20, 0.3)
    manifest, tensors = bundle_parts(
        model,
        config,
        list(LABELS),
        {"cat": "0", "dog": None, "7": "1"},
        means,
        classifier,
        temperature,
        Provenance(
            learner="unit",
            objective="supcon",
            step=42,
            offsets={("t.events", 0): 17},
            first_event_ms=1000,
            last_event_ms=2000,
            metrics={"ece": 0.1, "ece_calibrated": float("nan")},
            counters={"consumed": 30.0},
            bank_items=30,
        ),
    )
    return publish(registry, manifest, tensors, keep), model, means, queries
