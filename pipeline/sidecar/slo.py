"""Quality SLOs, evaluated by the sidecar for one learner; changes become alert events.

The same SLOs as the Prometheus rules of ``deploy/prometheus/alerts.yml`` (whose
thresholds the sidecar exports as ``supcon_slo_*`` series), so event-driven services can
react on ``<prefix>.alerts`` without Prometheus:

* ``loss_burn_page`` / ``loss_burn_ticket``: the loss SLI is the fraction of good steps;
  a step is bad when it was skipped (non-finite) or its loss exceeds ``slo.loss_max``, or,
  when that is null, ``slo.loss_vs_mean`` × the rolling mean loss before it. The error
  budget is ``1 − slo.loss_target``. Multiwindow, multi-burn-rate (Google SRE workbook,
  ch. 5): page at 14.4× burn over 1 h confirmed over 5 min, ticket at 6× over 6 h
  confirmed over 30 min; windows on the learner's clock, in 10 s buckets, evaluated when a
  bucket opens, and only once the short window holds ``MIN_WINDOW_STEPS`` steps.
* ``forgetting``: average forgetting above ``slo.forgetting_max``;
* ``stability_gap``: the newest average accuracy more than ``slo.stability_gap_max``
  below the best so far;
* ``calibration``: ECE of the primary classifier above ``slo.ece_max``.

The evaluation SLOs count from the ``slo.min_evaluations``-th evaluation. Pure: time is the
learner's ``ts`` passed in, no I/O.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config import SloSettings

Severity = Literal["page", "ticket"]
BUCKET_S = 10


@dataclass(frozen=True, slots=True)
class BurnRule:
    slo: str
    long_s: int
    short_s: int
    factor: float
    severity: Severity


BURN_RULES = (
    BurnRule("loss_burn_page", 3600, 300, 14.4, "page"),
    BurnRule("loss_burn_ticket", 6 * 3600, 1800, 6.0, "ticket"),
)
_HORIZON_S = max(r.long_s for r in BURN_RULES)
# A burn rate over a handful of steps is noise (one bad first step is a 100 % error ratio):
# both windows must hold this many steps. alerts.yml asks the same of its short window.
MIN_WINDOW_STEPS = 20


@dataclass(frozen=True, slots=True)
class AlertChange:
    """One SLO's state change: ``firing`` (with the evidence) or ``resolved``."""

    slo: str
    state: Literal["firing", "resolved"]
    severity: Severity
    threshold: float
    evidence: dict[str, Any]
    ts: int  # the learner's clock, ms
    since: int  # when this SLO started firing, ms


