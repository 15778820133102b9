"""The learner process: the composition root and its one loop.

Path of a message::

    source.get()            poll → decode+validate → micro-batch (consumer thread, consumers/)
      → split               probe (held out) | labeled (train) | unlabeled (predict)
      → predict-then-train  prequential accuracy on the labeled part, before it is learned
      → train_step × iters  batch ∪ replay (class-balanced + FAISS hard negatives), SupCon/CE
      → bank.add            write-through to Redis, idempotent by event id
      → telemetry           step stats, every N steps an evaluation on the probe set
      → checkpoint          atomic, then source.commit(offsets it covers)

INVARIANTS
  * An offset is committed only after a checkpoint covering every event before it is durable
    (and after the DLQ/predictions producer has flushed): at-least-once, duplicates bounded
    by the checkpoint interval.
  * Probe events are never trained on (``is_probe`` is a pure function of the event id).
  * trained + held_out + dead_lettered + predicted == consumed, for every batch.
  * The learner never blocks on metrics: telemetry is an XADD to Redis; the sidecar publishes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import orjson
import structlog
import torch

from consumers.decode import dead_letter_payload
from consumers.events import DeadLetter, EventBatch, SourceRecord, TopicPartitionKey
from consumers.exceptions import BrokerUnavailableError, ProducerError
from consumers.producer import JsonProducer
from consumers.protocols import EventSource
from memory_bank.bank import MemoryBank
from memory_bank.exceptions import BankUnavailableError
from pipeline.config import Settings
from pipeline.exceptions import SupconStreamError
from pipeline.learner.checkpoint import Checkpoint, load_latest, save_checkpoint
from pipeline.learner.health import HealthBoard, health_path, stop_quietly
from pipeline.learner.ledger import TrainedLedger, ledger_path
from pipeline.learning.batch import learn_batch, with_unlabeled
from pipeline.learning.inference import (
    ClassMeans,
    ProbeSet,
    class_means,
    is_probe,
    per_class_accuracy,
    predict_head,
    predict_ncm,
)
from pipeline.learning.labels import LabelRegistry
from pipeline.learning.model import StreamNet
from pipeline.learning.objectives import (
    HEAD_TERMS,
    chosen_classifier,
    loss_weights,
)
from pipeline.learning.step import TrainState, make_state, match_optimizer_device
from pipeline.learning.tuning import default_torch_threads
from pipeline.quality import expected_calibration_error
from pipeline.telemetry.channel import TelemetryWriter, telemetry_client
from pipeline.telemetry.records import ClassifierScores, EndRecord, EvalRecord, StepRecord

log = structlog.get_logger(__name__)
T = TypeVar("T")

PROGRESS_EVERY_S = 5.0
PREDICTION_MEANS_ITEMS = 4096  # bank items re-encoded for the class means of predictions
JOIN_TIMEOUT_S = 120.0


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class Counters:
    consumed: int = 0
    trained: int = 0
    held_out: int = 0
    dead_lettered: int = 0
    predicted: int = 0
    batches: int = 0
    prequential_correct: int = 0
    prequential_total: int = 0

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, raw: dict[str, float]) -> Counters:
        return cls(**{k: int(v) for k, v in raw.items() if k in cls.__dataclass_fields__})


@dataclass
class LearnerContext:
    """Everything the loop touches, built once by :func:`build_context`."""

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
    offsets: dict[TopicPartitionKey, int] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)
    means: ClassMeans | None = None
    means_step: int = -1
    current_task: str | None = None
    started: float = field(default_factory=time.monotonic)
    ledger: TrainedLedger | None = None  # checkpoint.ledger: ids of every trained event
    health: HealthBoard | None = None

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

    @property
    def events_per_s(self) -> float:
        """Throughput while there was work: group join and idle waiting are not counted."""
        return self.run_events / self.active_s if self.active_s > 0 else 0.0


# --------------------------------------------------------------------------- per-batch work


def _register_labels(ctx: LearnerContext, batch: EventBatch) -> list[int | None]:
    """Class index per event (None for unlabeled, -1 when the class registry is full)."""
    out: list[int | None] = []
    for label, task in zip(batch.labels, batch.tasks, strict=True):
        if label is None:
            out.append(None)
        elif ctx.registry.has_room_for(label):
            idx = ctx.registry.index(label, task)
            ctx.registry.note_task(label, task)
            out.append(idx)
        else:
            out.append(-1)
    fresh = {idx for idx in out if idx is not None and idx >= 0}
    if fresh:
        # One indexed write per batch: a tensor write per event cost ~20 µs each.
        ctx.seen_classes[sorted(fresh)] = True
    return out


def _dead_letter_class_limit(ctx: LearnerContext, batch: EventBatch, rows: list[int]) -> None:
    """Events whose label would exceed model.max_classes go to the DLQ, not into training."""
    for i in rows:
        src = batch.sources[i]
        # The consumer dropped the raw bytes to save memory; re-serialise the validated event.
        raw = _event_json(batch, i)
        letter = DeadLetter(
            reason="class_limit",
            detail=f"label {batch.labels[i]!r} would exceed model.max_classes="
            f"{ctx.settings.model.max_classes}",
            source=SourceRecord(src.topic, src.partition, src.offset, raw, src.timestamp_ms),
        )
        ctx.producer.send(ctx.settings.kafka.dlq_topic, dead_letter_payload(letter))


def _event_json(batch: EventBatch, i: int) -> bytes:
    return orjson.dumps(
        {
            "id": batch.ids[i],
            "features": batch.features[i].tolist(),
            "label": batch.labels[i],
            "task": batch.tasks[i],
        }
    )


def _refresh_means(ctx: LearnerContext, force: bool = False) -> ClassMeans:
    every = ctx.settings.eval.prediction_refresh_steps
    if force or ctx.means is None or ctx.state.step - ctx.means_step >= every:
        if not force and len(ctx.bank) > PREDICTION_MEANS_ITEMS:
            # Predictions only (evaluation re-encodes everything): a class-balanced subset
            # bounds the re-encode, which for a 100k-item bank costs ~0.5 s on 2 CPU cores
            # and would delay the first trained batch after a restart by as much.
            drawn = ctx.bank.sample(PREDICTION_MEANS_ITEMS)
            feats, labels = drawn.features, drawn.labels
        else:
            _, feats, labels = ctx.bank.occupied()
        ctx.means = class_means(ctx.state.model, feats, labels)
        ctx.means_step = ctx.state.step
    return ctx.means


def _predict(ctx: LearnerContext, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``eval.classifier``: by default the objective's natural one (NCM; the head for ce and
    focal); kNN over the FAISS index falls back to NCM while the bank is empty."""
    choice = chosen_classifier(ctx.settings.train, ctx.settings.eval.classifier)
    if choice == "head":
        return predict_head(ctx.state.model, feats, ctx.seen_classes)
    if choice == "knn" and len(ctx.bank):
        return _predict_knn(ctx, feats)
    return predict_ncm(ctx.state.model, feats, _refresh_means(ctx))


