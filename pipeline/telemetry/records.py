"""The telemetry records the learner writes and the sidecar reads: one frozen type per kind.

Times: ``ts`` is milliseconds since the epoch, ``elapsed_s`` seconds since learner start.
Labels and tasks are strings (JSON object keys always are).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Self

import orjson

from pipeline.exceptions import SupconStreamError

# NON_STR_KEYS: a label registry filled from JSONL may hold integer keys; NUMPY: a counter
# that is a numpy scalar must not cost the record.
_ORJSON_OPTS: Final = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


class TelemetryDecodeError(SupconStreamError, ValueError):
    """A stream entry that is not a valid record of its kind. Telemetry is another process's
    data: the reader skips such an entry (logged and counted), it never stops the sidecar.

    Decoding is lenient where compatibility needs it and strict where the sidecar would
    otherwise compute garbage: unknown fields are ignored (a newer learner may add some), an
    absent optional field takes its default (an older learner may lack it), and a present
    field of the wrong type rejects the whole record. One exception: in per-class maps of
    floats an entry that is not a finite number is left out (a NaN loss travels as ``null``).
    Integer tasks read as their decimal string.
    """


class _Record:
    """JSON encoding shared by the record types: the payload is the dataclass's fields."""

    __slots__ = ()
    KIND: ClassVar[str]

    def to_json(self) -> bytes:
        """The payload as JSON: one object whose keys are the field names."""
        return orjson.dumps(self, option=_ORJSON_OPTS)

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        """Decode a payload written by :meth:`to_json`; raises :class:`TelemetryDecodeError`."""
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise TelemetryDecodeError(f"{cls.KIND} payload is not JSON: {exc}") from exc
        if not isinstance(payload, dict):
            raise TelemetryDecodeError(
                f"{cls.KIND} payload is a {type(payload).__name__}, not an object"
            )
        return cls.from_dict(payload)

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> Self:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class StepRecord(_Record):
    """``step``: one per training step (micro-batch), written by the learner loop.

    The sidecar turns these into rolling loss, per-class loss, events/s and prequential
    accuracy on ``<prefix>.metrics.loss``.
    """

    KIND: ClassVar[str] = "step"

    learner: str
    step: int
    """The learner's optimizer step count after this batch."""
    ts: int
    """Wall clock of the learner when the step finished, ms since the epoch."""
    objective: str | None = None
    group: str | None = None
    """Kafka consumer group of the learner."""
    events_total: int | None = None
    """Records consumed so far (valid and dead-lettered), across restarts."""
    trained_total: int | None = None
    """Events trained on so far."""
    batch_events: int | None = None
    """Records this batch accounted for; the sidecar's events/s counts these."""
    trained: int | None = None
    held_out: int | None = None
    """Events of this batch kept back for the probe set."""
    predicted: int | None = None
    """Unlabeled events of this batch given a prediction."""
    dead_lettered: int | None = None
    loss: float | None = None
    """Mean loss of the step; None when the step was skipped or nothing was trained."""
    per_class_loss: Mapping[str, float] = field(default_factory=dict)
    """Mean per-sample loss of each class in the batch."""
    skipped: bool = False
    """The step was skipped (non-finite loss or gradient)."""
    skipped_total: int | None = None
    """Skipped steps so far; when absent the sidecar counts ``skipped`` itself."""
    elapsed_s: float | None = None
    prequential_correct: int | None = None
    """Cumulative predict-then-train hits (each labeled event predicted before training)."""
    prequential_total: int | None = None
    """Cumulative predict-then-train attempts; None or 0 means no accuracy yet."""

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> StepRecord:
        p = _Payload(cls.KIND, payload)
        return cls(
            learner=p.text("learner"),
            step=p.integer("step"),
            ts=p.integer("ts"),
            objective=p.opt_str("objective"),
            group=p.opt_str("group"),
            events_total=p.opt_int("events_total"),
            trained_total=p.opt_int("trained_total"),
            batch_events=p.opt_int("batch_events"),
            trained=p.opt_int("trained"),
            held_out=p.opt_int("held_out"),
            predicted=p.opt_int("predicted"),
            dead_lettered=p.opt_int("dead_lettered"),
            loss=p.number("loss"),
            per_class_loss=p.scores("per_class_loss"),
            skipped=p.flag("skipped"),
            skipped_total=p.opt_int("skipped_total"),
            elapsed_s=p.number("elapsed_s"),
            prequential_correct=p.opt_int("prequential_correct"),
            prequential_total=p.opt_int("prequential_total"),
        )


