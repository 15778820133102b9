"""``supcon-stream compare`` and ``bench forgetting`` (= ``compare split-digits``): argument
handling around the runs and their report."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import torch
import yaml

from pipeline.config import BankSettings, EvalSettings
from pipeline.devtools.bench.compare import (
    COMPARE_MEMORIES,
    COMPARE_METHODS,
    COMPARE_SEEDS,
    TOPIC_SOURCE,
    ProgressBar,
    check_stream,
    count_runs,
    eval_every,
    load_file_stream,
    load_scenario_stream,
    load_topic_stream,
    loss_terms_method,
    make_split,
)
from pipeline.devtools.bench.forgetting import (
    DEFAULT_MEMORIES,
    DEFAULT_METHODS,
    METHOD_NAMES,
    BenchConfig,
    RunResult,
    bench_train_settings,
    run_grid,
)
from pipeline.devtools.bench.forgetting_report import summarise, write_report
from pipeline.exceptions import ConfigError
from pipeline.settings.learning import eviction_target_problem
from pipeline.streams.scenarios import SCENARIOS

if TYPE_CHECKING:
    from pipeline.config import Settings

log = structlog.get_logger(__name__)


def _memories(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--memories: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"--memories: expected sizes >= 1, got {text!r}")
    return values


def _methods(text: str | None, default: tuple[str, ...] = DEFAULT_METHODS) -> tuple[str, ...]:
    if text is None:
        return default
    known = (*METHOD_NAMES, "loss_terms")
    chosen = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [m for m in chosen if m not in known]
    if unknown or not chosen:
        raise ConfigError(f"--methods: unknown {unknown or text!r}; known: {', '.join(known)}")
    return chosen


def _train_overrides(overrides: list[str], section: str = "train") -> dict[str, Any]:
    """``--set train.KEY=VALUE`` (or ``model.KEY=VALUE``) items, for the shared settings."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, _, raw = item.partition("=")
        if key.startswith(f"{section}."):
            out[key.removeprefix(f"{section}.")] = yaml.safe_load(raw)
    return out


def _model_overrides(overrides: list[str]) -> dict[str, Any]:
    """``--set model.KEY=VALUE`` items, checked now (the sizes come from the data)."""
    from pipeline.config import ModelSettings

    model = _train_overrides(overrides, "model")
    try:
        ModelSettings(**model)
    except ValueError as exc:
        raise ConfigError(f"--set model.*: {exc}") from None
    return model


def _ema_decay(args: argparse.Namespace) -> float | None:
    decay: float | None = getattr(args, "ema_decay", None)
    if decay is not None and not 0.0 < decay < 1.0:
        raise ConfigError(f"--ema-decay: must be in (0, 1), got {decay}")
    return decay


def _bank_overrides(overrides: list[str]) -> BankSettings:
    """``--set bank.KEY=VALUE`` items (e.g. ``bank.eviction``); the capacity is each run's
    memory, whatever is set here."""
    try:
        return BankSettings(**_train_overrides(overrides, "bank"))
    except ValueError as exc:
        raise ConfigError(f"--set bank.*: {exc}") from None


def _eval_overrides(overrides: list[str]) -> EvalSettings:
    """``--set eval.KEY=VALUE`` items (e.g. ``eval.class_means=bank``): the class means the
    SupCon arms' NCM reads, as the learner would."""
    try:
        return EvalSettings(**_train_overrides(overrides, "eval"))
    except ValueError as exc:
        raise ConfigError(f"--set eval.*: {exc}") from None


def _bank_and_eval(overrides: list[str]) -> tuple[BankSettings, EvalSettings]:
    bank, evaluation = _bank_overrides(overrides), _eval_overrides(overrides)
    if problem := eviction_target_problem(bank, evaluation):
        raise ConfigError(f"--set: {problem}")
    return bank, evaluation


def bench_config(args: argparse.Namespace) -> BenchConfig:
    try:
        train = bench_train_settings(**_train_overrides(args.overrides))
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigError(f"--set train.*: {exc}") from None
    bank, evaluation = _bank_and_eval(args.overrides)
    return BenchConfig(
        bank=bank,
        eval=evaluation,
        memories=_memories(args.memories) if args.memories else DEFAULT_MEMORIES,
        seeds=args.seeds,
        methods=_methods(args.methods),
        train=train,
        model=_model_overrides(args.overrides),
        ema_decay=_ema_decay(args),
    )


def run_bench_forgetting(
    args: argparse.Namespace,
    cfg: BenchConfig | None = None,
    stem: str = "forgetting",
    class_names: tuple[str, ...] | None = None,
) -> int:
    cfg = cfg or bench_config(args)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    bar = ProgressBar(count_runs(cfg))

    def progress(r: RunResult) -> None:
        bar.update(r)
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
    paths = write_report(results, cfg, args.out, wall, stem, class_names)
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


def run_compare(args: argparse.Namespace, settings: Settings) -> int:
    """``compare SOURCE``: split-digits is the forgetting benchmark (its defaults and data);
    a file or a topic slice brings its own dimension, classes and order (compare.py)."""
    overrides = _train_overrides(args.overrides)
    loss_terms = overrides.pop("loss_terms", None) or dict(settings.train.loss_terms)
    if args.source == "split-digits":
        args.memories = args.memories or ",".join(map(str, DEFAULT_MEMORIES))
        args.seeds = args.seeds or 5
        return run_bench_forgetting(args, stem="compare")
    if args.source.startswith(TOPIC_SOURCE):
        topic = args.source[len(TOPIC_SOURCE) :]
        options = settings.kafka.client_options()
        stream = load_topic_stream(options, topic, args.start_from, args.until)
    elif args.source in SCENARIOS:
        stream = load_scenario_stream(args.source)
    elif Path(args.source).is_file():
        stream = load_file_stream(Path(args.source))
    else:
        raise ConfigError(
            f"compare: {args.source!r} is not a built-in scenario ({', '.join(SCENARIOS)}), "
            f"a readable file or {TOPIC_SOURCE}NAME"
        )
    check_stream(stream)
    if stream.skipped:
        log.warning("compare: events left out", source=stream.name, **stream.skipped)
    extra = (loss_terms_method(loss_terms),) if loss_terms else ()
    default_methods = COMPARE_METHODS + tuple(m.name for m in extra)
    try:
        train = bench_train_settings(**overrides)
    except ValueError as exc:
        raise ConfigError(f"--set train.*: {exc}") from None
    first = make_split(stream, 0)
    bank, evaluation = _bank_and_eval(args.overrides)
    cfg = BenchConfig(
        bank=bank,
        eval=evaluation,
        memories=_memories(args.memories) if args.memories else COMPARE_MEMORIES,
        seeds=args.seeds or COMPARE_SEEDS,
        methods=_methods(args.methods, default_methods),
        train=train,
        model=_model_overrides(args.overrides),
        eval_every=eval_every(first, 10),
        data=lambda seed: first if seed == 0 else make_split(stream, seed),
        data_name=stream.name,
        extra_methods=extra,
        ema_decay=_ema_decay(args),
    )
    if "loss_terms" in cfg.methods and not extra:
        raise ConfigError("--methods loss_terms needs train.loss_terms (-c or --set)")
    log.info(
        "compare starting",
        source=stream.name,
        events=len(stream.labels),
        input_dim=first.input_dim,
        classes=first.n_classes,
        tasks=len(set(first.task_names)),
        runs=count_runs(cfg),
    )
    return run_bench_forgetting(args, cfg, "compare", first.class_names)
