"""Prometheus exposition of the quality the sidecar computes (``GET /metrics``).

The series follow the publications (:mod:`pipeline.sidecar.state`), so what Prometheus
sees is what ``<prefix>.metrics.*`` and ``<prefix>.alerts`` carry. All are labelled
``learner`` and ``objective``; ``class`` and ``task`` label values are bounded by
``model.max_classes`` per learner (later ones are left out and counted in
``supcon_sidecar_labels_dropped_total``).

* loss: ``supcon_loss_mean``, ``supcon_loss_ema`` (rolling, per learner), the loss SLI
  counters ``supcon_loss_sli_steps_total`` and ``supcon_loss_sli_bad_steps_total``;
* accuracy: ``supcon_class_accuracy{class}``, ``supcon_accuracy_avg``,
  ``supcon_accuracy_best_avg`` (best so far), ``supcon_prequential_accuracy``,
  ``supcon_accuracy_matrix{after_task, task}``;
* forgetting: ``supcon_forgetting_avg``, ``supcon_class_forgetting{class}``,
  ``supcon_stability_gap_min_accuracy`` (mean over ended tasks of their lowest accuracy since
  they ended); calibration: ``supcon_ece``;
* the SLO thresholds ``supcon_slo_loss_target``, ``supcon_slo_forgetting_max``,
  ``supcon_slo_stability_gap_max``, ``supcon_slo_ece_max`` (the Prometheus rules compare
  with these, so ``slo.*`` settings reach them), and ``supcon_slo_alert_firing{slo,
  severity}`` (1 while the sidecar's own evaluation fires).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import generate_latest

from pipeline.config import SloSettings
from pipeline.sidecar.state import LearnerState, Publication

_LABELS = ("learner", "objective")


class SidecarExposition:
    """The sidecar's Prometheus series, in a registry of their own."""

    def __init__(self, max_labels: int, slo: SloSettings) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.max_labels = max_labels
        self.slo = slo

        def gauge(name: str, doc: str, *extra: str) -> Gauge:
            return Gauge(name, doc, (*_LABELS, *extra), registry=r)

        self._g = {
            "loss_mean": gauge("supcon_loss_mean", "Mean loss of the last sidecar.window steps."),
            "loss_ema": gauge("supcon_loss_ema", "EMA of the step loss (sidecar.ema_alpha)."),
            "prequential_accuracy": gauge(
                "supcon_prequential_accuracy", "Cumulative predict-then-train accuracy."
            ),
            "avg_accuracy": gauge("supcon_accuracy_avg", "Average probe accuracy over classes."),
            "best_avg_accuracy": gauge(
                "supcon_accuracy_best_avg", "Best average probe accuracy so far."
            ),
            "avg_forgetting": gauge("supcon_forgetting_avg", "Average forgetting over classes."),
            "avg_min_accuracy": gauge(
                "supcon_stability_gap_min_accuracy",
                "Mean over ended tasks of their lowest accuracy since they ended.",
            ),
            "ece": gauge("supcon_ece", "Expected calibration error of the primary classifier."),
        }
        self._class_acc = gauge("supcon_class_accuracy", "Probe accuracy per class.", "class")
        self._class_forget = gauge("supcon_class_forgetting", "Forgetting per class.", "class")
        self._matrix = gauge(
            "supcon_accuracy_matrix",
            "Accuracy on each task's classes, measured when after_task ended.",
            "after_task",
            "task",
        )
        self._firing = gauge(
            "supcon_slo_alert_firing", "1 while the sidecar's SLO evaluation fires.", "slo"
        )
        self._thresholds = {
            "loss_target": gauge("supcon_slo_loss_target", "slo.loss_target: good steps/steps."),
            "forgetting_max": gauge("supcon_slo_forgetting_max", "slo.forgetting_max."),
            "stability_gap_max": gauge("supcon_slo_stability_gap_max", "slo.stability_gap_max."),
            "ece_max": gauge("supcon_slo_ece_max", "slo.ece_max."),
        }
        self._sli_steps = Counter(
            "supcon_loss_sli_steps", "Steps counted by the loss SLI.", _LABELS, registry=r
        )
        self._sli_bad = Counter(
            "supcon_loss_sli_bad_steps",
            "Bad steps of the loss SLI (skipped, or loss above the SLO's bound).",
            _LABELS,
            registry=r,
        )
        self._dropped = Counter(
            "supcon_sidecar_labels_dropped",
            "Class or task values left out past model.max_classes.",
            registry=r,
        )
        self._labels: dict[tuple[str, str], set[str]] = {}
        self._counted: dict[str, tuple[int, int]] = {}  # learner → SLI (steps, bad) exported

    # ---- updates (the sidecar's loop thread) -----------------------------------------------

    def observe(self, publications: Iterable[Publication], state_of: Mapping[str, Any]) -> None:
        """Set the series from publications just made (``state_of``: learner → state)."""
        for pub in publications:
            state = state_of.get(pub.learner)
            ids = (pub.learner, str(pub.payload.get("objective") or ""))
            if pub.stream == "loss":
                for key in ("loss_mean", "loss_ema", "prequential_accuracy"):
                    self._set(key, ids, pub.payload.get(key))
            elif pub.stream == "forgetting":
                self._forgetting(ids, pub.payload, state)
            else:
                firing = 1.0 if pub.payload["state"] == "firing" else 0.0
                self._firing.labels(*ids, pub.payload["slo"]).set(firing)

    def sync(self, learners: Mapping[str, LearnerState]) -> None:
        """Advance the loss SLI counters to each learner's totals."""
        for name, state in learners.items():
            ids = (name, state.objective or "")
            steps, bad = state.slo.steps, state.slo.bad_steps
            before = self._counted.get(name)
            if before is None:
                before = (0, 0)
                self._thresholds_for(ids)
                self._sli_steps.labels(*ids)  # present from the start, at 0
                self._sli_bad.labels(*ids)
            if (steps, bad) != before:
                self._sli_steps.labels(*ids).inc(max(0, steps - before[0]))
                self._sli_bad.labels(*ids).inc(max(0, bad - before[1]))
            self._counted[name] = (steps, bad)

    def rebuilt(self, name: str, state: LearnerState) -> None:
        """A learner's state rebuilt from its stream: those steps were counted before the
        restart (by the previous sidecar), so the counters start from here."""
        self._counted[name] = (state.slo.steps, state.slo.bad_steps)
        self._thresholds_for((name, state.objective or ""))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- helpers ---------------------------------------------------------------------------

    def _set(self, key: str, ids: tuple[str, str], value: Any) -> None:
        if isinstance(value, int | float):
            self._g[key].labels(*ids).set(value)

    def _forgetting(self, ids: tuple[str, str], p: Mapping[str, Any], state: Any) -> None:
        for key in ("avg_accuracy", "avg_forgetting", "avg_min_accuracy", "ece"):
            self._set(key, ids, p.get(key))
        if state is not None:
            self._set("best_avg_accuracy", ids, state.slo.best_avg_accuracy)
        for cls, acc in (p.get("per_class_accuracy") or {}).items():
            if self._admit(ids, "class", cls):
                self._class_acc.labels(*ids, cls).set(acc)
        for cls, value in (p.get("forgetting") or {}).items():
            if self._admit(ids, "class", cls):
                self._class_forget.labels(*ids, cls).set(value)
        for row in p.get("accuracy_matrix") or ():
            after = str(row["task"])
            for task, acc in row["accuracy"].items():
                if self._admit(ids, "task", after) and self._admit(ids, "task", str(task)):
                    self._matrix.labels(*ids, after, str(task)).set(acc)

    def _admit(self, ids: tuple[str, str], kind: str, value: str) -> bool:
        seen = self._labels.setdefault((ids[0], kind), set())
        if value in seen:
            return True
        if len(seen) >= self.max_labels:
            self._dropped.inc()
            return False
        seen.add(value)
        return True

    def _thresholds_for(self, ids: tuple[str, str]) -> None:
        for key, gauge in self._thresholds.items():
            gauge.labels(*ids).set(getattr(self.slo, key))