@dataclass(frozen=True, slots=True)
class ClassifierScores:
    """One classifier's result on the probe set."""

    per_class_accuracy: Mapping[str, float]
    """Accuracy of each probed class, in [0, 1]."""
    ece: float | None = None
    """Expected calibration error of its confidences; None without probes. For NCM, of the
    confidences at the fixed temperature 0.1, i.e. before calibration."""
    ece_calibrated: float | None = None
    """NCM only: the ECE after temperature scaling with ``temperature``, fitted on the same
    probes; None when no temperature was fitted (too few probes) or for other classifiers.
    Optional on the wire: absent in records of older learners."""
    temperature: float | None = None
    """NCM only: the softmax temperature fitted on the probes (the bundle ships it)."""

    @classmethod
    def from_payload(cls, p: _Payload) -> ClassifierScores:
        return cls(
            per_class_accuracy=p.scores("per_class_accuracy"),
            ece=p.number("ece"),
            ece_calibrated=p.number("ece_calibrated"),
            temperature=p.number("temperature"),
        )


@dataclass(frozen=True, slots=True)
class EvalRecord(_Record):
    """``eval``: accuracy and calibration on the held-out probe set, every
    ``eval.every_steps`` steps and once more when the learner stops.

    The sidecar folds the primary classifier's per-class accuracy into its forgetting
    tracker and publishes ``<prefix>.metrics.forgetting`` for each one.
    """

    KIND: ClassVar[str] = "eval"

    learner: str
    step: int
    ts: int
    primary: str
    """The classifier the metrics follow (``eval.classifier``, by default the objective's
    natural one): ``"ncm"``, ``"knn"`` or ``"head"``. When it is missing from
    ``classifiers`` (kNN before the bank has items) readers use the first one listed."""
    classifiers: Mapping[str, ClassifierScores]
    """NCM always; kNN once the bank has items; the head when a loss term trains it."""
    objective: str | None = None
    group: str | None = None
    events_total: int | None = None
    class_task: Mapping[str, str | None] = field(default_factory=dict)
    """Task in which each class first appeared (None: the events carried no task)."""
    current_task: str | None = None
    """Task of the most recently trained events."""
    probe_sizes: Mapping[str, int] = field(default_factory=dict)
    """Probe events held per class."""

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> EvalRecord:
        p = _Payload(cls.KIND, payload)
        return cls(
            learner=p.text("learner"),
            step=p.integer("step"),
            ts=p.integer("ts"),
            primary=p.text("primary"),
            classifiers={
                name: ClassifierScores.from_payload(scores)
                for name, scores in p.objects("classifiers").items()
            },
            objective=p.opt_str("objective"),
            group=p.opt_str("group"),
            events_total=p.opt_int("events_total"),
            class_task=p.tasks("class_task"),
            current_task=p.task("current_task"),
            probe_sizes=p.counts("probe_sizes"),
        )


@dataclass(frozen=True, slots=True)
class EndRecord(_Record):
    """``end``: a bounded learner run finished (after its final eval and checkpoint).

    The sidecar closes the current task's accuracy-matrix row and publishes one more loss
    and forgetting record each, marked ``final``.
    """

    KIND: ClassVar[str] = "end"

    learner: str
    step: int
    events_total: int | None = None
    elapsed_s: float | None = None
    world_size: int | None = None
    """Ranks of a data-parallel group (torchrun) whose rank 0 wrote this; None: one process."""
    model_digest: str | None = None
    """A group's hash of the final model parameters, equal on every rank."""

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> EndRecord:
        p = _Payload(cls.KIND, payload)
        return cls(
            learner=p.text("learner"),
            step=p.integer("step"),
            events_total=p.opt_int("events_total"),
            elapsed_s=p.number("elapsed_s"),
            world_size=p.opt_int("world_size"),
            model_digest=p.opt_str("model_digest"),
        )


