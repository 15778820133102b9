"""The composition root: builds a :class:`LearnerContext` from settings, restores, and closes it.

Nothing is connected at import time. A learner started before its broker or Redis waits for
them (``learner.startup_wait_s``); whatever fails half-way leaves no consumer thread,
consumer process or producer behind.
"""

from __future__ import annotations

import contextlib
import threading
import time

import structlog
import torch

from consumers.positions import OffsetProbe
from memory_bank.bank import MemoryBank
from memory_bank.protocols import BankStore
from pipeline.config import Settings
from pipeline.distributed.group import broadcast_object
from pipeline.distributed.rank_info import SINGLE, RankInfo
from pipeline.distributed.shares import rank_seed
from pipeline.learner.checkpoint import Checkpoint, load_latest
from pipeline.learner.checkpointer import Checkpointer
from pipeline.learner.context import Counters, LearnerContext
from pipeline.learner.exporting import AutoExport
from pipeline.learner.exposition import LearnerExposition
from pipeline.learner.health import stop_quietly
from pipeline.learner.ledger import TrainedLedger, ledger_path
from pipeline.learner.opening import Opened, learner_bank_store, open_io, wait_for_redis
from pipeline.learner.predictions import make_stream_means
from pipeline.learner.probes import ProbeSet
from pipeline.learner.sharing import FollowerStore
from pipeline.learner.start import NO_REQUEST, StartRequest, plan_start
from pipeline.learning.labels import LabelRegistry
from pipeline.learning.model import StreamNet
from pipeline.learning.step import make_state, match_optimizer_device
from pipeline.learning.tuning import default_torch_threads
from pipeline.telemetry.channel import TelemetryWriter, telemetry_client

log = structlog.get_logger(__name__)


def build_context(
    settings: Settings,
    stop: threading.Event | None = None,
    start_source: bool = False,
    request: StartRequest = NO_REQUEST,
    rank: RankInfo = SINGLE,
    opened: Opened | None = None,
) -> LearnerContext:
    """Create every component. Nothing is connected at import time.

    On a rank of a data-parallel group (``rank``, its process group already joined), rank 0
    reads the checkpoint and broadcasts it, ranks other than 0 keep their own health file and
    ledger and write nothing to the bank's Redis keys, and the model's objective is wrapped
    in DDP (:mod:`pipeline.distributed.replicas`).

    With ``start_source`` the source is started (at the checkpoint's offsets, or where
    ``request`` says; see :mod:`pipeline.learner.start`) as soon as the checkpoint is loaded,
    so the group join overlaps the bank load. ``opened``: connections :func:`open_io` opened
    earlier, before torch was imported (the source already joining, the bank being read).
    """
    torch.manual_seed(settings.train.seed)
    device = resolve_device(settings.train.device)
    threads = settings.train.torch_threads or default_torch_threads(device)
    if threads:
        torch.set_num_threads(threads)
    stop = stop or threading.Event()
    if opened is None:
        opened = open_io(settings, stop, request, rank=rank.rank)
    try:
        return _assemble(settings, device, opened, stop, start_source, request, rank)
    except BaseException:
        # Whatever failed after the source exists (checkpoint, model, Redis, bank, ledger):
        # leave no consumer thread, consumer process or producer behind.
        with contextlib.suppress(Exception):
            opened.close()
        raise