def _predict_knn(ctx: LearnerContext, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        ctx.state.model.eval()
        queries = torch.nn.functional.normalize(ctx.state.model.embed(feats).float(), dim=-1)
    return ctx.bank.knn_predict(queries, ctx.settings.eval.knn_k)


def _publish_predictions(
    ctx: LearnerContext, batch: EventBatch, rows: list[int], feats: torch.Tensor
) -> None:
    labels, conf = _predict(ctx, feats)
    if not bool(ctx.seen_classes.any()):
        # Nothing learned yet: publish "no label" rather than an arbitrary head index.
        labels = torch.full_like(labels, -1)
    for i, label, c in zip(rows, labels.tolist(), conf.tolist(), strict=True):
        ctx.producer.send(
            ctx.settings.kafka.predictions_topic,
            {
                "id": batch.ids[i],
                "label": ctx.registry.name(label) if label >= 0 else None,
                "confidence": round(float(c), 6),
                "learner": ctx.name,
            },
            key=batch.ids[i].encode(),
        )


def process_batch(ctx: LearnerContext, batch: EventBatch) -> dict[str, Any]:
    """Handle one micro-batch; returns the step telemetry record."""
    s = ctx.settings
    class_idx = _register_labels(ctx, batch)
    train_rows, probe_rows, predict_rows, overflow = [], [], [], []
    for i, idx in enumerate(class_idx):
        if idx is None:
            predict_rows.append(i)
        elif idx < 0:
            overflow.append(i)
        elif is_probe(batch.ids[i], s.eval.probe_fraction):
            probe_rows.append(i)
        else:
            train_rows.append(i)
    if overflow:
        _dead_letter_class_limit(ctx, batch, overflow)

    feats_all = torch.from_numpy(batch.features)
    if ctx.device.type == "cuda":
        feats_all = feats_all.pin_memory().to(ctx.device, non_blocking=True)

    for i in probe_rows:
        ctx.probes.add(batch.ids[i], feats_all[i], int(class_idx[i]))  # type: ignore[arg-type]
    if predict_rows:
        _publish_predictions(ctx, batch, predict_rows, feats_all[predict_rows])

    record: dict[str, Any] = {"loss": None, "per_class_loss": {}, "skipped": False}
    if train_rows:
        x = feats_all[train_rows]
        y = torch.tensor([class_idx[i] for i in train_rows], dtype=torch.long, device=ctx.device)
        # Predict, then train: the prequential accuracy costs one forward pass.
        if len(ctx.bank) > 0 or chosen_classifier(s.train, s.eval.classifier) == "head":
            predicted, _ = _predict(ctx, x)
            ctx.counters.prequential_correct += int((predicted == y).sum())
            ctx.counters.prequential_total += len(train_rows)
        unlabeled = feats_all[predict_rows] if s.train.train_unlabeled and predict_rows else None
        x, y = with_unlabeled(x, y, unlabeled)  # trained with NT-Xent, never banked
        record = _train_on(ctx, batch, train_rows, x, y)
        tasks = [batch.tasks[i] for i in train_rows]
        ctx.current_task = tasks[-1] if tasks[-1] is not None else ctx.current_task

    c = ctx.counters
    c.batches += 1
    c.consumed += batch.consumed
    c.trained += len(train_rows)
    c.held_out += len(probe_rows)
    c.predicted += len(predict_rows)
    c.dead_lettered += len(batch.dead_letters) + len(overflow)
    for tp, offset in batch.offsets.items():
        ctx.offsets[tp] = max(offset, ctx.offsets.get(tp, 0))
    return {
        **record,
        "batch_events": batch.consumed,
        "trained": len(train_rows),
        "held_out": len(probe_rows),
        "predicted": len(predict_rows),
        "dead_lettered": len(batch.dead_letters) + len(overflow),
    }


def _train_on(
    ctx: LearnerContext, batch: EventBatch, rows: list[int], x: torch.Tensor, y: torch.Tensor
) -> dict[str, Any]:
    ids = [batch.ids[i] for i in rows]
    bank_items = (
        ids,
        [batch.labels[i] or "" for i in rows],
        [batch.tasks[i] for i in rows],
    )
    outcome = learn_batch(
        ctx.state, ctx.bank, ctx.settings.train, x, y, ctx.seen_classes, ctx.generator, bank_items
    )
    if ctx.ledger is not None:
        ctx.ledger.record(ctx.state.step, ids)
    losses, per_sample = outcome.losses, outcome.per_sample_loss
    per_class: dict[str, float] = {}
    if per_sample is not None:
        ys = y.cpu()
        for cls in torch.unique(ys[ys >= 0]).tolist():
            per_class[ctx.registry.name(cls)] = round(float(per_sample[ys == cls].mean()), 6)
    return {
        "loss": round(float(np.mean(losses)), 6) if losses else None,
        "per_class_loss": per_class,
        "skipped": outcome.skipped_any,
    }


# --------------------------------------------------------------------------- evaluation


def evaluate(ctx: LearnerContext) -> EvalRecord:
    """Per-class accuracy and ECE on the held-out probes: NCM, kNN, and the head when trained.

    ``primary`` is ``eval.classifier`` (by default the objective's natural classifier).
    """
    feats, truth = ctx.probes.tensors()
    cfg = ctx.settings.train
    means = _refresh_means(ctx, force=True)
    predictions = {"ncm": predict_ncm(ctx.state.model, feats, means)}
    if len(ctx.bank) and feats.shape[0]:
        predictions["knn"] = _predict_knn(ctx, feats)
    primary = chosen_classifier(cfg, ctx.settings.eval.classifier)
    if primary == "head" or HEAD_TERMS & set(loss_weights(cfg)):
        predictions["head"] = predict_head(ctx.state.model, feats, ctx.seen_classes)
    classifiers = {
        name: ClassifierScores(
            per_class_accuracy=per_class_accuracy(pred, truth, ctx.registry),
            ece=expected_calibration_error(conf.tolist(), (pred == truth).tolist()),
        )
        for name, (pred, conf) in predictions.items()
    }
    return EvalRecord(
        learner=ctx.name,
        step=ctx.state.step,
        ts=int(time.time() * 1000),
        primary=primary,
        classifiers=classifiers,
        objective=ctx.settings.train.objective,
        group=ctx.settings.group_id,
        events_total=ctx.counters.consumed,
        class_task=dict(ctx.registry.class_task),
        current_task=ctx.current_task,
        probe_sizes={ctx.registry.name(k): v for k, v in ctx.probes.sizes().items()},
    )


# --------------------------------------------------------------------------- checkpoints


def checkpoint_and_commit(ctx: LearnerContext, wait: bool = False) -> None:
    """INVARIANT order: bank + producer + ledger flushed → checkpoint durable → offsets committed.

    When the producer cannot flush (broker unreachable), the checkpoint and the commit are
    deferred to the next attempt rather than crashing: nothing is committed that is not
    durable, and re-delivery covers the rest (at-least-once).
    """
    ctx.bank.flush()
    try:
        ctx.producer.flush()
    except ProducerError as exc:
        log.warning("checkpoint deferred: predictions/dead letters not durable", error=str(exc))
        return
    if ctx.ledger is not None:
        ctx.ledger.sync()
    ckpt = Checkpoint(
        step=ctx.state.step,
        model=ctx.state.model.state_dict(),
        optimizer=ctx.state.optimizer.state_dict(),
        labels=ctx.registry.names,
        class_task=dict(ctx.registry.class_task),
        offsets=dict(ctx.offsets),
        probe=ctx.probes.state(),
        counters={**ctx.counters.as_dict(), "skipped": float(ctx.state.skipped)},
    )
    path = save_checkpoint(ctx.settings.checkpoint_dir, ckpt, ctx.settings.checkpoint.keep)
    if ctx.health is not None:
        ctx.health.progress(checkpoint_step=ctx.state.step, checkpoint_ts=round(time.time(), 3))
    if not ctx.offsets:
        return
    if wait:
        committed = ctx.source.commit_sync(dict(ctx.offsets), timeout_s=30.0)
        if not committed:
            log.warning(
                "final offset commit did not complete; events after the previous "
                "commit will be re-delivered",
                checkpoint=str(path),
            )
    else:
        ctx.source.commit(dict(ctx.offsets))
    log.debug("checkpoint written", path=str(path), offsets=len(ctx.offsets))


def registry_from(ckpt: Checkpoint | None, max_classes: int) -> LabelRegistry:
    registry = LabelRegistry(max_classes, ckpt.labels if ckpt else ())
    if ckpt:
        registry.class_task.update(ckpt.class_task)
    return registry


def apply_checkpoint(ctx: LearnerContext, ckpt: Checkpoint) -> None:
    """Restore model, optimizer, offsets, probes and counters (the registry is already set)."""
    ctx.state.model.load_state_dict(ckpt.model)
    ctx.state.optimizer.load_state_dict(ckpt.optimizer)
    match_optimizer_device(ctx.state.optimizer, ctx.device)
    ctx.state.step = ckpt.step
    ctx.state.skipped = int(ckpt.counters.get("skipped", 0))
    ctx.offsets = dict(ckpt.offsets)
    ctx.probes.load_state(ckpt.probe)
    ctx.counters = Counters.from_dict(ckpt.counters)


# --------------------------------------------------------------------------- assembly


def _until_reachable(
    make: Callable[[], T],
    what: str,
    wait_s: float,
    stop: threading.Event,
    report: Callable[[str | None], None] | None = None,
) -> T:
    """``make()``, retried with backoff while its server is unreachable at start.

    A learner started before its broker or Redis (a whole stack coming up at once) waits up
    to ``learner.startup_wait_s`` instead of exiting and being restarted in a loop; the wait
    shows in ``report`` (the health board) as that dependency being down.
    """
    deadline = time.monotonic() + wait_s
    delay = 1.0
    while True:
        try:
            made = make()
        except (BrokerUnavailableError, BankUnavailableError) as exc:
            if report is not None:
                report(str(exc))
            if time.monotonic() + delay > deadline or stop.is_set():
                raise
            log.warning("waiting for a dependency", dependency=what, error=str(exc), retry_s=delay)
            if stop.wait(delay):
                raise
            delay = min(30.0, 2 * delay)
        else:
            if report is not None:
                report(None)
            return made


def _make_source(
    settings: Settings,
    client_options: dict[str, Any],
    producer: JsonProducer,
    health: HealthBoard,
) -> EventSource:
    """The event source: in this process, or ``consumer.processes`` consumer processes."""
    from consumers.process_source import ProcessBatchSource
    from consumers.source import KafkaBatchSource, SourceConfig

    source_config = SourceConfig.from_tuning(
        settings.consumer,
        topic=settings.kafka.events_topic,
        group_id=settings.group_id,
        input_dim=settings.model.input_dim,
        dlq_topic=settings.kafka.dlq_topic,
    )
    if settings.consumer.processes > 1:
        # Polling and decoding in other processes, off this one's GIL (a GPU learner
        # outruns one kafka-python consumer); each child has its own DLQ producer.
        return ProcessBatchSource(
            source_config,
            client_options,
            settings.consumer.processes,
            log_level=logging.getLevelName(settings.logging.level),
        )
    return KafkaBatchSource(
        source_config,
        client_options,
        producer,
        on_health=health.reporter("kafka_consumer"),
    )


def build_context(
    settings: Settings, stop: threading.Event | None = None, start_source: bool = False
) -> LearnerContext:
    """Create every component. Nothing is connected at import time.

    With ``start_source`` the source is started (from the checkpoint's offsets) as soon as the
    checkpoint is loaded, so the group join overlaps the bank load.
    """
    from memory_bank.redis_store import make_redis_client

    torch.manual_seed(settings.train.seed)
    device = resolve_device(settings.train.device)
    threads = settings.train.torch_threads or default_torch_threads(device)
    if threads:
        torch.set_num_threads(threads)
    seen = torch.zeros(settings.model.max_classes, dtype=torch.bool, device=device)
    r = settings.redis
    health = HealthBoard(settings.learner_name, health_path(settings.checkpoint_dir))
    client = make_redis_client(
        r.url, r.username, r.password, r.socket_timeout_s, tls_options=r.tls_options()
    )
    client_options = settings.kafka.client_options()
    stop = stop or threading.Event()
    wait_s = settings.learner.startup_wait_s
    producer = _until_reachable(
        lambda: JsonProducer(client_options, on_health=health.reporter("kafka_producer")),
        "kafka",
        wait_s,
        stop,
        health.reporter("kafka_producer"),
    )
    source = _make_source(settings, client_options, producer, health)
    try:
        return _assemble(
            settings, device, seen, client, health, producer, source, stop, start_source
        )
    except BaseException:
        # Whatever failed after the source exists (checkpoint, model, Redis, bank, ledger):
        # leave no consumer thread, consumer process or producer behind.
        with contextlib.suppress(Exception):
            source.stop(timeout_s=10.0)
        with contextlib.suppress(Exception):
            producer.close()
        raise


def _assemble(
    settings: Settings,
    device: torch.device,
    seen: torch.Tensor,
    client: Any,
    health: HealthBoard,
    producer: JsonProducer,
    source: EventSource,
    stop: threading.Event,
    start_source: bool,
) -> LearnerContext:
    """The rest of :func:`build_context`, once the producer and the source exist."""
    from memory_bank.index import make_index
    from memory_bank.redis_store import RedisBankStore, ping_redis

    r = settings.redis
    wait_s = settings.learner.startup_wait_s
    ckpt = load_latest(settings.checkpoint_dir, map_location=device)
    if ckpt is None:
        log.info("no checkpoint; starting fresh", dir=str(settings.checkpoint_dir))
    if start_source:
        # Join the consumer group while the bank loads: a restart then costs
        # max(group join, bank load), not their sum (a 100k-item bank loads in ~2 s).
        source.start(ckpt.offsets if ckpt else {})
    # After the join has started: the first Adam import takes ~1.5 s (torch._dynamo).
    model = StreamNet(settings.model).to(device)
    state = make_state(model, settings.train)
    registry = registry_from(ckpt, settings.model.max_classes)
    seen[: len(registry)] = True

    def label_index(name: str) -> int:
        # Labels found in the bank but not in the checkpoint (written after it) register here.
        idx = registry.index(name)
        seen[idx] = True
        return idx

    b = settings.bank
    store = RedisBankStore(
        client,
        r.key_prefix,
        settings.learner_name,
        settings.model.input_dim,
        settings.model.embed_dim,
        retries=r.retries,
        backoff_s=r.retry_backoff_s,
        max_backoff_s=r.retry_max_backoff_s,
        on_health=health.reporter("redis"),
    )
    started = time.monotonic()
    _until_reachable(lambda: ping_redis(client), "redis", wait_s, stop, health.reporter("redis"))
    bank = MemoryBank.open(
        store,
        make_index(b.index, settings.model.embed_dim, device, b.use_gpu),
        capacity=b.capacity,
        input_dim=settings.model.input_dim,
        embed_dim=settings.model.embed_dim,
        device=device,
        seed=settings.train.seed,
        index_refresh_steps=b.index_refresh_steps,
        hard_negative_queries=b.hard_negative_queries,
        hard_negative_every=b.hard_negative_interval,
        label_index=label_index,
        policy=b.policy,
    )
    log.info("memory bank loaded", items=len(bank), seconds=round(time.monotonic() - started, 3))
    ctx = LearnerContext(
        settings=settings,
        device=device,
        state=state,
        registry=registry,
        seen_classes=seen,
        probes=ProbeSet(settings.eval.probe_per_class, settings.model.input_dim, device),
        bank=bank,
        source=source,
        producer=producer,
        # Its own fast-failing client: a Redis outage must not stall training on telemetry.
        telemetry=TelemetryWriter(
            telemetry_client(r), r.key_prefix, settings.learner_name, r.telemetry_maxlen
        ),
        generator=torch.Generator(device=device).manual_seed(settings.train.seed),
        health=health,
    )
    if settings.checkpoint.ledger:
        ctx.ledger = TrainedLedger(ledger_path(settings.checkpoint_dir))
    if ckpt is not None:
        apply_checkpoint(ctx, ckpt)
    return ctx


def close_context(ctx: LearnerContext, final_state: str = "stopped") -> None:
    try:
        ctx.source.stop(timeout_s=10.0)
        ctx.producer.close()
    finally:
        if ctx.ledger is not None:
            ctx.ledger.close()
        stop_quietly(ctx.health, final_state)


# --------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class RunLimits:
    max_events: int | None = None
    exit_when_idle_s: float | None = None


def _step_record(ctx: LearnerContext, record: dict[str, Any]) -> StepRecord:
    """``record`` is :func:`process_batch`'s: the batch's counts, loss and per-class loss."""
    return StepRecord(
        learner=ctx.name,
        objective=ctx.settings.train.objective,
        group=ctx.settings.group_id,
        step=ctx.state.step,
        ts=int(time.time() * 1000),
        events_total=ctx.counters.consumed,
        trained_total=ctx.counters.trained,
        skipped_total=ctx.state.skipped,
        elapsed_s=round(time.monotonic() - ctx.started, 3),
        prequential_correct=ctx.counters.prequential_correct,
        prequential_total=ctx.counters.prequential_total,
        **record,
    )


def _emit_eval(ctx: LearnerContext) -> None:
    ctx.telemetry.emit(evaluate(ctx))


def run_learner(  # noqa: PLR0915 - the one readable loop (STYLE.md) stays whole
    settings: Settings,
    stop: threading.Event,
    limits: RunLimits = RunLimits(),
) -> LearnerSummary:
    ctx = build_context(settings, stop, start_source=True)
    log.info(
        "learner starting",
        learner=ctx.name,
        objective=settings.train.objective,
        group=settings.group_id,
        device=str(ctx.device),
        resumed_step=ctx.state.step,
        replay=settings.train.replay_enabled,
    )
    ctx.started = time.monotonic()
    start_consumed = ctx.counters.consumed
    last_ckpt_step, last_ckpt_time = ctx.state.step, time.monotonic()
    last_eval_step = ctx.state.step
    last_progress = last_batch = time.monotonic()
    assigned = False
    first_batch_at: float | None = None
    clean = False
    try:
        _start_health(ctx)
        while not stop.is_set():
            if (
                limits.max_events is not None
                and ctx.counters.consumed - start_consumed >= limits.max_events
            ):
                log.info("max events reached", events=ctx.counters.consumed - start_consumed)
                break
            batch = ctx.source.get(timeout_s=0.5)
            now = time.monotonic()
            if batch is None:
                if not assigned:
                    # Idle time counts from the group join: joining can take seconds.
                    assigned = bool(ctx.source.assignment())
                    last_batch = now
                    if limits.exit_when_idle_s is not None and now - ctx.started > JOIN_TIMEOUT_S:
                        raise SupconStreamError(
                            f"no partitions of {settings.kafka.events_topic} assigned within "
                            f"{JOIN_TIMEOUT_S:.0f} s; does the topic exist?"
                        )
                    continue
                if (
                    limits.exit_when_idle_s is not None
                    and now - last_batch >= limits.exit_when_idle_s
                ):
                    log.info("idle; finishing", idle_s=round(now - last_batch, 1))
                    break
                continue
            last_batch, assigned = now, True
            first_batch_at = first_batch_at or now
            first = batch.sources[0] if batch.sources else None
            structlog.contextvars.bind_contextvars(
                step=ctx.state.step,
                batch=ctx.counters.batches,
                topic=first.topic if first else None,
                offsets={f"{t}:{p}": o for (t, p), o in batch.offsets.items()},
            )
            record = process_batch(ctx, batch)
            _note_progress(ctx)
            ctx.telemetry.emit(_step_record(ctx, record))
            if ctx.state.step - last_eval_step >= settings.eval.every_steps:
                _emit_eval(ctx)
                last_eval_step = ctx.state.step
            if (
                ctx.state.step - last_ckpt_step >= settings.checkpoint.every_steps
                or now - last_ckpt_time >= settings.checkpoint.every_seconds
            ):
                checkpoint_and_commit(ctx)
                last_ckpt_step, last_ckpt_time = ctx.state.step, now
            if now - last_progress >= PROGRESS_EVERY_S:
                _log_progress(ctx, start_consumed)
                last_progress = now
            structlog.contextvars.clear_contextvars()
        _emit_eval(ctx)
        checkpoint_and_commit(ctx, wait=True)
        committed_at = time.monotonic()
        elapsed = time.monotonic() - ctx.started
        ctx.telemetry.emit(
            EndRecord(
                learner=ctx.name,
                step=ctx.state.step,
                events_total=ctx.counters.consumed,
                elapsed_s=round(elapsed, 3),
            )
        )
        ctx.telemetry.flush()
        clean = True
    finally:
        structlog.contextvars.clear_contextvars()
        close_context(ctx, "stopped" if clean else "failed")
    summary = LearnerSummary(
        name=ctx.name,
        objective=settings.train.objective,
        steps=ctx.state.step,
        skipped_steps=ctx.state.skipped,
        counters=ctx.counters.as_dict(),
        elapsed_s=time.monotonic() - ctx.started,
        bank_size=len(ctx.bank),
        active_s=(last_batch - first_batch_at) if first_batch_at else 0.0,
        run_events=ctx.counters.consumed - start_consumed,
        first_batch_to_commit_s=(committed_at - first_batch_at) if first_batch_at else 0.0,
    )
    log.info(
        "learner stopped",
        **summary.counters,
        steps=summary.steps,
        skipped=summary.skipped_steps,
        events_per_s=round(summary.events_per_s, 1),
    )
    return summary


def _start_health(ctx: LearnerContext) -> None:
    h = ctx.settings.health
    if ctx.health is not None:
        ctx.health.start(h.every_s, h.http_host, h.http_port)
        ctx.health.set_state("running")


def _note_progress(ctx: LearnerContext) -> None:
    if ctx.health is not None:
        c = ctx.counters
        ctx.health.progress(
            step=ctx.state.step,
            consumed=c.consumed,
            trained=c.trained,
            dead_lettered=c.dead_lettered,
            last_batch_ts=round(time.time(), 3),
        )


def _log_progress(ctx: LearnerContext, start_consumed: int) -> None:
    elapsed = time.monotonic() - ctx.started
    events = ctx.counters.consumed - start_consumed
    stats = ctx.source.stats()
    log.info(
        "progress",
        events=ctx.counters.consumed,
        trained=ctx.counters.trained,
        dead_lettered=ctx.counters.dead_lettered,
        steps=ctx.state.step,
        skipped=ctx.state.skipped,
        bank=len(ctx.bank),
        events_per_s=round(events / elapsed, 1) if elapsed > 0 else 0.0,
        lag=stats.get("lag"),
    )
