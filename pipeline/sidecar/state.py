"""The sidecar's rolling state per learner: telemetry records in, metrics payloads out.

Pure: no I/O, time is passed in, so every payload is unit-testable without Kafka or Redis.
See :mod:`pipeline.quality` for the metric definitions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config import SidecarSettings, SloSettings
from pipeline.quality import Ema, ForgettingTracker, PerKeyRollingMean, Rate, RollingMean
from pipeline.sidecar.slo import AlertChange, SloEvaluator
from pipeline.telemetry.channel import MALFORMED, TelemetryEntry
from pipeline.telemetry.records import EndRecord, EvalRecord, StepRecord, TelemetryRecord

Stream = Literal["loss", "forgetting", "alerts"]


@dataclass(frozen=True, slots=True)
class Publication:
    """One metrics record to publish: which stream, for which learner (the Kafka key)."""

    stream: Stream
    learner: str
    payload: dict[str, Any]


class LearnerState:
    """Rolling state of one learner, fed record by record; builds the payloads."""

    def __init__(self, name: str, cfg: SidecarSettings, slo: SloSettings | None = None) -> None:
        self.name = name
        self.slo = SloEvaluator(slo or SloSettings())
        self.window = cfg.window
        self.loss_mean = RollingMean(cfg.window)
        self.loss_ema = Ema(cfg.ema_alpha)
        self.per_class_loss = PerKeyRollingMean(cfg.window)
        self.rate = Rate(cfg.rate_window_s)
        self.forgetting = ForgettingTracker()
        self.objective: str | None = None
        self.group: str | None = None
        self.step: int | None = None
        self.ts: int | None = None
        self.events_total: int | None = None
        self.skipped_steps = 0
        self.prequential_correct = 0
        self.prequential_total = 0
        self.classifier: str | None = None
        self.ece: float | None = None
        self.ece_calibrated: float | None = None
        self.steps_seen = 0
        self.evals_seen = 0
        self.ended = False
        self.dirty = False  # steps since the last loss publication
        self.last_loss_publish = -math.inf  # sidecar monotonic clock

    def apply(self, record: TelemetryRecord) -> list[Publication]:
        """Fold one record in; returns what it makes due (eval → forgetting, end → both,
        any record → an alert for each SLO whose state it changed)."""
        match record:
            case StepRecord():
                return self._alerts(self._apply_step(record))
            case EvalRecord():
                self._apply_eval(record)
                payload = self.forgetting_payload()
                changes = self.slo.evaluation(
                    self.evals_seen,
                    payload["avg_forgetting"],
                    payload["avg_accuracy"],
                    self.ece,
                    record.ts,
                )
                return [Publication("forgetting", self.name, payload), *self._alerts(changes)]
            case EndRecord():
                return self._apply_end(record)

    def _alerts(self, changes: list[AlertChange]) -> list[Publication]:
        """The ``<prefix>.alerts`` records (JSON, keyed by learner name): one per SLO state
        change. Besides the learner's identity (learner, objective, group, step): ``slo``
        (``loss_burn_page``, ``loss_burn_ticket``, ``forgetting``, ``stability_gap``,
        ``calibration``), ``state`` (``firing`` | ``resolved``), ``severity`` (``page`` |
        ``ticket``), ``threshold``, ``evidence`` (the values compared), ``ts`` (the learner's
        clock, ms) and ``since`` (when it started firing, ms). See :mod:`pipeline.sidecar.slo`.
        """
        return [
            Publication(
                "alerts",
                self.name,
                {
                    "learner": self.name,
                    "objective": self.objective,
                    "group": self.group,
                    "step": self.step,
                    "slo": c.slo,
                    "state": c.state,
                    "severity": c.severity,
                    "threshold": c.threshold,
                    "evidence": c.evidence,
                    "ts": c.ts,
                    "since": c.since,
                },
            )
            for c in changes
        ]

    def _apply_common(self, record: TelemetryRecord) -> None:
        if not isinstance(record, EndRecord):
            self.objective = record.objective or self.objective
            self.group = record.group or self.group
            self.ts = record.ts
        self.step = record.step
        if record.events_total is not None:
            self.events_total = record.events_total

    def _apply_step(self, record: StepRecord) -> list[AlertChange]:
        self._apply_common(record)
        self.steps_seen += 1
        self.ended = False  # steps after an `end`: a new run of the same learner
        changes = self.slo.step(record.loss, record.skipped, self.loss_mean.result(), record.ts)
        if not record.skipped and record.loss is not None:
            self.loss_mean.update(record.loss)
            self.loss_ema.update(record.loss)
        self.per_class_loss.update(record.per_class_loss)
        if record.skipped_total is not None:
            self.skipped_steps = record.skipped_total
        elif record.skipped:
            self.skipped_steps += 1
        if record.batch_events is not None:
            # The learner's clock, not ours: rebuilding after a restart or catching up on a
            # backlog must give the rate the learner had, not the speed of reading.
            self.rate.update((record.batch_events, record.ts / 1000.0))
        if record.prequential_total is not None:
            self.prequential_total = record.prequential_total
            self.prequential_correct = record.prequential_correct or 0
        self.dirty = True
        return changes

    def _apply_eval(self, record: EvalRecord) -> None:
        self._apply_common(record)
        self.evals_seen += 1
        primary = record.primary
        chosen = record.classifiers.get(primary)
        if chosen is None and record.classifiers:
            primary, chosen = next(iter(record.classifiers.items()))
        self.classifier = primary
        self.ece = chosen.ece if chosen else None
        self.ece_calibrated = chosen.ece_calibrated if chosen else None
        self.forgetting.update(
            chosen.per_class_accuracy if chosen else {},
            class_task=record.class_task,
            current_task=record.current_task,
        )

    def _apply_end(self, record: EndRecord) -> list[Publication]:
        self._apply_common(record)
        self.ended = True
        self.forgetting.finish()
        out: list[Publication] = []
        if self.steps_seen:
            out.append(Publication("loss", self.name, self.loss_payload()))
            self.dirty = False
        if self.evals_seen:
            out.append(Publication("forgetting", self.name, self.forgetting_payload()))
        return out

    def loss_payload(self) -> dict[str, Any]:
        """The ``<prefix>.metrics.loss`` record (JSON, keyed by learner name).

        Published every ``sidecar.publish_every_s`` per learner with new steps, and on
        ``end``. Besides the learner's identity (learner, objective, group, step, ts,
        events_total): ``window``; ``loss_mean``, the mean loss of the last ``window``
        non-skipped steps; ``loss_ema``, their EMA (``sidecar.ema_alpha``);
        ``per_class_loss``, {label: mean of its last ``window`` per-class losses};
        ``events_per_s``, consumed records/s over ``sidecar.rate_window_s`` of the learner's
        clock; ``skipped_steps``; ``prequential_accuracy``, the cumulative predict-then-train
        accuracy (null before any); ``final``, true on the record published for ``end``.
        """
        return {
            "learner": self.name,
            "objective": self.objective,
            "group": self.group,
            "step": self.step,
            "ts": self.ts,
            "window": self.window,
            "loss_mean": self.loss_mean.result(),
            "loss_ema": self.loss_ema.result(),
            "per_class_loss": self.per_class_loss.result(),
            "events_total": self.events_total,
            "events_per_s": self.rate.result(),
            "skipped_steps": self.skipped_steps,
            "prequential_accuracy": (
                self.prequential_correct / self.prequential_total
                if self.prequential_total
                else None
            ),
            "final": self.ended,
        }

    def forgetting_payload(self) -> dict[str, Any]:
        """The ``<prefix>.metrics.forgetting`` record (JSON, keyed by learner name).

        Published on every ``eval`` and once more on ``end`` (then ``final`` is true and the
        accuracy matrix holds the last task's row). Besides the learner's identity:
        ``classifier``, the eval's primary classifier; {label: float} maps
        ``per_class_accuracy``, ``best_accuracy``, ``forgetting``; ``avg_forgetting``,
        ``avg_accuracy`` (float | null); {task: float} maps ``per_task_accuracy``,
        ``per_task_forgetting``; ``anytime_avg_accuracy``, ``backward_transfer`` (float |
        null); ``min_task_accuracy``, {ended task: lowest accuracy since it ended} (the
        stability gap) and ``avg_min_accuracy``, its mean (null before a task ends); ``ece``
        of the primary classifier and ``ece_calibrated``, its ECE after temperature scaling
        (NCM only, else null); ``accuracy_matrix``, [{"task": ended task, "accuracy":
        {task: float}}, ...]; ``current_task``; ``evaluations``; ``final``, the learner's
        ``end`` was seen (and no step since).
        """
        r = self.forgetting.result()
        return {
            "learner": self.name,
            "objective": self.objective,
            "group": self.group,
            "step": self.step,
            "ts": self.ts,
            "events_total": self.events_total,
            "classifier": self.classifier,
            "per_class_accuracy": r.per_class_accuracy,
            "best_accuracy": r.best_accuracy,
            "forgetting": r.forgetting,
            "avg_forgetting": r.avg_forgetting,
            "avg_accuracy": r.avg_accuracy,
            "per_task_accuracy": r.per_task_accuracy,
            "per_task_forgetting": r.per_task_forgetting,
            "anytime_avg_accuracy": r.anytime_avg_accuracy,
            "backward_transfer": r.backward_transfer,
            "min_task_accuracy": r.min_task_accuracy,
            "avg_min_accuracy": r.avg_min_accuracy,
            "ece": self.ece,
            "ece_calibrated": self.ece_calibrated,
            "accuracy_matrix": [
                {"task": row.task, "accuracy": row.accuracy} for row in r.accuracy_matrix
            ],
            "current_task": r.current_task,
            "evaluations": r.evaluations,
            "final": self.ended,
        }


class SidecarState:
    """All learners' rolling state. Pure: no I/O, time is passed in."""

    def __init__(self, cfg: SidecarSettings, slo: SloSettings | None = None) -> None:
        self.cfg = cfg
        self.slo = slo or SloSettings()
        self.learners: dict[str, LearnerState] = {}
        self.malformed = 0  # entries skipped because they could not be decoded

    def learner(self, name: str) -> LearnerState:
        state = self.learners.get(name)
        if state is None:
            state = self.learners[name] = LearnerState(name, self.cfg, self.slo)
        return state

    def apply(self, entry: TelemetryEntry) -> list[Publication]:
        """Fold one entry into its learner's state. Malformed entries (the reader logged
        them) and kinds this version does not know are skipped."""
        state = self.learner(entry.learner)
        if entry.record is None:
            self.malformed += entry.kind == MALFORMED
            return []
        return state.apply(entry.record)

    def due_loss(self, now: float) -> list[Publication]:
        """Loss payloads of learners with new steps whose publish period has elapsed."""
        out: list[Publication] = []
        for state in self.learners.values():
            if state.dirty and now - state.last_loss_publish >= self.cfg.publish_every_s:
                out.append(Publication("loss", state.name, state.loss_payload()))
                state.dirty = False
                state.last_loss_publish = now
        return out
