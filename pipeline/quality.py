"""Rolling metrics: small objects with ``update`` / ``result`` behind one protocol.

Pure logic, no I/O and no clocks of their own (:class:`Rate` is given timestamps), so the
sidecar can rebuild them by re-reading telemetry and tests can check them against values
computed by hand.

Forgetting follows Chaudhry et al. 2018 ("Riemannian Walk"): for each class (and each task),
``forgetting = best accuracy so far − current accuracy``. Because "best so far" includes the
current evaluation, forgetting is never negative: a class that improves has forgotten nothing.
Average anytime accuracy follows Caccia et al. 2022, backward transfer Lopez-Paz & Ranzato
2017 (``BWT = mean over earlier tasks i of R[last, i] − R[i, i]``), the stability gap's
worst-case accuracy De Lange et al. 2023 (``min_task_accuracy``: a task's lowest accuracy at
any evaluation after it ended), and expected calibration error Guo et al. 2017
(:func:`expected_calibration_error`). docs/metrics.md has the definitions.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

InT_contra = TypeVar("InT_contra", contravariant=True)
OutT_co = TypeVar("OutT_co", covariant=True)


class RollingMetric(Protocol[InT_contra, OutT_co]):
    """A metric fed one observation at a time; ``result()`` is cheap and side-effect free."""

    def update(self, value: InT_contra, /) -> None: ...

    def result(self) -> OutT_co: ...


class RollingMean:
    """Mean of the last ``window`` values; ``None`` before the first value."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self._values: deque[float] = deque(maxlen=window)

    def update(self, value: float, /) -> None:
        self._values.append(float(value))

    def result(self) -> float | None:
        if not self._values:
            return None
        # fsum over a small window is exact and avoids the drift of a running sum.
        return math.fsum(self._values) / len(self._values)

    def __len__(self) -> int:
        return len(self._values)


class Ema:
    """Exponential moving average ``m ← α·x + (1−α)·m``, seeded with the first value."""

    def __init__(self, alpha: float) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._value: float | None = None

    def update(self, value: float, /) -> None:
        x = float(value)
        # Seeding with the first value (rather than 0) avoids the start-up bias of a zero init.
        self._value = (
            x if self._value is None else self.alpha * x + (1.0 - self.alpha) * self._value
        )

    def result(self) -> float | None:
        return self._value


