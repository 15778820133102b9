"""``supcon-stream bench forgetting``: argument handling around the benchmark and its report."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import structlog
import torch
import yaml

from pipeline.devtools.bench.forgetting import (
    DEFAULT_MEMORIES,
    METHOD_NAMES,
    BenchConfig,
    RunResult,
    bench_train_settings,
    run_grid,
)
from pipeline.devtools.bench.forgetting_report import summarise, write_report
from pipeline.exceptions import ConfigError

log = structlog.get_logger(__name__)


def _memories(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--memories: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"--memories: expected sizes >= 1, got {text!r}")
    return values


def _methods(text: str | None) -> tuple[str, ...]:
    if text is None:
        return METHOD_NAMES
    chosen = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [m for m in chosen if m not in METHOD_NAMES]
    if unknown or not chosen:
        raise ConfigError(
            f"--methods: unknown {unknown or text!r}; known: {', '.join(METHOD_NAMES)}"
        )
    return chosen


def _train_overrides(overrides: list[str]) -> dict[str, Any]:
    """``--set train.KEY=VALUE`` items, applied to the shared bench settings."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, _, raw = item.partition("=")
        if key.startswith("train."):
            out[key.removeprefix("train.")] = yaml.safe_load(raw)
    return out


def bench_config(args: argparse.Namespace) -> BenchConfig:
    try:
        train = bench_train_settings(**_train_overrides(args.overrides))
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigError(f"--set train.*: {exc}") from None
    return BenchConfig(
        memories=_memories(args.memories) if args.memories else DEFAULT_MEMORIES,
        seeds=args.seeds,
        methods=_methods(args.methods),
        train=train,
    )


def run_bench_forgetting(args: argparse.Namespace) -> int:
    cfg = bench_config(args)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def progress(r: RunResult) -> None:
        log.info(
            "bench run",
            method=r.method,
            memory=r.memory,
            seed=r.seed,
            final_accuracy=round(r.final_accuracy, 4),
            forgetting=None if r.forgetting is None else round(r.forgetting, 4),
            seconds=round(r.seconds, 2),
        )

    results = run_grid(cfg, progress)
    wall = time.perf_counter() - started
    paths = write_report(results, cfg, args.out, wall)
    summary = {
        f"{row.method}@{row.memory}": round(stat.mean, 4)
        for row in summarise(results)
        if (stat := row.stats["final_accuracy"]) is not None
    }
    print(
        json.dumps(
            {
                "wall_s": round(wall, 1),
                **{k: str(p) for k, p in paths.items()},
                "final_accuracy": summary,
            }
        )
    )
    return 0