class StepCounts:
    """Good and bad steps in ``BUCKET_S`` buckets over the last 6 h of the learner's clock."""

    def __init__(self) -> None:
        self._buckets: deque[list[int]] = deque()  # [bucket start s, bad, total]

    def add(self, ts_s: float, bad: bool) -> bool:
        """Count one step; True when it opened a new bucket (the previous one closed)."""
        start = int(ts_s // BUCKET_S) * BUCKET_S
        opened = not self._buckets or start > self._buckets[-1][0]
        if opened:
            self._buckets.append([start, 0, 0])
            while self._buckets[0][0] <= start - _HORIZON_S:
                self._buckets.popleft()
        last = self._buckets[-1]  # a step older than the newest bucket counts in it
        last[1] += bad
        last[2] += 1
        return opened

    def error_ratio(self, window_s: int) -> tuple[float | None, int]:
        """(bad / total, total) over the buckets of the last ``window_s``; None without steps."""
        if not self._buckets:
            return None, 0
        newest = self._buckets[-1][0]
        bad = total = 0
        for start, b, t in reversed(self._buckets):
            if start <= newest - window_s:
                break
            bad, total = bad + b, total + t
        return (bad / total if total else None), total


class SloEvaluator:
    """The SLOs of one learner; feed steps and evaluations, get the state changes back."""

    def __init__(self, cfg: SloSettings) -> None:
        self.cfg = cfg
        self.counts = StepCounts()
        self.steps = 0  # the loss SLI's steps and bad steps since the sidecar started
        self.bad_steps = 0
        self.best_avg_accuracy: float | None = None
        self.firing: dict[str, int] = {}  # slo → since (ms)

    def loss_threshold(self, mean_before: float | None) -> float | None:
        if self.cfg.loss_max is not None:
            return self.cfg.loss_max
        return None if mean_before is None else self.cfg.loss_vs_mean * mean_before

    def step(
        self, loss: float | None, skipped: bool, mean_before: float | None, ts_ms: int
    ) -> list[AlertChange]:
        """One training step. ``mean_before`` is the rolling mean loss before it."""
        if loss is None and not skipped:
            return []  # nothing was trained: not an SLI event
        limit = self.loss_threshold(mean_before)
        bad = skipped or loss is None or not math.isfinite(loss)
        bad = bad or (limit is not None and loss is not None and loss > limit)
        self.steps += 1
        self.bad_steps += bad
        if not self.counts.add(ts_ms / 1000.0, bad):
            return []
        changes: list[AlertChange] = []
        budget = 1.0 - self.cfg.loss_target
        for rule in BURN_RULES:
            long_ratio, long_n = self.counts.error_ratio(rule.long_s)
            short_ratio, short_n = self.counts.error_ratio(rule.short_s)
            bound = rule.factor * budget
            breached = (
                short_n >= MIN_WINDOW_STEPS
                and (long_ratio or 0.0) > bound
                and (short_ratio or 0.0) > bound
            )
            evidence = {
                "error_ratio_long": long_ratio,
                "error_ratio_short": short_ratio,
                "window_long_s": rule.long_s,
                "window_short_s": rule.short_s,
                "steps_long": long_n,
                "burn_rate": None if long_ratio is None else long_ratio / budget,
            }
            changes += self._transition(rule.slo, rule.severity, breached, bound, evidence, ts_ms)
        return changes

    def evaluation(
        self,
        evaluations: int,
        avg_forgetting: float | None,
        avg_accuracy: float | None,
        ece: float | None,
        ts_ms: int,
    ) -> list[AlertChange]:
        """One evaluation on the probe set (already folded into the forgetting tracker)."""
        best = self.best_avg_accuracy
        gap = None if best is None or avg_accuracy is None else best - avg_accuracy
        if avg_accuracy is not None:
            self.best_avg_accuracy = avg_accuracy if best is None else max(best, avg_accuracy)
        if evaluations < self.cfg.min_evaluations:
            return []
        c = self.cfg
        checks = (
            ("forgetting", avg_forgetting, c.forgetting_max, {"avg_forgetting": avg_forgetting}),
            (
                "stability_gap",
                gap,
                c.stability_gap_max,
                {"avg_accuracy": avg_accuracy, "best_avg_accuracy": best, "gap": gap},
            ),
            ("calibration", ece, c.ece_max, {"ece": ece}),
        )
        changes: list[AlertChange] = []
        for slo, value, bound, evidence in checks:
            if value is None:
                continue  # no evidence either way: the state stays
            breached = value > bound
            changes += self._transition(slo, "ticket", breached, bound, evidence, ts_ms)
        return changes

    def _transition(
        self,
        slo: str,
        severity: Severity,
        breached: bool,
        threshold: float,
        evidence: dict[str, Any],
        ts_ms: int,
    ) -> list[AlertChange]:
        since = self.firing.get(slo)
        if breached and since is None:
            self.firing[slo] = ts_ms
            return [AlertChange(slo, "firing", severity, threshold, evidence, ts_ms, ts_ms)]
        if not breached and since is not None:
            del self.firing[slo]
            return [AlertChange(slo, "resolved", severity, threshold, evidence, ts_ms, since)]
        return []
