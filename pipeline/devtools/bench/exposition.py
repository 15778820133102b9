"""``supcon-stream bench exposition``: what the Prometheus exposition costs, in one run.

1. **update**: the training thread's share, ``LearnerExposition.batch_done`` for a 32-event
   batch, timed over ``renders`` × 4 calls (microseconds per batch).
2. **render**: the learner's and the sidecar's ``/metrics`` bodies with ``classes`` classes
   (100 by default: per-class bank items, accuracy and forgetting, a task × task accuracy
   matrix, every dead-letter reason, histograms filled), rendered ``renders`` times each;
   median, p99 and max milliseconds and the body size.
3. **end-to-end, metrics off vs on**: a full ``supcon-stream learn`` process over the same
   topic (a fresh consumer group each run), without ``health.http_port`` (no exposition at
   all) and with it, scraped every second as Prometheus would; off, on, off, on, so drift of
   a shared machine shows up as the spread between runs of one kind.

Results go to ``<out>/exposition.json`` and ``<out>/exposition.md``; progress to stderr.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from consumers.events import EventBatch, SourceRecord
from pipeline.config import SloSettings, load_settings
from pipeline.devtools.bench.throughput import Stack, _progress
from pipeline.devtools.bench.throughput_report import machine_info
from pipeline.devtools.bench.throughput_stages import Synthetic, measure_end_to_end, produce
from pipeline.devtools.devstack import free_port
from pipeline.learner.exposition import LearnerExposition
from pipeline.sidecar.exposition import SidecarExposition
from pipeline.sidecar.state import Publication


def _batch(n: int) -> EventBatch:
    now_ms = int(time.time() * 1000)
    return EventBatch(
        ids=tuple(f"e{i}" for i in range(n)),
        features=np.zeros((n, 1), dtype=np.float32),
        labels=("0",) * n,
        tasks=(None,) * n,
        timestamps_ms=np.full(n, now_ms, dtype=np.int64),
        sources=tuple(SourceRecord("t", i % 4, i, None, now_ms - 10 * i) for i in range(n)),
        consumed=n,
    )


def _filled_learner(classes: int) -> LearnerExposition:
    expo = LearnerExposition("bench", "supcon", max_classes=classes)
    n = 256
    batch = _batch(n)
    fates = {"consumed": n, "trained": n - 20, "held_out": 20, "predicted": 0}
    for step in range(50):
        expo.batch_done(batch, fates, {"not_json": 1}, list(range(n - 20)), (3, 0), (0.01, 0.008))
        expo.lag({f"supcon.events:{p}": 100 * step for p in range(4)})
    expo.bank(classes * 20, {f"class-{c}": 20 for c in range(classes)})
    return expo


def _filled_sidecar(classes: int) -> SidecarExposition:
    expo = SidecarExposition(max_labels=classes, slo=SloSettings())
    tasks = [str(t) for t in range(10)]
    accuracy = {f"class-{c}": 0.9 for c in range(classes)}
    forgetting = {
        "objective": "supcon",
        "per_class_accuracy": accuracy,
        "forgetting": dict.fromkeys(accuracy, 0.05),
        "avg_accuracy": 0.9,
        "avg_forgetting": 0.05,
        "avg_min_accuracy": 0.8,
        "ece": 0.04,
        "accuracy_matrix": [{"task": t, "accuracy": dict.fromkeys(tasks, 0.9)} for t in tasks],
    }
    loss = {"objective": "supcon", "loss_mean": 2.5, "loss_ema": 2.4, "prequential_accuracy": 0.8}
    expo.observe(
        [Publication("forgetting", "bench", forgetting), Publication("loss", "bench", loss)], {}
    )
    return expo


def measure_update(calls: int, n: int = 32) -> dict[str, Any]:
    """Microseconds of the training thread's per-batch update (``batch_done``)."""
    expo = LearnerExposition("bench", "supcon", max_classes=100)
    batch = _batch(n)
    fates = {"consumed": n, "trained": n - 3, "held_out": 3, "predicted": 0}
    rows = list(range(n - 3))
    started = time.perf_counter()
    for _ in range(calls):
        expo.batch_done(batch, fates, {}, rows, (3, 0), (0.01, 0.008))
    seconds = time.perf_counter() - started
    return {"batch_events": n, "calls": calls, "us_per_batch": round(seconds / calls * 1e6, 1)}


def measure_render(classes: int, renders: int) -> dict[str, Any]:
    out: dict[str, Any] = {"classes": classes, "renders": renders}
    for name, expo in (
        ("learner", _filled_learner(classes)),
        ("sidecar", _filled_sidecar(classes)),
    ):
        body = expo.render()
        times = []
        for _ in range(renders):
            started = time.perf_counter()
            expo.render()
            times.append((time.perf_counter() - started) * 1000)
        times.sort()
        out[name] = {
            "median_ms": round(statistics.median(times), 3),
            "p99_ms": round(times[min(len(times) - 1, int(0.99 * len(times)))], 3),
            "max_ms": round(times[-1], 3),
            "bytes": len(body),
            "series": sum(1 for line in body.splitlines() if line and not line.startswith(b"#")),
        }
    return out


