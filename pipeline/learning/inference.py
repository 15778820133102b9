"""Held-out probe set, classifiers (nearest class mean, CE head) and per-class accuracy.

INVARIANT: probe events are never trained on. Whether a labeled event is a probe is decided
by a hash of its id, so the same event is held out again after a restart or re-delivery and
cannot leak into training.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from pipeline.learning.labels import LabelRegistry
from pipeline.learning.model import StreamNet

NCM_TEMPERATURE = 0.1  # softmax temperature turning cosine similarities into a confidence


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


@dataclass(frozen=True, slots=True)
class ClassMeans:
    labels: torch.Tensor  # [k] class indices
    means: torch.Tensor  # [k, embed_dim], L2-normalised

    def __len__(self) -> int:
        return int(self.labels.numel())


@torch.no_grad()
def class_means(model: StreamNet, features: torch.Tensor, labels: torch.Tensor) -> ClassMeans:
    """Class means of the *current* encoder over the bank (SCR re-encodes the memory)."""
    if features.numel() == 0:
        return ClassMeans(labels.new_empty(0), features.new_empty(0, 0))
    model.eval()
    h = F.normalize(model.embed(features).float(), dim=-1)
    classes, inverse = torch.unique(labels, return_inverse=True)
    sums = torch.zeros(classes.numel(), h.shape[1], device=h.device).index_add_(0, inverse, h)
    return ClassMeans(classes, F.normalize(sums, dim=-1))


@torch.no_grad()
def predict_ncm(
    model: StreamNet, features: torch.Tensor, means: ClassMeans
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class index [n], confidence [n]) by cosine to the nearest class mean."""
    if len(means) == 0 or features.shape[0] == 0:
        n = features.shape[0]
        return (
            torch.full((n,), -1, dtype=torch.long, device=features.device),
            torch.zeros(n, device=features.device),
        )
    model.eval()
    h = F.normalize(model.embed(features).float(), dim=-1)
    probs = torch.softmax(h @ means.means.T / NCM_TEMPERATURE, dim=1)
    conf, idx = probs.max(dim=1)
    return means.labels[idx], conf


@torch.no_grad()
def predict_head(
    model: StreamNet, features: torch.Tensor, seen_classes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class index [n], softmax confidence [n]) from the CE head, unseen masked."""
    model.eval()
    logits = model.logits(model.embed(features)).float()
    logits = logits.masked_fill(~seen_classes, torch.finfo(torch.float32).min)
    conf, idx = torch.softmax(logits, dim=1).max(dim=1)
    return idx, conf


def per_class_accuracy(
    predicted: torch.Tensor, truth: torch.Tensor, registry: LabelRegistry
) -> dict[str, float]:
    if truth.numel() == 0:
        return {}
    classes, inverse = torch.unique(truth, return_inverse=True)
    correct = torch.zeros(classes.numel(), device=truth.device).index_add_(
        0, inverse, (predicted == truth).float()
    )
    counts = torch.bincount(inverse, minlength=classes.numel()).float()
    acc = (correct / counts).cpu().tolist()
    return {registry.name(int(c)): round(a, 6) for c, a in zip(classes.tolist(), acc, strict=True)}
