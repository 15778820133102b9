"""What one learner process holds: its components, its counters, its limits and its summary.

:class:`LearnerContext` is built once by :func:`pipeline.learner.assembly.build_context` and
passed to every stage of the loop; nothing in it is global.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from consumers.producer import JsonProducer
from consumers.protocols import EventSource
from memory_bank.bank import MemoryBank
from pipeline.config import Settings
from pipeline.distributed.rank_info import SINGLE, RankInfo
from pipeline.learner.checkpointer import Checkpointer
from pipeline.learner.exposition import LearnerExposition
from pipeline.learner.health import HealthBoard
from pipeline.learner.ledger import TrainedLedger
from pipeline.learner.probes import ProbeSet
from pipeline.learning.inference import NCM_TEMPERATURE, ClassMeans
from pipeline.learning.labels import LabelRegistry
from pipeline.learning.step import TrainState
from pipeline.learning.stream_means import StreamClassMeans
from pipeline.telemetry.channel import TelemetryWriter

if TYPE_CHECKING:
    from pipeline.learner.exporting import AutoExport


@dataclass
class Counters:
    """Events by fate since the first run (restored from the checkpoint on restart)."""

    consumed: int = 0
    trained: int = 0
    held_out: int = 0
    dead_lettered: int = 0
    predicted: int = 0
    batches: int = 0
    prequential_correct: int = 0
    prequential_total: int = 0
    first_event_ms: int = 0  # event time of the earliest / latest trained event (0: none yet)
    last_event_ms: int = 0

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, raw: dict[str, float]) -> Counters:
        return cls(**{k: int(v) for k, v in raw.items() if k in cls.__dataclass_fields__})


@dataclass
class LearnerContext:
    """Everything the loop touches, built once by ``build_context``."""

    settings: Settings
    device: torch.device
    state: TrainState
    registry: LabelRegistry
    seen_classes: torch.Tensor  # bool [max_classes] on device
    probes: ProbeSet
    bank: MemoryBank
    source: EventSource
    producer: JsonProducer
    telemetry: TelemetryWriter
    generator: torch.Generator
    checkpointer: Checkpointer  # the offsets covered by training, and when to commit them
    counters: Counters = field(default_factory=Counters)
    means: ClassMeans | None = None
    means_step: int = -1
    # eval.class_means: stream (NCM's class means follow the stream; in the checkpoint)
    stream_means: StreamClassMeans | None = None
    current_task: str | None = None
    started: float = field(default_factory=time.monotonic)
    ledger: TrainedLedger | None = None  # checkpoint.ledger: ids of every trained event
    health: HealthBoard | None = None
    # NCM's softmax temperature: fitted on the probes at each evaluation (probes.evaluate).
    temperature: float = NCM_TEMPERATURE
    last_metrics: dict[str, Any] = field(default_factory=dict)  # of the last evaluation
    exporter: AutoExport | None = None  # export.every_checkpoints > 0
    exposition: LearnerExposition | None = None  # Prometheus series, served with /healthz
    rank: RankInfo = SINGLE  # this process's place in a data-parallel group (torchrun)

    @property
    def name(self) -> str:
        return self.settings.learner_name


@dataclass(frozen=True)
class LearnerSummary:
    name: str
    objective: str
    steps: int
    skipped_steps: int
    counters: dict[str, float]
    elapsed_s: float
    bank_size: int
    active_s: float  # first batch received → last batch processed, in this run
    run_events: int  # events consumed in this run (counters continue across restarts)
    first_batch_to_commit_s: float = 0.0  # first batch received → final commit done
    group: dict[str, Any] = field(default_factory=dict)  # rank, world_size, model_digest (DDP)

    @property
    def events_per_s(self) -> float:
        """Throughput while there was work: group join and idle waiting are not counted."""
        return self.run_events / self.active_s if self.active_s > 0 else 0.0