TelemetryRecord = StepRecord | EvalRecord | EndRecord

RECORD_TYPES: Final[Mapping[str, type[StepRecord] | type[EvalRecord] | type[EndRecord]]] = {
    t.KIND: t for t in (StepRecord, EvalRecord, EndRecord)
}


def decode_record(kind: str, data: bytes | str) -> TelemetryRecord | None:
    """The record of ``kind`` in ``data``; None for a kind this version does not know
    (readers ignore those: forward compatibility). Raises :class:`TelemetryDecodeError`."""
    record_type = RECORD_TYPES.get(kind)
    return None if record_type is None else record_type.from_json(data)


class _Payload:
    """Typed reads of one decoded JSON object; every failure names the field."""

    def __init__(self, where: str, payload: Mapping[str, Any]) -> None:
        self._where = where
        self._payload = payload

    def _bad(self, name: str, expected: str) -> TelemetryDecodeError:
        value = self._payload.get(name)
        return TelemetryDecodeError(
            f"{self._where}.{name} is {type(value).__name__} {value!r:.40}, not {expected}"
        )

    def _required(self, name: str) -> Any:
        value = self._payload.get(name)
        if value is None:
            raise TelemetryDecodeError(f"{self._where}.{name} is missing")
        return value

    def integer(self, name: str) -> int:
        value = self._required(name)
        if not _is_int(value):
            raise self._bad(name, "an integer")
        return int(value)

    def opt_int(self, name: str) -> int | None:
        return None if self._payload.get(name) is None else self.integer(name)

    def text(self, name: str) -> str:
        value = self._required(name)
        if not isinstance(value, str):
            raise self._bad(name, "a string")
        return value

    def opt_str(self, name: str) -> str | None:
        return None if self._payload.get(name) is None else self.text(name)

    def flag(self, name: str) -> bool:
        value = self._payload.get(name, False)
        if not isinstance(value, bool):
            raise self._bad(name, "a boolean")
        return value

    def number(self, name: str) -> float | None:
        """An optional number; a non-finite one reads as None."""
        value = self._payload.get(name)
        if value is None:
            return None
        if not _is_number(value):
            raise self._bad(name, "a number")
        return _finite(value)

    def task(self, name: str) -> str | None:
        value = self._payload.get(name)
        if value is not None and not isinstance(value, str) and not _is_int(value):
            raise self._bad(name, "a task (string, integer or null)")
        return None if value is None else str(value)

    def mapping(self, name: str) -> Mapping[str, Any]:
        value = self._payload.get(name)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self._bad(name, "an object")
        return value

    def objects(self, name: str) -> dict[str, _Payload]:
        """A required object of objects, each value readable in turn."""
        self._required(name)
        out: dict[str, _Payload] = {}
        for key, value in self.mapping(name).items():
            if not isinstance(value, Mapping):
                raise _Payload(f"{self._where}.{name}", {key: value})._bad(key, "an object")
            out[str(key)] = _Payload(f"{self._where}.{name}.{key}", value)
        return out

    def scores(self, name: str) -> dict[str, float]:
        """Label → float; entries that are not finite numbers are left out (see module doc)."""
        out: dict[str, float] = {}
        for key, value in self.mapping(name).items():
            x = _finite(value) if _is_number(value) else None
            if x is not None:
                out[str(key)] = x
        return out

    def counts(self, name: str) -> dict[str, int]:
        values = _Payload(f"{self._where}.{name}", self.mapping(name))
        return {str(key): values.integer(key) for key in values._payload}

    def tasks(self, name: str) -> dict[str, str | None]:
        values = _Payload(f"{self._where}.{name}", self.mapping(name))
        return {str(key): values.task(key) for key in values._payload}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: float) -> float | None:
    x = float(value)
    return x if math.isfinite(x) else None
