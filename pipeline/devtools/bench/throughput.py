"""``supcon-stream bench throughput``: every rate of the pipeline, side by side, in one run.

One embedded Tansu broker and one redis-server (free loopback ports, stopped at the end) serve
every stage, so the figures are comparable with each other even on a noisy machine:

1. **raw consume**, per Kafka client (kafka-python, confluent): the bare client with the
   learner's fetch settings (the ceiling of the client);
2. **parse floor**, per client: the bare client plus ``orjson.loads`` of every record;
   **ingest-only**, per client: the project's source (poll, micro-batch, decode + validate),
   no learning; the decode cost per event, offline;
3. **learner-only**: :func:`pipeline.learner.process.process_batch` (predict, train steps with
   replay from the real bank, write-through to Redis) plus telemetry, on batches held in memory;
4. **end-to-end**, per client: a full ``supcon-stream learn`` process, first batch to final
   commit;
5. **memory bank** with a 100k-item bank in Redis: add rate, replay sample time, hard-negative
   search time, as shares of the train iteration;
6. **restart**, three times: process start to first trained batch of a learner whose bank
   holds 100k items;
7. **latency**: event-to-trained p50/p99 at a fixed offered load below capacity.

Results go to ``<out>/throughput.json`` and ``<out>/throughput.md``; progress to stderr.
This module starts the stack and runs the stages in order (:func:`run_bench`); the stages are
in :mod:`~pipeline.devtools.bench.throughput_clients` (1, 2),
:mod:`~pipeline.devtools.bench.throughput_stages` (2-4, 7) and
:mod:`~pipeline.devtools.bench.throughput_bank` (5, 6), the report in
:mod:`~pipeline.devtools.bench.throughput_report`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consumers.runtime import tune_gc
from pipeline.config import Settings, load_settings
from pipeline.devtools.bench.throughput_bank import measure_bank, measure_restart
from pipeline.devtools.bench.throughput_clients import (
    measure_decode,
    measure_parse_floor,
    measure_raw,
)
from pipeline.devtools.bench.throughput_report import machine_info, ratios, render_markdown
from pipeline.devtools.bench.throughput_stages import (
    CLASSES,
    Synthetic,
    measure_end_to_end,
    measure_ingest,
    measure_latency,
    measure_learner,
    measure_threads,
    produce,
)
from pipeline.devtools.devstack import (
    ManagedProcess,
    free_port,
    start_broker,
    start_redis,
    stop_process,
)

LEARNER_EVENTS_CAP = 60_000
CLIENTS = ("kafka-python", "confluent")  # consumer.client values, measured side by side
RESTART_RUNS = 3


@dataclass(frozen=True)
class BenchOptions:
    events: int = 200_000  # the end-to-end stages' stream
    # The ingest stages' window: at 100k+ events/s a 50k-event round lasts under half a
    # second, and one such round moves by a factor of two; they read the first
    # max(events, ingest_events) events of the same topic.
    ingest_events: int = 200_000
    input_dim: int = 64
    bank_items: int = 100_000
    learner_events: int = LEARNER_EVENTS_CAP
    latency_rate: float | None = None  # events/s; None = half the end-to-end rate
    latency_seconds: float = 10.0
    consumer_processes: int = 2  # ingest-only is also measured with this many (1 = skip)
    ingest_rounds: int = 3  # interleaved rounds of raw / floor / ingest; the median is reported
    out: Path = Path("runs/bench")
    config: Path | None = None
    overrides: tuple[str, ...] = ()


def _progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


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


def _learner_mean(first: dict[str, Any], second: dict[str, Any]) -> None:
    """Fold a second learner-only run into the first: events/s = mean of the two runs."""
    first["runs_events_per_s"] = [first["events_per_s"], second["events_per_s"]]
    first["events"] += second["events"]
    first["seconds"] = round(first["seconds"] + second["seconds"], 3)
    first["events_per_s"] = round((first["events_per_s"] + second["events_per_s"]) / 2, 1)


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
    # The bank just filled belongs to learner "restart": start a learner on it, three times,
    # each with a group and a checkpoint directory of its own (so each has events to train on
    # whatever the stream length), all on the same bank.
    runs = []
    for i in range(RESTART_RUNS):
        overrides = [
            *_overrides(opts, stack, f"bench-{tag}", "restart"),
            f"consumer.group_id=r-{tag}-{i}",
            f"checkpoint.dir={stack.workdir / f'checkpoints-restart-{i}'}",
        ]
        runs.append(measure_restart(overrides, bank_settings, opts.bank_items, stack.workdir))
        _progress(f"restart {i + 1}/{RESTART_RUNS}: {runs[-1]['seconds']} s to the first batch")
    # The slowest run is the one reported; every run is kept.
    results["restart"] = {**max(runs, key=lambda r: r["seconds"]), "runs": runs}

    slowest = min(c["end_to_end"]["events_per_s"] for c in results["clients"].values())
    lat_rate = opts.latency_rate or max(100.0, 0.5 * slowest)
    lat_settings = _settings(opts, _overrides(opts, stack, f"bench-lat-{tag}", "latency"))
    k = lat_settings.kafka
    ensure_topics(k.client_options(), k.all_topics(), k.partitions, 1, timeout_s=30.0)
    results["latency"] = measure_latency(lat_settings, data, lat_rate, opts.latency_seconds)
    _progress(
        f"latency at {lat_rate:,.0f}/s: p50 {results['latency']['p50_ms']} ms, "
        f"p99 {results['latency']['p99_ms']} ms"
    )


def _ingest_stages(opts: BenchOptions, settings: Settings) -> dict[str, Any]:
    """Raw consume, parse floor and ingest-only (also with N processes) of one client.

    ``opts.ingest_rounds`` rounds of the three, interleaved so that a drift of the machine's
    load touches all of them alike; each stage reports its median round (the others'
    rates in ``rounds``). A round of 50k events lasts a fraction of a second here, so one
    round alone moves by a factor of two from run to run.
    """
    client = settings.consumer.client
    stages = (
        ("raw_consume", lambda: measure_raw(settings, opts.ingest_events, client)),
        ("parse_floor", lambda: measure_parse_floor(settings, opts.ingest_events, client)),
        ("ingest_only", lambda: measure_ingest(settings, opts.ingest_events)),
    )
    runs: dict[str, list[dict[str, Any]]] = {stage: [] for stage, _ in stages}
    for round_no in range(1, opts.ingest_rounds + 1):
        for stage, measure in stages:
            runs[stage].append(measure())
            rate = runs[stage][-1]["events_per_s"]
            _progress(f"{stage.replace('_', ' ')}, {client}, round {round_no}: {rate:,.0f}/s")
    out: dict[str, Any] = {stage: _median_round(found) for stage, found in runs.items()}
    if opts.consumer_processes > 1:
        out["ingest_processes"] = measure_ingest(
            settings, opts.ingest_events, opts.consumer_processes
        )
        _progress(
            f"ingest-only, {client}, {opts.consumer_processes} consumer processes: "
            f"{out['ingest_processes']['events_per_s']:,.0f} events/s"
        )
    return out


def _median_round(found: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median rate (the lower middle one of an even count), with every
    round's rate in ``rounds``."""
    ranked = sorted(found, key=lambda run: run["events_per_s"])
    return {**ranked[(len(ranked) - 1) // 2], "rounds": [run["events_per_s"] for run in found]}


def run_bench(opts: BenchOptions, command: str) -> dict[str, Any]:
    if opts.events < 1000 or opts.ingest_events < 1000:
        raise ValueError(
            f"events and ingest events must be >= 1000, got {opts.events}, {opts.ingest_events}"
        )
    topic_events = max(opts.events, opts.ingest_events)
    begun = time.perf_counter()
    tune_gc()  # as in the learner's process: every stage runs under the product's settings
    machine = machine_info()
    _progress(f"machine: {machine['cpu_count']} CPUs, torch {machine['torch']}")
    workdir = opts.out / "stack"
    shutil.rmtree(workdir, ignore_errors=True)
    results: dict[str, Any] = {}
    data = Synthetic.make(max(topic_events, opts.bank_items), opts.input_dim)
    if importlib.util.find_spec("confluent_kafka") is None:
        raise RuntimeError("bench throughput compares both clients: pip install '.[fast]'")
    with Stack.running(workdir) as stack:
        from consumers.admin import ensure_topics

        tag = uuid.uuid4().hex[:6]
        base = _overrides(opts, stack, f"bench-{tag}", "e2e")
        settings = _settings(opts, base)
        k = settings.kafka
        ensure_topics(k.client_options(), k.all_topics(), k.partitions, 1, timeout_s=30.0)
        _progress(f"stack up (broker {stack.broker.address}, redis {stack.redis.address})")

        rate = produce(settings, data, 0, topic_events)
        _progress(f"produced {topic_events} events ({rate:,.0f}/s)")

        results["clients"] = {
            client: _ingest_stages(opts, _settings(opts, [*base, f"consumer.client={client}"]))
            for client in CLIENTS
        }
        results["decode"] = measure_decode(
            data, min(opts.events, 20_000), settings.consumer.batch_size
        )
        _progress(
            f"decode: orjson.loads {results['decode']['orjson_loads_us_per_event']} us/event, "
            f"decode_batch {results['decode']['decode_batch_us_per_event']} us/event"
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

        for client in CLIENTS:
            e2e = measure_end_to_end(
                [
                    *_overrides(opts, stack, f"bench-{tag}", f"e2e-{client}"),
                    f"consumer.client={client}",
                ],
                opts.events,
                workdir,
            )
            results["clients"][client]["end_to_end"] = e2e
            _progress(f"end-to-end, {client}: {e2e['events_per_s']:,.0f} events/s")
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
        "ingest_events": opts.ingest_events,
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
