"""What goes into a bundle, from a model and its class means (the learner's side of export).

:func:`bundle_parts` turns the learner's objects into the manifest and the tensors of
:mod:`pipeline.serving.bundle`; :func:`pipeline.serving.registry.publish` writes them as the
next version. The learner's automatic export and the ``export`` command both end here
(``pipeline/learner/exporting.py``).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.config import ModelSettings
from pipeline.learning.inference import NCM_TEMPERATURE, ClassMeans
from pipeline.learning.model import StreamNet
from pipeline.serving.bundle import MODEL_PREFIX, PROTOTYPE_BIAS, PROTOTYPES

CALIBRATION_METHOD = (
    "temperature scaling: T minimising the NLL of softmax(score of the class means / T) on the "
    "learner's held-out probes (log grid 0.005-2 + golden-section refinement)"
)


@dataclass(frozen=True)
class Provenance:
    """Where a model comes from: its learner, step, the stream it covers, its metrics."""

    learner: str
    objective: str
    step: int
    offsets: Mapping[tuple[str, int], int] = field(default_factory=dict)
    first_event_ms: int = 0
    last_event_ms: int = 0
    metrics: Mapping[str, Any] = field(default_factory=dict)
    counters: Mapping[str, float] = field(default_factory=dict)
    bank_items: int = 0


def bundle_parts(
    model: StreamNet,
    config: ModelSettings,
    labels: list[str],
    class_task: Mapping[str, str | None],
    means: ClassMeans,
    classifier: str,
    temperature: float | None,
    origin: Provenance,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest without format fields and digest, tensors) of one bundle."""
    tensors = {MODEL_PREFIX + k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    classes: list[str] = []
    bias: str | None = None
    if len(means):
        tensors[PROTOTYPES] = means.means.detach().float().cpu()
        classes = [labels[int(i)] for i in means.labels.tolist()]
        if means.bias is not None:
            tensors[PROTOTYPE_BIAS] = means.bias.detach().float().cpu()
            bias = PROTOTYPE_BIAS
    manifest: dict[str, Any] = {
        "learner": origin.learner,
        "objective": origin.objective,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": config.model_dump(mode="json"),
        "classifier": "head" if classifier == "head" else "ncm",
        "labels": list(labels),
        "class_task": dict(class_task),
        "prototypes": {
            "tensor": PROTOTYPES,
            "bias": bias,
            "classes": classes,
            "bank_items": origin.bank_items,
        },
        "calibration": {
            "temperature": float(temperature) if temperature else None,
            "uncalibrated_temperature": NCM_TEMPERATURE,
            "method": CALIBRATION_METHOD,
        },
        "step": origin.step,
        "offsets": [
            {"topic": t, "partition": p, "offset": o}
            for (t, p), o in sorted(origin.offsets.items())
        ],
        "event_time": {
            "first_ms": origin.first_event_ms or None,
            "last_ms": origin.last_event_ms or None,
        },
        "metrics": _finite(dict(origin.metrics)),
        "counters": {k: int(v) for k, v in origin.counters.items()},
    }
    return manifest, tensors


def _finite(value: Any) -> Any:
    """JSON without NaN/inf (the canonical form of the digest refuses them): they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