def _assemble(
    settings: Settings,
    device: torch.device,
    opened: Opened,
    stop: threading.Event,
    start_source: bool,
    request: StartRequest,
    rank: RankInfo,
) -> LearnerContext:
    """The rest of :func:`build_context`, once the producer and the source exist."""
    from memory_bank.index import make_index

    r = settings.redis
    health, source = opened.health, opened.source
    ckpt = _load_checkpoint(settings, device, rank)
    if ckpt is None:
        log.info("no checkpoint; starting fresh", dir=str(settings.checkpoint_dir))
    topic = settings.kafka.events_topic
    plan = plan_start(
        settings, ckpt, request, lambda: OffsetProbe(settings.kafka.client_options(), topic)
    )
    if opened.joining is not None:
        opened.joining.set_start(plan.offsets)  # joined since open_io: the offsets follow
    elif start_source:
        # Join the consumer group while the bank loads: a restart then costs
        # max(group join, bank load), not their sum (docs/performance.md, "Restart").
        source.start(plan.offsets)
    # After the join has started: on CUDA, torch.optim.Adam imports torch._dynamo (slow).
    model = StreamNet(settings.model).to(device)
    state = make_state(model, settings.train)
    registry = registry_from(ckpt, settings.model.max_classes)
    seen = torch.zeros(settings.model.max_classes, dtype=torch.bool, device=device)
    seen[: len(registry)] = True

    def label_index(name: str) -> int:
        # Labels found in the bank but not in the checkpoint (written after it) register here.
        idx = registry.index(name)
        seen[idx] = True
        return idx

    b = settings.bank
    store: BankStore = learner_bank_store(settings, opened.redis, health)
    if not rank.leader:
        store = FollowerStore(store)  # rank 0 writes the group's bank (learner/sharing.py)
    started = time.monotonic()
    if opened.snapshot is None:
        wait_for_redis(settings, opened.redis, stop, health)
    bank = MemoryBank.open(
        store,
        make_index(b.index, settings.model.embed_dim, device, b.use_gpu),
        capacity=b.capacity,
        input_dim=settings.model.input_dim,
        embed_dim=settings.model.embed_dim,
        device=device,
        seed=settings.train.seed,
        # Each rank draws its own replay from the one bank (rank 0: exactly a single learner's).
        draw_seed=rank_seed(settings.train.seed, rank.rank),
        index_refresh_steps=b.index_refresh_steps,
        hard_negative_queries=b.hard_negative_queries,
        hard_negative_every=b.hard_negative_interval,
        label_index=label_index,
        policy=b.policy,
        eviction=b.victim_rule,
        adaptive_items=b.adaptive_items,
        snapshot=opened.snapshot.result() if opened.snapshot is not None else None,
    )
    log.info("memory bank loaded", items=len(bank), seconds=round(time.monotonic() - started, 3))
    health.mark_ready("bank_loaded")
    ctx = LearnerContext(
        settings=settings,
        device=device,
        state=state,
        registry=registry,
        seen_classes=seen,
        probes=ProbeSet(settings.eval.probe_per_class, settings.model.input_dim, device),
        bank=bank,
        source=source,
        producer=opened.producer,
        # Its own fast-failing client: a Redis outage must not stall training on telemetry.
        telemetry=TelemetryWriter(
            telemetry_client(r), r.key_prefix, settings.learner_name, r.telemetry_maxlen
        ),
        generator=torch.Generator(device=device).manual_seed(
            rank_seed(settings.train.seed, rank.rank)
        ),
        checkpointer=Checkpointer.from_settings(settings),
        health=health,
        # Only when served: without health.http_port nothing could scrape it.
        exposition=LearnerExposition(
            settings.learner_name, settings.train.objective, settings.model.max_classes
        )
        if settings.health.http_port is not None
        else None,
        rank=rank,
        stream_means=make_stream_means(settings, device),
    )
    if settings.checkpoint.ledger:
        ctx.ledger = TrainedLedger(ledger_path(settings.checkpoint_dir, rank.rank))
    ctx.exporter = AutoExport.from_settings(settings)
    ctx.checkpointer.start = plan.start
    health.progress(start=plan.start)
    if ckpt is not None:
        apply_checkpoint(ctx, ckpt)
    restore_stream_means(ctx, ckpt)
    if ckpt is None and plan.offsets:
        # A new lineage at --from: its start is durable before any event is trained, so a
        # crash before the first checkpoint resumes there, not at the group's offsets.
        ctx.checkpointer.restore(plan.offsets)
        if rank.leader:
            ctx.checkpointer.save(ctx)
    if rank.distributed:
        from pipeline.distributed.replicas import replicate

        ctx.state.replicated = replicate(model, settings.train, ctx.generator, device)
        health.progress(**rank.as_dict())
    health.mark_ready("checkpoint_restored")
    return ctx


def _load_checkpoint(settings: Settings, device: torch.device, rank: RankInfo) -> Checkpoint | None:
    """The newest checkpoint; in a group rank 0 reads it and every rank gets its copy."""
    if not rank.distributed:
        return load_latest(settings.checkpoint_dir, map_location=device)
    ckpt = load_latest(settings.checkpoint_dir, map_location="cpu") if rank.leader else None
    ckpt = broadcast_object(ckpt)
    if ckpt is not None:
        ckpt.model = {k: v.to(device) for k, v in ckpt.model.items()}
    return ckpt


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


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
    counters = _rank_counters(ckpt, ctx.rank)
    ctx.state.skipped = int(counters.get("skipped", 0))
    ctx.checkpointer.restore(ckpt.offsets)
    ctx.probes.load_state(ckpt.probe)
    ctx.counters = Counters.from_dict(counters)
    if ckpt.temperature is not None:
        ctx.temperature = float(ckpt.temperature)
    ctx.last_metrics = dict(ckpt.metrics)


def restore_stream_means(ctx: LearnerContext, ckpt: Checkpoint | None) -> None:
    """The stream class means from the checkpoint; without saved ones (a checkpoint written
    before them or under ``eval.class_means: bank``, or a bank that outlived its checkpoints)
    they start from the bank's items under the restored encoder. The bank's ``stream_mean``
    eviction aims at them."""
    means = ctx.stream_means
    if means is None:
        return
    ctx.bank.set_eviction_target(means.target)  # bank.eviction stream_mean aims at them
    saved = ckpt.class_means if ckpt is not None else None
    if saved is not None:
        try:
            means.load_state_dict(saved)
            return
        except (KeyError, ValueError) as exc:
            log.warning("saved class means not usable; rebuilt from the bank", error=str(exc))
            means.running.reset()
    means.seed(ctx.state.model, ctx.bank)
    if len(means):
        log.info("class means seeded from the bank", classes=len(means), items=len(ctx.bank))


def _rank_counters(ckpt: Checkpoint, rank: RankInfo) -> dict[str, float]:
    """This rank's counters from a group checkpoint (rank 0's are the file's own)."""
    if rank.rank == 0:
        return ckpt.counters
    if len(ckpt.ranks) > rank.rank:
        return dict(ckpt.ranks[rank.rank].get("counters", {}))
    return {}  # a new rank (the group grew): its counters start at zero


def close_context(
    ctx: LearnerContext, final_state: str = "stopped", failure: str | None = None
) -> None:
    """Stop the source and close the producer; the ledger and the health board close anyway
    (``failure``: what stopped a failed learner, kept in its health file)."""
    try:
        ctx.source.stop(timeout_s=10.0)
        ctx.producer.close()
    finally:
        if ctx.ledger is not None:
            ctx.ledger.close()
        stop_quietly(ctx.health, final_state, failure)
