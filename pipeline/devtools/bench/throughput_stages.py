"""The stages of ``supcon-stream bench throughput`` that measure a rate or a latency.

Each ``measure_*`` function runs one stage against the broker and redis-server of the run
(:mod:`pipeline.devtools.bench.throughput` starts them and calls the stages in order) and
returns its figures as a dict for the report. The memory-bank and restart stages are in
:mod:`pipeline.devtools.bench.throughput_bank`.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from pipeline.config import Settings
from pipeline.devtools.spawn import cli_command, run, set_args

CLASSES = 20
JOIN_TIMEOUT_S = 60.0

# --------------------------------------------------------------------------- synthetic data


@dataclass(frozen=True)
class Synthetic:
    """A labeled stream: ``CLASSES`` Gaussian clusters in ``input_dim`` dimensions."""

    features: np.ndarray  # float32 [n, d]
    labels: np.ndarray  # int64 [n]

    @classmethod
    def make(cls, n: int, dim: int, seed: int = 0) -> Synthetic:
        rng = np.random.default_rng(seed)
        means = rng.normal(0.0, 1.0, (CLASSES, dim)).astype(np.float32)
        labels = rng.integers(0, CLASSES, n)
        noise = rng.normal(0.0, 0.5, (n, dim)).astype(np.float32)
        return cls(np.round(means[labels] + noise, 4), labels.astype(np.int64))

    def payload(self, i: int, ts_ms: int | None = None) -> bytes:
        event: dict[str, Any] = {
            "id": f"e-{i}",
            "features": self.features[i].tolist(),
            "label": int(self.labels[i]),
        }
        if ts_ms is not None:
            event["ts"] = ts_ms
        return orjson.dumps(event)


def produce(settings: Settings, data: Synthetic, start: int, stop: int) -> float:
    """Write events ``start..stop`` to the events topic as fast as the client can; events/s."""
    from kafka import KafkaProducer

    producer = KafkaProducer(
        **settings.kafka.client_options(),
        linger_ms=20,
        batch_size=1 << 20,
        acks=1,
    )
    topic = settings.kafka.events_topic
    started = time.perf_counter()
    for i in range(start, stop):
        producer.send(topic, data.payload(i), key=f"e-{i}".encode())
    producer.flush(120)
    producer.close()
    return (stop - start) / (time.perf_counter() - started)


# --------------------------------------------------------------------------- helpers


def rate(count: float, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


def source_config(settings: Settings, group: str) -> Any:
    from consumers.source import SourceConfig

    return SourceConfig.from_tuning(
        settings.consumer,
        topic=settings.kafka.events_topic,
        group_id=group,
        input_dim=settings.model.input_dim,
        dlq_topic=settings.kafka.dlq_topic,
    )


# --------------------------------------------------------------------------- 2. ingest-only


def measure_ingest(settings: Settings, total: int, processes: int = 1) -> dict[str, Any]:
    """The project's source, first batch to the last full one: poll + micro-batch + decode +
    validate. The final partial batch of each consumer waits for its latency timer
    (``consumer.max_latency_ms``), which is not a rate, so the clock stops once all but the
    last ``processes × batch_size`` events are in (``timed_events``); the stage still waits
    for every event. Events are counted once each: a copy delivered again (a partition re-read
    by its new owner after a rebalance) is counted in ``redelivered``, not as progress.

    With ``processes`` > 1, :class:`~consumers.process_source.ProcessBatchSource`: that many
    consumer processes in one group, batches unpickled in this one. Its children first join
    and hold (``start_joining``) until the group has settled, with every child owning its
    share of the partitions (``join_s``); only then are they let go, so neither the staggered
    joins nor the rebalances they cause fall inside the measured time.
    """
    from consumers.process_source import ProcessBatchSource
    from consumers.producer import JsonProducer
    from consumers.source import KafkaBatchSource

    producer = JsonProducer(settings.kafka.client_options())
    config = source_config(settings, f"bench-ingest-{uuid.uuid4().hex[:6]}")
    started = time.perf_counter()
    source: KafkaBatchSource | ProcessBatchSource
    if processes > 1:
        options = settings.kafka.client_options()
        source = ProcessBatchSource(config, options, processes, log_level=30)
        source.start_joining()
    else:
        source = KafkaBatchSource(config, settings.kafka.client_options(), producer)
        source.start()
    try:
        if isinstance(source, ProcessBatchSource):
            settle_by = time.monotonic() + JOIN_TIMEOUT_S
            while not source.settled():
                if time.monotonic() >= settle_by:
                    raise RuntimeError(f"{processes} consumer processes did not settle in time")
                time.sleep(0.1)
            source.set_start()
        drained = _drain(source, total, timed_until=total - processes * config.batch_size)
        paused = source.stats().get("paused_events", 0)
    finally:
        source.stop(timeout_s=10.0)
        producer.close()
    first = drained.first or started
    elapsed = drained.last - first if drained.first else 0.0
    return {
        "events": drained.events,
        "timed_events": drained.timed,
        "redelivered": drained.delivered - drained.events,
        "seconds": round(elapsed, 3),
        "events_per_s": rate(drained.timed, elapsed),
        "join_s": round(first - started, 3),
        "backpressure_pauses": paused,
        "processes": processes,
    }


@dataclass
class _Drained:
    events: int = 0  # distinct events (and dead letters) seen
    delivered: int = 0  # records handed over, copies included
    timed: int = 0  # events in by the time the clock stopped
    first: float | None = None  # perf_counter of the first batch
    last: float = 0.0  # ... and of the batch that stopped the clock


def _drain(source: Any, total: int, timed_until: int) -> _Drained:
    """Take batches until ``total`` distinct events are in (or 300 s); the clock stops at the
    batch that brings them to ``timed_until``, or at the last new event."""
    out = _Drained()
    seen: set[str] = set()
    deadline = time.monotonic() + 300
    while len(seen) < total and time.monotonic() < deadline:
        batch = source.get(timeout_s=1.0)
        if batch is None:
            continue
        now = time.perf_counter()
        out.first = out.first or now
        out.delivered += batch.consumed
        before = len(seen)
        seen.update(batch.ids)
        seen.update(f"dlq-{d.source.partition}-{d.source.offset}" for d in batch.dead_letters)
        if len(seen) > before and not out.timed:
            out.last = now
            if len(seen) >= timed_until:
                out.timed = len(seen)
    out.events = len(seen)
    out.timed = out.timed or out.events
    return out


# --------------------------------------------------------------------------- 3. learner-only


def event_batches(settings: Settings, data: Synthetic, start: int, stop: int) -> list[Any]:
    """EventBatches as the source would hand them over, built without Kafka."""
    from consumers.events import EventBatch, SourceRecord

    topic = settings.kafka.events_topic
    size = settings.consumer.batch_size
    out = []
    for lo in range(start, stop, size):
        hi = min(stop, lo + size)
        rows = range(lo, hi)
        sources = tuple(SourceRecord(topic, i % 4, i // 4, None, 0) for i in rows)
        offsets: dict[tuple[str, int], int] = {}
        for s in sources:
            offsets[(s.topic, s.partition)] = s.offset + 1
        out.append(
            EventBatch(
                ids=tuple(f"e-{i}" for i in rows),
                features=np.ascontiguousarray(data.features[lo:hi]),
                labels=tuple(str(int(x)) for x in data.labels[lo:hi]),
                tasks=(None,) * (hi - lo),
                timestamps_ms=np.zeros(hi - lo, dtype=np.int64),
                sources=sources,
                offsets=offsets,
                consumed=hi - lo,
            )
        )
    return out


def _learner_mean(first: dict[str, Any], second: dict[str, Any]) -> None:
    """Fold a second learner-only run into the first: events/s = mean of the two runs."""
    first["runs_events_per_s"] = [first["events_per_s"], second["events_per_s"]]
    first["events"] += second["events"]
    first["seconds"] = round(first["seconds"] + second["seconds"], 3)
    first["events_per_s"] = round((first["events_per_s"] + second["events_per_s"]) / 2, 1)


def _learner_step(ctx: Any, batch: Any) -> None:
    """One batch as the learner loop handles it: process it, then emit its step record."""
    from pipeline.learner.emit import step_record
    from pipeline.learner.process import process_batch

    ctx.telemetry.emit(step_record(ctx, process_batch(ctx, batch)))


def measure_learner(settings: Settings, data: Synthetic, total: int) -> dict[str, Any]:
    """process_batch + step telemetry on in-memory batches (warm-up excluded)."""
    from pipeline.learner.assembly import build_context, close_context

    ctx = build_context(settings)
    batches = event_batches(settings, data, 0, total)
    warm = max(1, len(batches) // 20)
    try:
        for batch in batches[:warm]:
            _learner_step(ctx, batch)
        started = time.perf_counter()
        events = 0
        for batch in batches[warm:]:
            _learner_step(ctx, batch)
            events += batch.consumed
        elapsed = time.perf_counter() - started
        steps = ctx.state.step
    finally:
        close_context(ctx)
    return {
        "events": events,
        "seconds": round(elapsed, 3),
        "events_per_s": rate(events, elapsed),
        "steps": steps,
        "batch_size": settings.consumer.batch_size,
        "replay_size": settings.train.replay_size,
        "hard_negatives": settings.train.hard_negatives,
        "iters_per_batch": settings.train.iters_per_batch,
        "bank_capacity": settings.bank.capacity,
    }


# --------------------------------------------------------------------------- 4. end-to-end


def learn_command(overrides: Sequence[str], *extra: str, level: str = "WARNING") -> list[str]:
    return cli_command("learn", "--log-level", level, *set_args(overrides), *extra)


def measure_end_to_end(overrides: Sequence[str], total: int, workdir: Path) -> dict[str, Any]:
    """A full learner process over the topic, first batch to final commit (its own clock)."""
    log_path = workdir / "e2e-learner.log"
    started = time.perf_counter()
    proc = run(
        learn_command(overrides, "--max-events", str(total), "--exit-when-idle", "10"),
        log_path,
        timeout_s=600,
        append=False,
        threads=None,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"end-to-end learner exited {proc.returncode}; see {log_path}")
    summary = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    seconds = float(summary.get("first_batch_to_commit_s") or 0.0)
    return {
        "events": int(summary["consumed"]),
        "seconds": round(seconds, 3),
        "events_per_s": rate(summary["consumed"], seconds),
        "first_to_last_batch_events_per_s": summary["events_per_s"],
        "process_wall_s": round(wall, 3),
        "steps": summary["steps"],
        "consumer_processes": summary.get("consumer_processes", 1),
    }


def measure_threads(settings: Settings, steps: int = 150) -> dict[str, Any]:
    """One train step (batch + replay + hard negatives rows) at each torch thread count."""
    import torch

    from pipeline.learning.model import StreamNet
    from pipeline.learning.step import StepInputs, make_state, train_step

    s = settings
    before = torch.get_num_threads()
    replay = s.train.replay_size + s.train.hard_negatives
    gen = torch.Generator().manual_seed(0)
    inputs = StepInputs(
        torch.randn(s.consumer.batch_size, s.model.input_dim, generator=gen),
        torch.randint(0, CLASSES, (s.consumer.batch_size,), generator=gen),
        torch.randn(replay, s.model.input_dim, generator=gen),
        torch.randint(0, CLASSES, (replay,), generator=gen),
        torch.ones(s.model.max_classes, dtype=torch.bool),
    )
    out: dict[str, Any] = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        state = make_state(StreamNet(s.model), s.train)
        for _ in range(10):
            train_step(state, inputs, s.train)
        started = time.perf_counter()
        done = 0
        # Bounded in time too: under CPU contention a step at all threads can take 150 ms.
        while done < steps and time.perf_counter() - started < 3.0:
            train_step(state, inputs, s.train)
            done += 1
        out[f"step_ms_{threads}_threads"] = round((time.perf_counter() - started) / done * 1e3, 3)
    torch.set_num_threads(before)
    return out


# --------------------------------------------------------------------------- 7. latency


def measure_latency(
    settings: Settings, data: Synthetic, rate: float, seconds: float
) -> dict[str, Any]:
    """Event-to-trained latency at ``rate`` events/s: the learner's per-batch path in-process.

    A producer thread writes events stamped with their send time; the main thread runs the
    source and ``process_batch`` exactly as the learner loop does, and records, for every
    trained batch, now minus each event's stamp.
    """
    from kafka import KafkaProducer

    from pipeline.learner.assembly import build_context, close_context

    ctx = build_context(settings)
    producer = KafkaProducer(**settings.kafka.client_options(), linger_ms=0, acks=1)
    topic = settings.kafka.events_topic
    total = int(rate * seconds)
    ages: list[np.ndarray] = []
    stop = threading.Event()

    def produce() -> None:
        # Paced in 10 ms slices: each slice sends what the rate owes so far.
        begin = time.monotonic()
        sent = 0
        while sent < total and not stop.is_set():
            owed = min(total, int((time.monotonic() - begin) * rate) + 1)
            now_ms = int(time.time() * 1000)
            for i in range(sent, owed):
                producer.send(topic, data.payload(i, now_ms), key=f"e-{i}".encode())
            sent = owed
            time.sleep(0.01)
        producer.flush(60)

    ctx.source.start(ctx.checkpointer.offsets)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not ctx.source.assignment() and time.monotonic() < deadline:
        ctx.source.get(timeout_s=0.2)
    # Let the group settle (all partitions assigned, fetch positions known) before producing.
    time.sleep(1.0)
    thread = threading.Thread(target=produce, name="bench-producer", daemon=True)
    thread.start()
    consumed = 0
    end_by = time.monotonic() + seconds + 30
    try:
        while consumed < total and time.monotonic() < end_by:
            batch = ctx.source.get(timeout_s=0.5)
            if batch is None:
                continue
            _learner_step(ctx, batch)
            ages.append(time.time() * 1000 - batch.timestamps_ms)
            consumed += batch.consumed
    finally:
        stop.set()
        thread.join(30)
        producer.close()
        close_context(ctx)
    lat = np.concatenate(ages) if ages else np.zeros(0)
    return {
        "offered_events_per_s": round(rate, 1),
        "events": int(lat.size),
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat.size else None,
        "max_ms": round(float(lat.max()), 1) if lat.size else None,
        "max_latency_ms_setting": settings.consumer.max_latency_ms,
        "batch_size": settings.consumer.batch_size,
    }
