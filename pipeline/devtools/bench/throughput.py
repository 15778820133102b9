"""``supcon-stream bench throughput``: every rate of the pipeline, side by side, in one run.

One embedded Tansu broker and one redis-server (free loopback ports, stopped at the end) serve
every stage, so the figures are comparable with each other even on a noisy machine:

1. **raw consume**: a bare kafka-python consumer with the learner's fetch settings (the ceiling
   of the client);
2. **ingest-only**: the project's source (poll, micro-batch, decode + validate), no learning;
3. **learner-only**: :func:`pipeline.learner.process.process_batch` (predict, train steps with
   replay from the real bank, write-through to Redis) plus telemetry, on batches held in memory;
4. **end-to-end**: a full ``supcon-stream learn`` process, first batch to final commit;
5. **memory bank** with a 100k-item bank in Redis: add rate, replay sample time, hard-negative
   search time, as shares of the train iteration;
6. **restart**: process start to first trained batch of a learner whose bank holds 100k items;
7. **latency**: event-to-trained p50/p99 at a fixed offered load below capacity.

Results go to ``<out>/throughput.json`` and ``<out>/throughput.md``; progress to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from pipeline.config import Settings, load_settings
from pipeline.devtools.bench.throughput_report import machine_info, ratios, render_markdown
from pipeline.devtools.devstack import (
    ManagedProcess,
    free_port,
    start_broker,
    start_redis,
    stop_process,
)

CLASSES = 20
LEARNER_EVENTS_CAP = 60_000
RESTART_EVENTS = 4_000
JOIN_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class BenchOptions:
    events: int = 200_000
    input_dim: int = 64
    bank_items: int = 100_000
    learner_events: int = LEARNER_EVENTS_CAP
    latency_rate: float | None = None  # events/s; None = half the end-to-end rate
    latency_seconds: float = 10.0
    consumer_processes: int = 2  # ingest-only is also measured with this many (1 = skip)
    out: Path = Path("runs/bench")
    config: Path | None = None
    overrides: tuple[str, ...] = ()


def _progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


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


# --------------------------------------------------------------------------- stack and settings


@dataclass
class Stack:
    broker: ManagedProcess
    redis: ManagedProcess
    workdir: Path

    @contextlib.contextmanager
    @staticmethod
    def running(workdir: Path) -> Iterator[Stack]:
        workdir.mkdir(parents=True, exist_ok=True)
        broker = start_broker(free_port(), workdir)
        try:
            redis_proc = start_redis(free_port(), workdir, appendonly=False)
        except BaseException:
            stop_process(broker.pid)
            raise
        try:
            yield Stack(broker, redis_proc, workdir)
        finally:
            stop_process(redis_proc.pid)
            stop_process(broker.pid)


def _overrides(opts: BenchOptions, stack: Stack, prefix: str, name: str) -> list[str]:
    return [
        *opts.overrides,
        f"kafka.bootstrap_servers={stack.broker.address}",
        f"kafka.topic_prefix={prefix}",
        f"redis.url=redis://{stack.redis.address}/0",
        f"redis.key_prefix={prefix}",
        f"model.input_dim={opts.input_dim}",
        f"learner.name={name}",
        f"checkpoint.dir={stack.workdir / 'checkpoints'}",
    ]


def _settings(opts: BenchOptions, overrides: Sequence[str]) -> Settings:
    return load_settings(opts.config, list(overrides))


def _produce(settings: Settings, data: Synthetic, start: int, stop: int) -> float:
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


# --------------------------------------------------------------------------- 1. raw consume


def measure_raw(settings: Settings, total: int) -> dict[str, Any]:
    """A bare kafka-python consumer (assigned partitions, no group) with the same fetch settings."""
    from kafka import KafkaConsumer, TopicPartition

    from consumers.source import SourceConfig

    cfg = _source_config(settings, group="raw-unused")
    fetch = {
        k: v
        for k, v in cfg.consumer_options().items()
        if k in ("max_poll_records", "fetch_max_bytes", "max_partition_fetch_bytes")
    }
    consumer = KafkaConsumer(
        **settings.kafka.client_options(), enable_auto_commit=False, group_id=None, **fetch
    )
    topic = settings.kafka.events_topic
    parts = [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    count = 0
    first: float | None = None
    deadline = time.monotonic() + 300
    while count < total and time.monotonic() < deadline:
        polled = consumer.poll(timeout_ms=1000, max_records=cfg.max_poll_records)
        n = sum(len(v) for v in polled.values())
        if n and first is None:
            first = time.perf_counter()
        count += n
    elapsed = time.perf_counter() - (first or time.perf_counter())
    consumer.close()
    del SourceConfig
    return {"events": count, "seconds": round(elapsed, 3), "events_per_s": _rate(count, elapsed)}


def _rate(count: float, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


def _source_config(settings: Settings, group: str) -> Any:
    from consumers.source import SourceConfig

    return SourceConfig(
        **settings.consumer.model_dump(exclude={"group_id", "processes"}),
        topic=settings.kafka.events_topic,
        group_id=group,
        input_dim=settings.model.input_dim,
        dlq_topic=settings.kafka.dlq_topic,
    )


# --------------------------------------------------------------------------- 2. ingest-only


def measure_ingest(settings: Settings, total: int, processes: int = 1) -> dict[str, Any]:
    """The project's source, first batch to last: poll + micro-batch + decode + validate.

    With ``processes`` > 1, :class:`~consumers.process_source.ProcessBatchSource`: that many
    consumer processes in one group, batches unpickled in this one.
    """
    from consumers.process_source import ProcessBatchSource
    from consumers.producer import JsonProducer
    from consumers.source import KafkaBatchSource

    producer = JsonProducer(settings.kafka.client_options())
    config = _source_config(settings, f"bench-ingest-{uuid.uuid4().hex[:6]}")
    source: KafkaBatchSource | ProcessBatchSource = (
        ProcessBatchSource(config, settings.kafka.client_options(), processes, log_level=30)
        if processes > 1
        else KafkaBatchSource(config, settings.kafka.client_options(), producer)
    )
    started = time.perf_counter()
    source.start()
    count = 0
    first: float | None = None
    last = started
    deadline = time.monotonic() + 300
    try:
        while count < total and time.monotonic() < deadline:
            batch = source.get(timeout_s=1.0)
            if batch is None:
                continue
            last = time.perf_counter()
            first = first or last
            count += batch.consumed
        paused = source.stats().get("paused_events", 0)
    finally:
        source.stop(timeout_s=10.0)
        producer.close()
    elapsed = last - (first or last)
    return {
        "events": count,
        "seconds": round(elapsed, 3),
        "events_per_s": _rate(count, elapsed),
        "join_s": round((first or started) - started, 3),
        "backpressure_pauses": paused,
        "processes": processes,
    }


# --------------------------------------------------------------------------- 3. learner-only


def _batches(settings: Settings, data: Synthetic, start: int, stop: int) -> list[Any]:
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


def measure_learner(settings: Settings, data: Synthetic, total: int) -> dict[str, Any]:
    """process_batch + step telemetry on in-memory batches (warm-up excluded)."""
    from pipeline.learner.assembly import build_context, close_context
    from pipeline.learner.emit import step_record
    from pipeline.learner.process import process_batch

    ctx = build_context(settings)
    batches = _batches(settings, data, 0, total)
    warm = max(1, len(batches) // 20)
    try:
        for batch in batches[:warm]:
            ctx.telemetry.emit("step", step_record(ctx, process_batch(ctx, batch)))
        started = time.perf_counter()
        events = 0
        for batch in batches[warm:]:
            ctx.telemetry.emit("step", step_record(ctx, process_batch(ctx, batch)))
            events += batch.consumed
        elapsed = time.perf_counter() - started
        steps = ctx.state.step
    finally:
        close_context(ctx)
    return {
        "events": events,
        "seconds": round(elapsed, 3),
        "events_per_s": _rate(events, elapsed),
        "steps": steps,
        "batch_size": settings.consumer.batch_size,
        "replay_size": settings.train.replay_size,
        "hard_negatives": settings.train.hard_negatives,
        "iters_per_batch": settings.train.iters_per_batch,
        "bank_capacity": settings.bank.capacity,
    }


# --------------------------------------------------------------------------- 4. end-to-end


def _learn_command(overrides: Sequence[str], *extra: str, level: str = "WARNING") -> list[str]:
    cmd = [sys.executable, "-m", "pipeline.cli", "learn", "--log-level", level]
    for item in overrides:
        cmd += ["--set", item]
    return [*cmd, *extra]


def measure_end_to_end(overrides: Sequence[str], total: int, workdir: Path) -> dict[str, Any]:
    """A full learner process over the topic, first batch to final commit (its own clock)."""
    log_path = workdir / "e2e-learner.log"
    started = time.perf_counter()
    with log_path.open("wb") as err:
        proc = subprocess.run(
            _learn_command(overrides, "--max-events", str(total), "--exit-when-idle", "10"),
            stdout=subprocess.PIPE,
            stderr=err,
            timeout=600,
            check=False,
        )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"end-to-end learner exited {proc.returncode}; see {log_path}")
    summary = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    seconds = float(summary.get("first_batch_to_commit_s") or 0.0)
    return {
        "events": int(summary["consumed"]),
        "seconds": round(seconds, 3),
        "events_per_s": _rate(summary["consumed"], seconds),
        "first_to_last_batch_events_per_s": summary["events_per_s"],
        "process_wall_s": round(wall, 3),
        "steps": summary["steps"],
        "consumer_processes": summary.get("consumer_processes", 1),
    }


# --------------------------------------------------------------------------- 5. memory bank


@contextlib.contextmanager
def _timer(sink: list[float]) -> Iterator[None]:
    started = time.perf_counter()
    yield
    sink.append(time.perf_counter() - started)


def _fill_bank(
    bank: Any, data: Synthetic, items: int, bs: int, rng: np.random.Generator
) -> dict[str, Any]:
    """Fill through Redis in adds of 1000, then time 200 per-batch adds to the full bank."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    embed_dim = bank.embed_dim
    names = [str(c) for c in range(CLASSES)]
    rng = np.random.default_rng(1)
    fill_chunk = 1000
    started = time.perf_counter()
    for lo in range(0, items, fill_chunk):
        hi = min(items, lo + fill_chunk)
        idx = rng.integers(0, len(data.labels), hi - lo)
        labels = torch.from_numpy(data.labels[idx])
        emb = F.normalize(torch.randn(hi - lo, embed_dim), dim=1)
        bank.add(
            [f"b-{i}" for i in range(lo, hi)],
            torch.from_numpy(data.features[idx]),
            labels,
            [names[int(c)] for c in labels],
            emb,
            [None] * (hi - lo),
        )
    fill_s = time.perf_counter() - started

    # Per-batch adds to the full bank: evictions and Redis writes as in the learner.
    add_times: list[float] = []
    for j in range(200):
        idx = rng.integers(0, len(data.labels), bs)
        labels = torch.from_numpy(data.labels[idx])
        emb = F.normalize(torch.randn(bs, embed_dim), dim=1)
        with _timer(add_times):
            bank.add(
                [f"n-{j}-{k}" for k in range(bs)],
                torch.from_numpy(data.features[idx]),
                labels,
                [names[int(c)] for c in labels],
                emb,
                [None] * bs,
            )
    return {
        "fill_items_per_s": _rate(items, fill_s),
        "fill_chunk": fill_chunk,
        "add_batch_size": bs,
        "add_ms_per_batch": _ms_mean(add_times),
        "add_items_per_s": _rate(bs * len(add_times), sum(add_times)),
    }


