"""``Predictor.load(dir).predict(features)``: a model bundle as a plain Python object.

Needs torch, numpy and safetensors; imports no Kafka or Redis client, so a downstream
service can embed it. The arithmetic is the learner's own (``pipeline.learning.inference``):
for the same weights, class means and temperature the labels and confidences are the ones
the learner publishes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from pipeline.config import ModelSettings
from pipeline.learning.inference import (
    NCM_TEMPERATURE,
    ClassMeans,
    predict_head,
    predict_ncm,
)
from pipeline.learning.model import StreamNet
from pipeline.serving.bundle import PROTOTYPE_BIAS, PROTOTYPES, Bundle
from pipeline.serving.exceptions import BundleError
from pipeline.serving.registry import resolve

DEFAULT_BATCH = 4096  # rows per forward pass: bounds memory on large files


@dataclass(frozen=True)
class Predictions:
    """One row per input: ``labels[i]`` is None only when the bundle knows no class."""

    labels: list[str | None]
    confidences: np.ndarray  # float32 [n], calibrated with the bundle's temperature
    embeddings: np.ndarray  # float32 [n, embed_dim], the encoder output (NCM's space)
    class_index: np.ndarray  # int64 [n], index in the bundle's label registry; -1: none


class Predictor:
    """A loaded, verified bundle ready to predict (on the CPU unless ``device`` says so)."""

    def __init__(self, bundle: Bundle, device: str | torch.device = "cpu") -> None:
        m = bundle.manifest
        self.bundle = bundle
        self.device = torch.device(device)
        try:
            self.config = ModelSettings(**m["model"])
        except (TypeError, ValidationError) as exc:
            raise BundleError(f"{bundle.path}: bad model config in manifest: {exc}") from exc
        self.labels: list[str] = [str(x) for x in m["labels"]]
        self.classifier: str = m["classifier"]
        calibration = m.get("calibration") or {}
        self.temperature = float(calibration.get("temperature") or NCM_TEMPERATURE)
        self.model = StreamNet(self.config)
        try:
            self.model.load_state_dict(bundle.model_state(), strict=True)
        except RuntimeError as exc:
            raise BundleError(f"{bundle.path}: weights do not fit the model config: {exc}") from exc
        self.model.to(self.device).eval()
        self.means = self._prototypes(bundle)
        self.seen = torch.zeros(self.config.max_classes, dtype=torch.bool, device=self.device)
        self.seen[: len(self.labels)] = True

    def _prototypes(self, bundle: Bundle) -> ClassMeans:
        spec = bundle.manifest.get("prototypes") or {}
        classes = [str(c) for c in spec.get("classes", [])]
        index = {name: i for i, name in enumerate(self.labels)}
        if any(c not in index for c in classes):
            raise BundleError(f"{bundle.path}: a prototype class is not in the label registry")
        protos = bundle.tensors.get(PROTOTYPES)
        if classes and (protos is None or tuple(protos.shape) != (len(classes), self.embed_dim)):
            raise BundleError(
                f"{bundle.path}: {PROTOTYPES} does not hold {len(classes)} × {self.embed_dim}"
            )
        if not classes:
            return ClassMeans(torch.empty(0, dtype=torch.long), torch.empty(0, 0))
        assert protos is not None
        named = bool(spec.get("bias"))  # version 2 with a discriminant's biases
        bias = bundle.tensors.get(PROTOTYPE_BIAS) if named else None
        if named and (bias is None or tuple(bias.shape) != (len(classes),)):
            raise BundleError(
                f"{bundle.path}: {PROTOTYPE_BIAS} does not hold {len(classes)} values"
            )
        labels = torch.tensor([index[c] for c in classes], dtype=torch.long)
        return ClassMeans(
            labels.to(self.device),
            protos.float().to(self.device),
            None if bias is None else bias.float().to(self.device),
        )

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Predictor:
        """A bundle folder, or a registry folder (its newest loadable version)."""
        return cls(resolve(path), device)

    @property
    def version(self) -> int:
        return self.bundle.version

    @property
    def input_dim(self) -> int:
        return self.config.input_dim

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def manifest(self) -> dict[str, Any]:
        return self.bundle.manifest

    def compatible_with(self, other: Predictor) -> str | None:
        """Why ``other`` cannot replace this one for the same event stream, or None."""
        if other.input_dim != self.input_dim:
            return f"input_dim {other.input_dim} differs from the served {self.input_dim}"
        return None

    @torch.no_grad()
    def predict(
        self,
        features: np.ndarray | torch.Tensor,
        batch_size: int = DEFAULT_BATCH,
        temperature: float | None = None,
    ) -> Predictions:
        """Labels, calibrated confidences and encoder embeddings of ``features`` ``[n, dim]``.

        ``temperature`` overrides the bundle's (NCM only), e.g. ``NCM_TEMPERATURE`` for the
        uncalibrated confidences the ``predict`` command reports beside the calibrated ones.
        """
        if isinstance(features, torch.Tensor):
            x = features.detach().float()
        else:
            x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"features must be [n, {self.input_dim}], got {list(x.shape)}")
        idx_parts, conf_parts, emb_parts = [], [], []
        for start in range(0, x.shape[0], batch_size):
            chunk = x[start : start + batch_size].to(self.device)
            idx, conf = self._classify(chunk, temperature or self.temperature)
            idx_parts.append(idx.cpu())
            conf_parts.append(conf.float().cpu())
            emb_parts.append(self.model.embed(chunk).float().cpu())
        if not idx_parts:
            empty = np.zeros((0, self.embed_dim), np.float32)
            return Predictions([], np.zeros(0, np.float32), empty, np.zeros(0, np.int64))
        index = torch.cat(idx_parts).numpy().astype(np.int64)
        return Predictions(
            labels=[self.labels[i] if i >= 0 else None for i in index.tolist()],
            confidences=torch.cat(conf_parts).numpy(),
            embeddings=torch.cat(emb_parts).numpy(),
            class_index=index,
        )

    def _classify(self, x: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.labels:
            n = x.shape[0]
            return torch.full((n,), -1, dtype=torch.long), torch.zeros(n)
        if self.classifier == "head":
            return predict_head(self.model, x, self.seen)
        return predict_ncm(self.model, x, self.means, temperature)