@contextmanager
def _scraping(port: int, every_s: float = 1.0) -> Iterator[dict[str, int]]:
    """GET /metrics every ``every_s`` while the block runs, as Prometheus would."""
    counts = {"scrapes": 0, "failed": 0}
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    r.read()
                counts["scrapes"] += 1
            except OSError:
                counts["failed"] += 1  # before the learner serves, and after it exits

    thread = threading.Thread(target=loop, name="bench-scraper", daemon=True)
    thread.start()
    try:
        yield counts
    finally:
        stop.set()
        thread.join(5)


def measure_on_off(events: int, input_dim: int, workdir: Path, rounds: int) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    with Stack.running(workdir) as stack:
        from consumers.admin import ensure_topics

        tag = uuid.uuid4().hex[:6]
        base = [
            f"kafka.bootstrap_servers={stack.broker.address}",
            f"kafka.topic_prefix=bench-expo-{tag}",
            f"redis.url=redis://{stack.redis.address}/0",
            f"redis.key_prefix=bench-expo-{tag}",
            f"model.input_dim={input_dim}",
            f"checkpoint.dir={workdir / 'checkpoints'}",
        ]
        settings = load_settings(None, base)
        k = settings.kafka
        ensure_topics(k.client_options(), k.all_topics(), k.partitions, 1, timeout_s=30.0)
        produce(settings, Synthetic.make(events, input_dim), 0, events)
        _progress(f"produced {events} events")
        for i in range(rounds * 2):
            metrics = i % 2 == 1
            name = f"{'on' if metrics else 'off'}-{i}"
            overrides = [*base, f"learner.name={name}"]
            if metrics:
                port = free_port()
                with _scraping(port) as counts:
                    row = measure_end_to_end(
                        [*overrides, f"health.http_port={port}"], events, workdir
                    )
                row["scrapes"] = counts["scrapes"]
            else:
                row = measure_end_to_end(overrides, events, workdir)
            row["metrics"] = metrics
            runs.append(row)
            _progress(f"end-to-end, metrics {'on' if metrics else 'off'}: {row['events_per_s']}/s")
    off = [r["events_per_s"] for r in runs if not r["metrics"]]
    on = [r["events_per_s"] for r in runs if r["metrics"]]
    return {
        "runs": runs,
        "off_events_per_s": off,
        "on_events_per_s": on,
        "off_mean": round(statistics.mean(off), 1),
        "on_mean": round(statistics.mean(on), 1),
        "on_over_off": round(statistics.mean(on) / statistics.mean(off), 3),
        "off_spread": round((max(off) - min(off)) / statistics.mean(off), 3),
    }


def run_bench_exposition(
    events: int, classes: int, renders: int, rounds: int, out: Path, command: str
) -> dict[str, Any]:
    begun = time.perf_counter()
    report: dict[str, Any] = {"command": command, "machine": machine_info()}
    report["update"] = measure_update(renders * 4)
    _progress(f"per-batch update: {report['update']['us_per_batch']} us")
    report["render"] = measure_render(classes, renders)
    r = report["render"]
    _progress(
        f"render, {classes} classes: learner {r['learner']['median_ms']} ms, "
        f"sidecar {r['sidecar']['median_ms']} ms (median)"
    )
    report["end_to_end"] = measure_on_off(events, 64, out / "stack-exposition", rounds)
    report["total_s"] = round(time.perf_counter() - begun, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exposition.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "exposition.md").write_text(render_markdown(report))
    _progress(f"wrote {out / 'exposition.md'} ({report['total_s']} s)")
    return report


def render_markdown(report: dict[str, Any]) -> str:
    r, e, m = report["render"], report["end_to_end"], report["machine"]
    lines = [
        "# Exposition cost",
        "",
        f"Command: `{report['command']}`; {m['cpu_count']} CPUs, torch {m['torch']}.",
        "",
        f"Training thread, per {report['update']['batch_events']}-event batch: "
        f"{report['update']['us_per_batch']} µs (`batch_done`, {report['update']['calls']} calls).",
        "",
        f"`/metrics` render, {r['classes']} classes, {r['renders']} renders each:",
        "",
        "| process | median ms | p99 ms | max ms | series | bytes |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("learner", "sidecar"):
        x = r[name]
        lines.append(
            f"| {name} | {x['median_ms']} | {x['p99_ms']} | {x['max_ms']} | {x['series']} "
            f"| {x['bytes']} |"
        )
    lines += [
        "",
        "End-to-end learner (first batch to final commit), in run order:",
        "",
        "| metrics | events | seconds | events/s | scrapes |",
        "|---|---|---|---|---|",
    ]
    for row in e["runs"]:
        lines.append(
            f"| {'on' if row['metrics'] else 'off'} | {row['events']} | {row['seconds']} | "
            f"{row['events_per_s']} | {row.get('scrapes', '-')} |"
        )
    lines += [
        "",
        f"Mean off {e['off_mean']}/s, on {e['on_mean']}/s: on/off = {e['on_over_off']} "
        f"(spread between the off runs: {e['off_spread']:.1%}).",
        "",
    ]
    return "\n".join(lines)