def measure_bank(settings: Settings, data: Synthetic, items: int) -> dict[str, Any]:
    """Fill a bank of ``items`` through Redis, then time the per-step bank work around steps."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    from memory_bank.bank import MemoryBank
    from memory_bank.index import make_index
    from memory_bank.redis_store import RedisBankStore, make_redis_client
    from pipeline.learning.model import StreamNet
    from pipeline.learning.step import StepInputs, make_state, train_step

    s = settings
    torch.manual_seed(0)
    every = s.bank.model_copy(update={"capacity": items}).hard_negative_interval
    client = make_redis_client(s.redis.url)
    store = RedisBankStore(
        client, s.redis.key_prefix, s.learner_name, s.model.input_dim, s.model.embed_dim
    )
    bank = MemoryBank(
        store,
        make_index(s.bank.index, s.model.embed_dim, "cpu", s.bank.use_gpu),
        capacity=items,
        input_dim=s.model.input_dim,
        embed_dim=s.model.embed_dim,
        device="cpu",
        index_refresh_steps=s.bank.index_refresh_steps,
        hard_negative_queries=s.bank.hard_negative_queries,
        hard_negative_every=every,
    )
    rng = np.random.default_rng(1)
    bs = s.consumer.batch_size
    fill = _fill_bank(bank, data, items, bs, rng)
    bank.refresh_index()

    # Train iterations as pipeline.learning.batch.learn_batch runs them (select_replay, train_step,
    # write-back), each part timed separately.
    model = StreamNet(s.model)
    state = make_state(model, s.train)
    seen = torch.ones(s.model.max_classes, dtype=torch.bool)
    sample_t, search_t, step_t, other_t, iteration_t = [], [], [], [], []  # type: ignore[var-annotated]
    # Steady state: a warm-up (first search, allocator, autograd) is run and then dropped,
    # and the timed span holds whole search intervals, so every search is counted at its rate.
    warmup = 20
    iterations = max(300, 2 * every)
    queries = None
    for i in range(warmup + iterations):
        if i == warmup:
            for timings in (sample_t, search_t, step_t, other_t, iteration_t):
                timings.clear()
        idx = rng.integers(0, len(data.labels), bs)
        x = torch.from_numpy(data.features[idx])
        y = torch.from_numpy(data.labels[idx])
        t0 = time.perf_counter()
        with _timer(sample_t):
            replay = bank.sample(s.train.replay_size, s.train.replay_sampling)
        if queries is None:
            with torch.no_grad():
                queries = F.normalize(model.embed(x), dim=-1)
        with _timer(search_t):
            hard = bank.hard_negatives(queries, y, s.train.hard_negatives, replay.slots)
        h_feats, h_labels, h_versions = bank.gather(hard)
        inputs = StepInputs(
            x,
            y,
            torch.cat([replay.features, h_feats]),
            torch.cat([replay.labels, h_labels]),
            seen,
        )
        with _timer(step_t):
            result = train_step(state, inputs, s.train)
        t1 = time.perf_counter()
        bank.update_embeddings(
            torch.cat([replay.slots, hard]),
            result.replay_embeddings,
            torch.cat([replay.versions, h_versions]),
        )
        bank.step()
        other_t.append(time.perf_counter() - t1)
        iteration_t.append(time.perf_counter() - t0)
        queries = result.batch_embeddings
    client.close()
    ms, iteration = _ms_mean, _ms_mean(iteration_t)
    return {
        "bank_items": len(bank),
        **fill,
        "iterations": iterations,
        "replay_size": s.train.replay_size,
        "hard_negatives": s.train.hard_negatives,
        "hard_negative_queries": s.bank.hard_negative_queries,
        "hard_negative_every": every,
        "index": s.bank.index,
        "sample_ms": ms(sample_t),
        "search_ms": ms(search_t),
        "train_step_ms": ms(step_t),
        "writeback_and_refresh_ms": ms(other_t),
        "iteration_ms": iteration,
        "sample_share": round(ms(sample_t) / iteration, 4) if iteration else 0.0,
        "search_share": round(ms(search_t) / iteration, 4) if iteration else 0.0,
        "sample_plus_search_share": (
            round((ms(sample_t) + ms(search_t)) / iteration, 4) if iteration else 0.0
        ),
        "search_ms_max": round(max(search_t) * 1000, 3) if search_t else 0.0,
    }


def _ms_mean(values: list[float]) -> float:
    return round(float(np.mean(values)) * 1000, 4) if values else 0.0


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


# --------------------------------------------------------------------------- 6. restart


def measure_restart(
    overrides: Sequence[str], settings: Settings, bank_items: int, workdir: Path
) -> dict[str, Any]:
    """Process start to the first trained batch of a learner whose bank holds ``bank_items``."""
    import redis

    from pipeline.telemetry.channel import stream_key

    client = redis.Redis.from_url(settings.redis.url)
    key = stream_key(settings.redis.key_prefix, settings.learner_name)
    client.delete(key)
    log_path = workdir / "restart-learner.log"
    started = time.perf_counter()
    started_epoch = time.time()
    first_trained: float | None = None
    with log_path.open("wb") as err:
        proc = subprocess.Popen(
            _learn_command(
                [*overrides, f"bank.capacity={bank_items}"],
                "--max-events",
                str(RESTART_EVENTS),
                "--exit-when-idle",
                "5",
                level="INFO",
            ),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            first_trained = _wait_first_trained(client, key, proc)
        finally:
            proc.wait(timeout=120)
    client.close()
    if first_trained is None:
        raise RuntimeError(f"the restarted learner trained nothing; see {log_path}")
    return {
        "bank_items": bank_items,
        "seconds": round(first_trained - started, 3),
        "log": str(log_path),
        **_restart_breakdown(log_path, started_epoch),
    }


def _wait_first_trained(client: Any, key: str, proc: subprocess.Popen[bytes]) -> float | None:
    """perf_counter() when the learner's first step record with trained events shows up."""
    deadline = time.monotonic() + JOIN_TIMEOUT_S + 60
    cursor: Any = "0-0"
    while time.monotonic() < deadline and proc.poll() is None:
        reply: Any = client.xread({key: cursor}, count=100, block=20) or []
        for _stream, entries in reply:
            for entry_id, fields in entries:
                cursor = entry_id
                record = orjson.loads(fields[b"data"])
                if fields[b"kind"] == b"step" and record.get("trained", 0) > 0:
                    return time.perf_counter()
    return None