class PerKeyRollingMean:
    """One :class:`RollingMean` per key (per-class loss); a key's window only moves when the
    key is present in an update, so rare classes keep their last ``window`` values."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self._means: dict[str, RollingMean] = {}

    def update(self, value: Mapping[str, float], /) -> None:
        for key, x in value.items():
            mean = self._means.get(key)
            if mean is None:
                mean = self._means[key] = RollingMean(self.window)
            mean.update(x)

    def result(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, mean in self._means.items():
            value = mean.result()
            if value is not None:
                out[key] = value
        return out


class Rate:
    """Events per second over the last ``window_s`` seconds of observations.

    Each observation ``(count, t)`` says that ``count`` events happened in the interval that
    ends at ``t`` (seconds, any clock, non-decreasing). The rate is the events after the oldest
    kept observation divided by the time since it: the oldest one only anchors the interval.
    One observation older than the window is kept as that anchor, so the measured span covers
    the whole window. ``None`` until two observations span a positive time.
    """

    def __init__(self, window_s: float) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()  # (t, count)
        self._count_after_first = 0.0

    def update(self, value: tuple[float, float], /) -> None:
        count, t = float(value[0]), float(value[1])
        if self._samples and t < self._samples[-1][0]:
            # A clock step backwards (learner restarted on another host): start over rather
            # than report a negative or inflated rate.
            self._samples.clear()
            self._count_after_first = 0.0
        if self._samples:
            self._count_after_first += count
        self._samples.append((t, count))
        horizon = t - self.window_s
        while len(self._samples) >= 2 and self._samples[1][0] <= horizon:
            self._samples.popleft()
            self._count_after_first -= self._samples[0][1]

    def result(self) -> float | None:
        if len(self._samples) < 2:
            return None
        span = self._samples[-1][0] - self._samples[0][0]
        if span <= 0:
            return None
        return self._count_after_first / span


ECE_BINS = 15


def expected_calibration_error(
    confidence: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS
) -> float | None:
    """ECE (Guo et al. 2017): ``Σ_b |B_b|/n · |accuracy(B_b) − mean confidence(B_b)|``.

    Predictions are put in ``bins`` equal-width confidence bins over (0, 1] (a confidence of
    exactly 0 goes in the first bin). ``None`` when there are no predictions.
    """
    if len(confidence) != len(correct):
        raise ValueError(f"{len(confidence)} confidences for {len(correct)} outcomes")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    n = len(confidence)
    if n == 0:
        return None
    conf_sum = [0.0] * bins
    hits = [0] * bins
    count = [0] * bins
    for c, ok in zip(confidence, correct, strict=True):
        b = min(bins - 1, max(0, math.ceil(float(c) * bins) - 1))
        conf_sum[b] += float(c)
        hits[b] += bool(ok)
        count[b] += 1
    return math.fsum(abs(hits[b] - conf_sum[b]) / n for b in range(bins) if count[b])


@dataclass(frozen=True, slots=True)
class AccuracyRow:
    """One row of the accuracy matrix: per-task accuracy when ``task`` ended."""

    task: str
    accuracy: dict[str, float]


@dataclass(frozen=True, slots=True)
class ForgettingResult:
    """Everything :class:`ForgettingTracker` knows after its latest evaluation.

    Per-class maps cover every class evaluated so far (a class absent from the latest
    evaluation keeps its last value). Averages are ``None`` when nothing qualifies.
    """

    evaluations: int
    current_task: str | None
    per_class_accuracy: dict[str, float]
    best_accuracy: dict[str, float]
    forgetting: dict[str, float]
    seen_before: tuple[str, ...]
    avg_forgetting: float | None
    avg_accuracy: float | None
    per_task_accuracy: dict[str, float]
    per_task_forgetting: dict[str, float]
    anytime_avg_accuracy: float | None
    accuracy_matrix: tuple[AccuracyRow, ...]
    backward_transfer: float | None
    # Stability gap (De Lange et al. 2023): each ended task's lowest accuracy at any
    # evaluation after it ended, and the mean of those minima over ended tasks.
    min_task_accuracy: dict[str, float] = field(default_factory=dict)
    avg_min_accuracy: float | None = None


@dataclass(slots=True)
class _ClassHistory:
    current: float
    best: float
    evaluations: int = 1


@dataclass(slots=True)
class _Row:
    task: str
    accuracy: dict[str, float]
    # A row closed by finish() rather than by a task change: if the same task carries on
    # (a restarted learner), the next close replaces it instead of adding a duplicate.
    provisional: bool = False


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


class ForgettingTracker:
    """Per-class accuracy history → forgetting, average/anytime accuracy, per-task views.

    "Seen before" (the classes average forgetting is taken over): when the current task and
    the class's first task are known, classes whose first task differs from the current
    task; otherwise classes evaluated at least twice. A task's accuracy is the mean current
    accuracy of the classes that first appeared in it; its forgetting is the best such mean
    so far minus the current one. A row of the accuracy matrix is closed each time the
    current task changes (holding the per-task accuracy of the last evaluation of the task
    that ended) and by :meth:`finish` at the end of a bounded run.
    """

    def __init__(self) -> None:
        self._classes: dict[str, _ClassHistory] = {}
        self._first_task: dict[str, str] = {}
        self._tasks: list[str] = []  # order of first appearance
        self._task_best: dict[str, float] = {}
        self._current_task: str | None = None
        self._rows: list[_Row] = []
        self._evaluations = 0
        self._anytime_sum = 0.0
        self._anytime_n = 0
        self._task_min: dict[str, float] = {}  # ended tasks only

    def update(
        self,
        value: Mapping[str, float],
        /,
        class_task: Mapping[str, str | None] | None = None,
        current_task: str | None = None,
    ) -> None:
        """Record one evaluation: ``value`` maps class → accuracy in [0, 1]."""
        if (
            current_task is not None
            and self._current_task is not None
            and current_task != self._current_task
        ):
            # The previous evaluation was the last one of the task that just ended.
            self._close_row(self._current_task, provisional=False)
            self._task_min.setdefault(self._current_task, math.inf)
        if class_task:
            for cls, task in class_task.items():
                if task is not None:
                    # The first task a class appeared in never changes; keep the first answer.
                    self._first_task.setdefault(cls, task)
                    self._note_task(task)
        if current_task is not None:
            self._note_task(current_task)
            self._current_task = current_task
        for cls, acc in value.items():
            x = float(acc)
            if not math.isfinite(x):
                continue  # an empty probe reports NaN: no evidence either way
            hist = self._classes.get(cls)
            if hist is None:
                self._classes[cls] = _ClassHistory(current=x, best=x)
            else:
                hist.current = x
                hist.best = max(hist.best, x)
                hist.evaluations += 1
        for task, acc in self._task_accuracy().items():
            self._task_best[task] = max(self._task_best.get(task, acc), acc)
            if task in self._task_min and task != self._current_task:
                self._task_min[task] = min(self._task_min[task], acc)
        self._evaluations += 1
        avg = self._avg_accuracy()
        if avg is not None:
            self._anytime_sum += avg
            self._anytime_n += 1

    def finish(self) -> None:
        """Close the accuracy-matrix row of the current task (end of a bounded run)."""
        if self._current_task is not None and self._evaluations:
            self._close_row(self._current_task, provisional=True)

    def result(self) -> ForgettingResult:
        current = {c: h.current for c, h in self._classes.items()}
        best = {c: h.best for c, h in self._classes.items()}
        forgetting = {c: h.best - h.current for c, h in self._classes.items()}
        seen_before = tuple(c for c in self._classes if self._seen_before(c))
        task_acc = self._task_accuracy()
        task_forgetting = {t: self._task_best[t] - acc for t, acc in task_acc.items()}
        rows = tuple(AccuracyRow(r.task, dict(r.accuracy)) for r in self._rows)
        minima = {t: m for t, m in self._task_min.items() if math.isfinite(m)}
        return ForgettingResult(
            evaluations=self._evaluations,
            current_task=self._current_task,
            per_class_accuracy=current,
            best_accuracy=best,
            forgetting=forgetting,
            seen_before=seen_before,
            avg_forgetting=_mean([forgetting[c] for c in seen_before]),
            avg_accuracy=self._avg_accuracy(),
            per_task_accuracy=task_acc,
            per_task_forgetting=task_forgetting,
            anytime_avg_accuracy=(self._anytime_sum / self._anytime_n if self._anytime_n else None),
            accuracy_matrix=rows,
            backward_transfer=self._backward_transfer(),
            min_task_accuracy=minima,
            avg_min_accuracy=_mean(list(minima.values())),
        )

    def _note_task(self, task: str) -> None:
        if task not in self._tasks:
            self._tasks.append(task)

    def _seen_before(self, cls: str) -> bool:
        first = self._first_task.get(cls)
        if first is not None and self._current_task is not None:
            return first != self._current_task
        return self._classes[cls].evaluations >= 2

    def _avg_accuracy(self) -> float | None:
        return _mean([h.current for h in self._classes.values()])

    def _task_accuracy(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for task in self._tasks:
            accs = [h.current for c, h in self._classes.items() if self._first_task.get(c) == task]
            mean = _mean(accs)
            if mean is not None:
                out[task] = mean
        return out

    def _close_row(self, task: str, provisional: bool) -> None:
        row = _Row(task, self._task_accuracy(), provisional)
        if self._rows and self._rows[-1].provisional and self._rows[-1].task == task:
            self._rows[-1] = row
        else:
            self._rows.append(row)

    def _backward_transfer(self) -> float | None:
        if len(self._rows) < 2:
            return None
        last = self._rows[-1]
        diagonal: dict[str, float] = {}
        for row in self._rows[:-1]:
            # R[i, i] comes from the first time task i ended.
            if row.task not in diagonal and row.task in row.accuracy:
                diagonal[row.task] = row.accuracy[row.task]
        deltas = [
            last.accuracy[t] - r_ii
            for t, r_ii in diagonal.items()
            if t != last.task and t in last.accuracy
        ]
        return _mean(deltas)