def _restart_breakdown(log_path: Path, started_epoch: float) -> dict[str, Any]:
    """Phases of the restart from the learner's own log lines (ISO timestamps, UTC)."""
    marks = {
        "kafka source started": "join_started_s",
        "partitions assigned": "assigned_s",
        "memory_bank_opened": "bank_opened_s",
    }
    out: dict[str, Any] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        for text, key in marks.items():
            if text in line and key not in out:
                with contextlib.suppress(ValueError, IndexError):
                    stamp = datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))
                    out[key] = round(stamp.timestamp() - started_epoch, 3)
        if "memory_bank_opened" in line and "seconds=" in line:
            with contextlib.suppress(ValueError, IndexError):
                out["bank_load_s"] = float(line.split("seconds=")[1].split()[0])
    if "join_started_s" in out and "assigned_s" in out:
        out["group_join_s"] = round(out["assigned_s"] - out["join_started_s"], 3)
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
    from pipeline.learner.emit import step_record
    from pipeline.learner.process import process_batch

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
            ctx.telemetry.emit("step", step_record(ctx, process_batch(ctx, batch)))
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


# --------------------------------------------------------------------------- the run


def _bank_restart_latency(
    opts: BenchOptions, stack: Stack, data: Synthetic, tag: str, results: dict[str, Any]
) -> None:
    """Stages 5-7, on the stack of the run: bank costs, restart on that bank, latency."""
    from consumers.admin import ensure_topics

    bank_settings = _settings(opts, _overrides(opts, stack, f"bench-{tag}", "restart"))
    results["memory_bank"] = measure_bank(bank_settings, data, opts.bank_items)
    _progress(
        f"memory bank: sample+search = "
        f"{results['memory_bank']['sample_plus_search_share']:.1%} of the iteration"
    )
    # The bank just filled belongs to learner "restart": start a learner on it.
    results["restart"] = measure_restart(
        [*_overrides(opts, stack, f"bench-{tag}", "restart"), f"consumer.group_id=r-{tag}"],
        bank_settings,
        opts.bank_items,
        stack.workdir,
    )
    _progress(f"restart: {results['restart']['seconds']} s to the first trained batch")

    lat_rate = opts.latency_rate or max(100.0, 0.5 * results["end_to_end"]["events_per_s"])
    lat_settings = _settings(opts, _overrides(opts, stack, f"bench-lat-{tag}", "latency"))
    k = lat_settings.kafka
    ensure_topics(k.client_options(), k.all_topics(), k.partitions, 1, timeout_s=30.0)
    results["latency"] = measure_latency(lat_settings, data, lat_rate, opts.latency_seconds)
    _progress(
        f"latency at {lat_rate:,.0f}/s: p50 {results['latency']['p50_ms']} ms, "
        f"p99 {results['latency']['p99_ms']} ms"
    )


def run_bench(opts: BenchOptions, command: str) -> dict[str, Any]:
    if opts.events < 1000:
        raise ValueError(f"events must be >= 1000, got {opts.events}")
    begun = time.perf_counter()
    machine = machine_info()
    _progress(f"machine: {machine['cpu_count']} CPUs, torch {machine['torch']}")
    workdir = opts.out / "stack"
    shutil.rmtree(workdir, ignore_errors=True)
    results: dict[str, Any] = {}
    data = Synthetic.make(max(opts.events, opts.bank_items), opts.input_dim)
    with Stack.running(workdir) as stack:
        from consumers.admin import ensure_topics

        tag = uuid.uuid4().hex[:6]
        base = _overrides(opts, stack, f"bench-{tag}", "e2e")
        settings = _settings(opts, base)
        k = settings.kafka
        ensure_topics(k.client_options(), k.all_topics(), k.partitions, 1, timeout_s=30.0)
        _progress(f"stack up (broker {stack.broker.address}, redis {stack.redis.address})")

        rate = _produce(settings, data, 0, opts.events)
        _progress(f"produced {opts.events} events ({rate:,.0f}/s)")

        results["raw_consume"] = measure_raw(settings, opts.events)
        _progress(f"raw consume: {results['raw_consume']['events_per_s']:,.0f} events/s")
        results["ingest_only"] = measure_ingest(settings, opts.events)
        _progress(f"ingest-only: {results['ingest_only']['events_per_s']:,.0f} events/s")
        if opts.consumer_processes > 1:
            results["ingest_processes"] = measure_ingest(
                settings, opts.events, opts.consumer_processes
            )
            _progress(
                f"ingest-only, {opts.consumer_processes} consumer processes: "
                f"{results['ingest_processes']['events_per_s']:,.0f} events/s"
            )

        results["torch_threads"] = measure_threads(settings)
        _progress(f"train step by torch threads: {results['torch_threads']}")
        learner_events = min(opts.events, opts.learner_events)
        results["learner_only"] = measure_learner(
            _settings(opts, _overrides(opts, stack, f"bench-{tag}", "learner-only")),
            data,
            learner_events,
        )
        _progress(f"learner-only: {results['learner_only']['events_per_s']:,.0f} events/s")

        results["end_to_end"] = measure_end_to_end(base, opts.events, workdir)
        _progress(f"end-to-end: {results['end_to_end']['events_per_s']:,.0f} events/s")
        # Learner-only again, right after: on a shared machine the load drifts over the
        # minute end-to-end takes, and the ratio uses the mean of the two.
        again = measure_learner(
            _settings(opts, _overrides(opts, stack, f"bench-{tag}", "learner-only-2")),
            data,
            learner_events,
        )
        _learner_mean(results["learner_only"], again)
        _progress(f"learner-only again: {again['events_per_s']:,.0f} events/s")

        _bank_restart_latency(opts, stack, data, tag, results)
    machine["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report: dict[str, Any] = {
        "command": command,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "total_s": round(time.perf_counter() - begun, 1),
        "events": opts.events,
        "input_dim": opts.input_dim,
        "classes": CLASSES,
        "partitions": settings.kafka.partitions,
        "machine": machine,
        "results": results,
    }
    report["ratios"] = ratios(results)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    (opts.out / "throughput.md").write_text(render_markdown(report))
    _progress(f"wrote {opts.out / 'throughput.md'} and throughput.json ({report['total_s']} s)")
    _progress(f"process logs are under {workdir}")
    return report
